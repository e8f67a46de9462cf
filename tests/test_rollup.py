"""The trigger-kept rollup always equals what the rows themselves say, on both databases."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import insert, inspect, text

from storage.engine import make_engine
from storage.models import LocalDelta, WebhookEvent
from storage.report_queries import PERCENTILES, ReportFilter, _rank
from storage.session import LedgerSession
from storage.sql_ledger import SqlLedger
from tests.conftest import POSTGRES_ENV, empty_postgres, postgres_database

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
STATUSES = ["PENDING", "QUEUED", "PROCESSING", "VERIFIED", "FAILED", "REJECTED"]


def _amount(rng: random.Random) -> Decimal:
    return rng.choice([
        Decimal(rng.randint(-10**6, 10**6)).scaleb(-2),
        Decimal(rng.randint(-10**18, 10**18)).scaleb(-9),  # up to |1e9| with all nine decimals
        Decimal("-0.000000001"),
        Decimal("999999999.999999999"),
    ])


def _delta(n: int, rng: random.Random) -> LocalDelta:
    status = rng.choice(STATUSES)
    return LocalDelta(
        anchor_id=f"anc_{n}", item_hash=f"0x{n:064x}", customer_id=f"cust_{n % 7}", amount=_amount(rng), reason="r",
        idempotency_key=f"k{n}", source="import", status=status, created_at=NOW, emitted_at=NOW, updated_at=NOW,
        verification_lag_ms=rng.choice([0, 1, 99, 100, 101, rng.randint(0, 10**7)]) if status == "VERIFIED" else None,
    )


def _churn(session: LedgerSession, rng: random.Random, start: int, count: int) -> None:
    """Inserts, status moves, lag changes and event outcomes: every way the rollup moves."""
    for n in range(start, start + count):
        session.add_delta(_delta(n, rng))
        session.insert_event(WebhookEvent(event_id=f"evt_{n}", event_type="delta.verified", raw_body=b"{}",
                                          signature_timestamp=0, received_at=NOW, outcome=rng.choice(["applied", "orphan", "ignored"])))
    session.flush()
    for delta in session.list_deltas(customer_id=None, status=None, after_id=None, limit=10_000):
        if rng.random() < 0.3:
            delta.status = "VERIFIED"
            delta.verification_lag_ms = rng.randint(0, 10**6)
        elif rng.random() < 0.1:
            delta.amount = _amount(rng)
    session.flush()
    session._session.execute(text("UPDATE webhook_event SET outcome = 'applied' WHERE outcome = 'orphan' AND id % 2 = 0"))
    # deletes, each of many rows in one statement (PostgreSQL journals them per statement)
    session._session.execute(text("DELETE FROM local_delta WHERE id % 7 = 3"))
    session._session.execute(text("DELETE FROM webhook_event WHERE id % 11 = 4"))


def _check(ledger: SqlLedger) -> None:
    def compare(session: LedgerSession) -> None:
        deltas = session.list_deltas(customer_id=None, status=None, after_id=None, limit=100_000)
        expected: dict[str, tuple[int, Decimal]] = {}
        for d in deltas:
            count, total = expected.get(d.status, (0, Decimal(0)))
            expected[d.status] = (count + 1, total + d.amount)
        totals = session.report().totals_by_status(ReportFilter())
        assert {s: (t.count, t.amount) for s, t in totals.items()} == expected

        lags = sorted(d.verification_lag_ms for d in deltas if d.verification_lag_ms is not None)
        lag = session.report().lag(ReportFilter())
        assert lag.count == len(lags) and lag.max_ms == lags[-1]
        for p in PERCENTILES:
            exact = lags[_rank(p, len(lags)) - 1]
            assert exact <= lag.percentiles_ms[p] <= max(exact, exact * 1.01 + 1), (p, exact, lag.percentiles_ms[p])
        assert sum(n for _, n in lag.histogram) == len(lags)

        events = session._session.execute(text("SELECT count(*), sum(CASE WHEN outcome = 'orphan' THEN 1 ELSE 0 END) FROM webhook_event")).one()
        assert session.report().events_received(ReportFilter()) == (int(events[0]), int(events[1] or 0))
        # the filtered path reads the rows themselves: both paths agree
        everyone = [session.report().totals_by_status(ReportFilter(customer_id=f"cust_{c}")) for c in range(7)]
        for status, (count, amount) in expected.items():
            assert sum(t[status].count for t in everyone if status in t) == count
            assert sum((t[status].amount for t in everyone if status in t), Decimal(0)) == amount

    ledger.read_sync(compare)


def test_the_rollup_follows_every_write(ledger: SqlLedger) -> None:
    rng = random.Random(11)
    ledger.transact_sync(lambda s: _churn(s, rng, 0, 300))
    _check(ledger)
    ledger.transact_sync(lambda s: _churn(s, rng, 300, 100))
    _check(ledger)


def test_a_rolled_back_write_leaves_the_rollup_alone(ledger: SqlLedger) -> None:
    rng = random.Random(12)
    ledger.transact_sync(lambda s: _churn(s, rng, 0, 50))

    def fail(session: LedgerSession) -> None:
        _churn(session, rng, 50, 50)
        raise RuntimeError("rolled back")

    try:
        ledger.transact_sync(fail)
    except RuntimeError:
        pass
    _check(ledger)


def test_writers_on_several_connections_and_the_fold(database_url: str) -> None:
    """Writers on several connections (PostgreSQL: journal rows), then the fold keeps every sum."""
    rng = random.Random(13)
    for start in (0, 100, 200):  # three ledgers: three connections
        writer = SqlLedger.from_url(database_url)
        writer.transact_sync(lambda s: _churn(s, rng, start, 100))
        writer.close()
    ledger = SqlLedger.from_url(database_url)
    try:
        _check(ledger)
        ledger.transact_sync(lambda s: s.fold_rollup())
        _check(ledger)
        left = ledger.read_sync(lambda s: s._session.execute(text("SELECT count(*) FROM ledger_rollup_journal")).scalar_one())
        assert left == 0  # everything folded in (SQLite writes the rollup directly)
        ledger.transact_sync(lambda s: _churn(s, rng, 300, 50))  # and the journal goes on after a fold
        _check(ledger)
    finally:
        ledger.close()


def _upgraded(url: str, revision: str, fill: Callable[[str], None]) -> SqlLedger:
    """A SQLite ledger at `revision`, filled by `fill(url)`, then upgraded to head."""
    from alembic import command

    from storage.engine import make_engine
    from storage.schema import alembic_config

    engine = make_engine(url)
    command.upgrade(alembic_config(engine), revision)
    fill(url)
    command.upgrade(alembic_config(engine), "head")
    engine.dispose()
    return SqlLedger.from_url(url)


def test_a_migration_backfills_the_rollup_from_existing_rows(tmp_path: Path) -> None:
    rng = random.Random(14)

    def add(session: LedgerSession) -> None:
        for n in range(200):
            session.add_delta(_delta(n, rng))

    def fill(url: str) -> None:
        old = SqlLedger.from_url(url)
        old.transact_sync(add)
        old.close()

    ledger = _upgraded(f"sqlite:///{tmp_path / 'old.db'}", "0004", fill)
    try:
        _check(ledger)
    finally:
        ledger.close()



def test_a_negative_lag_from_before_0004_does_not_break_the_upgrade(tmp_path: Path) -> None:
    """PacSpace's receivedAt may be a little ahead of our clock: the backfilled lag is 0."""

    def fill(url: str) -> None:
        engine = make_engine(url)
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO local_delta (anchor_id, item_hash, customer_id, amount, reason, idempotency_key, source, status,"
                " created_at, emitted_at, verified_at, updated_at) VALUES ('a', '0x1', 'cust_1', 1000000000, 'r', 'k', 'import',"
                " 'VERIFIED', '2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.003000', '2026-01-01 00:00:00.000000',"
                " '2026-01-01 00:00:00.000000')"))
        engine.dispose()

    ledger = _upgraded(f"sqlite:///{tmp_path / 'skew.db'}", "0003", fill)
    try:
        assert ledger.read_sync(lambda s: s.get_delta(1).verification_lag_ms) == 0  # type: ignore[union-attr]
        _check(ledger)
    finally:
        ledger.close()


