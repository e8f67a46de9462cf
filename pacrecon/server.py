"""Running the app under uvicorn as a daemon."""

from __future__ import annotations

from types import FrameType

import uvicorn
from starlette.applications import Starlette

GRACEFUL_SHUTDOWN_SECONDS = 30


class DaemonServer(uvicorn.Server):
    """uvicorn's server, except that a stop on request is a clean exit.

    uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process
    would die of the signal (status 143); for a daemon that finished its requests
    and committed its work, being asked to stop is success.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve_app(app: Starlette, host: str, port: int) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # ours: structlog, JSON or console
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        lifespan="on",
    )
    DaemonServer(config).run()
