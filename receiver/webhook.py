"""`POST /webhooks/pacspace`: verify, then parse and record durably (the recorder), then acknowledge.

The hot path of the daemon, so it is a plain ASGI app: no Request object, no framework
layer between uvicorn and the ledger (`WebhookFastPath` puts it in front of Starlette's
routing). It answers every error it knows itself, in the same shapes as
`receiver.errors`; anything else goes up to Starlette's 500 handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from receiver.body import receive_limited_body
from receiver.errors import RequestError, answer_error
from receiver.recorder import Recorder
from receiver.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, verify_signature
from reconciler.errors import InvalidEvent
from storage.errors import StorageUnavailable
from storage.vocabulary import EventOutcome

PATH = "/webhooks/pacspace"
_SIGNATURE, _TIMESTAMP = SIGNATURE_HEADER.lower().encode("latin-1"), TIMESTAMP_HEADER.lower().encode("latin-1")
_LENGTH = b"content-length"


def _answer(word: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ASGI messages of a 200 answer, built once (the body JSONResponse renders)."""
    body = b'{"status":"%s"}' % word.encode("ascii")
    headers = [(b"content-length", str(len(body)).encode("ascii")), (b"content-type", b"application/json")]
    return {"type": "http.response.start", "status": 200, "headers": headers}, {"type": "http.response.body", "body": body}


_ANSWERS = {word: _answer(word) for word in ("recorded", "duplicate", "ignored")}


@dataclass(frozen=True)
class WebhookReceiver:
    """What the webhook route needs; built once by the composition root, after logging is
    configured (it binds its logger then: one lookup less per request)."""

    recorder: Recorder
    secrets: Sequence[str]
    tolerance_seconds: int
    max_body_bytes: int
    clock: Callable[[], float]
    # told of every delivery: (outcome, reason for a rejection or "", seconds spent)
    observe: Callable[[str, str, float], None] = field(default=lambda outcome, reason, seconds: None)
    log: Any = field(default_factory=lambda: structlog.get_logger("pacrecon.webhook").bind())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        outcome, reason = "rejected", "internal_error"
        try:
            start, body, outcome = await self._handle(scope, receive)
            reason = ""
        except (SignatureError, RequestError, InvalidEvent, ClientDisconnect) as exc:
            reason = "invalid_payload" if isinstance(exc, InvalidEvent) else getattr(exc, "code", "client_disconnected")
            await answer_error(exc, scope, receive, send)
            return
        except StorageUnavailable as exc:
            outcome, reason = "unavailable", ""
            await answer_error(exc, scope, receive, send)
            return
        finally:
            self.observe(outcome, reason, time.perf_counter() - started)
        await send(start)
        await send(body)

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[dict[str, Any], dict[str, Any], str]:
        signature = timestamp = length = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if name == _SIGNATURE and signature is None:
                signature = value.decode("latin-1")
            elif name == _TIMESTAMP and timestamp is None:
                timestamp = value.decode("latin-1")
            elif name == _LENGTH and length is None:
                length = value.decode("latin-1")
        raw_body = await receive_limited_body(length, receive, self.max_body_bytes)
        try:
            signature_timestamp = verify_signature(
                raw_body, signature, timestamp, secrets=self.secrets, tolerance_seconds=self.tolerance_seconds, now=self.clock()
            )
        except SignatureError as exc:
            self.log.warning("webhook_rejected", reason=exc.code, client=_client(scope))
            raise
        try:
            stored = await self.recorder.record(raw_body, signature_timestamp, self.clock())  # parses the body
        except InvalidEvent:
            self.log.warning("webhook_rejected", reason="invalid_payload", client=_client(scope))
            raise
        answer = "duplicate" if stored.duplicate else "ignored" if stored.outcome is EventOutcome.IGNORED else "recorded"
        outcome = stored.outcome.value if stored.outcome and not stored.duplicate else "duplicate"
        self.log.info(
            "webhook",
            event_id=stored.event_id,
            event_type=stored.event_type,
            anchor_id=stored.anchor_id,
            outcome=outcome,
            discrepancies=list(stored.finding_kinds) or None,
        )
        return *_ANSWERS[answer], outcome


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def webhook_routes(receiver: WebhookReceiver) -> list[Route]:
    # the route documents the path and answers 405 for other methods; POSTs arrive
    # through `WebhookFastPath` and skip the router
    return [Route(PATH, receiver, methods=["POST"], name="pacspace_webhook")]


class WebhookFastPath:
    """ASGI middleware: `POST /webhooks/pacspace` goes straight to the receiver; the rest
    on to the app. What the receiver does is the same either way (the route holds the same
    receiver); only the router's and the exception layer's cost is saved."""

    def __init__(self, app: ASGIApp, receiver: WebhookReceiver) -> None:
        self.app, self.receiver = app, receiver

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PATH and not scope.get("root_path"):
            await self.receiver(scope, receive, send)
        else:
            await self.app(scope, receive, send)
