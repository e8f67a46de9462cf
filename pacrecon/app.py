"""The composition root: one validated `Settings` in, one Starlette app out."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio.to_thread
import httpx
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import Scope

from pacrecon.lifecycle import Lifecycle, StopGate
from pacrecon.metrics import Metrics, MetricsEndpoint
from pacrecon.settings import Settings
from receiver.admin import AdminApi
from receiver.deltas import DeltasApi
from receiver.errors import EXCEPTION_HANDLERS
from receiver.health import health_routes
from receiver.openapi import openapi_routes
from receiver.recorder import Recorder
from receiver.webhook import PATH as WEBHOOK_PATH
from receiver.webhook import WebhookFastPath, WebhookReceiver, webhook_routes
from receiver.webhook_tally import WebhookTally
from reconciler.errors import PacSpaceError
from reconciler.outbox import Outbox
from reconciler.pacspace import PacSpaceClient, RetryPolicy
from reconciler.pages import LedgerPages, PageWriter
from reconciler.reconcile import PassSummary, Reconciler
from storage.errors import StorageUnavailable
from storage.session import LedgerSession
from storage.sql_ledger import SqlLedger


log = structlog.get_logger("pacrecon.app")
TALLY_FLUSH_SECONDS = 10
ROLLUP_FOLD_SECONDS = 10  # PostgreSQL's rollup journal is folded in this often (the report reads it meanwhile)


def open_ledger(settings: Settings) -> SqlLedger:
    return SqlLedger.from_url(
        settings.database_url, lock_timeout_ms=settings.lock_timeout_ms, write_deadline_seconds=settings.write_deadline_seconds()
    )


def open_pacspace(
    settings: Settings, observe: Callable[[str, str], None] | None = None
) -> tuple[httpx.AsyncClient, PacSpaceClient | None]:
    """The one pooled HTTP client, and PacSpace over it (None without an API key)."""
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.pacspace_timeout_seconds, connect=min(5.0, settings.pacspace_timeout_seconds)),
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
    )
    if settings.pacspace_api_key is None:
        return http, None
    return http, PacSpaceClient(http, settings.pacspace_base_url, settings.pacspace_api_key.get_secret_value(), observe=observe)


def create_app(
    settings: Settings, ledger: SqlLedger, recorder: Recorder, clock: Callable[[], float] = time.time
) -> Starlette:
    """The daemon's ASGI app. It owns `ledger` and `recorder` from here on; its lifespan
    owns the HTTP client and the scheduler, and closes them all at shutdown."""
    metrics, tally = Metrics(), WebhookTally()

    def observe_webhook(outcome: str, reason: str, seconds: float) -> None:
        metrics.webhook(outcome, reason, seconds)
        tally.count(outcome, reason, clock)

    receiver = WebhookReceiver(
        recorder=recorder,
        secrets=tuple(s.get_secret_value() for s in settings.webhook_secrets),
        tolerance_seconds=settings.webhook_tolerance_seconds,
        max_body_bytes=settings.max_body_bytes,
        clock=clock,
        observe=observe_webhook,
    )
    http, pacspace = open_pacspace(settings, metrics.upstream_request)
    outbox = (
        Outbox(
            ledger,
            pacspace,
            lease_seconds=settings.outbox_lease_seconds,
            resend_base_seconds=settings.outbox_retry_interval_seconds,
            clock=clock,
        )
        if pacspace
        else None
    )
    deltas = DeltasApi(ledger=ledger, outbox=outbox, token=settings.api_token, max_body_bytes=settings.max_body_bytes)
    scheduler = AsyncIOScheduler(timezone="UTC")
    lifecycle = Lifecycle()
    jobs: list[tuple[str, Callable[[], Awaitable[Any]], float]] = [
        ("webhook_tally", partial(tally.flush, ledger), TALLY_FLUSH_SECONDS),
        ("rollup_fold", partial(ledger.transact, LedgerSession.fold_rollup), ROLLUP_FOLD_SECONDS),
    ]
    start_pass: Callable[[Callable[[int], None] | None], Awaitable[PassSummary]] | None = None
    if outbox is not None and pacspace is not None:
        reconciler = make_reconciler(settings, ledger, pacspace, clock, foreground_busy=lifecycle.busy)
        lifecycle.on_stop(reconciler.request_stop)

        async def run_pass(on_started: Callable[[int], None] | None = None) -> PassSummary:
            async with lifecycle.work():  # a pass asked for by an admin is drained too
                summary = await reconciler.run_pass(on_started=on_started)
            duration = (summary.finished_at - summary.started_at).total_seconds() if summary.finished_at and summary.started_at else None
            metrics.run(summary.status, duration)
            return summary

        jobs += [
            ("outbox_resend", outbox.resend_due, settings.outbox_retry_interval_seconds),
            ("reconcile", run_pass, settings.reconcile_interval_seconds),
        ]
        start_pass = run_pass
    for name, job, seconds in jobs:
        # max_instances=1 and coalescing: never two runs of a job at once, no backlog
        scheduler.add_job(_logged(lifecycle.tracked(job), name), "interval", seconds=seconds, id=name, max_instances=1, coalesce=True)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await recorder.start()  # the writer process (ready already) is handed to the event loop
        scheduler.start()
        try:
            yield
        finally:
            scheduler.shutdown(wait=False)
            await recorder.close()  # the webhooks in flight were drained through it
            with contextlib.suppress(StorageUnavailable):
                await tally.flush(ledger)
            await http.aclose()
            # in-flight requests have finished: commit what they submitted, then let go
            await anyio.to_thread.run_sync(ledger.close)

    admin = AdminApi(ledger=ledger, token=settings.admin_token, start_pass=start_pass, clock=clock)
    routes = [
        *health_routes(ledger, lambda: lifecycle.stopping, recorder.check),
        *webhook_routes(receiver),
        *deltas.routes(),
        *admin.routes(),
        *MetricsEndpoint(metrics, ledger).routes(),
    ]
    app = Starlette(
        routes=[*routes, *openapi_routes(routes)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
        # the gate first: a webhook on the fast path is refused and drained like any request
        middleware=[
            Middleware(StopGate, lifecycle=lifecycle, refused=partial(_count_refused_webhook, metrics)),
            Middleware(WebhookFastPath, receiver=receiver),
        ],
    )
    app.state.lifecycle = lifecycle  # for the server: SIGTERM starts the stop sequence
    return app


def _count_refused_webhook(metrics: Metrics, scope: Scope) -> None:
    """A delivery the stop gate refused is one PacSpace will retry: counted as unavailable
    (not in the ledger's tally, whose "unavailable" means the ledger was away)."""
    if scope.get("path") == WEBHOOK_PATH:
        metrics.webhook("unavailable", "", 0.0)


def make_reconciler(settings: Settings, ledger: SqlLedger, pacspace: PacSpaceClient, clock: Callable[[], float] = time.time,
                    foreground_busy: Callable[[], bool] | None = None) -> Reconciler:
    # the pass waits out 429/503 itself, for all its lookups at once: one retry per call is enough
    return Reconciler(
        ledger,
        pacspace.with_retry(RetryPolicy(attempts=2)),
        stale_after_seconds=settings.stale_after_seconds,
        stuck_after_seconds=settings.stuck_after_seconds,
        concurrency=settings.reconcile_concurrency,
        clock=clock,
        foreground_busy=foreground_busy,
        yield_share=settings.yield_share(),
        pages_for=page_writers(settings, ledger),
    )


def page_writers(settings: Settings, ledger: SqlLedger) -> Callable[[bool], PageWriter] | None:
    """Who writes a pass's pages (PACRECON_RECONCILE_WRITER), given whether its first page is
    full: "thread", the ledger's own writer (None); "process", a child process
    (`pacrecon.page_writer`) always; "auto", a child for a pass of a full page or more, the
    ledger's writer for a smaller one (a child's start, about a second of CPU, would cost it
    more than it saves) or when the child cannot start."""
    if settings.reconcile_writer == "thread":
        return None
    from pacrecon.page_writer import PagesOrInProcess, ProcessPages
    from pacrecon.writer_child import WriterConfig

    start = partial(ProcessPages, WriterConfig.of(settings), deadline_seconds=settings.write_deadline_seconds())
    always = settings.reconcile_writer == "process"

    def pages_for(full: bool) -> PageWriter:
        if always:
            return start()
        return PagesOrInProcess(start, LedgerPages(ledger)) if full else LedgerPages(ledger)

    return pages_for


def _logged(job: Callable[[], Awaitable[Any]], name: str) -> Callable[[], Awaitable[None]]:
    """A scheduled job whose failures are one log line (PacSpace or the ledger being away
    is expected; the next run tries again), never a traceback."""

    async def run() -> None:
        try:
            result = await job()
        except (StorageUnavailable, PacSpaceError) as exc:
            log.warning("job_failed", job=name, error=str(exc))
        else:
            if isinstance(result, int) and result:
                log.info("job_done", job=name, count=result)

    return run
