"""The webhook hot path's statements on the DB-API cursor (storage.driver_sql) store each
row exactly as SQLAlchemy's own insert does, and find the same anchors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text

from storage.driver_sql import CHUNK, EVENT_COLUMNS
from storage.models import WebhookEvent
from storage.session import LedgerSession
from storage.sql_ledger import SqlLedger
from tests.test_apply import local, register


def row(n: int, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "event_id": f"evt_{n}",
        "event_type": "delta.verified",
        "raw_body": b'{"id": "evt_%d", "delta": -42.50}\x00\xff' % n,
        "signature_timestamp": 1_790_000_000 + n,
        "received_at": datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC) + timedelta(seconds=n),
        "outcome": "orphan",
        "anchor_id": f"a_{n}",
        "item_hash": None,
        "receipt_id": f"0x{n:064x}",
        "applied_at": None,
    }
    return {**values, **changes}


def stored(ledger: SqlLedger) -> list[tuple[Any, ...]]:
    """The rows as the database holds them, through the driver (no column types applied)."""
    columns = ", ".join(EVENT_COLUMNS)
    return ledger.read_sync(lambda s: [tuple(r) for r in s._session.execute(text(f"SELECT {columns} FROM webhook_event ORDER BY event_id"))])


def test_rows_are_stored_as_sqlalchemy_stores_them(ledger: SqlLedger, database_url: str) -> None:
    odd_zone = timezone(timedelta(hours=5, minutes=30))
    rows = [
        row(1),
        row(2, received_at=datetime(2026, 11, 27, 17, 30, tzinfo=odd_zone), applied_at=datetime(2026, 11, 28, tzinfo=UTC)),
        row(3, event_type="delta.créé \\u0000 ☃", anchor_id=None, receipt_id=None, item_hash="AB" * 32, outcome="ignored"),
        row(4, signature_timestamp=2**62, raw_body=b""),
    ]
    ledger.transact_sync(lambda s: s.insert_events(rows))
    by_driver = stored(ledger)

    # the same rows through SQLAlchemy's Core insert, in a second ledger of the same kind
    def core_insert(session: LedgerSession) -> None:
        session._session.execute(WebhookEvent.__table__.insert(), rows)

    ledger.transact_sync(lambda s: s._session.execute(text("DELETE FROM webhook_event")))
    ledger.transact_sync(core_insert)
    assert by_driver == stored(ledger)
    # and read back through the model, every value is what was given
    events = ledger.read_sync(lambda s: [s.get_event(r["event_id"]) for r in rows])
    for given, event in zip(rows, events, strict=True):
        assert event is not None
        assert {name: getattr(event, name) for name in EVENT_COLUMNS} == given


def test_known_ids_and_repeats_insert_once_and_report_only_the_new(ledger: SqlLedger) -> None:
    assert ledger.transact_sync(lambda s: s.insert_events([row(1), row(2)])) == {"evt_1", "evt_2"}
    again = [row(2), row(3), row(3, anchor_id="other"), row(1)]
    assert ledger.transact_sync(lambda s: s.insert_events(again)) == {"evt_3"}
    assert [r[EVENT_COLUMNS.index("anchor_id")] for r in stored(ledger)] == ["a_1", "a_2", "a_3"]  # the first copy wins


def test_more_rows_than_one_statement_holds(ledger: SqlLedger) -> None:
    rows = [row(n) for n in range(2 * CHUNK + 3)]
    assert len(ledger.transact_sync(lambda s: s.insert_events(rows))) == len(rows)
    assert ledger.read_sync(lambda s: s.count_events()) == len(rows)


def test_a_refused_value_raises_and_writes_nothing(ledger: SqlLedger) -> None:
    naive = row(2, received_at=datetime(2026, 11, 27, 12, 0))
    with pytest.raises(ValueError, match="naive datetime"):
        ledger.transact_sync(lambda s: s.insert_events([row(1), naive]))
    assert ledger.read_sync(lambda s: s.count_events()) == 0


def test_anchors_with_deltas(ledger: SqlLedger) -> None:
    register(ledger, local(1), local(2), local(3, anchor_id=None))
    asked = {"a_1", "a_2", "a_3", "a_404"} | {f"x_{n}" for n in range(CHUNK + 5)}  # more than one statement's worth
    assert ledger.read_sync(lambda s: s.anchors_with_deltas(asked)) == {"a_1", "a_2"}


def test_a_value_longer_than_its_column_is_refused_not_cut_short(ledger: SqlLedger, database_url: str) -> None:
    # PostgreSQL binds whole columns as arrays there; an explicit cast to VARCHAR(n) would
    # cut a long value to n characters silently (and two long ids sharing a prefix would
    # then be one event). SQLite does not hold strings to a length at all.
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite keeps a string of any length")
    long_id = "evt_" + "x" * 300
    with pytest.raises(Exception, match="value too long"):
        ledger.transact_sync(lambda s: s.insert_events([row(1, event_id=long_id)]))
    assert ledger.read_sync(lambda s: s.count_events()) == 0


@pytest.mark.postgres
def test_the_cursors_errors_are_told_as_sqlalchemy_tells_them(postgres_url: str) -> None:
    """What the cursor raises reaches the writer as SQLAlchemy's own error would: a lock
    timeout as an OperationalError (the database's trouble: a batch is not redone event by
    event, each waiting again), a lost connection as `connection_invalidated`."""
    from sqlalchemy.exc import DBAPIError, OperationalError
    from sqlalchemy.orm import Session

    from storage.engine import make_engine
    from storage.errors import is_database_trouble

    engine = make_engine(postgres_url, lock_timeout_ms=200)
    try:
        with Session(engine) as first, Session(engine) as second:
            LedgerSession(first).insert_events([row(901)])  # not committed: an insert of its id waits for it
            with pytest.raises(OperationalError, match="lock timeout") as waited:
                LedgerSession(second).insert_events([row(901)])
            assert is_database_trouble(waited.value) and not waited.value.connection_invalidated
            first.rollback()
            second.rollback()
        with Session(engine) as third:
            pid = third.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(DBAPIError) as gone:
                LedgerSession(third).insert_events([row(902)])
            assert gone.value.connection_invalidated and is_database_trouble(gone.value)
    finally:
        engine.dispose()
