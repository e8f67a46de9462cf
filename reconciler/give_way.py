"""Webhooks first, within a share: when a reconciliation pass waits for the daemon's webhooks.

The pass runs in the daemon's process, so it shares the event loop, the GIL and the
database with the webhooks. Measured without waiting (bench/ingest_during_pass.py): a pass
under webhook load took them from the webhooks, whose answers took seconds. So a pass
waits while the daemon is busy, a step at a time, never longer than MAX_STEPS steps at
once (so that it always moves on), and never for more than `share` of its time so far
(what suits depends on the database: `Settings.yield_share`, bench/RESULTS.md).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

STEP_SECONDS, MAX_STEPS = 0.02, 100  # 2 s at most at once


class GiveWay:
    """One pass's waits for the webhooks. Await the instance before each unit of work (a
    lookup, a page write); concurrent waits count once in `yielded_seconds` (the time
    during which at least one of the pass's tasks was waiting)."""

    def __init__(
        self,
        busy: Callable[[], bool] | None,
        share: float,
        sleep: Callable[[float], Awaitable[Any]],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`busy`: whether the daemon's webhooks need the process now (None: never);
        `share`: at most this fraction of the pass's time, from now on, is spent waiting
        (0: never wait; 1: only the cap at once)."""
        if not 0 <= share <= 1:
            raise ValueError(f"share must be between 0 and 1, not {share}")
        self.busy, self.share, self.sleep, self.monotonic = busy, share, sleep, monotonic
        self.started = monotonic()
        self._waiting = 0  # tasks waiting now
        self._window_began = 0.0  # when the first of them began
        self._closed = 0.0  # seconds of waiting windows that have ended

    @property
    def yielded_seconds(self) -> float:
        open_window = self.monotonic() - self._window_began if self._waiting else 0.0
        return self._closed + open_window

    def _may_wait(self) -> bool:
        return self.yielded_seconds < self.share * (self.monotonic() - self.started)

    async def __call__(self) -> None:
        busy = self.busy
        if busy is None or not self.share or not busy() or not self._may_wait():
            return
        if not self._waiting:
            self._window_began = self.monotonic()
        self._waiting += 1
        try:
            steps = 0
            while True:
                await self.sleep(STEP_SECONDS)
                steps += 1
                if steps >= MAX_STEPS or not busy() or not self._may_wait():
                    return
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._closed += self.monotonic() - self._window_began
