"""The composition root: one validated `Settings` in, one Starlette app out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio.to_thread
from starlette.applications import Starlette

from pacrecon.settings import Settings
from receiver.errors import EXCEPTION_HANDLERS
from receiver.health import health_routes
from receiver.webhook import WebhookReceiver, webhook_routes
from storage.ledger import Ledger
from storage.sql_ledger import SqlLedger


def open_ledger(settings: Settings) -> SqlLedger:
    # a write may wait out one lock timeout; the deadline leaves room for that and the commit
    deadline = max(30.0, 2 * settings.lock_timeout_ms / 1000 + 5)
    return SqlLedger.from_url(
        settings.database_url, lock_timeout_ms=settings.lock_timeout_ms, write_deadline_seconds=deadline
    )


def create_app(settings: Settings, ledger: Ledger, clock: Callable[[], float] = time.time) -> Starlette:
    """The daemon's ASGI app. It owns `ledger` from here on and closes it at shutdown."""
    receiver = WebhookReceiver(
        ledger=ledger,
        secrets=tuple(s.get_secret_value() for s in settings.webhook_secrets),
        tolerance_seconds=settings.webhook_tolerance_seconds,
        max_body_bytes=settings.max_body_bytes,
        clock=clock,
    )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            # in-flight requests have finished: commit what they submitted, then let go
            await anyio.to_thread.run_sync(ledger.close)

    return Starlette(
        routes=[*health_routes(ledger), *webhook_routes(receiver)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
