"""`/healthz` (the process answers; no database, so a database outage restarts nothing) and
`/readyz` (the ledger is reachable and migrated, webhooks can be recorded, and the process
is not stopping)."""

from __future__ import annotations

from collections.abc import Callable

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from receiver.errors import error_response
from storage.errors import SchemaNotCurrent, StorageUnavailable
from storage.ledger import Ledger


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


def readiness_route(ledger: Ledger, stopping: Callable[[], bool] = lambda: False, can_record: Callable[[], None] = lambda: None) -> Route:
    async def readyz(_: Request) -> Response:
        if stopping():
            return error_response(503, "shutting_down", "this instance is shutting down")
        try:
            can_record()  # the webhook writer (StorageUnavailable while it is being restarted)
            revision = await anyio.to_thread.run_sync(ledger.check_schema)
        except StorageUnavailable as exc:
            return error_response(503, "storage_unavailable", str(exc))
        except SchemaNotCurrent as exc:
            return error_response(503, "schema_not_current", str(exc))
        return JSONResponse({"status": "ready", "schema_revision": revision})

    return Route("/readyz", readyz, methods=["GET"])


def health_routes(ledger: Ledger, stopping: Callable[[], bool] = lambda: False, can_record: Callable[[], None] = lambda: None) -> list[Route]:
    return [Route("/healthz", healthz, methods=["GET"]), readiness_route(ledger, stopping, can_record)]
