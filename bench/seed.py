"""Fill a migrated ledger with a big, realistic history, fast (bulk SQL, not the ORM).

The rows look like the daemon's own: outbox and imported deltas in every status,
amounts with cents, verification lags, one webhook event per settled delta, open
discrepancies of every kind with their evidence, a history of reconciliation runs.
Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from sqlalchemy.engine import make_url

from storage.types import amount_to_units
from storage.vocabulary import DiscrepancyKind

START = datetime(2026, 1, 1, tzinfo=UTC)
STATUS_WEIGHTS = {"VERIFIED": 0.93, "FAILED": 0.02, "QUEUED": 0.03, "PROCESSING": 0.005, "REJECTED": 0.005, "PENDING": 0.01}
KINDS = [kind.value for kind in DiscrepancyKind]


@dataclass(frozen=True)
class Shape:
    deltas: int = 1_000_000
    open_discrepancies: int = 10_000
    customers: int = 2_000
    runs: int = 2_000
    seed: int = 7


def _stamp(moment: datetime | None, sqlite: bool) -> str | None:
    if moment is None:
        return None
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else moment.isoformat()


def delta_rows(shape: Shape, sqlite: bool) -> Iterator[tuple[object, ...]]:
    rng = random.Random(shape.seed)
    statuses, weights = zip(*STATUS_WEIGHTS.items())
    span = 300 * 86_400  # the ledger's history, in seconds
    for n in range(1, shape.deltas + 1):
        status = rng.choices(statuses, weights)[0]
        created = START + timedelta(seconds=span * n / shape.deltas)
        emitted = None if status == "PENDING" else created + timedelta(milliseconds=rng.randint(20, 400))
        lag_ms = int(rng.lognormvariate(8.5, 0.6)) if status == "VERIFIED" else None
        verified = emitted + timedelta(milliseconds=lag_ms) if emitted and lag_ms is not None else None
        amount = Decimal(rng.randint(-500_000, 500_000)).scaleb(-2)
        stored_amount: object = amount_to_units(amount) if sqlite else amount
        anchor = None if status == "PENDING" else f"anc_{n:012x}"
        item = None if anchor is None else f"0x{rng.getrandbits(256):064x}"
        receipt = None if anchor is None else f"0x{rng.getrandbits(256):064x}"
        yield (
            n, anchor, item, f"cust_{rng.randrange(shape.customers):05d}", stored_amount, "usage", f"ref-{n}", None,
            f"pacrecon:{n:012x}", "outbox" if n % 5 else "import", None, None, status,
            "insufficient credits" if status == "FAILED" else None, receipt, receipt,
            None if item is None else json.dumps([item]), None,
            None, None, None, "webhook" if verified else None,
            _stamp(created, sqlite), _stamp(emitted, sqlite), _stamp(verified, sqlite),
            _stamp(emitted + timedelta(seconds=5), sqlite) if status == "FAILED" and emitted else None,
            _stamp(verified or emitted or created, sqlite), lag_ms,
        )


DELTA_COLUMNS = (
    "id, anchor_id, item_hash, customer_id, amount, reason, reference_id, metadata, idempotency_key, source, "
    "submission_id, submission_index, status, status_reason, receipt_id, items_root, item_hashes, tx_hash, "
    "sequence_number, previous_proof_hash, verification_reference, verified_by, created_at, emitted_at, "
    "verified_at, failed_at, updated_at, verification_lag_ms"
)
EVENT_COLUMNS = "id, event_id, event_type, raw_body, signature_timestamp, received_at, outcome, anchor_id, item_hash, receipt_id, applied_at"
DISCREPANCY_COLUMNS = (
    "id, kind, status, subject, delta_id, anchor_id, customer_id, event_id, run_id, detected_by, evidence, "
    "occurrences, first_seen_at, last_seen_at, resolved_at, resolution_note"
)
RUN_COLUMNS = "id, status, dry_run, started_at, finished_at, checked, fixed, errors, found, error_detail"


def event_rows(deltas: list[tuple[object, ...]], sqlite: bool) -> Iterator[tuple[object, ...]]:
    for row in deltas:
        if row[12] not in ("VERIFIED", "FAILED"):
            continue
        event_type = "delta.verified" if row[12] == "VERIFIED" else "delta.failed"
        body = json.dumps({"id": f"evt_{row[0]}", "event": event_type,
                           "data": {"anchorId": row[1], "customerId": row[3], "itemHash": row[2], "receiptId": row[14]}})
        received = row[24] or row[25]
        yield (row[0], f"evt_{row[0]}", event_type, body.encode(), 1_767_225_600 + int(row[0]), received,
               "applied", row[1], row[2], row[14], received)


def discrepancy_rows(shape: Shape, sqlite: bool) -> Iterator[tuple[object, ...]]:
    rng = random.Random(shape.seed + 1)
    step = max(1, shape.deltas // max(1, shape.open_discrepancies))
    for n in range(1, shape.open_discrepancies + 1):
        delta_id = n * step
        kind = KINDS[n % len(KINDS)]
        seen = START + timedelta(days=rng.randrange(300), seconds=rng.randrange(86_400))
        evidence = {"field": "receipt_id", "ours": f"0x{rng.getrandbits(128):032x}", "theirs": f"0x{rng.getrandbits(128):032x}"}
        yield (n, kind, "open", f"delta:{delta_id}", delta_id, f"anc_{delta_id:012x}", f"cust_{delta_id % shape.customers:05d}",
               None, None, "reconciler", json.dumps(evidence), rng.randint(1, 5), _stamp(seen, sqlite),
               _stamp(seen + timedelta(hours=1), sqlite), None, None)


def run_rows(shape: Shape, sqlite: bool) -> Iterator[tuple[object, ...]]:
    for n in range(1, shape.runs + 1):
        started = START + timedelta(minutes=n)
        yield (n, "completed", False, _stamp(started, sqlite), _stamp(started + timedelta(seconds=2), sqlite),
               50, 3, 0, json.dumps({"missing_webhook": 3}), None)


def seed(url: str, shape: Shape) -> None:
    """Add the history to the empty, migrated ledger at `url`."""
    sqlite = make_url(url).get_backend_name() == "sqlite"
    deltas = list(delta_rows(shape, sqlite))
    tables = [
        ("reconciliation_run", RUN_COLUMNS, list(run_rows(shape, sqlite))),
        ("local_delta", DELTA_COLUMNS, deltas),
        ("webhook_event", EVENT_COLUMNS, list(event_rows(deltas, sqlite))),
        ("discrepancy", DISCREPANCY_COLUMNS, list(discrepancy_rows(shape, sqlite))),
    ]
    if sqlite:
        _seed_sqlite(make_url(url).database or "", tables)
    else:
        _seed_postgres(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False), tables)


def _seed_sqlite(path: str, tables: list[tuple[str, str, list[tuple[object, ...]]]]) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA synchronous = OFF")  # seeding only: the benchmark reads
    with connection:
        for table, columns, rows in tables:
            marks = ", ".join("?" * len(columns.split(",")))
            connection.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
    connection.execute("ANALYZE")
    connection.close()


def _seed_postgres(url: str, tables: list[tuple[str, str, list[tuple[object, ...]]]]) -> None:
    with psycopg.connect(url) as connection:
        with connection.cursor() as cursor:
            for table, columns, rows in tables:
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        connection.commit()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")

