"""Recording PacSpace's events and applying its claims to the ledger.

Each function runs inside one ledger transaction (a `LedgerSession`); the caller
commits. A claim that disagrees with our record opens discrepancies and leaves
the record as it was: our record is never overwritten by PacSpace's word.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import structlog

from reconciler.claims import ChainNeighbours, ClaimedStatus, DeltaClaim, Finding, compare
from reconciler.events import PacSpaceEvent, parse_event
from storage.batch import Isolated, Outcome
from storage.delta_row import AnyDelta, DeltaRow
from storage.errors import is_database_trouble
from storage.models import Discrepancy, LocalDelta, WebhookEvent
from storage.page_session import NotReadAhead, PageSession
from storage.session import LedgerSession
from storage.vocabulary import DeltaStatus, DetectedBy, DiscrepancyKind, EventOutcome, VerifiedBy

log = structlog.get_logger("pacrecon.apply")
D = TypeVar("D", LocalDelta, DeltaRow)

# gaps that exist only while a delta is unsettled
CLEARED_BY_SETTLING = (DiscrepancyKind.STUCK, DiscrepancyKind.NOT_FOUND_UPSTREAM, DiscrepancyKind.UNVERIFIABLE)


@dataclass(frozen=True)
class Recorded:
    """What recording one event did."""

    duplicate: bool
    outcome: EventOutcome | None  # None for a duplicate: nothing was changed
    anchor_id: str | None
    delta_ids: tuple[int, ...] = ()
    findings: tuple[Finding, ...] = ()


def record_event(
    session: LedgerSession,
    event: PacSpaceEvent,
    *,
    raw_body: bytes,
    signature_timestamp: int,
    now: datetime,
) -> Recorded:
    """Store `event` exactly once and apply its claim to the matching local delta(s)."""
    claim = event.claim
    # the deltas before the event's row, as a page of events (`_record_together`) takes them:
    # on PostgreSQL reading them locks them, and two daemons given one event, each taking
    # the delta and the event's row in another order, would each wait for the other
    deltas = matching_deltas(session, claim) if claim else []
    stored = session.insert_event(WebhookEvent(**_event_row(event, raw_body, signature_timestamp, now)))
    anchor_id = claim.anchor_id if claim else None
    if stored is None:
        return Recorded(duplicate=True, outcome=None, anchor_id=anchor_id)
    if claim is None:
        return Recorded(duplicate=False, outcome=EventOutcome.IGNORED, anchor_id=None)
    return _apply_event(session, stored, claim, now, deltas)


def _event_row(event: PacSpaceEvent, raw_body: bytes, signature_timestamp: int, now: datetime) -> dict[str, Any]:
    """The `webhook_event` row of a new event, before any claim is applied."""
    claim = event.claim
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "raw_body": raw_body,
        "signature_timestamp": signature_timestamp,
        "received_at": now,
        "outcome": (EventOutcome.ORPHAN if claim else EventOutcome.IGNORED).value,
        "anchor_id": claim.anchor_id if claim else None,
        "item_hash": claim.content_hash if claim else None,
        "receipt_id": claim.receipt_id if claim else None,
        "applied_at": None,
    }


@dataclass(frozen=True)
class RecordEvent:
    """`record_event` as ledger work (what the webhook route submits). Consecutive ones
    are run as a batch by the ledger's writer (`run_batch`)."""

    event: PacSpaceEvent
    raw_body: bytes
    signature_timestamp: int
    now: datetime

    def __call__(self, session: LedgerSession) -> Recorded:
        return record_event(
            session, self.event, raw_body=self.raw_body, signature_timestamp=self.signature_timestamp, now=self.now
        )

    @classmethod
    def run_batch(cls, session: LedgerSession, works: Sequence[RecordEvent], isolated: Isolated) -> list[Outcome]:
        """As if each were recorded alone, in order, at a fraction of the cost when most
        events change nothing but their own row: those with no claim (ignored) and those
        whose anchor no delta of ours has (orphans) are inserted by one multi-row INSERT;
        the rest (a delta to compare, or no anchor to tell) run alone, after them.

        Running them after is the same as in order: an ignored or orphan event writes only
        its own row, and nothing the others do reads `webhook_event` but the unique event
        id, which is why a repeated id always goes the slow way, after its first copy.
        """
        claimed = {w.event.claim.anchor_id for w in works if w.event.claim is not None and w.event.claim.anchor_id}
        known = session.anchors_with_deltas(claimed)
        fast: list[int] = []
        seen: set[str] = set()
        repeats: set[int] = set()  # indexes of works whose event id came earlier in the batch
        for index, work in enumerate(works):
            claim = work.event.claim
            simple = claim is None or (claim.anchor_id is not None and claim.anchor_id not in known)
            if work.event.event_id in seen:
                repeats.add(index)
            elif simple:
                fast.append(index)
            seen.add(work.event.event_id)
        inserted = session.insert_events(
            [_event_row(w.event, w.raw_body, w.signature_timestamp, w.now) for w in (works[i] for i in fast)]
        )
        outcomes: list[Outcome | None] = [None] * len(works)
        for index in fast:
            event = works[index].event
            if event.event_id not in inserted:
                outcomes[index] = (None, Recorded(duplicate=True, outcome=None, anchor_id=event.claim.anchor_id if event.claim else None))
            elif event.claim is None:
                outcomes[index] = (None, Recorded(duplicate=False, outcome=EventOutcome.IGNORED, anchor_id=None))
            else:
                outcomes[index] = (None, Recorded(duplicate=False, outcome=EventOutcome.ORPHAN, anchor_id=event.claim.anchor_id))
        rest = [index for index, outcome in enumerate(outcomes) if outcome is None]
        rest_outcomes = _record_rest(session, [works[index] for index in rest], [index in repeats for index in rest], isolated)
        for index, outcome in zip(rest, rest_outcomes, strict=True):
            outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]  # every one is set now


