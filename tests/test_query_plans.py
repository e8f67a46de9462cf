"""The hot lookups use their indexes, so they stay cheap at millions of rows."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite

from storage.delta_row import DeltaRows
from storage.models import Discrepancy, LocalDelta, WebhookEvent
from storage.session import LedgerSession
from storage.sql_ledger import SqlLedger
from tests.conftest import BACKENDS, empty_postgres, migrated_sqlite_url

NOW = datetime(2026, 11, 27, tzinfo=UTC)


def plan(ledger: SqlLedger, build: Any) -> str:
    """The database's plan for the statement `build(session)` would run."""
    captured: list[Any] = []

    def work(session: LedgerSession) -> str:
        inner = session._session

        def capturing(original: Any) -> Any:
            def capture(statement: Any, *args: Any, **kwargs: Any) -> Any:
                captured.append((statement, args[0] if args else {}))
                return original(statement, *args, **kwargs)

            return capture

        inner.scalars, inner.execute = capturing(inner.scalars), capturing(inner.execute)  # type: ignore[method-assign]
        build(session)
        statement, given = captured[-1]
        dialect = sqlite.dialect() if ledger.dialect == "sqlite" else postgresql.dialect()
        compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        params = {**compiled.params, **given}
        if ledger.dialect == "postgresql":
            prefix = "EXPLAIN "
        else:
            prefix = "EXPLAIN QUERY PLAN "
        processors = compiled._bind_processors
        bound = {k: processors[k](v) if k in processors else v for k, v in params.items()}
        arguments = bound if ledger.dialect == "postgresql" else tuple(bound[k] for k in compiled.positiontup)
        rows = inner.connection().exec_driver_sql(prefix + str(compiled), arguments).fetchall()
        return "\n".join(" ".join(str(c) for c in row) for row in rows)

    return ledger.read_sync(work)


@pytest.fixture(scope="module", params=BACKENDS)
def ledger(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlLedger]:
    """A ledger with 20,000 deltas (1 in 100 unsettled), 5,000 events (1 in 10 an orphan)
    and 5,000 discrepancies (half of them open).

    PostgreSQL is analysed, as its autovacuum would have done; SQLite is not, as a
    fresh daemon's file would not be, so no plan here depends on SQLite statistics.
    """

    def seed(session: LedgerSession) -> None:
        deltas = [
            dict(
                anchor_id=f"a_{n}",
                item_hash=f"0x{n}",
                receipt_id=f"0xr{n}",
                customer_id=f"cust_{n % 50}",
                sequence_number=str(n),
                amount=Decimal(1),
                reason="r",
                idempotency_key=f"k{n}",
                source="outbox",
                status="QUEUED" if n % 100 == 0 else "VERIFIED",
                created_at=NOW,
                updated_at=NOW,
                emitted_at=NOW,
            )
            for n in range(20_000)
        ]
        session._session.execute(LocalDelta.__table__.insert(), deltas)
        events = [
            dict(
                event_id=f"evt_{n}",
                event_type="delta.verified",
                raw_body=b"{}",
                signature_timestamp=0,
                received_at=NOW,
                outcome="orphan" if n % 10 == 0 else "applied",
                # a third name an anchor, a third only an item hash and a receipt, a third only a receipt
                anchor_id=f"a_x{n}" if n % 3 == 0 else None,
                item_hash=f"0xx{n}" if n % 3 != 2 else None,
                receipt_id=f"0xrx{n % 7}",
            )
            for n in range(5_000)
        ]
        session._session.execute(WebhookEvent.__table__.insert(), events)
        findings = [
            dict(
                kind=("stuck", "unverifiable", "not_found_upstream", "receipt_mismatch")[n % 4],
                status="open" if n % 2 == 0 else "resolved",
                subject=f"delta:{n}",
                detected_by="reconciler",
                evidence={},
                occurrences=1,
                first_seen_at=NOW,
                last_seen_at=NOW,
            )
            for n in range(5_000)
        ]
        session._session.execute(Discrepancy.__table__.insert(), findings)

    if request.param == "sqlite":
        url = migrated_sqlite_url(tmp_path_factory.mktemp("plans") / "ledger.db")
    else:
        url = request.getfixturevalue("postgres_url")
        empty_postgres(url)
    ledger = SqlLedger.from_url(url)
    ledger.transact_sync(seed)
    if ledger.dialect == "postgresql":
        with ledger.engine.connect() as connection:
            connection.execute(text("ANALYZE local_delta"))
            connection.execute(text("ANALYZE webhook_event"))
            connection.execute(text("ANALYZE discrepancy"))
            connection.commit()
    yield ledger
    ledger.close()
    if request.param == "postgres":
        empty_postgres(url)


