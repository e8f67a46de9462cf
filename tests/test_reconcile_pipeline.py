"""The pass writes a page while it looks up the next: what a failure, a stop or a cancel
in the middle of that leaves, on real SQLite and PostgreSQL. A real lock held from a
second connection keeps a page's write waiting; the answers come from an
httpx.MockTransport so that the test decides when each lookup returns."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from reconciler.pacspace import PacSpaceClient, RetryPolicy
from reconciler.reconcile import PassSummary, Reconciler
from storage.engine import LOCK_TIMEOUT_MS
from storage.models import ReconciliationRun
from storage.sql_ledger import SqlLedger
from tests.test_reconcile_edges import H, add, delta, kinds, ok, state

PAGE = 2  # two pages of two deltas: "first" is written while "second" is looked up
FIRST, SECOND = ["a_1", "a_2"], ["a_3", "a_4"]


class WriteLock:
    """A lock, held from a connection of its own, that the ledger's write of `delta_ids`
    waits for (SQLite: the database's write lock; PostgreSQL: those rows' locks). Taken
    while the pass looks up the first page: the pass's run row is written before."""

    def __init__(self, database_url: str, delta_ids: list[int]) -> None:
        self._url, self._ids = make_url(database_url), delta_ids
        self._connection: Any = None

    def take(self) -> None:
        if self._connection is not None:
            return
        if self._url.get_backend_name() == "sqlite":
            self._connection = sqlite3.connect(self._url.database or "", isolation_level=None)
            self._connection.execute("BEGIN IMMEDIATE")
        else:
            self._connection = psycopg.connect(self._url.set(drivername="postgresql").render_as_string(hide_password=False))
            self._connection.execute("SELECT id FROM local_delta WHERE id = ANY(%s) FOR UPDATE", [self._ids])

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.execute("ROLLBACK") if isinstance(connection, sqlite3.Connection) else connection.rollback()
            connection.close()


def verified(anchor: str) -> httpx.Response:
    if anchor == "webhooks":  # the pass's last step: the failed deliveries (none)
        return ok({"deliveries": []})
    n = int(anchor.split("_")[1])
    return ok({"anchorId": anchor, "status": "ANCHORED", "receiptId": H(f"item{n}"), "itemHashes": [H(f"item{n}")],
               "customerId": "cust", "delta": n})


def seed(ledger: SqlLedger) -> list[int]:
    """Four stale deltas, one anchor each, in the order the pass pages them."""
    return add(ledger, *(delta(n, f"a_{n}", idempotency_key=f"k{n}") for n in range(1, 5)))


