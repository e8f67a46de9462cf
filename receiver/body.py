"""Reading a request body without ever holding more than the limit."""

from __future__ import annotations

from starlette.requests import Request

from receiver.errors import RequestError


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The whole body, or `RequestError` 413 as soon as it is known to exceed `limit` bytes
    (from Content-Length before reading, else while streaming); the rest is never read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.strip().isdigit():
            raise RequestError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> RequestError:
    return RequestError(413, "payload_too_large", f"the body exceeds the {limit}-byte limit")
