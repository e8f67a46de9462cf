"""Comparing a claim with our record: every check, each in isolation."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from reconciler.claims import ChainNeighbours, ClaimedStatus, DeltaClaim, compare
from reconciler.proofs import keccak256, merkle_root
from storage.models import LocalDelta
from storage.vocabulary import DeltaStatus, DiscrepancyKind

NOW = datetime(2026, 11, 27, tzinfo=UTC)
ITEM = "0x" + keccak256(b"item").hex()
OTHER = "0x" + keccak256(b"other").hex()
ROOT = merkle_root([OTHER, ITEM])
FORGED = "0x" + keccak256(b"forged").hex()


def delta(**fields: object) -> LocalDelta:
    values: dict[str, object] = dict(
        id=1,
        anchor_id="a_1",
        item_hash="0x" + ITEM[2:].upper(),  # hashes compare without regard to case
        customer_id="cust_1",
        amount=Decimal("-42.50"),
        reason="r",
        idempotency_key="k",
        source="outbox",
        status=DeltaStatus.QUEUED.value,
        receipt_id=ROOT,
        items_root=ROOT,
        created_at=NOW,
        updated_at=NOW,
    )
    values.update(fields)
    return LocalDelta(**values)


AGREEING = DeltaClaim(
    status=ClaimedStatus.VERIFIED,
    anchor_id="a_1",
    customer_id="cust_1",
    amount=Decimal("-42.5"),
    receipt_id="0x" + ROOT[2:].upper(),
    items_root=ROOT,
    item_hashes=(OTHER, ITEM),
    content_hash=ITEM,
)


def kinds(findings: list) -> list[DiscrepancyKind]:
    return [f.kind for f in findings]


def test_an_agreeing_claim_has_no_findings() -> None:
    assert compare(delta(), AGREEING) == []


def test_a_claim_without_optional_fields_has_no_findings() -> None:
    assert compare(delta(), DeltaClaim(status=ClaimedStatus.VERIFIED)) == []


@pytest.mark.parametrize(
    ("change", "kind", "field"),
    [
        ({"customer_id": "cust_2"}, DiscrepancyKind.CUSTOMER_MISMATCH, "customerId"),
        ({"amount": Decimal("-42.51")}, DiscrepancyKind.AMOUNT_MISMATCH, "delta"),
        ({"amount": None, "amount_unreadable": "NaN"}, DiscrepancyKind.AMOUNT_MISMATCH, "delta"),
        ({"receipt_id": FORGED}, DiscrepancyKind.RECEIPT_MISMATCH, "receiptId"),
        ({"items_root": FORGED}, DiscrepancyKind.RECEIPT_MISMATCH, "itemsRoot"),
        ({"content_hash": FORGED}, DiscrepancyKind.ITEM_HASH_MISMATCH, "contentHash"),
        ({"item_hashes": (OTHER,)}, DiscrepancyKind.ITEM_HASH_MISMATCH, "itemHashes"),
        ({"item_hashes": (OTHER, ITEM, FORGED)}, DiscrepancyKind.UNVERIFIABLE, "receiptId"),  # root does not recompute
        ({"item_hashes": (ITEM, "0xshort")}, DiscrepancyKind.UNVERIFIABLE, "itemHashes"),
    ],
)
def test_each_difference_is_one_finding(change: dict, kind: DiscrepancyKind, field: str) -> None:
    findings = compare(delta(), replace(AGREEING, **change))
    assert [(f.kind, f.field) for f in findings] == [(kind, field)]
    assert kind is DiscrepancyKind.UNVERIFIABLE or (findings[0].ours is not None and findings[0].theirs is not None)


def test_the_amounts_are_compared_as_numbers_not_text() -> None:
    assert compare(delta(amount=Decimal("100")), replace(AGREEING, amount=Decimal("1E+2"))) == []


@pytest.mark.parametrize(
    ("ours", "claimed", "conflict"),
    [
        (DeltaStatus.VERIFIED, ClaimedStatus.FAILED, True),
        (DeltaStatus.FAILED, ClaimedStatus.VERIFIED, True),
        (DeltaStatus.REJECTED, ClaimedStatus.VERIFIED, True),
        (DeltaStatus.VERIFIED, ClaimedStatus.VERIFIED, False),
        (DeltaStatus.FAILED, ClaimedStatus.FAILED, False),
        (DeltaStatus.QUEUED, ClaimedStatus.FAILED, False),
        (DeltaStatus.PROCESSING, ClaimedStatus.VERIFIED, False),
    ],
)
def test_terminal_statuses_never_regress(ours: DeltaStatus, claimed: ClaimedStatus, conflict: bool) -> None:
    findings = compare(delta(status=ours.value), replace(AGREEING, status=claimed))
    assert (DiscrepancyKind.CONFLICTING_STATUS in kinds(findings)) is conflict


def test_chain_link_to_the_previous_verified_delta() -> None:
    previous = delta(id=7, receipt_id="0xPREV")
    linked = replace(AGREEING, previous_proof_hash="0xprev", sequence_number="8")
    assert compare(delta(), linked, ChainNeighbours(previous=previous)) == []
    broken = replace(linked, previous_proof_hash="0xelse")
    findings = compare(delta(), broken, ChainNeighbours(previous=previous))
    assert kinds(findings) == [DiscrepancyKind.CHAIN_BROKEN]
    assert findings[0].evidence()["previous_delta_id"] == "7"


def test_chain_link_from_the_following_verified_delta() -> None:
    following = delta(id=9, previous_proof_hash="0xsomething-else")
    findings = compare(delta(), AGREEING, ChainNeighbours(following=following))
    assert kinds(findings) == [DiscrepancyKind.CHAIN_BROKEN]
    assert findings[0].other_delta_id == 9  # the broken link is the following delta's
    assert compare(delta(), AGREEING, ChainNeighbours(following=delta(id=9, previous_proof_hash=ROOT))) == []


def test_a_failed_claim_skips_the_proof_checks() -> None:
    failed = DeltaClaim(status=ClaimedStatus.FAILED, receipt_id="0xwhatever", content_hash="0xnope")
    assert compare(delta(), failed) == []