def _record_rest(session: LedgerSession, works: list[RecordEvent], repeat: list[bool], isolated: Isolated) -> list[Outcome]:
    """The batch's events that change more than their own row, as if recorded one at a
    time, in order. When each is a new event naming one of our deltas by its anchor (the
    usual webhook), or a repeat of an event id (a duplicate: it changes nothing), the new
    ones are recorded as one page (`_record_together`), the repeats after them. Anything
    else among them, or a page that needs what it did not read ahead: each alone, in order."""
    firsts = [work for work, again in zip(works, repeat) if not again]
    if not firsts or any(work.event.claim is None or work.event.claim.anchor_id is None for work in firsts):
        return isolated(works)  # a claim found by item hash or receipt: its deltas are not read ahead
    recorded_before: frozenset[str] = frozenset()
    try:
        try:
            with session.savepoint():
                together = iter(_record_together(session, firsts, recorded_before))
        except RecordedBefore as exc:  # redelivered: once more, with those known (a third time is rare: alone)
            recorded_before = exc.event_ids
            log.info("webhook_batch_again", events=len(works), recorded_before=len(recorded_before))
            with session.savepoint():
                together = iter(_record_together(session, firsts, recorded_before))
    except Exception as exc:  # NotReadAhead, RecordedBefore again, or a claim we did not foresee
        if is_database_trouble(exc):
            raise  # the database's, not the events': recorded one at a time it fails again
        (log.info if isinstance(exc, NotReadAhead | RecordedBefore) else log.warning)(
            "webhook_batch_redone", events=len(works), error=f"{type(exc).__name__}: {exc}"[:500]
        )
        return isolated(works)
    others = iter(isolated([work for work, again in zip(works, repeat) if again]))
    return [next(others) if again else next(together) for again in repeat]


class RecordedBefore(Exception):
    """Events of a page were in the ledger already (recorded by an earlier batch, or by
    another daemon meanwhile): the page is undone and done again knowing them."""

    def __init__(self, event_ids: frozenset[str]) -> None:
        super().__init__(f"{len(event_ids)} event(s) recorded before")
        self.event_ids = event_ids


