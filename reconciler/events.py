"""PacSpace webhook bodies, parsed tolerantly into events and claims.

Two shapes are known: the SDK's `{"id", "event", "tenantId", "createdAt", "data"}`
and the documentation pages' `{"event", "timestamp", "data": {"proof": {...}}}`.
Both are accepted; a field we do not need may be missing or of another type.
Amounts are parsed as `Decimal`, never through binary floating point.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from reconciler.claims import ClaimedStatus, DeltaClaim
from reconciler.errors import InvalidEvent

DELTA_EVENT_STATUSES = {"delta.verified": ClaimedStatus.VERIFIED, "delta.failed": ClaimedStatus.FAILED}
MAX_EVENT_ID = 255
MAX_EVENT_TYPE = 128
MAX_KEY = 128  # anchor ids, hashes: longer values can match nothing of ours
MAX_SEQUENCE = 64
MAX_REFERENCE = 256


@dataclass(frozen=True)
class PacSpaceEvent:
    event_id: str  # the envelope id, or "sha256:<hex>" of the raw body when it has none
    event_type: str
    claim: DeltaClaim | None  # for the delta events we act on


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object with exact numbers; `InvalidEvent` otherwise."""
    try:
        text = raw.decode("utf-8")  # strict: a BOM or invalid byte is not silently dropped
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # over-long integers, absurd nesting
        raise InvalidEvent(f"body is not usable JSON: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise InvalidEvent(f"body must be a JSON object, not {_json_kind(value)}")
    return value


def _number(text: str) -> Decimal:
    """A JSON number, exactly; one beyond Decimal's exponent range is kept as NaN (unreadable)."""
    try:
        return Decimal(text)
    except InvalidOperation:
        return Decimal("NaN")


# built once: json.loads with options builds a decoder per call (a third of a parse)
_DECODER = json.JSONDecoder(parse_float=_number, parse_constant=Decimal)


def parse_event(raw: bytes) -> PacSpaceEvent:
    body = parse_json_object(raw)
    event_type = _text(body.get("event")) or _text(body.get("type")) or "unknown"
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    status = DELTA_EVENT_STATUSES.get(event_type)
    return PacSpaceEvent(
        event_id=_event_id(body, raw),
        event_type=event_type[:MAX_EVENT_TYPE],
        claim=claim_from_data(data, status) if status is not None else None,
    )


def claim_from_data(data: dict[str, Any], status: ClaimedStatus) -> DeltaClaim:
    """A claim from a webhook's `data` (or a status answer of the same vocabulary)."""
    proof = data.get("proof") if isinstance(data.get("proof"), dict) else {}
    amount, amount_unreadable = _amount(data.get("delta", data.get("amount")))
    return DeltaClaim(
        status=status,
        anchor_id=_key(data.get("recordId")) or _key(data.get("anchorId")),
        customer_id=_text(data.get("customerId")),
        amount=amount,
        amount_unreadable=amount_unreadable,
        receipt_id=_key(data.get("receiptId")) or _key(proof.get("proofHash")),
        items_root=_key(data.get("itemsRoot")),
        item_hashes=_hashes(data.get("itemHashes")) or _hashes(proof.get("itemHashes")),
        content_hash=_key(proof.get("contentHash")) or _key(data.get("itemHash")),
        previous_proof_hash=_key(proof.get("previousProofHash")),
        sequence_number=_bounded(_text(data.get("sequenceNumber"), allow_int=True), MAX_SEQUENCE),
        verification_reference=_bounded(_text(data.get("verificationReference")), MAX_REFERENCE),
        tx_hash=_key(data.get("txHash")),
        error=_error_text(data.get("error")),
    )


def _event_id(body: dict[str, Any], raw: bytes) -> str:
    # the id inside the signed body; a redelivery is re-signed with a new timestamp
    # header, so without an id only the body itself identifies the event
    value = body.get("id")
    text = _text(value, allow_int=True)
    faithful = text is not None and (text == value or not isinstance(value, str) or text == value.strip())
    if text and faithful and len(text) <= MAX_EVENT_ID and not text.startswith("sha256:"):
        return text
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _text(value: Any, allow_int: bool = False) -> str | None:
    """A string field as both databases can store it: NUL and lone surrogates escaped."""
    if isinstance(value, str):
        return _storable(value.strip()) or None
    if allow_int and isinstance(value, int) and not isinstance(value, bool) and value.bit_length() < 200:
        return str(value)
    return None


def _storable(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")  # PostgreSQL text cannot hold NUL
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return text


def _bounded(text: str | None, limit: int) -> str | None:
    return text if text is not None and len(text) <= limit else None


def _key(value: Any) -> str | None:
    return _bounded(_text(value), MAX_KEY)


def _hashes(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        return None
    return tuple(h.strip() for h in value if isinstance(h, str) and h.strip())


def _amount(value: Any) -> tuple[Decimal | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, bool):
        return None, json.dumps(value)
    try:
        amount = Decimal(value) if isinstance(value, (int, str, Decimal)) else None
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite():
        return None, str(value)[:64]
    return amount, None


def _error_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("message") or value.get("code")
    text = _text(value)
    return text[:2000] if text else None


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
