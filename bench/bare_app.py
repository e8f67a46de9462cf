"""Baseline (a) for bench/ingest.py: a bare Starlette app that only reads the body and
answers 200, served by pacrecon's own `serve_app` so the uvicorn settings are identical."""

from __future__ import annotations

import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pacrecon.server import serve_app


async def webhook(request: Request) -> Response:
    await request.body()
    return JSONResponse({"status": "recorded"})  # the same answer shape pacrecon sends


async def ready(_: Request) -> Response:
    return JSONResponse({"status": "ready"})


def main() -> None:
    app = Starlette(routes=[Route("/webhooks/pacspace", webhook, methods=["POST"]), Route("/readyz", ready)])
    serve_app(app, "127.0.0.1", int(sys.argv[1]))


if __name__ == "__main__":
    main()
