"""Every error the HTTP surface answers, in one table: class or status to code and status.

Bodies are always `{"error": {"code": ..., "message": ...}}`; no traceback ever
reaches a client or the log for something a client sent.
"""

from __future__ import annotations

from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from receiver.signature import SignatureError
from reconciler.errors import InvalidEvent
from storage.errors import SchemaNotCurrent, StorageUnavailable

log = structlog.get_logger("pacrecon.http")


class RequestError(Exception):
    """A request we refuse, with the status and the code to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def _request_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error_response(exc.status, exc.code, exc.message)


async def _signature_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignatureError)
    return error_response(401, exc.code, exc.message)


async def _invalid_event(_: Request, exc: Exception) -> Response:
    return error_response(400, "invalid_payload", str(exc))


async def _storage_unavailable(_: Request, exc: Exception) -> Response:
    log.warning("storage_unavailable", error=str(exc))
    # PacSpace retries what is not acknowledged: tell it to come back soon
    return error_response(503, "storage_unavailable", "the ledger cannot record this now; retry later", {"Retry-After": "5"})


async def _schema_not_current(_: Request, exc: Exception) -> Response:
    return error_response(503, "schema_not_current", str(exc))


async def _client_disconnect(_: Request, __: Exception) -> Response:
    return error_response(400, "client_disconnected", "the client went away before the body was read")


async def _http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


async def _internal_error(_: Request, __: Exception) -> Response:
    # Starlette logs the exception itself; the client learns nothing of the internals
    return error_response(500, "internal_error", "an internal error occurred")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    500: _internal_error,
    RequestError: _request_error,
    SignatureError: _signature_error,
    InvalidEvent: _invalid_event,
    StorageUnavailable: _storage_unavailable,
    SchemaNotCurrent: _schema_not_current,
    ClientDisconnect: _client_disconnect,
    HTTPException: _http_exception,
}


async def answer_error(exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer `exc` as the app's handlers above would: for the routes that are plain ASGI
    apps (no exception layer between them and uvicorn). Unknown errors are raised on."""
    handler = next((EXCEPTION_HANDLERS[kind] for kind in type(exc).__mro__ if kind in EXCEPTION_HANDLERS), None)
    if handler is None:
        raise exc
    response = await handler(Request(scope), exc)
    await response(scope, receive, send)