def _record_together(session: LedgerSession, works: list[RecordEvent], recorded_before: frozenset[str]) -> list[Outcome]:
    """New events (distinct ids) whose claims name deltas by anchor, recorded as
    `record_event` would one after the other, in a few statements: the deltas of their
    anchors read as one page (`PageSession`), the claims applied to it, then the events'
    rows in one INSERT, each with its final outcome (no second write of the row), and
    the deltas' changes and the discrepancies each in one statement.

    The claims are applied before the rows are inserted, so an event already in the
    ledger is known only at the INSERT: `RecordedBefore` then (unless it was named in
    `recorded_before`: a duplicate, left alone). `NotReadAhead` when the page lacks
    something. Either way the caller undoes it all."""
    claims = [work.event.claim for work in works]
    assert all(claim is not None and claim.anchor_id for claim in claims)  # _record_rest sends no other
    page = PageSession(session, anchor_ids=sorted({claim.anchor_id for claim in claims if claim and claim.anchor_id}))
    of_anchor: dict[str | None, list[DeltaRow]] = {}
    for delta in page.deltas:
        of_anchor.setdefault(delta.anchor_id, []).append(delta)
    matches = [_narrowed(of_anchor.get(claim.anchor_id, []), claim) if claim else [] for claim in claims]
    sequences = [(d.customer_id, number) for claim, deltas in zip(claims, matches) if claim for d in deltas for number in chain_sequences(claim)]
    page.read_ahead(
        sequences,
        [kind.value for kind in (*CLEARED_BY_SETTLING, DiscrepancyKind.ORPHAN_WEBHOOK)],
        [f"delta:{d.id}" for d in page.deltas] + [f"event:{w.event.event_id}" for w in works],
    )
    outcomes: list[Outcome] = []
    rows: list[dict[str, Any]] = []
    for work, claim, deltas in zip(works, claims, matches):
        assert claim is not None
        if work.event.event_id in recorded_before:
            outcomes.append((None, Recorded(duplicate=True, outcome=None, anchor_id=claim.anchor_id)))
            continue
        recorded = _apply_to(page, deltas, work.event.event_id, EventOutcome.ORPHAN.value, claim, work.now)
        row = _event_row(work.event, work.raw_body, work.signature_timestamp, work.now)
        if recorded.outcome is not None and recorded.outcome is not EventOutcome.ORPHAN:
            row.update(outcome=recorded.outcome.value, applied_at=work.now)
        rows.append(row)
        outcomes.append((None, recorded))
    inserted = session.insert_events(rows)
    if len(inserted) < len(rows):
        raise RecordedBefore(frozenset(row["event_id"] for row in rows) - inserted)
    page.write()
    return outcomes


def register_deltas(session: LedgerSession, deltas: Iterable[LocalDelta], now: datetime) -> list[LocalDelta]:
    """Add deltas PacSpace has accepted, then apply any orphan event waiting for them."""
    added = [session.add_delta(delta) for delta in deltas]
    match_orphans(session, added, now)
    return added


def match_late_orphans(session: LedgerSession, *, limit: int, now: datetime) -> int:
    """Apply up to `limit` orphan events whose delta was registered at the same moment
    (neither transaction saw the other): the ones `register_deltas` could not match.
    Each one applied is an orphan no more; returns how many were applied."""
    applied = 0
    for event in session.orphans_with_a_delta(limit):
        parsed = parse_event(event.raw_body)
        if parsed.claim is not None and _apply_event(session, event, parsed.claim, now).outcome is not EventOutcome.ORPHAN:
            applied += 1
    return applied


def match_orphans(session: LedgerSession, deltas: Iterable[LocalDelta], now: datetime) -> None:
    """Apply the orphan events that name any of `deltas` (now known by anchor, hash or receipt)."""
    session.flush()
    waiting: dict[int, WebhookEvent] = {}
    for delta in deltas:
        for event in session.orphan_events_for(delta):
            waiting.setdefault(event.id or 0, event)
    for event in sorted(waiting.values(), key=lambda e: e.id or 0):
        parsed = parse_event(event.raw_body)
        if parsed.claim is not None:
            _apply_event(session, event, parsed.claim, now)


