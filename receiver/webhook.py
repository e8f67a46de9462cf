"""`POST /webhooks/pacspace`: verify, parse, record durably, then acknowledge."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from receiver.body import read_limited_body
from receiver.errors import RequestError
from receiver.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, verify_signature
from reconciler.apply import RecordEvent
from reconciler.errors import InvalidEvent
from reconciler.events import parse_event
from storage.errors import StorageUnavailable
from storage.ledger import Ledger
from storage.vocabulary import EventOutcome

log = structlog.get_logger("pacrecon.webhook")
_ANSWERS = {answer: JSONResponse({"status": answer}).body for answer in ("recorded", "duplicate", "ignored")}


@dataclass(frozen=True)
class WebhookReceiver:
    """What the webhook route needs; built once by the composition root."""

    ledger: Ledger
    secrets: Sequence[str]
    tolerance_seconds: int
    max_body_bytes: int
    clock: Callable[[], float]
    # told of every delivery: (outcome, reason for a rejection or "", seconds spent)
    observe: Callable[[str, str, float], None] = field(default=lambda outcome, reason, seconds: None)

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        outcome, reason = "rejected", "internal_error"
        try:
            response, outcome = await self._handle(request)
            reason = ""
            return response
        except (SignatureError, RequestError) as exc:
            reason = exc.code
            raise
        except InvalidEvent:
            reason = "invalid_payload"
            raise
        except StorageUnavailable:
            outcome, reason = "unavailable", ""
            raise
        finally:
            self.observe(outcome, reason, time.perf_counter() - started)

    async def _handle(self, request: Request) -> tuple[Response, str]:
        raw_body = await read_limited_body(request, self.max_body_bytes)
        try:
            signature_timestamp = verify_signature(
                raw_body,
                request.headers.get(SIGNATURE_HEADER),
                request.headers.get(TIMESTAMP_HEADER),
                secrets=self.secrets,
                tolerance_seconds=self.tolerance_seconds,
                now=self.clock(),
            )
            event = parse_event(raw_body)
        except SignatureError as exc:
            log.warning("webhook_rejected", reason=exc.code, client=_client(request))
            raise
        except InvalidEvent:
            log.warning("webhook_rejected", reason="invalid_payload", client=_client(request))
            raise
        recorded = await self.ledger.transact(
            RecordEvent(event, raw_body, signature_timestamp, datetime.fromtimestamp(self.clock(), UTC))
        )
        answer = "duplicate" if recorded.duplicate else "ignored" if recorded.outcome is EventOutcome.IGNORED else "recorded"
        outcome = recorded.outcome.value if recorded.outcome and not recorded.duplicate else "duplicate"
        log.info(
            "webhook",
            event_id=event.event_id,
            event_type=event.event_type,
            anchor_id=recorded.anchor_id,
            outcome=outcome,
            discrepancies=sorted({f.kind.value for f in recorded.findings}) or None,
        )
        # the same bytes JSONResponse would render, encoded once
        return Response(_ANSWERS[answer], media_type="application/json"), outcome


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def webhook_routes(receiver: WebhookReceiver) -> list[Route]:
    return [Route("/webhooks/pacspace", receiver.handle, methods=["POST"], name="pacspace_webhook")]
