"""What PacSpace claims about a delta, and how a claim is compared with our record.

Pure functions over plain data: no database, no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum

from reconciler.proofs import PROOF_VERSION, ProofUnverifiable, merkle_root
from storage.delta_row import AnyDelta
from storage.vocabulary import DeltaStatus, DiscrepancyKind


class ClaimedStatus(StrEnum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    VERIFIED = "VERIFIED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class DeltaClaim:
    """PacSpace's word on one delta (or one anchor), from a webhook or a status lookup.

    Every field but `status` may be missing: PacSpace's shapes vary, and a genuine
    event is never refused for lack of a field we only compare.
    """

    status: ClaimedStatus
    anchor_id: str | None = None
    customer_id: str | None = None
    amount: Decimal | None = None
    amount_unreadable: str | None = None  # the raw value when it was no finite number
    receipt_id: str | None = None  # the proof hash / items root PacSpace verified
    items_root: str | None = None
    item_hashes: tuple[str, ...] | None = None
    content_hash: str | None = None  # this item's own hash, when the claim names one
    previous_proof_hash: str | None = None
    sequence_number: str | None = None
    verification_reference: str | None = None
    tx_hash: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ChainNeighbours:
    """Our deltas of the same customer just before and after the claim's sequence number."""

    previous: AnyDelta | None = None
    following: AnyDelta | None = None


@dataclass(frozen=True)
class Finding:
    """One difference between our record and a claim; becomes a `Discrepancy`."""

    kind: DiscrepancyKind
    field: str
    ours: str | None
    theirs: str | None
    detail: str
    extra: dict[str, str] = field(default_factory=dict)
    # set when the finding is about another of our deltas (the chain's next link):
    # it is recorded against that delta and does not hold back the compared one
    other_delta_id: int | None = None

    def evidence(self) -> dict[str, str | None]:
        return {"field": self.field, "ours": self.ours, "theirs": self.theirs, "detail": self.detail, **self.extra}


def same_hash(a: object, b: object) -> bool:
    """Hex hashes compare without regard to letter case or surrounding space; anything
    that is not a string matches nothing."""
    return isinstance(a, str) and isinstance(b, str) and a.strip().lower() == b.strip().lower()


def compare(delta: AnyDelta, claim: DeltaClaim, chain: ChainNeighbours = ChainNeighbours()) -> list[Finding]:
    """Every difference between `delta` (ours) and `claim` (PacSpace's), in a fixed order.

    An empty list means the claim may be applied to the delta. Checks a claim
    cannot support (a field it lacks) are skipped, never failed.
    """
    findings = _identity_findings(delta, claim)
    findings += _status_findings(delta, claim)
    if claim.status is ClaimedStatus.VERIFIED:
        findings += _proof_findings(delta, claim)
        findings += _chain_findings(delta, claim, chain)
    return findings


def _identity_findings(delta: AnyDelta, claim: DeltaClaim) -> list[Finding]:
    findings = []
    if claim.customer_id is not None and claim.customer_id != delta.customer_id:
        findings.append(
            Finding(
                DiscrepancyKind.CUSTOMER_MISMATCH,
                "customerId",
                delta.customer_id,
                claim.customer_id,
                "PacSpace names another customer for this delta",
            )
        )
    if claim.amount_unreadable is not None:
        findings.append(
            Finding(
                DiscrepancyKind.AMOUNT_MISMATCH,
                "delta",
                str(delta.amount),
                claim.amount_unreadable,
                "PacSpace's amount is not a finite number",
            )
        )
    elif claim.amount is not None and claim.amount != delta.amount:
        findings.append(
            Finding(
                DiscrepancyKind.AMOUNT_MISMATCH,
                "delta",
                str(delta.amount),
                str(claim.amount),
                "PacSpace's amount differs from the amount we emitted",
            )
        )
    return findings


