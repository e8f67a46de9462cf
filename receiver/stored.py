"""`Stored`: what recording one webhook did, as the route answers and logs it. A module of
its own, light to import: the webhook writer process's launcher needs it before the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage.vocabulary import EventOutcome

if TYPE_CHECKING:
    from reconciler.apply import Recorded
    from reconciler.events import PacSpaceEvent


@dataclass(frozen=True)
class Stored:
    event_id: str
    event_type: str
    duplicate: bool
    outcome: EventOutcome | None  # None for a duplicate
    anchor_id: str | None
    finding_kinds: tuple[str, ...] = ()  # the kinds of discrepancy it showed, sorted

    @classmethod
    def of(cls, event: PacSpaceEvent, recorded: Recorded) -> Stored:
        kinds = tuple(sorted({f.kind.value for f in recorded.findings}))
        return cls(event.event_id, event.event_type, recorded.duplicate, recorded.outcome, recorded.anchor_id, kinds)