def _apply_event(
    session: LedgerSession, event: WebhookEvent, claim: DeltaClaim, now: datetime, deltas: Sequence[AnyDelta] | None = None
) -> Recorded:
    """Apply the stored `event`'s claim to `deltas` (those it names: found here if None)."""
    recorded = _apply_to(session, matching_deltas(session, claim) if deltas is None else deltas, event.event_id, event.outcome, claim, now)
    if recorded.outcome is not None and recorded.outcome is not EventOutcome.ORPHAN:
        event.outcome = recorded.outcome.value
        event.applied_at = now
    return recorded


def _apply_to(
    session: LedgerSession, deltas: Sequence[AnyDelta], event_id: str, stored_outcome: str | None, claim: DeltaClaim, now: datetime
) -> Recorded:
    """Apply the claim of the stored event `event_id` (its outcome so far: `stored_outcome`)
    to `deltas`, those it names. The caller sets the event's new outcome unless it is ORPHAN."""
    if not deltas:
        return Recorded(duplicate=False, outcome=EventOutcome.ORPHAN, anchor_id=claim.anchor_id)
    findings: list[Finding] = []
    for delta in deltas:
        findings += apply_claim(session, delta, claim, now, event_id=event_id, by=VerifiedBy.WEBHOOK)
    outcome = EventOutcome.DISCREPANCY if findings else EventOutcome.APPLIED
    if stored_outcome == EventOutcome.ORPHAN.value:  # matched at last: it is no orphan any more
        session.resolve_open(DiscrepancyKind.ORPHAN_WEBHOOK.value, f"event:{event_id}", "matched to a delta", now)
    return Recorded(
        duplicate=False,
        outcome=outcome,
        anchor_id=claim.anchor_id,
        delta_ids=tuple(d.id for d in deltas if d.id is not None),
        findings=tuple(findings),
    )


def matching_deltas(session: LedgerSession, claim: DeltaClaim) -> list[LocalDelta]:
    """Our deltas a claim speaks of: by anchor id (narrowed by item hash within a batch
    anchor), else by the item's content hash, else by receipt id."""
    if claim.anchor_id:
        return _narrowed(session.deltas_by_anchor(claim.anchor_id), claim)
    if claim.content_hash:
        return session.deltas_by_item_hash(claim.content_hash)
    if claim.receipt_id:
        return session.deltas_by_receipt(claim.receipt_id)
    return []


def _narrowed(deltas: list[D], claim: DeltaClaim) -> list[D]:
    """Of an anchor's deltas (a batch anchor has several), those with the item hash the claim names."""
    if claim.content_hash and len(deltas) > 1:
        narrowed = [d for d in deltas if d.item_hash and d.item_hash.lower() == claim.content_hash.lower()]
        return narrowed or deltas  # none matches: compare all, each reports the mismatch
    return deltas


