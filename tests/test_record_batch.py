"""Webhook events recorded many to a batch by the ledger's writer (`RecordEvent.run_batch`)
give what recording them one at a time gives: the same answers, the same ledger."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from reconciler.apply import RecordEvent
from reconciler.events import parse_event
from storage.errors import StorageUnavailable
from storage.models import Discrepancy
from storage.session import LedgerSession
from storage.sql_ledger import SqlLedger
from tests.conftest import empty_postgres, migrated_sqlite_url
from tests.test_apply import LATER, NOW, H, local, register, verified
from tests.webhooks import envelope


def work(body: dict[str, Any], now: datetime = LATER) -> RecordEvent:
    raw = json.dumps(body).encode()
    return RecordEvent(parse_event(raw), raw, int(now.timestamp()), now)


def record_alone(ledger: SqlLedger, body: dict[str, Any], now: datetime = LATER) -> Any:
    """`body` recorded by `record_event` on its own, the ORM way: the work handed to the
    ledger is a plain function, which the writer never batches (a `RecordEvent` alone in
    a batch still takes the batch's path)."""
    recorded = work(body, now)
    return ledger.transact_sync(lambda session: recorded(session))


def scenario() -> tuple[list[int], list[dict[str, Any]]]:
    """Deltas 1-4 known; events of every kind, repeats inside the batch and across it."""
    orphan, matched = verified(7), verified(1)
    bodies = [
        matched,
        orphan,
        envelope("delta.created", {"recordId": "a_9"}),  # not ours to act on: ignored
        verified(2, receiptId=H("forged")),  # a discrepancy
        dict(orphan),  # a repeat of an orphan in the same batch
        envelope("delta.verified", {"proof": {"proofHash": H("item3"), "contentHash": H("item3")}}),  # no anchor
        dict(matched),  # a repeat of a matched event in the same batch
        envelope("delta.failed", {"recordId": "a_4", "error": "anchoring failed"}),
        verified(8),
        {**verified(9), "id": matched["id"]},  # another body under a known id: still a repeat
    ]
    return [1, 2, 3, 4], bodies


def in_one_batch(ledger: SqlLedger, works: list[Callable[[LedgerSession], Any]]) -> list[Any]:
    """Submit `works` while the writer is held, so that it takes them as one batch."""
    started, release = threading.Event(), threading.Event()

    def hold(_: LedgerSession) -> None:
        started.set()
        release.wait(10)

    async def run() -> list[Any]:
        held = asyncio.create_task(ledger.transact(hold))
        await asyncio.to_thread(started.wait, 10)
        tasks = [asyncio.create_task(ledger.transact(w)) for w in works]
        await asyncio.sleep(0)  # each task has submitted its work, in order
        release.set()
        await held
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(run())


# the rollup as the report sees it (PostgreSQL: with the journal not folded in yet)
ROLLUP = """SELECT metric, key, sum(count) FROM (SELECT metric, key, count FROM ledger_rollup
UNION ALL SELECT metric, key, count FROM ledger_rollup_journal) AS r GROUP BY metric, key HAVING sum(count) <> 0"""


def snapshot(ledger: SqlLedger) -> dict[str, Any]:
    """Every column of what recording webhooks writes. Row ids are left out where the two
    ways may number rows differently (events, discrepancies, audit entries); an audit
    entry's discrepancy is named by its kind and subject instead."""
    def read(session: LedgerSession) -> dict[str, Any]:
        run = session._session.execute

        def rows(table: str, order: str, keep_id: bool = False) -> list[dict[str, Any]]:
            return [{k: v for k, v in row._mapping.items() if keep_id or k != "id"} for row in run(text(f"SELECT * FROM {table} ORDER BY {order}"))]

        named = {row.id: (row.kind, row.subject) for row in run(text("SELECT id, kind, subject FROM discrepancy"))}
        audits = [entry | {"discrepancy_id": named.get(entry["discrepancy_id"])} for entry in rows("audit_entry", "id")]
        return {
            "events": rows("webhook_event", "event_id"),
            "deltas": rows("local_delta", "id", keep_id=True),  # registered in one order on both sides
            "discrepancies": rows("discrepancy", "kind, subject, status, first_seen_at"),
            "audit": sorted(audits, key=repr),
            "rollup": sorted(run(text(ROLLUP)).all()),
        }

    return ledger.read_sync(read)


@pytest.fixture
def fresh(database_url: str, tmp_path: Path) -> Callable[[], SqlLedger]:
    """A new empty ledger on the same backend at each call. On PostgreSQL every call empties
    the one database the run has: snapshot a ledger before asking for the next one."""
    opened: list[SqlLedger] = []
    count = iter(range(100))

    def make() -> SqlLedger:
        if database_url.startswith("sqlite"):
            url = migrated_sqlite_url(tmp_path / f"ledger{next(count)}.db")
        else:
            for ledger in opened:
                ledger.close()
            empty_postgres(database_url)
            url = database_url
        ledger = SqlLedger.from_url(url)
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


def test_a_batch_answers_and_records_as_one_at_a_time(fresh: Callable[[], SqlLedger], monkeypatch: pytest.MonkeyPatch) -> None:
    known, bodies = scenario()
    one_by_one = fresh()
    register(one_by_one, *(local(n) for n in known))
    alone = [record_alone(one_by_one, body) for body in bodies]
    expected = snapshot(one_by_one)

    batches: list[int] = []
    original = RecordEvent.run_batch.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(RecordEvent, "run_batch", classmethod(lambda cls, s, works, isolated: batches.append(len(works)) or original(cls, s, works, isolated)))
    batched = fresh()
    register(batched, *(local(n) for n in known))
    together = in_one_batch(batched, [work(body) for body in bodies])

    assert batches == [len(bodies)]  # one batch indeed
    assert together == alone
    assert [(r.duplicate, r.outcome and r.outcome.value) for r in together] == [
        (False, "applied"), (False, "orphan"), (False, "ignored"), (False, "discrepancy"), (True, None),
        (False, "applied"), (True, None), (False, "applied"), (False, "orphan"), (True, None),
    ]
    assert snapshot(batched) == expected


def test_a_bad_event_in_a_batch_fails_alone(fresh: Callable[[], SqlLedger]) -> None:
    ledger = fresh()
    good = [work(verified(n)) for n in range(10, 15)]
    bad = work(verified(99), now=datetime(2026, 11, 27, 12, 0))  # naive: the ledger refuses it
    results = in_one_batch(ledger, [*good[:2], bad, *good[2:]])
    assert isinstance(results[2], ValueError)
    assert [r.outcome.value for i, r in enumerate(results) if i != 2] == ["orphan"] * 5
    assert ledger.read_sync(lambda s: s.count_events()) == 5


def test_an_event_alone_commits_without_a_savepoint_and_a_bad_one_fails_alone(fresh: Callable[[], SqlLedger]) -> None:
    """Below the peak most batches are small, one event often: it takes the batch path too,
    with no SAVEPOINT and RELEASE around it; refused, it is undone and run again alone."""
    ledger = fresh()
    savepoints: list[str] = []
    event.listen(ledger.engine, "savepoint", lambda connection, name: savepoints.append(name))
    (good,) = in_one_batch(ledger, [work(verified(10))])
    assert good.outcome.value == "orphan"
    assert savepoints == []
    (bad,) = in_one_batch(ledger, [work(verified(99), now=datetime(2026, 11, 27, 12, 0))])  # naive: refused
    assert isinstance(bad, ValueError)
    assert len(savepoints) == 1  # the second run, alone in a savepoint
    assert ledger.read_sync(lambda s: s.count_events()) == 1


@pytest.mark.parametrize("jobs", [1, 3])
def test_a_locked_sqlite_file_fails_the_batch_once_not_each_job_again(tmp_path: Path, jobs: int) -> None:
    """BEGIN IMMEDIATE is taken before any work runs: a lock held past the timeout fails
    the batch at once (one wait), not as a refused batch whose jobs each wait again."""
    path = tmp_path / "locked.db"
    ledger = SqlLedger.from_url(migrated_sqlite_url(path), lock_timeout_ms=200)
    begins: list[str] = []
    event.listen(ledger.engine, "before_cursor_execute", lambda c, cursor, statement, *rest: statement.startswith("BEGIN") and begins.append(statement))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        outcomes = ledger.commit_here([work(verified(10 + n)) for n in range(jobs)])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [type(error) for error, _ in outcomes] == [StorageUnavailable] * jobs
    assert "locked" in str(outcomes[0][0])
    assert begins == ["BEGIN IMMEDIATE"]
    assert [error for error, _ in ledger.commit_here([work(verified(20))])] == [None]  # the lock gone, the next batch commits
    ledger.close()


def test_events_for_deltas_registered_in_the_same_batch_wait_for_them(fresh: Callable[[], SqlLedger]) -> None:
    """Order is kept across kinds of work: a delta registered before an event in the
    batch is matched by it, as it would be one at a time."""
    from reconciler.apply import register_deltas

    ledger = fresh()
    body = verified(5)
    results = in_one_batch(ledger, [work(verified(6)), lambda s: [d.id for d in register_deltas(s, [local(5)], NOW)], work(body)])
    assert [results[0].outcome.value, results[2].outcome.value] == ["orphan", "applied"]
    stored = ledger.read_sync(lambda s: s.get_event(body["id"]))
    assert stored is not None and stored.outcome == "applied"


# -- events that name our deltas, recorded together (`_record_together`) ------------------


def with_deltas(ledger: SqlLedger) -> SqlLedger:
    """Deltas 1-6 (sequence numbers 1-6 once verified), two deltas sharing the anchor
    a_batch (items 7 and 8), and an open STUCK discrepancy about delta 2 that settling clears."""
    register(ledger, *(local(n) for n in range(1, 7)))
    register(ledger, local(7, anchor_id="a_batch", receipt_id=H("root78")), local(8, anchor_id="a_batch", receipt_id=H("root78")))
    finding = {"detected_by": "reconciler", "evidence": {"detail": "an earlier pass"}}
    ledger.transact_sync(lambda s: s.open_discrepancy(Discrepancy(kind="stuck", subject="delta:2", delta_id=2, **finding), NOW))
    return ledger


def event_pool() -> list[dict[str, Any]]:
    """Webhooks that name our deltas by anchor, agreeing and not, and a few that do not."""
    pool = [verified(n) for n in range(1, 7)]
    pool += [
        verified(1, receiptId=H("forged")),  # a discrepancy
        verified(2, delta=-1),  # another amount
        verified(3, sequenceNumber="9"),  # a chain that does not follow
        envelope("delta.failed", {"recordId": "a_4", "error": "anchoring failed"}),
        envelope("delta.failed", {"recordId": "a_5", "error": "late failure"}),
        verified(7, recordId="a_batch", receiptId=H("root78"), itemHash=H("item7"), itemHashes=[H("item7"), H("item8")]),
        verified(8, recordId="a_batch", receiptId=H("root78"), itemHash=H("item8"), itemHashes=[H("item7"), H("item8")]),
        verified(9, recordId="a_batch", receiptId=H("root78"), itemHash=H("nobody")),  # names neither: compared with both
        verified(50),  # an orphan
        envelope("delta.created", {"recordId": "a_1"}),  # ignored
    ]
    return pool


def test_events_naming_our_deltas_are_recorded_together_as_one_at_a_time(
    fresh: Callable[[], SqlLedger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random batches of such events (repeats included: in the batch, and of events stored
    before it) leave the answers and the ledger that recording them one at a time leaves,
    and most of them take the together path (it is not always undone and redone)."""
    import reconciler.apply as apply

    taken: list[bool] = []
    again_knowing: list[bool] = []  # a try that knew of events recorded before it: done?
    original = apply._record_together

    def counted(session: LedgerSession, works: list[RecordEvent], recorded_before: frozenset[str]) -> Any:
        taken.append(False)
        outcomes = original(session, works, recorded_before)
        taken[-1] = True
        if recorded_before:
            again_knowing.append(True)
        return outcomes

    monkeypatch.setattr(apply, "_record_together", counted)
    chooser = random.Random(9)
    tries: list[bool] = []
    for _ in range(12):
        pool = event_pool()
        before = [dict(body) for body in chooser.sample(pool, 2)]  # stored before the batch
        batch = [dict(chooser.choice(pool + before)) for _ in range(chooser.randint(1, 14))]
        batch += [dict(batch[0])] if chooser.random() < 0.5 else []  # a repeat inside the batch

        # each webhook received a moment after the one before: whatever takes a time takes its own
        nows = [LATER + timedelta(milliseconds=137 * n) for n in range(len(before) + len(batch))]
        one_by_one = with_deltas(fresh())
        for body, now in zip(before, nows, strict=False):
            record_alone(one_by_one, body, now)
        alone = [record_alone(one_by_one, body, now) for body, now in zip(batch, nows[len(before):], strict=True)]
        expected = snapshot(one_by_one)

        batched = with_deltas(fresh())
        for body, now in zip(before, nows, strict=False):
            record_alone(batched, body, now)
        taken.clear()
        together = in_one_batch(batched, [work(body, now) for body, now in zip(batch, nows[len(before):], strict=True)])
        assert together == alone, batch
        assert snapshot(batched) == expected, batch
        tries += taken
    assert tries.count(True) >= 8, tries  # a failed try is redone one at a time: equal, but not this path
    assert len(again_knowing) >= 3, (again_knowing, tries)  # a batch with redelivered events is done together too, at the second try


def test_a_batch_of_events_naming_our_deltas_is_a_few_statements(fresh: Callable[[], SqlLedger]) -> None:
    """As many statements for six such events as for two: not a few per event, which is
    what makes a webhook that names one of our deltas cheap."""
    counts = []
    for events in (2, 6):
        ledger = with_deltas(fresh())
        statements: list[str] = []
        event.listen(ledger.engine, "before_cursor_execute", lambda c, cursor, statement, *rest: statements.append(statement))
        recorded = in_one_batch(ledger, [work(verified(n)) for n in range(1, events + 1)])
        assert [r.outcome.value for r in recorded] == ["applied"] * events
        counts.append(len(statements))
    assert counts[0] == counts[1], counts


def test_a_page_that_cannot_be_done_together_is_undone_and_recorded_one_at_a_time(
    fresh: Callable[[], SqlLedger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page that needs what it did not read ahead fails after it wrote the events' rows:
    those are undone, and each event is recorded alone, as it would have been."""
    from storage.page_session import NotReadAhead, PageSession

    bodies = [verified(1), verified(2, receiptId=H("forged")), verified(3), dict(verified(1))]
    one_by_one = with_deltas(fresh())
    alone = [record_alone(one_by_one, body) for body in bodies]
    expected = snapshot(one_by_one)

    refused: list[int] = []

    def refuse(self: PageSession) -> None:
        refused.append(1)
        raise NotReadAhead("as a test")

    monkeypatch.setattr(PageSession, "write", refuse)
    batched = with_deltas(fresh())
    together = in_one_batch(batched, [work(body) for body in bodies])
    assert refused == [1]  # the page was tried, and undone
    assert together == alone
    assert snapshot(batched) == expected


def test_a_page_whose_connection_is_gone_is_not_recorded_again_one_at_a_time(
    fresh: Callable[[], SqlLedger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error after which the connection is gone (of whatever class) is the database's,
    not the events': the batch fails as a whole, unacknowledged, instead of each event
    being tried again in a transaction that can no longer commit."""
    from sqlalchemy.exc import ProgrammingError

    import storage.sql_ledger
    from storage.page_session import PageSession

    def connection_gone(self: PageSession) -> None:
        raise ProgrammingError("INSERT ...", {}, Exception("server closed the connection"), connection_invalidated=True)

    isolated_calls: list[int] = []
    run_isolated = storage.sql_ledger._run_isolated

    def counted(*args: Any) -> Any:
        isolated_calls.append(1)
        return run_isolated(*args)

    monkeypatch.setattr(PageSession, "write", connection_gone)
    monkeypatch.setattr(storage.sql_ledger, "_run_isolated", counted)
    ledger = with_deltas(fresh())
    before = snapshot(ledger)
    answers = in_one_batch(ledger, [work(verified(n)) for n in (1, 2, 3)])
    assert [type(a) for a in answers] == [StorageUnavailable] * 3, answers
    assert isolated_calls == []
    assert snapshot(ledger) == before  # nothing of the batch was committed