@pytest.mark.parametrize(
    ("build", "index"),
    [
        (lambda s: s.deltas_by_anchor("a_1"), "ux_local_delta_anchor_item"),
        (lambda s: s.deltas_by_item_hash("0x1"), "ix_local_delta_item_hash"),
        (lambda s: s.get_event("evt_1"), "webhook_event_event_id_key|sqlite_autoindex_webhook_event"),
        (lambda s: s.unsettled_deltas(NOW, None, 100), "ix_local_delta_unsettled"),
        (lambda s: s.unsettled_deltas(NOW, (NOW, 5), 100), "ix_local_delta_unsettled"),
        (lambda s: s.delta_by_sequence("cust_7", "7"), "ix_local_delta_customer_sequence"),
        (lambda s: s.resolve_open(["stuck", "unverifiable"], "delta:7", "cleared", NOW), "ux_discrepancy_open_subject"),
        (lambda s: s.unsettled_anchors([f"a_{n}" for n in range(0, 20_000, 100)], NOW, (NOW, 5)), "ux_local_delta_anchor_item|ix_local_delta_unsettled"),
        (lambda s: DeltaRows(s._session).at_sequences([("cust_7", "7"), ("cust_8", "9"), ("cust_9", "9")]), "ix_local_delta_customer_sequence"),
        (lambda s: s.open_discrepancies_about(["stuck", "unverifiable"], [f"delta:{n}" for n in range(200)]), "ux_discrepancy_open_subject"),
    ],
)
def test_lookup_uses_its_index(ledger: SqlLedger, build: Any, index: str) -> None:
    import re

    found = plan(ledger, build)
    assert re.search(index, found), found


@pytest.mark.parametrize(
    ("delta", "index"),
    [
        (LocalDelta(anchor_id="a_1"), "ix_webhook_event_orphan_anchor"),
        (LocalDelta(item_hash="0x1"), "ix_webhook_event_orphan_item_unanchored"),
        (LocalDelta(receipt_id="0xr"), "ix_webhook_event_orphan_receipt_only"),
    ],
)
def test_orphans_are_found_through_their_partial_indexes(ledger: SqlLedger, delta: LocalDelta, index: str) -> None:
    found = plan(ledger, lambda s: s.orphan_events_for(delta))
    assert index in found, found


def test_late_orphans_are_read_through_an_orphan_index(ledger: SqlLedger) -> None:
    # every pass asks: the events must be read through a partial index of orphans, never all of them
    import re

    found = plan(ledger, lambda s: s.orphans_with_a_delta(1000))
    assert re.search("ix_webhook_event_orphan_(anchor|age)", found), found
    assert not re.search(r"Seq Scan on webhook_event|SCAN webhook_event\b(?! USING)", found), found


def test_the_webhook_batchs_anchor_lookup_uses_the_anchor_index(ledger: SqlLedger) -> None:
    # the writer asks it for every batch of webhooks, on the DB-API cursor (storage.driver_sql)
    from storage.driver_sql import statements_for

    statements = statements_for(ledger.engine.dialect)
    anchors = [f"a_{n}" for n in range(0, 20_000, 701)]  # a batch's worth, 1 in 700 of the table

    def work(session: LedgerSession) -> str:
        cursor = session._session.connection().connection.cursor()
        if ledger.dialect == "postgresql":
            cursor.execute("EXPLAIN " + statements._anchors_array_sql, [anchors])
        else:
            cursor.execute("EXPLAIN QUERY PLAN " + statements._anchors_sql(len(anchors)), anchors)
        return "\n".join(" ".join(str(c) for c in row) for row in cursor.fetchall())

    found = ledger.read_sync(work)
    assert "ux_local_delta_anchor_item" in found, found
    assert not re.search(r"Seq Scan on local_delta|SCAN local_delta\b(?! USING)", found), found
