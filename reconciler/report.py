"""The reconciliation report: is every delta accounted for, and what is not.

One function builds it from the ledger as plain, JSON-ready data (amounts stay
`Decimal`); the HTTP routes and `pacrecon report` render that same data as JSON,
CSV, HTML or a terminal table.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from storage.models import Discrepancy, ReconciliationRun
from storage.report_queries import PERCENTILES, ReportFilter, count_by
from storage.session import LedgerSession
from storage.vocabulary import DeltaStatus, DiscrepancyKind

CHART_DAYS = 30
CSV_COLUMNS = (
    "id", "kind", "status", "subject", "delta_id", "anchor_id", "customer_id", "event_id", "detected_by",
    "field", "ours", "theirs", "detail", "occurrences", "first_seen_at", "last_seen_at", "run_id",
)


@dataclass(frozen=True)
class ReportPage:
    """Which page of the report's two lists to include."""

    discrepancy_limit: int = 100
    discrepancy_after: int | None = None
    customer_limit: int = 100
    customer_after: str | None = None


def build_report(session: LedgerSession, where: ReportFilter, page: ReportPage, now: datetime) -> dict[str, Any]:
    queries = session.report()
    queries.one_snapshot()  # every section from the same moment
    totals = queries.totals_by_status(where)
    open_by_kind = queries.open_by_kind(where)
    rows = queries.discrepancies(where, kind=None, status="open", after_id=page.discrepancy_after, limit=page.discrepancy_limit)
    lag = queries.lag(where)
    received, orphans_waiting = queries.events_received(where)
    tallies = queries.tallies(where)
    rejected = count_by(tallies, "rejected")
    customers = queries.customer_totals(where, page.customer_after, page.customer_limit)
    last_run = queries.latest_run()
    unsettled = sum(totals[s].count for s in totals if not DeltaStatus(s).is_terminal) if totals else 0
    open_total = sum(open_by_kind.values())
    return {
        "generated_at": now,
        "filters": {"customer_id": where.customer_id, "since": where.since, "until": where.until},
        "summary": {
            "deltas": sum(t.count for t in totals.values()),
            "unsettled": unsettled,
            "open_discrepancies": open_total,
            # accounted for: every delta settled one way or the other, and nothing left to explain
            "all_accounted_for": unsettled == 0 and open_total == 0,
        },
        "totals": {
            status.value: {
                "count": totals[status.value].count if status.value in totals else 0,
                "amount": totals[status.value].amount if status.value in totals else Decimal(0),
            }
            for status in DeltaStatus
        },
        "discrepancies": {
            "open": open_total,
            "open_by_kind": {kind.value: open_by_kind.get(kind.value, 0) for kind in DiscrepancyKind},
            "rows": [discrepancy_view(row) for row in rows],
            "next_cursor": str(rows[-1].id) if len(rows) == page.discrepancy_limit else None,
            "per_day": [
                {"day": day, "found": found, "still_open": still_open}
                for day, found, still_open in queries.discrepancies_per_day(where, now - timedelta(days=CHART_DAYS))
            ],
        },
        "last_run": run_view(last_run) if last_run else None,
        "lag": {
            "verified": lag.count,
            **{f"p{round(p * 100)}_seconds": _seconds(lag.percentiles_ms.get(p)) for p in PERCENTILES},
            "max_seconds": _seconds(lag.max_ms),
            "histogram": [{"below_seconds": _seconds(bound), "count": count} for bound, count in lag.histogram],
        },
        "webhooks": {
            "received": received,
            "orphans_waiting": orphans_waiting,
            "duplicates": sum(count_by(tallies, "duplicate").values()),
            "unavailable": sum(count_by(tallies, "unavailable").values()),
            "rejected": sum(rejected.values()),
            "rejected_by_reason": dict(sorted(rejected.items())),
        },
        "customers": {
            "rows": [
                {
                    "customer_id": c.customer_id,
                    "deltas": c.deltas,
                    "local_amount": c.local_amount,
                    "verified_deltas": c.verified_deltas,
                    "verified_amount": c.verified_amount,
                    "unverified_amount": c.local_amount - c.verified_amount,
                }
                for c in customers
            ],
            "next_cursor": customers[-1].customer_id if len(customers) == page.customer_limit else None,
        },
    }


