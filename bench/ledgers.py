"""Benchmark ledgers: real stale deltas the sandbox knows, bulk-seeded settled history around them.

The stale deltas go through the real paths: emitted one by one at the sandbox over HTTP
and registered with `import_records` (what `pacrecon import` runs). The history (the
settled deltas a long-lived ledger holds) is bulk-inserted, converted by the columns'
own SQLAlchemy types, so each row is stored exactly as the ORM would store it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import JSON, Engine, select, text
from sqlalchemy.engine import make_url

from reconciler.imports import import_records
from storage import jsonio
from storage.engine import make_engine
from storage.models import LocalDelta
from storage.schema import upgrade_to_head
from storage.sql_ledger import SqlLedger
from tests.daemon import SANDBOX_KEY, SandboxProcess

TABLE = LocalDelta.__table__  # type: ignore[attr-defined]
COLUMNS = [column.name for column in TABLE.columns]
EMIT_BATCH = 100  # emits in flight at once, and records per import transaction
STALE_CUSTOMERS = 100
HISTORY_CUSTOMERS = 20_000
JSON_TYPE = {"Content-Type": "application/json"}


def emit_stale(sandbox_url: str, api_key: str, count: int) -> list[Any]:
    """`count` single-delta emits at the sandbox (one anchor each, so the pass makes one
    lookup per delta), `EMIT_BATCH` at a time; returns their emit answers."""

    async def emit_all() -> list[Any]:
        answers: list[Any] = []
        async with httpx.AsyncClient(base_url=sandbox_url, headers={"X-Api-Key": api_key}, timeout=30) as http:
            for start in range(0, count, EMIT_BATCH):
                bodies = [
                    {"customerId": f"cust_live_{n % STALE_CUSTOMERS:03d}", "delta": Decimal(n % 997 + 1).scaleb(-2),
                     "reason": "usage", "referenceId": f"order-{n:07d}"}
                    for n in range(start, min(start + EMIT_BATCH, count))
                ]
                replies = await asyncio.gather(
                    *(http.post("/api/v1/balance/delta", content=jsonio.dumps_bytes(body), headers=JSON_TYPE) for body in bodies)
                )
                for reply in replies:
                    reply.raise_for_status()
                    answers.append(jsonio.loads(reply.content))
        return answers

    return asyncio.run(emit_all())


def import_stale(path: Path, answers: list[Any]) -> list[dict[str, Any]]:
    """Import the answers into a scratch SQLite ledger with `import_records`, `EMIT_BATCH`
    records per transaction, and read the rows back (Python values, via the column types)."""
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    ledger = SqlLedger.from_url(url)
    try:
        for start in range(0, len(answers), EMIT_BATCH):
            chunk = answers[start : start + EMIT_BATCH]
            now = datetime.now(UTC)
            report = ledger.transact_sync(lambda s: import_records(s, chunk, now))
            assert len(report.imported) == len(chunk) and not report.invalid, report.as_dict()
        with ledger.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(select(TABLE).order_by(TABLE.c.id))]
    finally:
        ledger.close()


def verified_stale(sandbox: SandboxProcess, workdir: Path, count: int) -> list[dict[str, Any]]:
    """`count` stale deltas as our ledger holds them, which `sandbox` has verified: emitted
    there (`emit_stale`), imported (`import_stale`, into workdir/import.db), the sandbox
    flushed. Its webhooks all failed (it runs without a webhook URL): nothing settles them."""
    answers = emit_stale(sandbox.url, SANDBOX_KEY, count)
    imported = import_stale(workdir / "import.db", answers)
    with sandbox.api() as api:
        api.post("/_sandbox/flush").raise_for_status()
        counts = api.get("/_sandbox/state").json()["data"]
    assert counts["deltas"] == {"VERIFIED": count} and counts["deliveries"] == {"failed": count}, counts
    return imported


def place_stale(rows: list[dict[str, Any]], total: int, age: timedelta) -> list[dict[str, Any]]:
    """The imported rows spread through a ledger of `total` ids (every total/len-th id, so
    their pages are not next to each other) and made `age` older: stale by then."""
    step = total // len(rows)
    placed = []
    for n, row in enumerate(rows):
        moved = dict(row)
        moved["id"] = (n + 1) * step
        for name in ("created_at", "emitted_at", "updated_at"):
            moved[name] = row[name] - age
        placed.append(moved)
    return placed


def history(total: int, skip: set[int], now: datetime, seed: int = 7) -> Iterator[dict[str, Any]]:
    """Settled deltas for every id in 1..total not in `skip`, as imports settled by their
    webhooks leave them: 98% VERIFIED (receipt, chain, tx), 2% FAILED. Oldest first."""
    rng = random.Random(seed)
    chains: dict[str, tuple[int, str | None]] = {}
    span = timedelta(days=90).total_seconds()

    def hex_hash() -> str:
        return f"0x{rng.getrandbits(256):064x}"

    for delta_id in range(1, total + 1):
        if delta_id in skip:
            continue
        customer = f"cust_{rng.randrange(HISTORY_CUSTOMERS):06d}"
        emitted = now - timedelta(days=91) + timedelta(seconds=span * delta_id / total)
        anchor, item, receipt = f"a_{rng.getrandbits(64):016x}", hex_hash(), hex_hash()
        sequence, previous = chains.get(customer, (0, None))
        row: dict[str, Any] = {column: None for column in COLUMNS}
        row.update(
            id=delta_id, anchor_id=anchor, item_hash=item, customer_id=customer,
            amount=Decimal(rng.randrange(1, 1_000_000) * rng.choice((1, -1))).scaleb(-2),
            reason="", reference_id=f"order-{delta_id:07d}" if rng.random() < 0.5 else None,
            idempotency_key=f"import:{anchor}:{item}", source="import",
            receipt_id=receipt, items_root=receipt, item_hashes=[item],
            created_at=emitted, emitted_at=emitted,
        )
        settled = emitted + timedelta(seconds=rng.uniform(2, 30))
        if rng.random() < 0.02:
            row.update(status="FAILED", status_reason="anchoring failed", failed_at=settled, updated_at=settled)
            chains[customer] = (sequence + 1, previous)
        else:
            row.update(
                status="VERIFIED", verified_at=settled, updated_at=settled, verified_by="webhook",
                tx_hash=hex_hash(), sequence_number=str(sequence + 1), previous_proof_hash=previous,
                verification_reference=f"vr_{rng.getrandbits(64):016x}",
            )
            chains[customer] = (sequence + 1, receipt)
        yield row


def _converters(engine: Engine) -> list[Any]:
    """Per column, what the ORM does to a value before the driver sees it (None: nothing)."""
    dialect = engine.dialect
    converters = []
    for column in TABLE.columns:
        if isinstance(column.type, JSON):
            converters.append(lambda v: None if v is None else jsonio.dumps(v))  # the engine's json_serializer
        else:
            converters.append(column.type.bind_processor(dialect))
    return converters


def _tuples(rows: Iterator[dict[str, Any]], converters: list[Any]) -> Iterator[tuple[Any, ...]]:
    names = list(zip(COLUMNS, converters))
    for row in rows:
        yield tuple(row[name] if convert is None or row[name] is None else convert(row[name]) for name, convert in names)


def migrated(url: str) -> Engine:
    engine = make_engine(url)
    upgrade_to_head(engine)
    return engine


def seed(url: str, rows: Iterator[dict[str, Any]]) -> None:
    """Bulk-insert `rows` into the migrated ledger at `url`: SQLite executemany, PostgreSQL
    COPY, with local_delta's secondary indexes dropped and then rebuilt from their own DDL."""
    engine = migrated(url)
    try:
        converters = _converters(engine)
        if engine.dialect.name == "sqlite":
            _seed_sqlite(engine, _tuples(rows, converters))
        else:
            _seed_postgres(engine, _tuples(rows, converters))
    finally:
        engine.dispose()