def _status_findings(delta: AnyDelta, claim: DeltaClaim) -> list[Finding]:
    ours = DeltaStatus(delta.status)
    conflicting = (claim.status is ClaimedStatus.VERIFIED and ours in (DeltaStatus.FAILED, DeltaStatus.REJECTED)) or (
        claim.status is ClaimedStatus.FAILED and ours is DeltaStatus.VERIFIED
    )
    if not conflicting:
        return []
    return [
        Finding(
            DiscrepancyKind.CONFLICTING_STATUS,
            "status",
            ours.value,
            claim.status.value,
            f"a terminal status never changes: ours is {ours.value}, PacSpace now says {claim.status.value}",
        )
    ]


def _proof_findings(delta: AnyDelta, claim: DeltaClaim) -> list[Finding]:
    findings = []
    # the proof hash must be the receipt id we were given when we emitted
    for name, theirs in (("receiptId", claim.receipt_id), ("itemsRoot", claim.items_root)):
        ours = delta.receipt_id or delta.items_root
        if theirs is not None and ours is not None and not same_hash(ours, theirs):
            findings.append(
                Finding(
                    DiscrepancyKind.RECEIPT_MISMATCH,
                    name,
                    ours,
                    theirs,
                    "the verified proof hash is not the receipt id PacSpace gave us at emit",
                )
            )
    # our item's content hash must be the one verified, and among the verified item hashes
    if delta.item_hash is not None:
        if claim.content_hash is not None and not same_hash(delta.item_hash, claim.content_hash):
            findings.append(
                Finding(
                    DiscrepancyKind.ITEM_HASH_MISMATCH,
                    "contentHash",
                    delta.item_hash,
                    claim.content_hash,
                    "the verified content hash is not our item's hash",
                )
            )
        if claim.item_hashes is not None and not any(same_hash(delta.item_hash, h) for h in claim.item_hashes):
            findings.append(
                Finding(
                    DiscrepancyKind.ITEM_HASH_MISMATCH,
                    "itemHashes",
                    delta.item_hash,
                    ",".join(claim.item_hashes),
                    "our item's hash is not among the verified item hashes",
                )
            )
    if not findings and claim.item_hashes and claim.receipt_id:
        findings += _root_findings(claim.item_hashes, claim.receipt_id)
    return findings


def _root_findings(item_hashes: tuple[str, ...], receipt_id: str) -> list[Finding]:
    """PacSpace's root must recompute from its own item hashes (reconciler.proofs)."""
    try:
        root = merkle_root(item_hashes)
    except ProofUnverifiable as exc:
        return [Finding(DiscrepancyKind.UNVERIFIABLE, "itemHashes", None, None, f"the root cannot be recomputed: {exc}")]
    if same_hash(root, receipt_id):
        return []
    return [
        Finding(
            DiscrepancyKind.UNVERIFIABLE,
            "receiptId",
            root,
            receipt_id,
            f"PacSpace's receipt is not the Merkle root of its item hashes ({PROOF_VERSION})",
        )
    ]


def _chain_findings(delta: AnyDelta, claim: DeltaClaim, chain: ChainNeighbours) -> list[Finding]:
    findings = []
    previous = chain.previous
    if claim.previous_proof_hash is not None and previous is not None and previous.receipt_id is not None:
        if not same_hash(previous.receipt_id, claim.previous_proof_hash):
            findings.append(
                Finding(
                    DiscrepancyKind.CHAIN_BROKEN,
                    "previousProofHash",
                    previous.receipt_id,
                    claim.previous_proof_hash,
                    f"the proof does not link to the customer's previous verified delta (id {previous.id})",
                    {"previous_delta_id": str(previous.id)},
                )
            )
    following = chain.following
    receipt = claim.receipt_id or delta.receipt_id
    if following is not None and following.previous_proof_hash is not None and receipt is not None:
        if not same_hash(following.previous_proof_hash, receipt):
            findings.append(
                Finding(
                    DiscrepancyKind.CHAIN_BROKEN,
                    "previousProofHash",
                    receipt,
                    following.previous_proof_hash,
                    f"the customer's next verified delta (id {following.id}) does not link to this proof",
                    {"preceding_delta_id": str(delta.id)},
                    other_delta_id=following.id,
                )
            )
    return findings
