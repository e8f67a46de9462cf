"""The stop sequence: what SIGTERM sets off before the server closes its sockets.

At once: `/readyz` answers 503, and requests that would change something are refused
with 503 (no new work). Then the stop callbacks run (the scheduler starts nothing new;
a running pass stops after its current page), and the drain waits, up to a deadline,
for the work already in flight (requests and scheduled jobs) to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from receiver.errors import error_response

log = structlog.get_logger("pacrecon.lifecycle")

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
RETRY_AFTER_SECONDS = 5
# writes in flight (webhooks, API calls) from which background work (a reconciliation pass)
# waits for them; at a few thousand webhooks a second, each answered in a few ms, ~10 are
BUSY_IN_FLIGHT = 32


class Lifecycle:
    def __init__(self) -> None:
        self.stopping = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_stop: list[Callable[[], Awaitable[None] | None]] = []

    def request_stop(self) -> None:
        """Safe from a signal handler: only a flag, read by the gate and `/readyz`."""
        self.stopping = True

    def on_stop(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        self._on_stop.append(callback)

    @contextlib.asynccontextmanager
    async def work(self) -> AsyncIterator[None]:
        """Marks a unit of work that the drain waits for."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self) -> None:
        """A unit of work starts (`work()`, without a context manager's cost per request)."""
        self._in_flight += 1
        if self._in_flight == 1:
            self._idle.clear()

    def end(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    def busy(self) -> bool:
        """Whether the requests in flight are many (BUSY_IN_FLIGHT): they come first."""
        return self._in_flight >= BUSY_IN_FLIGHT

    def tracked(self, job: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """A scheduled job that starts nothing once stopping, and is waited for when running."""

        async def run() -> Any:
            if self.stopping:
                return None
            async with self.work():
                return await job()

        return run

    async def drain(self, timeout: float) -> bool:
        """Stop taking work, run the stop callbacks, wait for work in flight. False when
        `timeout` passed first (what is left is cancelled by the server's shutdown)."""
        self.request_stop()
        for callback in self._on_stop:
            outcome = callback()
            if inspect.isawaitable(outcome):
                await outcome
        log.info("draining", in_flight=self._in_flight)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("drain_timed_out", in_flight=self._in_flight, timeout_seconds=timeout)
            return False
        return True


class StopGate:
    """ASGI middleware: while stopping, a request that would change something gets 503
    (the sender retries later, or at another replica); the rest is counted as work."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, refused: Callable[[Scope], None] = lambda scope: None) -> None:
        self.app, self.lifecycle = app, lifecycle
        self.refused = refused  # told of each request refused while stopping (metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in READ_ONLY_METHODS:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.stopping:
            response = error_response(503, "shutting_down", "this instance is shutting down; try again shortly",
                                      {"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"})
            self.refused(scope)
            await response(scope, receive, send)
            return
        self.lifecycle.begin()
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.end()