def _seed_sqlite(engine: Engine, values: Iterator[tuple[Any, ...]]) -> None:
    import sqlite3

    path = make_url(str(engine.url)).database
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA synchronous=OFF")  # seeding only; the pass runs with the ledger's own settings
        indexes = connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='local_delta' AND sql IS NOT NULL"
        ).fetchall()
        connection.execute("BEGIN")
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        insert = f"INSERT INTO local_delta ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        connection.executemany(insert, values)
        for _, sql in indexes:
            connection.execute(sql)
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def _seed_postgres(engine: Engine, values: Iterator[tuple[Any, ...]]) -> None:
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        with raw.cursor() as cursor:
            cursor.execute("SET statement_timeout = 0")  # the ledger's engine caps statements at 30 s; a 1M-row COPY is longer
            cursor.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'local_delta' AND indexname NOT IN "
                "(SELECT conname FROM pg_constraint WHERE conrelid = 'local_delta'::regclass)"
            )
            indexes = cursor.fetchall()
            for name, _ in indexes:
                cursor.execute(f'DROP INDEX "{name}"')
            with cursor.copy(f"COPY local_delta ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in values:
                    copy.write_row(row)
            for _, sql in indexes:
                cursor.execute(sql)
            cursor.execute("SELECT setval(pg_get_serial_sequence('local_delta', 'id'), (SELECT max(id) FROM local_delta))")
        raw.commit()
    # autovacuum would analyze a table this size soon after loading; do it now, once
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("SET statement_timeout = 0"))
        connection.execute(text("VACUUM ANALYZE local_delta"))


def storage_forms(url: str, ids: list[int]) -> dict[int, dict[str, str]]:
    """How SQLite stores each column of the given rows (typeof, and the datetime text form),
    to check the seeded history is stored like the imported rows."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            forms = {}
            for delta_id in ids:
                typed = connection.execute(
                    text(f"SELECT {', '.join(f'typeof({c})' for c in COLUMNS)}, emitted_at FROM local_delta WHERE id = :id"),
                    {"id": delta_id},
                ).one()
                forms[delta_id] = {**dict(zip(COLUMNS, typed[:-1])), "emitted_at_text": typed[-1]}
            return forms
    finally:
        engine.dispose()
