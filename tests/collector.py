"""A webhook endpoint for the sandbox's own tests: a real uvicorn server in a thread
that keeps every delivery and answers with the statuses it is told to."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.daemon import free_port


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    at: float


@dataclass
class Collector:
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # statuses to answer first, in order; then 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Collector:
        async def hook(request: Request) -> Response:
            self.received.append(Received(await request.body(), dict(request.headers), time.time()))
            return Response(status_code=self.answers.pop(0) if self.answers else 200)

        config = uvicorn.Config(
            Starlette(routes=[Route("/hook", hook, methods=["POST"])]), port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def wait_for(self, count: int, timeout: float = 15, where: object = None) -> list[Received]:
        """Wait until `count` deliveries satisfying `where(received)` have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [r for r in self.received if where is None or where(r)]  # type: ignore[operator]
            if len(matching) >= count or time.monotonic() > deadline:
                return matching
            time.sleep(0.02)
