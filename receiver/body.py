"""Reading a request body without ever holding more than the limit."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from receiver.errors import RequestError


async def read_limited_body(request: Request, limit: int) -> bytes:
    return await receive_limited_body(request.headers.get("content-length"), request.receive, limit)


async def receive_limited_body(declared: str | None, receive: Receive, limit: int) -> bytes:
    """The whole body, or `RequestError` 413 as soon as it is known to exceed `limit` bytes
    (from Content-Length before reading, else while streaming); the rest is never read.
    `declared` is the Content-Length header's value, if any."""
    if declared is not None:
        if not declared.isascii() or not declared.strip().isdigit():
            raise RequestError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> RequestError:
    return RequestError(413, "payload_too_large", f"the body exceeds the {limit}-byte limit")
