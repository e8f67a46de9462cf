"""Where the webhook route has an event recorded: `LedgerRecorder` (the ledger's own
writer thread, in this process) or `pacrecon.webhook_writer.ProcessRecorder` (a writer
process of its own). Either answers only once the event's commit is durable."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from receiver.stored import Stored
from reconciler.apply import RecordEvent
from reconciler.events import parse_event
from storage.ledger import Ledger


class Recorder(Protocol):
    async def record(self, raw_body: bytes, signature_timestamp: int, received_at: float) -> Stored:
        """Parse the event in `raw_body` (its signature verified; received at Unix time
        `received_at`) and record it durably (exactly once: a repeat is a duplicate).
        Raises `InvalidEvent` when the body is no event we can read, `StorageUnavailable`
        when it cannot be recorded; either way nothing was acknowledged. The recorder
        parses, not the route: the writer process parses in its own interpreter, so the
        daemon's event loop never parses the body at all."""
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

    async def record(self, raw_body: bytes, signature_timestamp: int, received_at: float) -> Stored:
        event = parse_event(raw_body)
        now = datetime.fromtimestamp(received_at, UTC)
        return Stored.of(event, await self.ledger.transact(RecordEvent(event, raw_body, signature_timestamp, now)))

    def check(self) -> None:
        pass  # the ledger's own check (readiness) covers its writer

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass  # the ledger is closed by its owner, after this