def apply_claim(
    session: LedgerSession,
    delta: AnyDelta,
    claim: DeltaClaim,
    now: datetime,
    *,
    event_id: str | None,
    by: VerifiedBy,
    run_id: int | None = None,
) -> list[Finding]:
    """Compare `claim` with `delta`; apply it when they agree, else open a discrepancy
    per finding and leave `delta` untouched. Returns the findings."""
    findings = compare(delta, claim, _chain_neighbours(session, delta, claim))
    # one sighting of a gap is one discrepancy update, however many fields show it
    grouped: dict[tuple[str, int | None], list[Finding]] = {}
    for finding in findings:
        grouped.setdefault((finding.kind.value, finding.other_delta_id or delta.id), []).append(finding)
    for (kind, subject_id), same in grouped.items():
        evidence = same[0].evidence()
        if len(same) > 1:
            evidence["also"] = [other.evidence() for other in same[1:]]
        session.open_discrepancy(
            Discrepancy(
                kind=kind,
                subject=f"delta:{subject_id}",
                delta_id=subject_id,
                anchor_id=delta.anchor_id if same[0].other_delta_id is None else None,
                customer_id=delta.customer_id,
                event_id=event_id,
                run_id=run_id,
                detected_by=(DetectedBy.WEBHOOK if by is VerifiedBy.WEBHOOK else DetectedBy.RECONCILER).value,
                evidence=evidence,
            ),
            now,
        )
    if not any(finding.other_delta_id is None for finding in findings):
        settled_before = DeltaStatus(delta.status).is_terminal
        _follow(delta, claim, now, by)
        if not settled_before and DeltaStatus(delta.status).is_terminal:
            # the condition is gone: PacSpace has decided (one query for the three kinds)
            session.resolve_open([kind.value for kind in CLEARED_BY_SETTLING], f"delta:{delta.id}", f"cleared: the delta is {delta.status}", now)
    return findings


def _follow(delta: AnyDelta, claim: DeltaClaim, now: datetime, by: VerifiedBy) -> None:
    """Move `delta` to the claimed state; a terminal status is never left."""
    status = DeltaStatus(delta.status)
    if claim.status is ClaimedStatus.VERIFIED:
        if status is not DeltaStatus.VERIFIED:
            delta.status = DeltaStatus.VERIFIED.value
            delta.verified_at = now
            delta.verified_by = by.value
            delta.verification_lag_ms = verification_lag_ms(delta, now)
        _fill(delta, claim)
    elif claim.status is ClaimedStatus.FAILED:
        if not status.is_terminal:
            delta.status = DeltaStatus.FAILED.value
            delta.failed_at = now
            delta.status_reason = claim.error
    elif claim.status is ClaimedStatus.PROCESSING and status in (DeltaStatus.PENDING, DeltaStatus.QUEUED):
        delta.status = DeltaStatus.PROCESSING.value
    else:
        return
    delta.updated_at = now


def verification_lag_ms(delta: AnyDelta, verified_at: datetime) -> int:
    """Milliseconds from emit (PacSpace's receivedAt, else our record) to verified, never negative."""
    emitted = delta.emitted_at or delta.created_at
    return max(0, round((verified_at - emitted).total_seconds() * 1000))


def _fill(delta: AnyDelta, claim: DeltaClaim) -> None:
    """Record what the verification adds; never replace a value we already hold."""
    for attribute, value in (
        ("receipt_id", claim.receipt_id),
        ("items_root", claim.items_root),
        ("tx_hash", claim.tx_hash),
        ("sequence_number", claim.sequence_number),
        ("previous_proof_hash", claim.previous_proof_hash),
        ("verification_reference", claim.verification_reference),
    ):
        if value is not None and getattr(delta, attribute) is None:
            setattr(delta, attribute, value)
    if claim.item_hashes is not None and not delta.item_hashes:
        delta.item_hashes = list(claim.item_hashes)


def chain_sequences(claim: DeltaClaim) -> tuple[str, ...]:
    """The sequence numbers of the chain neighbours a claim is checked against: the
    previous one (none before 0), then the following one; none unless it is verified."""
    sequence = claim.sequence_number
    if claim.status is not ClaimedStatus.VERIFIED or sequence is None or not (sequence.isascii() and sequence.isdigit()):
        return ()
    number = int(sequence)
    return (str(number - 1), str(number + 1)) if number > 0 else (str(number + 1),)


def _chain_neighbours(session: LedgerSession, delta: AnyDelta, claim: DeltaClaim) -> ChainNeighbours:
    sequences = chain_sequences(claim)
    if not sequences:
        return ChainNeighbours()
    previous = session.delta_by_sequence(delta.customer_id, sequences[0]) if len(sequences) == 2 else None
    following = session.delta_by_sequence(delta.customer_id, sequences[-1])
    return ChainNeighbours(
        previous=previous if previous is not delta else None,
        following=following if following is not delta else None,
    )