def _seconds(ms: int | None) -> Decimal | None:
    return None if ms is None else Decimal(ms).scaleb(-3)


def discrepancy_view(row: Discrepancy) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "status": row.status,
        "subject": row.subject,
        "delta_id": row.delta_id,
        "anchor_id": row.anchor_id,
        "customer_id": row.customer_id,
        "event_id": row.event_id,
        "run_id": row.run_id,
        "detected_by": row.detected_by,
        "evidence": row.evidence,
        "occurrences": row.occurrences,
        "first_seen_at": row.first_seen_at,
        "last_seen_at": row.last_seen_at,
        "resolved_at": row.resolved_at,
        "resolution_note": row.resolution_note,
    }


def run_view(run: ReconciliationRun) -> dict[str, Any]:
    duration = (run.finished_at - run.started_at).total_seconds() if run.finished_at else None
    return {
        "id": run.id,
        "status": run.status,
        "dry_run": run.dry_run,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "duration_seconds": duration,
        "checked": run.checked,
        "fixed": run.fixed,
        "errors": run.errors,
        "found": run.found,
        "error_detail": run.error_detail,
    }


def discrepancies_csv(rows: list[dict[str, Any]]) -> str:
    """The discrepancy rows as CSV, evidence spread into field / ours / theirs / detail."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        evidence = row.get("evidence") or {}
        flat = {**row, **{k: evidence.get(k) for k in ("field", "ours", "theirs", "detail")}}
        writer.writerow([_cell(flat.get(column)) for column in CSV_COLUMNS])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    text = value if isinstance(value, str) else str(value)
    # a cell a spreadsheet would run as a formula is quoted as text
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _is_number(text) else text


def _is_number(text: str) -> bool:
    try:
        Decimal(text)
    except ArithmeticError:
        return False
    return True


def report_table(report: dict[str, Any]) -> str:
    """The report for a terminal: aligned columns, one section after another."""
    lines: list[str] = []
    summary = report["summary"]
    verdict = "every delta is accounted for" if summary["all_accounted_for"] else (
        f"{summary['unsettled']} unsettled, {summary['open_discrepancies']} open discrepancies")
    lines += [f"Reconciliation report, {report['generated_at'].isoformat()}: {summary['deltas']} deltas; {verdict}", ""]
    lines += _table(["status", "deltas", "amount"],
                    [[s, str(t["count"]), str(t["amount"])] for s, t in report["totals"].items() if t["count"]])
    kinds = [[k, str(n)] for k, n in report["discrepancies"]["open_by_kind"].items() if n]
    lines += ["", "Open discrepancies" + ("" if kinds else ": none")]
    if kinds:
        lines += _table(["kind", "open"], kinds)
        lines += [""] + _table(
            ["id", "kind", "subject", "customer", "field", "ours", "theirs"],
            [[str(r["id"]), r["kind"], r["subject"], r["customer_id"] or "", *(_short((r["evidence"] or {}).get(k)) for k in ("field", "ours", "theirs"))]
             for r in report["discrepancies"]["rows"]],
        )
    run = report["last_run"]
    lines += ["", "Last reconciliation run: " + (
        f"#{run['id']} {run['status']} at {run['started_at'].isoformat()}, checked {run['checked']}, fixed {run['fixed']}, errors {run['errors']}"
        if run else "none yet")]
    lag = report["lag"]
    lines += ["", f"Emit to verified ({lag['verified']} verified): p50 {lag['p50_seconds']} s, p95 {lag['p95_seconds']} s, "
                  f"p99 {lag['p99_seconds']} s, max {lag['max_seconds']} s"]
    hooks = report["webhooks"]
    lines += [f"Webhooks: {hooks['received']} recorded, {hooks['duplicates']} duplicates, {hooks['rejected']} rejected"
              + (" (" + ", ".join(f"{k} {v}" for k, v in hooks["rejected_by_reason"].items()) + ")" if hooks["rejected"] else "")
              + f", {hooks['orphans_waiting']} orphans waiting"]
    return "\n".join(lines) + "\n"


def _short(value: Any, width: int = 24) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
