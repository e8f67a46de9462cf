"""The fixed words the ledger stores. Values are stored as text, so they never change."""

from enum import StrEnum


class DeltaStatus(StrEnum):
    PENDING = "PENDING"  # committed locally, not yet accepted by PacSpace
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    VERIFIED = "VERIFIED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"  # PacSpace refused it for good (validation, 402, 412)

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({DeltaStatus.VERIFIED, DeltaStatus.FAILED, DeltaStatus.REJECTED})
UNSETTLED_STATUSES = (DeltaStatus.QUEUED, DeltaStatus.PROCESSING)


class VerifiedBy(StrEnum):
    WEBHOOK = "webhook"
    RECONCILER = "reconciler"


class DeltaSource(StrEnum):
    OUTBOX = "outbox"  # emitted through pacrecon
    IMPORT = "import"  # emitted elsewhere, registered from its emit answer


class SubmissionStatus(StrEnum):
    PENDING = "PENDING"  # committed locally; not yet answered by PacSpace
    SENT = "SENT"  # PacSpace answered; its answer is recorded on the deltas
    REJECTED = "REJECTED"  # PacSpace refused it for good


class EventOutcome(StrEnum):
    APPLIED = "applied"  # matched local delta(s); their state follows the event
    DISCREPANCY = "discrepancy"  # matched, but the event disagrees with our record
    ORPHAN = "orphan"  # no local delta matches yet; matched when one is recorded
    IGNORED = "ignored"  # an event type we record but do not act on


class DiscrepancyKind(StrEnum):
    MISSING_WEBHOOK = "missing_webhook"
    RECEIPT_MISMATCH = "receipt_mismatch"
    ITEM_HASH_MISMATCH = "item_hash_mismatch"
    AMOUNT_MISMATCH = "amount_mismatch"
    CUSTOMER_MISMATCH = "customer_mismatch"
    UPSTREAM_FAILED = "upstream_failed"
    NOT_FOUND_UPSTREAM = "not_found_upstream"
    STUCK = "stuck"
    ORPHAN_WEBHOOK = "orphan_webhook"
    CHAIN_BROKEN = "chain_broken"
    CONFLICTING_STATUS = "conflicting_status"
    UNVERIFIABLE = "unverifiable"


class DiscrepancyStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class DetectedBy(StrEnum):
    WEBHOOK = "webhook"
    RECONCILER = "reconciler"


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
