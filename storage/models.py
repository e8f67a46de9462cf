"""The ledger's tables. Column names follow PacSpace's words (anchor_id, receipt_id, item_hash)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, LargeBinary, text
from sqlmodel import Field, SQLModel

from storage.types import ExactAmount, UtcDateTime
from storage.vocabulary import DiscrepancyStatus, UNSETTLED_STATUSES

# Queries repeat these predicates word for word: SQLite uses a partial index only
# when the query's WHERE visibly implies the index's, and bound parameters do not.
UNSETTLED_PREDICATE = text("status IN (%s)" % ", ".join(f"'{s.value}'" for s in UNSETTLED_STATUSES))
ORPHAN_PREDICATE = text("outcome = 'orphan'")
# An orphan is matched by its anchor id when it names one, else by its item hash, else by its
# receipt id (reconciler.apply.matching_deltas), so it is indexed under that key alone: with
# random ids, each index entry of a new event is one more page written at its commit.
UNANCHORED_ORPHAN_PREDICATE = text("outcome = 'orphan' AND anchor_id IS NULL")
RECEIPT_ONLY_ORPHAN_PREDICATE = text("outcome = 'orphan' AND anchor_id IS NULL AND item_hash IS NULL")
VERIFIED_LAG_PREDICATE = text("verification_lag_ms IS NOT NULL")
NUMBERED_PREDICATE = text("sequence_number IS NOT NULL")
_OPEN_SQL = text(f"status = '{DiscrepancyStatus.OPEN.value}'")


def _time(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UtcDateTime(), nullable=nullable, index=index))


class LocalDelta(SQLModel, table=True):
    """One delta item we emitted (or imported), and what PacSpace has confirmed of it."""

    __tablename__ = "local_delta"
    __table_args__ = (
        # "find stale unsettled deltas": a small partial index, so its cost follows
        # the number of unsettled deltas and not the size of the ledger.
        Index(
            "ix_local_delta_unsettled",
            "emitted_at",
            "id",
            sqlite_where=UNSETTLED_PREDICATE,
            postgresql_where=UNSETTLED_PREDICATE,
        ),
        # numbered deltas only on SQLite: its statistics would count the unnumbered ones of a
        # customer as one key and make a lookup by number look like a scan (migration 0006)
        Index("ix_local_delta_customer_sequence", "customer_id", "sequence_number", sqlite_where=NUMBERED_PREDICATE),
        Index("ix_local_delta_customer_id", "customer_id", "id"),
        Index("ix_local_delta_status_id", "status", "id"),
        # the report's totals per status (and per customer) read these indexes alone, not the table
        Index("ix_local_delta_status_amount", "status", "amount"),
        Index("ix_local_delta_customer_status_amount", "customer_id", "status", "amount"),
        # the report's lag percentiles walk this index from either end
        Index(
            "ix_local_delta_verification_lag",
            "verification_lag_ms",
            sqlite_where=VERIFIED_LAG_PREDICATE,
            postgresql_where=VERIFIED_LAG_PREDICATE,
        ),
        # one row per accepted item: registering the same emit answer twice adds nothing
        Index("ux_local_delta_anchor_item", "anchor_id", "item_hash", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    anchor_id: str | None = Field(default=None, max_length=128)  # looked up via ux_local_delta_anchor_item
    item_hash: str | None = Field(default=None, max_length=130, index=True)
    customer_id: str = Field(max_length=128)
    amount: Decimal = Field(sa_column=Column(ExactAmount(), nullable=False))
    reason: str = Field(max_length=500)
    reference_id: str | None = Field(default=None, max_length=256)
    # "metadata" is reserved by SQLAlchemy's declarative base, hence the attribute name
    delta_metadata: dict[str, Any] | None = Field(default=None, sa_column=Column("metadata", JSON))
    idempotency_key: str = Field(max_length=255, unique=True)
    source: str = Field(max_length=16)
    submission_id: int | None = Field(default=None, foreign_key="outbox_submission.id", index=True)
    submission_index: int | None = None  # the item's position in its submission
    status: str = Field(max_length=16)
    status_reason: str | None = Field(default=None, max_length=2000)
    receipt_id: str | None = Field(default=None, max_length=130, index=True)
    items_root: str | None = Field(default=None, max_length=130)
    item_hashes: list[str] | None = Field(default=None, sa_column=Column(JSON))
    tx_hash: str | None = Field(default=None, max_length=130)
    sequence_number: str | None = Field(default=None, max_length=64)
    previous_proof_hash: str | None = Field(default=None, max_length=130)
    verification_reference: str | None = Field(default=None, max_length=256)
    verified_by: str | None = Field(default=None, max_length=16)
    created_at: datetime = _time(nullable=False)
    emitted_at: datetime | None = _time()  # PacSpace's receivedAt, or when we got the answer
    verified_at: datetime | None = _time()
    failed_at: datetime | None = _time()
    updated_at: datetime = _time(nullable=False)
    # verified_at - emitted_at, set with verified_at: percentiles need an index, not arithmetic per row
    verification_lag_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class OutboxSubmission(SQLModel, table=True):
    """One emit request we owe PacSpace (a delta, or a batch of them), kept until answered.

    Committed before anything is sent; re-sent with the same idempotency key and the
    same bytes until PacSpace answers, so PacSpace records it exactly once.
    """

    __tablename__ = "outbox_submission"
    __table_args__ = (Index("ix_outbox_submission_due", "status", "next_attempt_at"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=8)  # "single" or "batch"
    idempotency_key: str = Field(max_length=255, sa_column_kwargs={"unique": True, "nullable": False})
    client_key: str | None = Field(default=None, max_length=255, sa_column_kwargs={"unique": True})
    fingerprint: str = Field(max_length=64)  # sha256 of the request, to tell a repeat from a conflict
    request_body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    credit_pool_id: str | None = Field(default=None, max_length=255)
    status: str = Field(max_length=16)
    attempts: int = 0
    last_error: str | None = Field(default=None, max_length=2000)
    next_attempt_at: datetime = _time(nullable=False)  # also a lease: the sender owns it until then
    answer: bytes | None = Field(default=None, sa_column=Column(LargeBinary))  # what we answered the caller
    answer_status: int | None = None
    created_at: datetime = _time(nullable=False)
    sent_at: datetime | None = _time()


class WebhookEvent(SQLModel, table=True):
    """A genuine PacSpace webhook, exactly once per event id, with its raw signed body."""

    __tablename__ = "webhook_event"
    __table_args__ = (
        Index("ix_webhook_event_orphan_anchor", "anchor_id", sqlite_where=ORPHAN_PREDICATE, postgresql_where=ORPHAN_PREDICATE),
        Index(
            "ix_webhook_event_orphan_item_unanchored",
            "item_hash",
            sqlite_where=UNANCHORED_ORPHAN_PREDICATE,
            postgresql_where=UNANCHORED_ORPHAN_PREDICATE,
        ),
        Index(
            "ix_webhook_event_orphan_receipt_only",
            "receipt_id",
            sqlite_where=RECEIPT_ONLY_ORPHAN_PREDICATE,
            postgresql_where=RECEIPT_ONLY_ORPHAN_PREDICATE,
        ),
        Index("ix_webhook_event_orphan_age", "received_at", sqlite_where=ORPHAN_PREDICATE, postgresql_where=ORPHAN_PREDICATE),
    )

    id: int | None = Field(default=None, primary_key=True)
    # the envelope id, or "sha256:<hex of the raw body>" when the body has none
    event_id: str = Field(max_length=255, sa_column_kwargs={"unique": True, "nullable": False})
    event_type: str = Field(max_length=128)
    raw_body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # seconds since the epoch, from X-PacSpace-Timestamp
    signature_timestamp: int = Field(sa_column=Column(BigInteger, nullable=False))
    received_at: datetime = _time(nullable=False, index=True)
    outcome: str = Field(max_length=16)
    anchor_id: str | None = Field(default=None, max_length=128)
    item_hash: str | None = Field(default=None, max_length=130)
    receipt_id: str | None = Field(default=None, max_length=130)
    applied_at: datetime | None = _time()


class Discrepancy(SQLModel, table=True):
    """A gap between our record and PacSpace's, open until fixed or resolved by a person."""

    __tablename__ = "discrepancy"
    __table_args__ = (
        # one open discrepancy per kind and subject: a second sighting updates it
        Index(
            "ux_discrepancy_open_subject",
            "kind",
            "subject",
            unique=True,
            sqlite_where=_OPEN_SQL,
            postgresql_where=_OPEN_SQL,
        ),
        Index("ix_discrepancy_status_kind", "status", "kind", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32)
    status: str = Field(max_length=16)
    subject: str = Field(max_length=300)  # "delta:<id>", "event:<event id>", …
    delta_id: int | None = Field(default=None, foreign_key="local_delta.id", index=True)
    anchor_id: str | None = Field(default=None, max_length=128)
    customer_id: str | None = Field(default=None, max_length=128)
    event_id: str | None = Field(default=None, max_length=255)
    run_id: int | None = Field(default=None, foreign_key="reconciliation_run.id")
    detected_by: str = Field(max_length=16)
    evidence: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    occurrences: int = 1
    first_seen_at: datetime = _time(nullable=False)
    last_seen_at: datetime = _time(nullable=False)
    resolved_at: datetime | None = _time()
    resolution_note: str | None = Field(default=None, max_length=2000)


class ReconciliationRun(SQLModel, table=True):
    """One reconciliation pass: when, how much it checked and fixed, what it found."""

    __tablename__ = "reconciliation_run"

    id: int | None = Field(default=None, primary_key=True)
    status: str = Field(max_length=16)
    dry_run: bool = False
    started_at: datetime = _time(nullable=False, index=True)
    finished_at: datetime | None = _time()
    checked: int = 0
    fixed: int = 0
    errors: int = 0
    found: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error_detail: str | None = Field(default=None, max_length=4000)


class WebhookTally(SQLModel, table=True):
    """Webhook deliveries that left no event row (duplicates, rejections), counted per hour.

    Counted in memory by the receiver and added here every few seconds, so that a
    flood of forgeries costs no write per request.
    """

    __tablename__ = "webhook_tally"
    __table_args__ = (Index("ux_webhook_tally_hour_outcome_reason", "hour", "outcome", "reason", unique=True),)

    id: int | None = Field(default=None, primary_key=True)
    hour: datetime = _time(nullable=False)  # the start of the hour (UTC)
    outcome: str = Field(max_length=16)  # "duplicate", "rejected", "unavailable"
    reason: str = Field(max_length=64)  # the rejection's code; "" otherwise
    count: int = Field(sa_column=Column(BigInteger, nullable=False))


class LedgerRollup(SQLModel, table=True):
    """Running aggregates kept by database triggers (migration 0005), so the report reads a
    few hundred rows instead of millions: per delta status (count, exact amount), per
    verification-lag bucket (count), per webhook event outcome (count).

    On SQLite the triggers update these rows in place. On PostgreSQL they append to
    `ledger_rollup_journal`, which readers add in and a job folds in now and then.
    Amounts are kept as whole units plus 1e-9 units, summed separately, so no sum
    overflows or rounds.
    """

    __tablename__ = "ledger_rollup"

    metric: str = Field(max_length=32, primary_key=True)  # "delta_status", "lag_bucket", "event_outcome"
    key: str = Field(max_length=64, primary_key=True)  # the status, the bucket's lower bound in ms, the outcome
    count: int = Field(sa_column=Column(BigInteger, nullable=False))
    whole: int = Field(sa_column=Column(BigInteger, nullable=False))
    nanos: int = Field(sa_column=Column(BigInteger, nullable=False))


class LedgerRollupJournal(SQLModel, table=True):
    """PostgreSQL's changes to `ledger_rollup` not folded in yet: a row per (metric, key)
    per statement that inserted or deleted rows (migration 0007), a row per change per
    updated row."""

    __tablename__ = "ledger_rollup_journal"

    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True, autoincrement=True))
    metric: str = Field(max_length=32)
    key: str = Field(max_length=64)
    count: int = Field(sa_column=Column(BigInteger, nullable=False))
    whole: int = Field(sa_column=Column(BigInteger, nullable=False))
    nanos: int = Field(sa_column=Column(BigInteger, nullable=False))


class LagBucket(SQLModel, table=True):
    """Lower bounds of the verification-lag buckets: one per ms below 100 ms, then each
    1 % above the last, so a percentile read from them is within 1 % of the exact one."""

    __tablename__ = "lag_bucket"

    lower_ms: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))


class AuditEntry(SQLModel, table=True):
    """One change made by the reconciler or a person: what, when, before -> after, by whom."""

    __tablename__ = "audit_entry"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _time(nullable=False, index=True)
    actor: str = Field(max_length=64)  # "reconciler", or "admin"
    action: str = Field(max_length=64)  # mark_verified, mark_failed, resend, resolve, ...
    run_id: int | None = Field(default=None, foreign_key="reconciliation_run.id", index=True)
    delta_id: int | None = Field(default=None, foreign_key="local_delta.id", index=True)
    discrepancy_id: int | None = Field(default=None, foreign_key="discrepancy.id")
    before: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    after: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    note: str | None = Field(default=None, max_length=2000)
