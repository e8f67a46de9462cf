"""Where the webhook route has an event recorded: `LedgerRecorder` (the ledger's own
writer thread, in this process) or `pacrecon.webhook_writer.ProcessRecorder` (a writer
process of its own). Either answers only once the event's commit is durable."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from receiver.stored import Stored
from reconciler.apply import RecordEvent
from reconciler.events import PacSpaceEvent
from storage.ledger import Ledger


class Recorder(Protocol):
    async def record(self, event: PacSpaceEvent, raw_body: bytes, signature_timestamp: int, received_at: float) -> Stored:
        """Record `event` (parsed from `raw_body`, received at Unix time `received_at`) durably (exactly once: a repeat is a duplicate); raises
        `StorageUnavailable` when it cannot, and then nothing was acknowledged."""
        ...

    def check(self) -> None:
        """Raise `StorageUnavailable` while events cannot be recorded (readiness)."""
        ...

    async def start(self) -> None:
        """Before the first `record` (the app's startup)."""
        ...

    async def close(self) -> None:
        """After the last `record` (the app's shutdown, once requests have drained)."""
        ...


@dataclass(frozen=True)
class LedgerRecorder:
    ledger: Ledger

    async def record(self, event: PacSpaceEvent, raw_body: bytes, signature_timestamp: int, received_at: float) -> Stored:
        now = datetime.fromtimestamp(received_at, UTC)
        return Stored.of(await self.ledger.transact(RecordEvent(event, raw_body, signature_timestamp, now)))

    def check(self) -> None:
        pass  # the ledger's own check (readiness) covers its writer

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass  # the ledger is closed by its owner, after this