def test_the_histogram_bins_whole_lags_on_both_paths(ledger: SqlLedger) -> None:
    """A lag of 1,005 ms is not "below 1 s", whether read from the rollup or from the rows."""
    rng = random.Random(15)

    def add(session: LedgerSession) -> None:
        for n, lag in enumerate([999, 1000, 1005, 1999, 2000]):
            delta = _delta(n, rng)
            delta.status, delta.verification_lag_ms = "VERIFIED", lag
            session.add_delta(delta)

    ledger.transact_sync(add)
    for where in (ReportFilter(), ReportFilter(since=datetime(2000, 1, 1, tzinfo=UTC))):
        histogram = dict(ledger.read_sync(lambda s: s.report().lag(where).histogram))
        assert histogram[1000] == 1 and histogram[2000] == 3 and histogram[5000] == 1, (where, histogram)


def _journal_rows(ledger: SqlLedger) -> int:
    return int(ledger.read_sync(lambda s: s._session.execute(text("SELECT count(*) FROM ledger_rollup_journal")).scalar_one()))


@pytest.mark.postgres
def test_postgres_journals_a_statements_inserts_and_deletes_once_per_key(postgres_url: str) -> None:
    """One multi-row INSERT of 30 deltas (one status, three lag buckets) adds four journal
    rows, a DELETE of half of them four more; 40 events of two outcomes in one statement add
    two, not 40, a DELETE of 39 of them two more; the rollup equals the rows throughout."""
    empty_postgres(postgres_url)
    ledger = SqlLedger.from_url(postgres_url)
    try:
        deltas = [_delta(n, random.Random(n)) for n in range(30)]
        for n, delta in enumerate(deltas):
            delta.status, delta.verification_lag_ms = "VERIFIED", (5, 150, 1005)[n % 3]  # one status, three lag buckets
        columns = [attribute for attribute in inspect(LocalDelta).column_attrs if attribute.key != "id"]
        values = [{attribute.columns[0].name: getattr(delta, attribute.key) for attribute in columns} for delta in deltas]
        ledger.transact_sync(lambda s: s._session.execute(insert(LocalDelta.__table__).values(values)))
        assert _journal_rows(ledger) == 4  # one statement: a row for the status, one per lag bucket
        _check(ledger)
        ledger.transact_sync(lambda s: s._session.execute(text("DELETE FROM local_delta WHERE id % 2 = 0")))
        assert _journal_rows(ledger) == 8  # the same four keys again, negative
        _check(ledger)
        ledger.transact_sync(lambda s: s.fold_rollup())

        rows = [{"event_id": f"evt_{n}", "event_type": "delta.verified", "raw_body": b"{}", "signature_timestamp": 0, "received_at": NOW,
                 "outcome": "orphan" if n % 4 else "ignored", "anchor_id": None, "item_hash": None, "receipt_id": None, "applied_at": None}
                for n in range(40)]
        assert len(ledger.transact_sync(lambda s: s.insert_events(rows))) == 40  # one statement
        assert _journal_rows(ledger) == 2
        _check(ledger)
        ledger.transact_sync(lambda s: s._session.execute(text("DELETE FROM webhook_event WHERE event_id <> 'evt_1'")))
        assert _journal_rows(ledger) == 4
        _check(ledger)
        ledger.transact_sync(lambda s: s.fold_rollup())
        assert _journal_rows(ledger) == 0
        _check(ledger)
    finally:
        ledger.close()


@pytest.mark.postgres
def test_postgres_statement_triggers_migrate_up_and_down(postgres_url: str) -> None:
    """Rows written under 0006's row triggers, then 0007's statement triggers, then 0006's
    again after a downgrade: the rollup equals the rows at every step."""
    from alembic import command

    from storage.schema import alembic_config

    admin_url = os.environ[POSTGRES_ENV]
    rng = random.Random(16)
    with postgres_database(admin_url, prefix="pacrecon_test_0007") as url:
        engine = make_engine(url)
        try:
            for start, revision in ((0, "0006"), (100, "head"), (200, "0006"), (300, "head")):
                if revision == "head":
                    command.upgrade(alembic_config(engine), revision)
                else:
                    command.downgrade(alembic_config(engine), revision)
                ledger = SqlLedger.from_url(url)
                try:
                    ledger.transact_sync(lambda s: _churn(s, rng, start, 100))
                    _check(ledger)
                    statement_triggers = ledger.read_sync(lambda s: s._session.execute(text(
                        "SELECT count(*) FROM pg_trigger WHERE tgname = 'rollup_webhook_event_insert'")).scalar_one())
                    assert statement_triggers == (1 if revision == "head" else 0)
                finally:
                    ledger.close()
        finally:
            engine.dispose()
