"""Deliveries that leave no event row (duplicates, rejections, refusals while the ledger
is away), counted in memory and added to the ledger's hourly tallies now and then.

A flood of forged requests must not become a flood of writes: counting is a dict
update, and one transaction adds everything counted since the last one. Counts not
yet added when the process dies are lost (at most one interval's worth); they are
statistics, not deliveries (nothing here was acknowledged as recorded).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

from storage.ledger import Ledger
from storage.session import LedgerSession

TALLIED = frozenset({"duplicate", "rejected", "unavailable"})


class WebhookTally:
    """Counted and flushed on the event loop's thread only: no lock needed."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[datetime, str, str]] = Counter()

    def count(self, outcome: str, reason: str, clock: Callable[[], float]) -> None:
        if outcome in TALLIED:  # the clock is read only for what is counted: not per recorded event
            now = clock()
            self._counts[(datetime.fromtimestamp(now - now % 3600, UTC), outcome, reason)] += 1

    def _take(self) -> Counter[tuple[datetime, str, str]]:
        taken, self._counts = self._counts, Counter()
        return taken

    async def flush(self, ledger: Ledger) -> None:
        """Add what was counted to the ledger; kept for the next flush if it cannot be."""
        taken = self._take()
        if not taken:
            return
        by_hour: dict[datetime, dict[tuple[str, str], int]] = {}
        for (hour, outcome, reason), n in taken.items():
            by_hour.setdefault(hour, {})[(outcome, reason)] = n

        def add(session: LedgerSession) -> None:
            for hour, counts in sorted(by_hour.items()):
                session.add_webhook_tallies(hour, counts)

        try:
            await ledger.transact(add)
        except BaseException:  # not written (or not known to be): counted again next time
            self._counts.update(taken)
            raise

