"""`/admin/...`: the reconciliation report, runs on demand, discrepancies and their resolution.

Bearer `PACRECON_ADMIN_TOKEN` on every route (503 `admin_disabled` without one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time as day_start
from typing import Any

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from receiver.auth import require_bearer
from receiver.body import read_limited_body
from receiver.deltas import exact_json
from receiver.errors import RequestError
from receiver.report_html import CONTENT_SECURITY_POLICY, render_report_html
from receiver.routing import route
from reconciler.report import ReportPage, build_report, discrepancies_csv, discrepancy_view, run_view
from storage import jsonio
from storage.ledger import Ledger
from storage.models import AuditEntry
from storage.report_queries import ReportFilter
from storage.session import LedgerSession
from storage.vocabulary import DiscrepancyKind, DiscrepancyStatus

PAGE_MAX = 1000
NOTE_MAX = 2000
ID_MAX = 2**31 - 1  # row ids are 32-bit integers on PostgreSQL
StartPass = Callable[[Callable[[int], None]], Awaitable[Any]]


@dataclass
class AdminApi:
    ledger: Ledger
    token: SecretStr | None
    start_pass: StartPass | None  # None when no PacSpace API key is configured
    clock: Callable[[], float] = time.time
    _passes: set[asyncio.Task[Any]] = field(default_factory=set)

    def _authorize(self, request: Request) -> None:
        require_bearer(request, self.token, disabled_code="admin_disabled", setting="PACRECON_ADMIN_TOKEN")

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def report(self, request: Request) -> Response:
        self._authorize(request)
        query = request.query_params
        form = _format(request)
        where = report_filter(query)
        page = ReportPage(
            discrepancy_limit=_int(query, "discrepancy_limit", 100, 1, PAGE_MAX),
            discrepancy_after=_int(query, "discrepancy_cursor", None, 0, ID_MAX),
            customer_limit=_int(query, "customer_limit", 100, 1, PAGE_MAX),
            customer_after=_text(query, "customer_cursor"),
        )
        now = self._now()
        if form == "csv":  # every open row the filters select, not one page
            rows = await self.ledger.read(lambda s: [discrepancy_view(r) for r in s.report().all_discrepancies(where, status="open")])
            return Response(discrepancies_csv(rows), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": 'attachment; filename="discrepancies.csv"'})
        report = await self.ledger.read(lambda s: build_report(s, where, page, now))
        if form == "html":
            return HTMLResponse(render_report_html(report), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})
        return exact_json(report)

    async def start_run(self, request: Request) -> Response:
        self._authorize(request)
        if self.start_pass is None:
            raise RequestError(503, "pacspace_not_configured", "set PACRECON_PACSPACE_API_KEY to reconcile")
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self.start_pass(lambda run_id: started.done() or started.set_result(run_id)))
        self._passes.add(task)  # held until done: a task nobody references may be collected
        task.add_done_callback(self._passes.discard)
        await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            run_id = started.result()
            return exact_json({"run_id": run_id, "status": "running", "href": f"/admin/reconciliation/runs/{run_id}"}, 202)
        summary = task.result()
        if getattr(summary, "skipped", None):
            raise RequestError(409, "pass_running", "another reconciliation pass is running; try again when it ends")
        raise RequestError(503, "pass_not_started", f"the pass could not start: {getattr(summary, 'error_detail', None)}")

    async def list_runs(self, request: Request) -> Response:
        self._authorize(request)
        limit = _int(request.query_params, "limit", 50, 1, PAGE_MAX)
        before = _int(request.query_params, "cursor", None, 1, ID_MAX)
        runs = await self.ledger.read(lambda s: [run_view(r) for r in s.report().runs(before, limit)])
        return exact_json({"runs": runs, "next_cursor": str(runs[-1]["id"]) if len(runs) == limit else None})

    async def get_run(self, request: Request) -> Response:
        self._authorize(request)
        run_id = _path_id(request, "run_id")
        run = await self.ledger.read(lambda s: (lambda r: run_view(r) if r else None)(s.get_run(run_id)))
        if run is None:
            raise RequestError(404, "not_found", f"no reconciliation run {run_id}")
        return exact_json(run)

    async def list_discrepancies(self, request: Request) -> Response:
        self._authorize(request)
        query = request.query_params
        kind = _choice(query, "kind", [k.value for k in DiscrepancyKind], None)
        status = _choice(query, "status", [s.value for s in DiscrepancyStatus] + ["all"], DiscrepancyStatus.OPEN.value)
        limit = _int(query, "limit", 100, 1, PAGE_MAX)
        after = _int(query, "cursor", None, 0, ID_MAX)
        where = ReportFilter(customer_id=_text(query, "customer_id"))
        rows = await self.ledger.read(
            lambda s: [discrepancy_view(r) for r in s.report().discrepancies(
                where, kind=kind, status=None if status == "all" else status, after_id=after, limit=limit)]
        )
        return exact_json({"discrepancies": rows, "next_cursor": str(rows[-1]["id"]) if len(rows) == limit else None})

    async def resolve(self, request: Request) -> Response:
        self._authorize(request)
        discrepancy_id = _path_id(request, "discrepancy_id")
        note = _note(await read_limited_body(request, 64 * 1024))
        now = self._now()

        def work(session: LedgerSession) -> dict[str, Any] | str:
            existing = session.report().get_discrepancy(discrepancy_id)
            if existing is None:
                return "missing"
            row = session.resolve_discrepancy(discrepancy_id, note, now)
            if row is None:
                return "not_open"
            session.add_audit(AuditEntry(
                at=now, actor="admin", action="resolve", delta_id=row.delta_id, discrepancy_id=row.id,
                before={"status": DiscrepancyStatus.OPEN.value}, after={"status": row.status}, note=note,
            ))
            return discrepancy_view(row)

        outcome = await self.ledger.transact(work)
        if outcome == "missing":
            raise RequestError(404, "not_found", f"no discrepancy {discrepancy_id}")
        if outcome == "not_open":
            raise RequestError(409, "not_open", f"discrepancy {discrepancy_id} is not open")
        return exact_json(outcome)

    def routes(self) -> list[Route]:
        return [
            Route("/admin/reconciliation/report", self.report, methods=["GET"]),
            route("/admin/reconciliation/runs", {"POST": self.start_run, "GET": self.list_runs}),
            Route("/admin/reconciliation/runs/{run_id}", self.get_run, methods=["GET"]),
            Route("/admin/discrepancies", self.list_discrepancies, methods=["GET"]),
            Route("/admin/discrepancies/{discrepancy_id}/resolve", self.resolve, methods=["POST"]),
        ]


def report_filter(query: Any) -> ReportFilter:
    since, until = _time(query, "since"), _time(query, "until")
    if since and until and since >= until:
        raise RequestError(400, "invalid_parameter", "since must be before until")
    return ReportFilter(customer_id=_text(query, "customer_id"), since=since, until=until)


def _text(query: Any, name: str) -> str | None:
    """A free-text parameter; empty is absent, and text the ledger cannot hold is refused."""
    raw = query.get(name)
    if not raw:
        return None
    if len(raw) > 300 or jsonio.storable_text_error(raw):
        raise RequestError(400, "invalid_parameter", f"{name} must be at most 300 characters of text")
    return str(raw)


def _format(request: Request) -> str:
    asked = request.query_params.get("format")
    if asked is None:
        return "html" if "text/html" in request.headers.get("accept", "") else "json"
    if asked not in ("json", "csv", "html"):
        raise RequestError(400, "invalid_parameter", f"format must be json, csv or html, not {asked[:40]!r}")
    return asked


def _int(query: Any, name: str, default: int | None, low: int, high: int | None) -> Any:
    raw = query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise RequestError(400, "invalid_parameter", f"{name} must be a whole number, not {raw[:40]!r}")
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise RequestError(400, "invalid_parameter", f"{name} must be between {low} and {high}" if high else f"{name} must be at least {low}")
    return value


def _choice(query: Any, name: str, allowed: list[str], default: str | None) -> str | None:
    raw = query.get(name)
    if raw in (None, ""):
        return default
    if raw not in allowed:
        raise RequestError(400, "invalid_parameter", f"{name} must be one of {', '.join(allowed)}")
    return str(raw)


def _time(query: Any, name: str) -> datetime | None:
    raw = query.get(name)
    if raw in (None, ""):
        return None
    try:
        if len(raw) == 10:
            moment = datetime.combine(date.fromisoformat(raw), day_start())
        else:
            moment = datetime.fromisoformat(raw)
        # a time without an offset is UTC, as every time in the ledger
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: an offset that moves it past year 1 or 9999
        raise RequestError(400, "invalid_parameter", f"{name} must be an ISO 8601 date or time, e.g. 2026-11-01 or 2026-11-01T12:00:00Z") from None


def _path_id(request: Request, name: str) -> int:
    raw = request.path_params[name]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > ID_MAX:
        raise RequestError(404, "not_found", f"no such id {raw[:40]!r}")
    return int(raw)


def _note(body: bytes) -> str:
    try:
        data = jsonio.loads(body) if body else None
    except (ValueError, RecursionError):
        raise RequestError(400, "invalid_json", "the body must be JSON: {\"note\": \"why it is resolved\"}") from None
    note = data.get("note") if isinstance(data, dict) else None
    if not isinstance(note, str) or not note.strip():
        raise RequestError(400, "note_required", "a resolution needs a note: {\"note\": \"why it is resolved\"}")
    if len(note) > NOTE_MAX or jsonio.storable_text_error(note):
        raise RequestError(400, "invalid_note", f"the note must be at most {NOTE_MAX} characters of text")
    return note.strip()
