"""Registering deltas emitted by other means (the TypeScript SDK, curl) from their emit
answers, so the reconciler watches them too. Importing the same record twice adds nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from reconciler.apply import match_orphans
from reconciler.emit_rules import CUSTOMER_ID
from reconciler.pacspace import amount_from, time_from
from reconciler.outbox import METADATA_MAX_BYTES, REFERENCE_MAX
from storage import jsonio
from storage.errors import AmountOutOfRange
from storage.models import LocalDelta
from storage.session import LedgerSession
from storage.types import amount_to_units
from storage.vocabulary import DeltaSource, DeltaStatus


HASH_MAX = 130


class InvalidRecord(ValueError):
    """An import record that is not an emit answer we can register; the message says why."""


@dataclass
class ImportReport:
    imported: list[int] = field(default_factory=list)  # ids of new deltas
    known: int = 0  # records already in the ledger
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (record number, why)

    def as_dict(self) -> dict[str, Any]:
        return {
            "imported": len(self.imported),
            "already_known": self.known,
            "invalid": [{"record": n, "error": why} for n, why in self.invalid],
            "ids": self.imported,
        }


def items_of(record: Any) -> list[dict[str, Any]]:
    """The delta items in one record: an emit answer (bare, or in its `{"success", "data"}`
    envelope), a batch answer (its accepted `results`), or one batch result."""
    if isinstance(record, dict) and isinstance(record.get("data"), dict) and "success" in record:
        record = record["data"]
    if not isinstance(record, dict):
        raise InvalidRecord("not a JSON object")
    if isinstance(record.get("results"), list):
        return [r for r in record["results"] if isinstance(r, dict) and str(r.get("status", "")).upper() != "FAILED"]
    return [record]


def _text(item: dict[str, Any], name: str, limit: int) -> str | None:
    """An optional string field, refused (InvalidRecord) when the ledger cannot hold it."""
    value = item.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRecord(f"{name} must be a string")
    problem = jsonio.storable_text_error(value)
    if problem or len(value) > limit:
        raise InvalidRecord(f"{name} {problem or f'must be at most {limit} characters'}")
    return value


def delta_from(item: dict[str, Any], now: datetime) -> LocalDelta:
    anchor_id = item.get("anchorId") or item.get("recordId")
    if not isinstance(anchor_id, str) or not anchor_id or len(anchor_id) > 128:
        raise InvalidRecord("anchorId (or recordId) is required")
    customer_id = item.get("customerId")
    if not isinstance(customer_id, str) or not CUSTOMER_ID.fullmatch(customer_id):
        raise InvalidRecord("customerId is missing or not a valid customer id")
    amount = amount_from(item.get("delta"))
    if amount is None or amount.is_zero():
        raise InvalidRecord("delta must be a non-zero number")
    try:
        amount_to_units(amount)
    except AmountOutOfRange as exc:
        raise InvalidRecord(f"delta: {exc}") from None
    listed = item.get("itemHashes") if isinstance(item.get("itemHashes"), list) else []
    hashes = [h for h in listed if isinstance(h, str) and len(h) <= HASH_MAX and not jsonio.storable_text_error(h)]
    item_hash = _text(item, "itemHash", HASH_MAX) or (hashes[0] if len(hashes) == 1 else None)
    if item_hash is None:
        raise InvalidRecord("itemHash (or a single itemHashes entry) is required")
    receipt = _text(item, "receiptId", HASH_MAX) or _text(item, "itemsRoot", HASH_MAX)
    reference_id = _text(item, "referenceId", REFERENCE_MAX)
    reason = _text(item, "reason", 500)
    metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else None
    if metadata is not None and (jsonio.storable_text_error(metadata) or len(jsonio.dumps_bytes(metadata)) > METADATA_MAX_BYTES):
        raise InvalidRecord("metadata cannot be stored (NUL, unpaired surrogates, or over 16 KiB)")
    return LocalDelta(
        anchor_id=anchor_id,
        item_hash=item_hash,
        customer_id=customer_id,
        amount=amount,
        reason=reason or "",  # emit answers do not repeat the reason
        reference_id=reference_id,
        delta_metadata=metadata,
        idempotency_key=f"import:{anchor_id}:{item_hash}"[:255],
        source=DeltaSource.IMPORT.value,
        status=DeltaStatus.QUEUED.value,
        receipt_id=receipt if isinstance(receipt, str) else None,
        items_root=_text(item, "itemsRoot", HASH_MAX) or receipt,
        item_hashes=hashes or [item_hash],
        emitted_at=time_from(item.get("receivedAt")) or now,
        created_at=now,
        updated_at=now,
    )


def import_records(session: LedgerSession, records: list[Any], now: datetime) -> ImportReport:
    """Register every valid record not yet in the ledger, then apply waiting orphan events."""
    report = ImportReport()
    added: list[LocalDelta] = []
    for number, record in enumerate(records, start=1):
        try:
            candidates = [delta_from(item, now) for item in items_of(record)]
        except InvalidRecord as exc:
            report.invalid.append((number, str(exc)))
            continue
        for delta in candidates:
            known = any(d.item_hash == delta.item_hash for d in session.deltas_by_anchor(delta.anchor_id or ""))
            if known or any(a.anchor_id == delta.anchor_id and a.item_hash == delta.item_hash for a in added):
                report.known += 1
                continue
            added.append(session.add_delta(delta))
    match_orphans(session, added, now)
    report.imported = [d.id for d in added if d.id is not None]
    return report


__all__ = ["ImportReport", "InvalidRecord", "delta_from", "import_records", "items_of"]
