"""`/v1/deltas`: emit through the outbox, import deltas emitted elsewhere, read the ledger."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.auth import require_bearer
from receiver.body import read_limited_body
from receiver.errors import RequestError
from receiver.routing import route
from reconciler.emit_rules import CUSTOMER_ID
from reconciler.imports import import_records
from reconciler.outbox import InvalidRequest, Outbox, parse_request
from storage import jsonio
from storage.ledger import Ledger
from storage.models import LocalDelta
from storage.vocabulary import DeltaStatus

LIST_LIMIT_MAX = 500
IMPORT_MAX_RECORDS = 10_000


def exact_json(data: Any, status: int = 200) -> Response:
    return Response(jsonio.dumps_bytes(data), status, media_type="application/json")


def delta_view(delta: LocalDelta) -> dict[str, Any]:
    return {
        "id": delta.id,
        "anchorId": delta.anchor_id,
        "itemHash": delta.item_hash,
        "customerId": delta.customer_id,
        "delta": delta.amount,
        "reason": delta.reason,
        "referenceId": delta.reference_id,
        "metadata": delta.delta_metadata,
        "status": delta.status,
        "statusReason": delta.status_reason,
        "receiptId": delta.receipt_id,
        "itemsRoot": delta.items_root,
        "itemHashes": delta.item_hashes,
        "txHash": delta.tx_hash,
        "sequenceNumber": delta.sequence_number,
        "verificationReference": delta.verification_reference,
        "verifiedBy": delta.verified_by,
        "source": delta.source,
        "createdAt": delta.created_at,
        "emittedAt": delta.emitted_at,
        "verifiedAt": delta.verified_at,
        "failedAt": delta.failed_at,
    }


@dataclass(frozen=True)
class DeltasApi:
    """The routes' dependencies, built once by the composition root."""

    ledger: Ledger
    outbox: Outbox | None  # None when no PacSpace API key is configured
    token: SecretStr | None
    max_body_bytes: int

    def _authorize(self, request: Request) -> None:
        require_bearer(request, self.token, disabled_code="api_disabled", setting="PACRECON_API_TOKEN")

    async def emit(self, request: Request) -> Response:
        return await self._emit(request, "single")

    async def emit_batch(self, request: Request) -> Response:
        return await self._emit(request, "batch")

    async def _emit(self, request: Request, kind: str) -> Response:
        self._authorize(request)
        if self.outbox is None:
            raise RequestError(503, "pacspace_not_configured", "set PACRECON_PACSPACE_API_KEY to emit through pacrecon")
        raw = await read_limited_body(request, self.max_body_bytes)
        try:
            parsed = parse_request(
                raw, kind, request.headers.get("idempotency-key"), request.headers.get("x-credit-pool-id")
            )
        except InvalidRequest as exc:
            return exact_json(
                {"error": {"code": "validation_error", "message": str(exc), "details": [e.__dict__ for e in exc.errors]}},
                400,
            )
        answer = await self.outbox.submit(parsed)
        return Response(answer.body, answer.status, media_type="application/json")

    async def import_deltas(self, request: Request) -> Response:
        self._authorize(request)
        raw = await read_limited_body(request, self.max_body_bytes)
        try:
            body = jsonio.loads(raw)
        except (ValueError, RecursionError):
            raise RequestError(400, "validation_error", "the body must be JSON (no NaN): a list of emit answers, or {\"records\": [...]}") from None
        records = body.get("records") if isinstance(body, dict) else body
        if not isinstance(records, list) or not 1 <= len(records) <= IMPORT_MAX_RECORDS:
            raise RequestError(400, "validation_error", f"records: a list of 1 to {IMPORT_MAX_RECORDS} emit answers")
        now = datetime.now(UTC)
        report = await self.ledger.transact(lambda session: import_records(session, records, now))
        return exact_json(report.as_dict(), 200)

    async def get_by_anchor(self, request: Request) -> Response:
        self._authorize(request)
        anchor_id = request.path_params["anchor_id"]
        views = await self.ledger.read(lambda s: [delta_view(d) for d in s.deltas_by_anchor(anchor_id)])
        if not views:
            raise RequestError(404, "not_found", f"no delta with anchor id {anchor_id[:128]!r} in the ledger")
        return exact_json({"anchorId": anchor_id, "deltas": views})

    async def list_deltas(self, request: Request) -> Response:
        self._authorize(request)
        query = request.query_params
        customer_id = query.get("customer_id")
        if customer_id is not None and not CUSTOMER_ID.fullmatch(customer_id):
            raise RequestError(400, "validation_error", "customer_id: not a valid customer id")
        status = query.get("status")
        if status is not None and status.upper() not in DeltaStatus.__members__:
            raise RequestError(400, "validation_error", f"status: one of {', '.join(DeltaStatus.__members__)}")
        limit_text = query.get("limit", "100")
        if not (limit_text.isascii() and limit_text.isdigit() and 1 <= int(limit_text) <= LIST_LIMIT_MAX):
            raise RequestError(400, "validation_error", f"limit: a whole number from 1 to {LIST_LIMIT_MAX}")
        after = _decode_cursor(query.get("cursor"))
        limit = int(limit_text)
        rows = await self.ledger.read(
            lambda s: [
                delta_view(d)
                for d in s.list_deltas(
                    customer_id=customer_id, status=status.upper() if status else None, after_id=after, limit=limit + 1
                )
            ]
        )
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = _encode_cursor(rows[-1]["id"]) if more and rows else None
        return exact_json({"deltas": rows, "next_cursor": cursor})

    def routes(self) -> list[Route]:
        return [
            route("/v1/deltas", {"POST": self.emit, "GET": self.list_deltas}),
            Route("/v1/deltas/batch", self.emit_batch, methods=["POST"]),
            Route("/v1/deltas/import", self.import_deltas, methods=["POST"]),
            Route("/v1/deltas/{anchor_id}", self.get_by_anchor, methods=["GET"]),
        ]


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    kind, _, value = text.partition(":")
    if kind != "id" or not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise RequestError(400, "validation_error", "cursor: not a cursor this API returned")
    return int(value)