@contextlib.contextmanager
def seeded_and_locked(database_url: str, lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> Iterator[tuple[SqlLedger, list[int], WriteLock]]:
    """A ledger (giving up on a lock after `lock_timeout_ms`) of the four stale deltas, and
    the lock that holds up the first page's write, not taken yet; both let go at the end."""
    ledger = SqlLedger.from_url(database_url, lock_timeout_ms=lock_timeout_ms)
    try:
        ids = seed(ledger)
        lock = WriteLock(database_url, ids[:PAGE])
        try:
            yield ledger, ids, lock
        finally:
            lock.release()
    finally:
        ledger.close()


async def pass_with(ledger: SqlLedger, answer: Callable[[str, Reconciler], Awaitable[httpx.Response]],
                    started: Callable[[asyncio.Task[PassSummary]], Awaitable[None]] | None = None) -> PassSummary:
    """One pass, pages of PAGE, whose lookups `answer` (given the anchor and the reconciler)."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: handler(request))) as http:
        client = PacSpaceClient(http, "http://pacspace.test", "k", RetryPolicy(attempts=1), sleep=lambda _: asyncio.sleep(0))
        reconciler = Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=3600, concurrency=2, page_size=PAGE)

        async def handler(request: httpx.Request) -> httpx.Response:
            return await answer(request.url.path.rsplit("/", 1)[-1], reconciler)

        task = asyncio.create_task(reconciler.run_pass())
        if started is not None:
            await started(task)
        return await task


def run_row(ledger: SqlLedger) -> tuple[str, str | None, int, int]:
    rows = ledger.read_sync(lambda s: [(r.status, r.error_detail, r.checked, r.fixed) for r in s._session.query(ReconciliationRun)])
    assert len(rows) >= 1
    return rows[-1]


def test_a_page_that_fails_to_be_written_while_the_next_is_looked_up_fails_the_pass_and_the_next_pass_does_it(database_url: str) -> None:
    with seeded_and_locked(database_url, lock_timeout_ms=300) as (ledger, ids, lock):

        async def answer(anchor: str, _: Reconciler) -> httpx.Response:
            if anchor in FIRST:
                lock.take()
            elif anchor in SECOND:
                await asyncio.sleep(1.5)  # the first page's write gives up meanwhile (300 ms)
                lock.release()  # so that the failed pass can still finish its run row
            return verified(anchor)

        failed = asyncio.run(pass_with(ledger, answer))
        lock.release()  # let go by the lookups already; the next pass needs it free
        assert failed.status == "failed" and "lock" in (failed.error_detail or "").lower(), failed.error_detail
        # nothing of either page was written: the second is not written after the first failed
        assert failed.checked == 0 and failed.fixed == 0
        assert state(ledger, ids) == ["QUEUED"] * 4
        assert run_row(ledger)[:1] == ("failed",)

        async def at_once(anchor: str, _: Reconciler) -> httpx.Response:
            return verified(anchor)

        done = asyncio.run(pass_with(ledger, at_once))
        assert (done.status, done.checked, done.fixed) == ("completed", 4, 4)
        assert state(ledger, ids) == ["VERIFIED"] * 4 and kinds(ledger) == []


def test_a_stop_during_the_next_pages_lookups_writes_and_counts_both_pages(ledger: SqlLedger) -> None:
    ids = seed(ledger)

    async def answer(anchor: str, reconciler: Reconciler) -> httpx.Response:
        if anchor in SECOND:
            reconciler.request_stop()
        return verified(anchor)

    stopped = asyncio.run(pass_with(ledger, answer))
    assert stopped.status == "failed" and "stopped" in (stopped.error_detail or "")
    # the page looked up when the stop came is written before the pass ends, and counted
    assert state(ledger, ids) == ["VERIFIED"] * 4
    assert (stopped.checked, stopped.fixed) == (4, 4)
    assert run_row(ledger) == ("failed", stopped.error_detail, 4, 4)


def test_a_page_whose_write_fails_while_the_pass_stops_for_another_reason_is_logged(database_url: str) -> None:
    with seeded_and_locked(database_url, lock_timeout_ms=300) as (ledger, ids, lock):

        async def answer(anchor: str, _: Reconciler) -> httpx.Response:
            if anchor in FIRST:
                lock.take()
            if anchor not in SECOND:
                return verified(anchor)
            await asyncio.sleep(0.6)  # meanwhile the first page's write gives up (300 ms)
            lock.release()
            return httpx.Response(500, json={"success": False, "error": {"code": "INTERNAL_ERROR", "message": "down"}})

        with capture_logs() as events:
            failed = asyncio.run(pass_with(ledger, answer))
        # the pass fails for its own reason (no lookup answered), and the lost page is in the log
        assert failed.status == "failed" and "answered no lookup" in (failed.error_detail or ""), failed.error_detail
        assert [e["event"] for e in events if e["event"] == "reconcile_page_not_written"] == ["reconcile_page_not_written"]
        assert state(ledger, ids) == ["QUEUED"] * 4 and failed.checked == 0


def test_a_cancel_while_waiting_for_a_pages_write_still_counts_that_page(database_url: str) -> None:
    with seeded_and_locked(database_url) as (ledger, ids, lock):
        second_answered = asyncio.Event()

        async def answer(anchor: str, _: Reconciler) -> httpx.Response:
            if anchor in FIRST:
                lock.take()
            elif anchor in SECOND:
                second_answered.set()
            return verified(anchor)

        async def cancel_while_writing(task: asyncio.Task[PassSummary]) -> None:
            await second_answered.wait()
            await asyncio.sleep(0.3)  # the pass now waits for the first page's write, held by the lock
            task.cancel()
            await asyncio.sleep(0.1)
            lock.release()  # the write goes through: the ledger has it, and commits it

        with pytest.raises(asyncio.CancelledError):
            asyncio.run(pass_with(ledger, answer, started=cancel_while_writing))
        assert state(ledger, ids) == ["VERIFIED", "VERIFIED", "QUEUED", "QUEUED"]
        # the committed page is in the run row's counts, though the pass was interrupted
        assert run_row(ledger) == ("failed", "interrupted", 2, 2)
