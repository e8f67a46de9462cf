"""The sandbox's PacSpace: submissions, their lifecycle, proofs and webhook bodies, in memory.

No I/O here: the clock and the random source are passed in, so a seed gives the
same ids, hashes and fault choices for the same sequence of requests.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from reconciler.proofs import EMPTY_ROOT, canonical_json, item_hash, keccak256, merkle_root, proof_item
from sandbox.faults import Faults

# the status endpoint's own words, and the SDK's
STATUS_WORDS = {"QUEUED": "QUEUED", "PROCESSING": "ANCHORING", "VERIFIED": "ANCHORED", "FAILED": "FAILED"}
VOCABULARIES = ("status", "sdk")
SHAPES = ("sdk", "docs")


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(epoch * 1000) % 1000:03d}Z"


@dataclass
class Item:
    index: int
    customer_id: str
    delta: Decimal
    reason: str
    reference_id: str | None
    metadata: dict[str, Any] | None
    item_hash: str
    status: str = "QUEUED"
    sequence_number: int | None = None
    previous_proof_hash: str | None = None
    error: str | None = None
    settled_at: float | None = None


@dataclass
class Anchor:
    anchor_id: str
    receipt_id: str
    items: list[Item]
    received_at: float
    processing_at: float
    due_at: float
    forgotten: bool = False
    status: str = "QUEUED"
    tx_hash: str | None = None
    verification_reference: str | None = None
    wrong_status_receipt: str | None = None  # fault: what the status endpoint claims instead
    wrong_status_item_hash: str | None = None

    @property
    def item_hashes(self) -> list[str]:
        return [item.item_hash for item in self.items]


@dataclass
class Delivery:
    event_id: str
    event_type: str
    anchor_id: str
    body: bytes
    created_at: float
    next_attempt_at: float
    status: str = "pending"  # pending | delivered | failed
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    last_attempt_at: float | None = None
    copy_of: str | None = None  # a duplicate delivery of the same event

    def view(self) -> dict[str, Any]:
        return {
            "eventId": self.event_id,
            "event": self.event_type,
            "recordId": self.anchor_id,
            "status": self.status,
            "attempts": self.attempts,
            "lastStatusCode": self.last_status_code,
            "lastError": self.last_error,
            "createdAt": iso(self.created_at),
            "lastAttemptAt": iso(self.last_attempt_at) if self.last_attempt_at else None,
            "duplicate": self.copy_of is not None,
        }


@dataclass
class Idempotent:
    fingerprint: bytes
    status_code: int | None = None  # None while the first request is still being processed
    body: bytes | None = None


@dataclass
class SandboxState:
    seed: int | None
    clock: Callable[[], float]
    faults: Faults = field(default_factory=Faults)
    verify_delay: float = 2.0
    vocabulary: str = "status"
    webhook_shape: str = "sdk"
    tenant_id: str = "ten_sandbox"

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.anchors: dict[str, Anchor] = {}
        self.by_receipt: dict[str, Anchor] = {}
        self.deliveries: list[Delivery] = []
        self.chains: dict[str, tuple[int, str]] = {}  # customer -> (last sequence, last proof hash)
        self.idempotency: dict[tuple[str, str], Idempotent] = {}

    # -- randomness, from the one seeded source ------------------------------

    def new_id(self, prefix: str) -> str:
        return prefix + "%016x" % self.rng.getrandbits(64)

    def roll(self, fraction: float) -> bool:
        return fraction > 0 and self.rng.random() < fraction

    def random_hash(self) -> str:
        return "0x" + keccak256(self.rng.getrandbits(128).to_bytes(16, "big")).hex()

    # -- emitting -------------------------------------------------------------

    def accept(self, requests: list[dict[str, Any]]) -> Anchor:
        """One submission of already valid delta requests: one anchor, one receipt."""
        now = self.clock()
        anchor_id = self.new_id("a_")
        items = []
        for index, request in enumerate(requests):
            fields = proof_item(
                anchor_id=anchor_id,
                index=index,
                customer_id=request["customerId"],
                delta=Decimal(request["delta"]),
                reason=request["reason"],
                reference_id=request.get("referenceId"),
                metadata=request.get("metadata"),
            )
            items.append(
                Item(
                    index=index,
                    customer_id=fields["customerId"],
                    delta=fields["delta"],
                    reason=fields["reason"],
                    reference_id=fields.get("referenceId"),
                    metadata=fields.get("metadata"),
                    item_hash=item_hash(fields),
                )
            )
        anchor = Anchor(
            anchor_id=anchor_id,
            receipt_id=merkle_root([item.item_hash for item in items]),
            items=items,
            received_at=now,
            processing_at=now + self.verify_delay / 2,
            due_at=now + self.verify_delay,
            forgotten=self.roll(self.faults.forget_deltas),
        )
        if self.roll(self.faults.corrupt_status_receipt):
            anchor.wrong_status_receipt = self.random_hash()
        if self.roll(self.faults.corrupt_status_item_hash):
            anchor.wrong_status_item_hash = self.random_hash()
        self.anchors[anchor_id] = anchor
        self.by_receipt[anchor.receipt_id] = anchor
        return anchor

    # -- the lifecycle ----------------------------------------------------------

    def advance(self, flush: bool = False) -> list[Delivery]:
        """Move every anchor whose time has come (all of them with `flush`); return the
        webhook deliveries that creates."""
        now = self.clock()
        created: list[Delivery] = []
        for anchor in self.anchors.values():
            if anchor.forgotten or anchor.status in ("VERIFIED", "FAILED"):
                continue
            if anchor.status == "QUEUED" and (flush or now >= anchor.processing_at):
                anchor.status = "PROCESSING"
                for item in anchor.items:
                    item.status = "PROCESSING"
            if flush or now >= anchor.due_at:
                created += self._settle(anchor, now)
        return created

    def _settle(self, anchor: Anchor, now: float) -> list[Delivery]:
        anchor.tx_hash = "0x" + keccak256(b"tx:" + anchor.receipt_id.encode()).hex()
        anchor.verification_reference = self.new_id("vr_")
        created = []
        for item in anchor.items:
            sequence, previous = self.chains.get(item.customer_id, (0, EMPTY_ROOT))
            item.sequence_number = sequence + 1  # a failed delta uses its number too: a gap
            item.settled_at = now
            if self.roll(self.faults.fail_deltas):
                item.status, item.error = "FAILED", "anchoring failed (sandbox fault fail_deltas)"
                self.chains[item.customer_id] = (sequence + 1, previous)
            else:
                item.status, item.previous_proof_hash = "VERIFIED", previous
                self.chains[item.customer_id] = (sequence + 1, anchor.receipt_id)
            created += self._deliveries_for(anchor, item, now)
        anchor.status = "FAILED" if all(i.status == "FAILED" for i in anchor.items) else "VERIFIED"
        return created

    def _deliveries_for(self, anchor: Anchor, item: Item, now: float) -> list[Delivery]:
        event_type = "delta.verified" if item.status == "VERIFIED" else "delta.failed"
        event_id = self.new_id("evt_")
        body = canonical_json(self._webhook_body(event_id, event_type, anchor, item, now))
        delay = self.rng.uniform(0, self.faults.late_seconds) if self.roll(self.faults.late_webhooks) else 0.0
        delivery = Delivery(event_id, event_type, anchor.anchor_id, body, created_at=now, next_attempt_at=now + delay)
        if self.roll(self.faults.drop_webhooks):
            delivery.status, delivery.last_error = "failed", "dropped (sandbox fault drop_webhooks)"
        deliveries = [delivery]
        if self.roll(self.faults.duplicate_webhooks):
            copy_delay = self.rng.uniform(0, max(self.faults.late_seconds, 0.5))
            deliveries.append(
                Delivery(event_id, event_type, anchor.anchor_id, body, now, now + copy_delay, copy_of=event_id)
            )
        self.deliveries += deliveries
        return deliveries

    def _webhook_body(self, event_id: str, event_type: str, anchor: Anchor, item: Item, now: float) -> dict[str, Any]:
        data: dict[str, Any] = {
            "recordId": anchor.anchor_id,
            "anchorId": anchor.anchor_id,
            "customerId": item.customer_id,
            "delta": item.delta,
            "itemHash": item.item_hash,
        }
        if item.reference_id is not None:
            data["referenceId"] = item.reference_id
        if event_type == "delta.failed":
            data.update(error=item.error, failedAt=iso(now), sequenceNumber=str(item.sequence_number))
        else:
            receipt = self.random_hash() if self.roll(self.faults.corrupt_webhook_receipt) else anchor.receipt_id
            hashes = list(anchor.item_hashes)
            own_hash = item.item_hash
            if self.roll(self.faults.corrupt_webhook_item_hash):
                own_hash = self.random_hash()
                hashes[item.index] = own_hash
            data.update(
                receiptId=receipt,
                itemsRoot=receipt,
                itemHashes=hashes,
                itemHash=own_hash,
                verificationReference=anchor.verification_reference,
                sequenceNumber=str(item.sequence_number),
                blockTimestamp=iso(now),
                txHash=anchor.tx_hash,
                proof={
                    "proofHash": receipt,
                    "contentHash": own_hash,
                    "itemHashes": hashes,
                    "previousProofHash": item.previous_proof_hash,
                },
            )
        if self.webhook_shape == "docs":
            return {"event": event_type, "timestamp": iso(now), "data": data}
        return {"id": event_id, "event": event_type, "tenantId": self.tenant_id, "createdAt": iso(now), "data": data}

    # -- answers ----------------------------------------------------------------

    def status_word(self, status: str) -> str:
        return STATUS_WORDS[status] if self.vocabulary == "status" else status

    def status_view(self, anchor: Anchor) -> dict[str, Any]:
        receipt = anchor.wrong_status_receipt or anchor.receipt_id
        hashes = list(anchor.item_hashes)
        if anchor.wrong_status_item_hash:
            hashes[0] = anchor.wrong_status_item_hash
        view: dict[str, Any] = {
            "anchorId": anchor.anchor_id,
            "status": self.status_word(anchor.status),
            "receiptId": receipt,
            "itemsRoot": receipt,
            "itemHashes": hashes,
            "txHash": anchor.tx_hash,
            "receivedAt": iso(anchor.received_at),
        }
        if len(anchor.items) == 1:
            item = anchor.items[0]
            view.update(customerId=item.customer_id, delta=item.delta, itemHash=hashes[0])
            if item.sequence_number is not None:
                view["sequenceNumber"] = str(item.sequence_number)
        else:
            view["deltaCount"] = len(anchor.items)
            view["deltas"] = [
                {
                    "index": item.index,
                    "customerId": item.customer_id,
                    "delta": item.delta,
                    "itemHash": hashes[item.index],
                    "status": self.status_word(item.status),
                    **({"sequenceNumber": str(item.sequence_number)} if item.sequence_number else {}),
                    **({"error": item.error} if item.error else {}),
                }
                for item in anchor.items
            ]
        return view

    def lookup(self, anchor_id: str) -> Anchor | None:
        anchor = self.anchors.get(anchor_id)
        return None if anchor is None or anchor.forgotten else anchor

    def gaps(self, customer_id: str, first: int, last: int | None, limit: int) -> dict[str, Any]:
        verified = sorted(
            item.sequence_number
            for anchor in self.anchors.values()
            for item in anchor.items
            if item.customer_id == customer_id and item.status == "VERIFIED" and item.sequence_number
        )
        latest = self.chains.get(customer_id, (0, EMPTY_ROOT))[0]
        upper = latest if last is None else min(last, latest)
        present = set(verified)
        gaps: list[dict[str, int]] = []
        number = max(first, 1)
        while number <= upper and len(gaps) < limit:
            if number not in present:
                start = number
                while number + 1 <= upper and number + 1 not in present:
                    number += 1
                gaps.append({"fromSequence": start, "toSequence": number, "missing": number - start + 1})
            number += 1
        return {"customerId": customer_id, "fromSequence": first, "toSequence": upper, "latestSequence": latest, "gaps": gaps}

    def counts(self) -> dict[str, Any]:
        def tally(values: list[str]) -> dict[str, int]:
            return {v: values.count(v) for v in sorted(set(values))}

        return {
            "anchors": tally([a.status for a in self.anchors.values()]),
            "deltas": tally([i.status for a in self.anchors.values() for i in a.items]),
            "forgotten": sum(1 for a in self.anchors.values() if a.forgotten),
            "deliveries": tally([d.status for d in self.deliveries]),
        }
