"""Deliveries that leave no event row (duplicates, rejections, refusals while the ledger
is away), counted in memory and added to the ledger's hourly tallies now and then.

A flood of forged requests must not become a flood of writes: counting is a dict
update, and one transaction adds everything counted since the last one. Counts not
yet added when the process dies are lost (at most one interval's worth); they are
statistics, not deliveries (nothing here was acknowledged as recorded).
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime

from storage.ledger import Ledger
from storage.session import LedgerSession

TALLIED = frozenset({"duplicate", "rejected", "unavailable"})


class WebhookTally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[datetime, str, str]] = Counter()

    def count(self, outcome: str, reason: str, now: datetime) -> None:
        if outcome in TALLIED:
            with self._lock:
                self._counts[(now.replace(minute=0, second=0, microsecond=0), outcome, reason)] += 1

    def _take(self) -> Counter[tuple[datetime, str, str]]:
        with self._lock:
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
            with self._lock:
                self._counts.update(taken)
            raise

