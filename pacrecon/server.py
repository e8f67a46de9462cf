"""Running the app under uvicorn as a daemon: one process, one worker (scale with
processes or pods: each keeps its own metrics and its own scheduler)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import socket
import time
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from pacrecon.http_protocol import OneSendHttpToolsProtocol
from pacrecon.lifecycle import Lifecycle
from pacrecon.systemd import SystemdNotifier

GRACEFUL_SHUTDOWN_SECONDS = 30  # from SIGTERM to exit; deploy/ gives the platforms a little more


class DaemonServer(uvicorn.Server):
    """uvicorn's server, plus the daemon's lifecycle.

    - A stop on request is a clean exit: uvicorn re-raises SIGTERM/SIGINT after its
      graceful shutdown, so the process would die of the signal (status 143); for a
      daemon that finished its requests and committed its work, that is success.
    - On the signal, the app's `Lifecycle` stops taking work at once, and the work in
      flight is drained before uvicorn closes its sockets; all within
      GRACEFUL_SHUTDOWN_SECONDS.
    - Under systemd (NOTIFY_SOCKET): READY=1 once bound, WATCHDOG=1 from the event loop,
      STOPPING=1 on the signal.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle | None,
                 notifier: SystemdNotifier | None) -> None:
        super().__init__(config)
        self.lifecycle, self.notifier = lifecycle, notifier
        self._watchdog: asyncio.Task[None] | None = None
        self._stop_asked_at: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            _freeze_startup_objects()
        if self.started and self.notifier is not None:
            self.notifier.notify(f"READY=1\nSTATUS=serving on {self.config.host}:{self.config.port}")
            if self.notifier.watchdog_seconds:
                self._watchdog = asyncio.create_task(self._ping(self.notifier, self.notifier.watchdog_seconds))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_asked_at is None:
            self._stop_asked_at = time.monotonic()
            if self.lifecycle is not None:
                self.lifecycle.request_stop()
            if self.notifier is not None:
                self.notifier.notify("STOPPING=1")
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = (self._stop_asked_at or time.monotonic()) + GRACEFUL_SHUTDOWN_SECONDS
        if self.lifecycle is not None:
            await self.lifecycle.drain(max(0.0, deadline - time.monotonic()))
        # uvicorn waits for what is left (reads) with what is left of the grace period
        self.config.timeout_graceful_shutdown = max(1, math.floor(deadline - time.monotonic()))
        try:
            await super().shutdown(sockets)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watchdog

    @staticmethod
    async def _ping(notifier: SystemdNotifier, seconds: float) -> None:
        # a task on the event loop: when the loop is stuck, the pings stop and systemd restarts us
        while True:
            notifier.notify("WATCHDOG=1")
            await asyncio.sleep(seconds)


def _freeze_startup_objects() -> None:
    """Everything alive once the app is up (modules, the ORM's metadata, compiled SQL...) is
    kept for the process's life: out of the collector's sight, a full collection under load
    walks only what requests made. Measured: 2-4 ms instead of 70-120 ms per full collection,
    each of which held every request in flight (bench/RESULTS.md). No collection first: it
    found 66 unreachable objects of 115 000 and held the loop ~50 ms before `/readyz`."""
    gc.freeze()


def server_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings for the daemon (and for bench/bare_app.py, its baseline)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # ours: structlog, JSON or console
        # no access line per request: the routes log what happened (the webhook line says
        # which event and its outcome), and a second line per request cost as much as the first
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        lifespan="on",
        workers=1,
        http=OneSendHttpToolsProtocol,  # each answer in one send, not two (pacrecon.http_protocol)
    )


def serve_app(app: Starlette, host: str, port: int) -> None:
    config = server_config(app, host, port)
    lifecycle = getattr(app.state, "lifecycle", None)
    notifier = SystemdNotifier.from_environment()
    try:
        DaemonServer(config, lifecycle, notifier).run()
    finally:
        if notifier is not None:
            notifier.close()
