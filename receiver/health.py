"""`/healthz` (the process answers) and `/readyz` (the ledger is reachable and migrated)."""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from receiver.errors import error_response
from storage.errors import SchemaNotCurrent, StorageUnavailable
from storage.ledger import Ledger


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


def readiness_route(ledger: Ledger) -> Route:
    async def readyz(_: Request) -> Response:
        try:
            revision = await anyio.to_thread.run_sync(ledger.check_schema)
        except StorageUnavailable as exc:
            return error_response(503, "storage_unavailable", str(exc))
        except SchemaNotCurrent as exc:
            return error_response(503, "schema_not_current", str(exc))
        return JSONResponse({"status": "ready", "schema_revision": revision})

    return Route("/readyz", readyz, methods=["GET"])


def health_routes(ledger: Ledger) -> list[Route]:
    return [Route("/healthz", healthz, methods=["GET"]), readiness_route(ledger)]
