"""Recording events and applying PacSpace's claims, on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from reconciler.apply import Recorded, record_event, register_deltas
from reconciler.events import parse_event
from storage.models import LocalDelta
from storage.sql_ledger import SqlLedger
from storage.vocabulary import DeltaStatus, EventOutcome
from reconciler.proofs import keccak256, merkle_root
from tests.webhooks import envelope


def H(label: str) -> str:
    """A real 32-byte hash for a test label."""
    return "0x" + keccak256(label.encode()).hex()


BATCH_ROOT = merkle_root([H("item1"), H("item2"), H("item3")])
PAIR_ROOT = merkle_root([H("item1"), H("item2")])

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=30)


def local(n: int, **fields: Any) -> LocalDelta:
    values: dict[str, Any] = dict(
        anchor_id=f"a_{n}",
        item_hash=H(f"item{n}"),
        customer_id="cust_1",
        amount=Decimal("-42.50"),
        reason="usage",
        idempotency_key=f"key_{n}",
        source="outbox",
        status=DeltaStatus.QUEUED.value,
        receipt_id=H(f"item{n}"),  # a single item's root is its leaf
        items_root=H(f"item{n}"),
        item_hashes=[H(f"item{n}")],
        created_at=NOW,
        updated_at=NOW,
        emitted_at=NOW,
    )
    values.update(fields)
    return LocalDelta(**values)


def register(ledger: SqlLedger, *deltas: LocalDelta) -> list[int]:
    return ledger.transact_sync(lambda s: [d.id for d in register_deltas(s, deltas, NOW)])


def receive(ledger: SqlLedger, body: dict[str, Any] | bytes, now: datetime = LATER) -> Recorded:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    event = parse_event(raw)
    return ledger.transact_sync(
        lambda s: record_event(s, event, raw_body=raw, signature_timestamp=int(now.timestamp()), now=now)
    )


def verified(n: int, **data: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "recordId": f"a_{n}",
        "receiptId": H(f"item{n}"),
        "customerId": "cust_1",
        "delta": -42.5,
        "sequenceNumber": str(n),
        "verificationReference": f"vr_{n}",
        "itemHashes": [H(f"item{n}")],
        "txHash": f"0xtx{n}",
    }
    fields.update(data)
    return envelope("delta.verified", {k: v for k, v in fields.items() if v is not None})


def get(ledger: SqlLedger, delta_id: int) -> LocalDelta:
    found = ledger.read_sync(lambda s: s.get_delta(delta_id))
    assert found is not None
    return found


def open_kinds(ledger: SqlLedger) -> list[str]:
    return [d.kind for d in ledger.read_sync(lambda s: s.open_discrepancies())]


def test_delta_verified_verifies_the_delta_and_records_what_it_adds(ledger: SqlLedger) -> None:
    (delta_id,) = register(ledger, local(1))
    result = receive(ledger, verified(1))
    assert (result.duplicate, result.outcome, result.delta_ids) == (False, EventOutcome.APPLIED, (delta_id,))
    delta = get(ledger, delta_id)
    assert (delta.status, delta.verified_by, delta.verified_at) == ("VERIFIED", "webhook", LATER)
    assert (delta.sequence_number, delta.verification_reference, delta.tx_hash) == ("1", "vr_1", "0xtx1")
    assert delta.amount == Decimal("-42.5") and open_kinds(ledger) == []


def test_a_repeated_event_changes_nothing(ledger: SqlLedger) -> None:
    (delta_id,) = register(ledger, local(1))
    body = verified(1)
    receive(ledger, body)
    before = get(ledger, delta_id)
    again = receive(ledger, body, now=LATER + timedelta(hours=1))
    assert (again.duplicate, again.outcome) == (True, None)
    assert get(ledger, delta_id).model_dump() == before.model_dump()
    assert ledger.read_sync(lambda s: s.count_events()) == 1


def test_a_forged_receipt_opens_a_discrepancy_and_leaves_our_record(ledger: SqlLedger) -> None:
    (delta_id,) = register(ledger, local(1))
    body = verified(1, receiptId=H("forged"))
    result = receive(ledger, body)
    assert result.outcome is EventOutcome.DISCREPANCY
    delta = get(ledger, delta_id)
    assert (delta.status, delta.receipt_id, delta.sequence_number) == ("QUEUED", H("item1"), None)
    (row,) = ledger.read_sync(lambda s: s.open_discrepancies())
    assert (row.kind, row.delta_id, row.detected_by, row.event_id) == ("receipt_mismatch", delta_id, "webhook", body["id"])
    assert (row.evidence["ours"], row.evidence["theirs"]) == (H("item1"), H("forged"))
    # PacSpace delivers the same wrong claim again under a new event id: still one open discrepancy
    receive(ledger, verified(1, receiptId=H("forged")))
    (row,) = ledger.read_sync(lambda s: s.open_discrepancies())
    assert row.occurrences == 2


def test_an_amount_that_differs_only_in_notation_agrees(ledger: SqlLedger) -> None:
    register(ledger, local(1, amount=Decimal("100")))
    assert receive(ledger, verified(1, delta=1e2)).outcome is EventOutcome.APPLIED


def test_an_amount_mismatch_is_reported_exactly(ledger: SqlLedger) -> None:
    register(ledger, local(1))
    raw = json.dumps(verified(1)).replace("-42.5", "-42.500000000000001").encode()
    assert receive(ledger, raw).outcome is EventOutcome.DISCREPANCY
    (row,) = ledger.read_sync(lambda s: s.open_discrepancies())
    assert (row.kind, row.evidence["ours"], row.evidence["theirs"]) == ("amount_mismatch", "-42.5", "-42.500000000000001")


def test_delta_failed_fails_the_delta(ledger: SqlLedger) -> None:
    (delta_id,) = register(ledger, local(1))
    receive(ledger, envelope("delta.failed", {"recordId": "a_1", "error": "anchoring failed"}))
    delta = get(ledger, delta_id)
    assert (delta.status, delta.status_reason, delta.failed_at) == ("FAILED", "anchoring failed", LATER)


def test_delta_failed_after_verified_is_a_conflict_and_nothing_regresses(ledger: SqlLedger) -> None:
    (delta_id,) = register(ledger, local(1))
    receive(ledger, verified(1))
    result = receive(ledger, envelope("delta.failed", {"recordId": "a_1", "error": "late"}))
    assert result.outcome is EventOutcome.DISCREPANCY
    assert get(ledger, delta_id).status == "VERIFIED"
    assert open_kinds(ledger) == ["conflicting_status"]


def test_an_event_before_its_delta_is_an_orphan_until_the_delta_is_recorded(ledger: SqlLedger) -> None:
    body = verified(1)
    assert receive(ledger, body).outcome is EventOutcome.ORPHAN
    (delta_id,) = register(ledger, local(1))
    delta = get(ledger, delta_id)
    assert (delta.status, delta.verified_by) == ("VERIFIED", "webhook")
    stored = ledger.read_sync(lambda s: s.get_event(body["id"]))
    assert stored is not None and stored.outcome == "applied"


@pytest.mark.parametrize(
    ("data", "matched"),
    [
        ({}, True),  # by its anchor
        ({"recordId": None, "itemHash": H("item1"), "receiptId": H("another")}, True),  # no anchor: by item hash
        ({"recordId": None}, True),  # neither: by receipt
        ({"recordId": "a_other", "itemHash": H("item1")}, False),  # another anchor: not by its hash or receipt
        ({"recordId": None, "itemHash": H("another")}, False),  # another hash: not by its receipt
    ],
)
def test_an_orphan_is_matched_by_the_first_key_it_names(ledger: SqlLedger, data: dict[str, Any], matched: bool) -> None:
    # the order of reconciler.apply.matching_deltas, which the orphan indexes follow (storage.models)
    body = verified(1, **data)
    assert receive(ledger, body).outcome is EventOutcome.ORPHAN
    register(ledger, local(1))
    stored = ledger.read_sync(lambda s: s.get_event(body["id"]))
    assert stored is not None and (stored.outcome != "orphan") is matched, stored.outcome


def test_a_batch_anchor_is_matched_item_by_item(ledger: SqlLedger) -> None:
    items = [local(n, anchor_id="a_batch", receipt_id=BATCH_ROOT, items_root=BATCH_ROOT) for n in (1, 2, 3)]
    ids = register(ledger, *items)
    proof = {"proofHash": BATCH_ROOT, "contentHash": H("item2"), "itemHashes": [H("item1"), H("item2"), H("item3")]}
    result = receive(ledger, envelope("delta.verified", {"anchorId": "a_batch", "proof": proof}))
    assert (result.outcome, result.delta_ids) == (EventOutcome.APPLIED, (ids[1],))
    assert [get(ledger, i).status for i in ids] == ["QUEUED", "VERIFIED", "QUEUED"]


def test_a_whole_batch_anchor_verified_at_once(ledger: SqlLedger) -> None:
    items = [local(n, anchor_id="a_batch", receipt_id=PAIR_ROOT, items_root=PAIR_ROOT) for n in (1, 2)]
    ids = register(ledger, *items)
    data = {"recordId": "a_batch", "receiptId": PAIR_ROOT, "itemHashes": [H("item1"), H("item2")]}
    assert receive(ledger, envelope("delta.verified", data)).delta_ids == tuple(ids)
    assert [get(ledger, i).status for i in ids] == ["VERIFIED", "VERIFIED"]


def test_an_item_missing_from_the_verified_hashes(ledger: SqlLedger) -> None:
    register(ledger, local(1))
    receive(ledger, verified(1, itemHashes=[H("someone else")]))
    assert open_kinds(ledger) == ["item_hash_mismatch"]


def test_a_claim_without_anchor_is_matched_by_its_content_hash(ledger: SqlLedger) -> None:
    (delta_id,) = register(ledger, local(1))
    proof = {"proofHash": H("item1"), "contentHash": H("item1"), "itemHashes": [H("item1")]}
    assert receive(ledger, envelope("delta.verified", {"proof": proof})).delta_ids == (delta_id,)


def test_a_root_that_does_not_recompute_is_unverifiable(ledger: SqlLedger) -> None:
    (delta_id,) = register(ledger, local(1))
    # our hash is there and the receipt is ours, but the root is not the root of these hashes
    receive(ledger, verified(1, itemHashes=[H("item1"), H("stowaway")]))
    (row,) = ledger.read_sync(lambda s: s.open_discrepancies())
    assert (row.kind, row.evidence["field"]) == ("unverifiable", "receiptId") and get(ledger, delta_id).status == "QUEUED"


def test_a_broken_proof_chain(ledger: SqlLedger) -> None:
    first, second = register(ledger, local(1), local(2))
    receive(ledger, verified(1))
    good_link = verified(2, proof={"previousProofHash": H("item1")})
    bad_link = verified(2, proof={"previousProofHash": "0xnot-the-previous"})
    receive(ledger, bad_link)
    assert open_kinds(ledger) == ["chain_broken"] and get(ledger, second).status == "QUEUED"
    receive(ledger, good_link)
    assert get(ledger, second).status == "VERIFIED"


def test_a_link_checked_when_the_earlier_delta_is_verified_last(ledger: SqlLedger) -> None:
    first, second = register(ledger, local(1), local(2))
    receive(ledger, verified(2, proof={"previousProofHash": "0xforged-previous"}))  # out of order
    assert get(ledger, second).status == "VERIFIED"  # nothing known to compare with yet
    receive(ledger, verified(1))
    # delta 1's own proof checks out; the broken link is recorded against delta 2
    assert get(ledger, first).status == "VERIFIED"
    (row,) = ledger.read_sync(lambda s: s.open_discrepancies())
    assert (row.kind, row.delta_id, row.evidence["preceding_delta_id"]) == ("chain_broken", second, str(first))


@pytest.mark.parametrize("event_type", ["record.committed", "record.failed", "tenant.updated"])
def test_other_event_types_are_recorded_and_ignored(ledger: SqlLedger, event_type: str) -> None:
    body = envelope(event_type, {"recordId": "a_1"})
    assert receive(ledger, body).outcome is EventOutcome.IGNORED
    stored = ledger.read_sync(lambda s: s.get_event(body["id"]))
    assert stored is not None and stored.outcome == "ignored"
    assert stored.raw_body == json.dumps(body).encode()
