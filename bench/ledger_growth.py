"""The webhook writer's own cost per event as its SQLite ledger grows, for the ingest bench's
two styles of id (bench/ingest.py's `body_ids`): random, as PacSpace's, or counting up.

What it runs: the writer process's path without the process (`SqlLedger.commit_here` of
batches of orphan `delta.verified` events, parsed by `parse_event` first, as
`pacrecon.webhook_writer` does), on a fresh SQLite ledger file, until --rows events; each
--segment events it prints the CPU and wall time per event of that segment and the size of
the database and its WAL. The events are built before each segment is timed.

    flock /tmp/bench.lock .venv/bin/python bench/ledger_growth.py --ids random --rows 1000000
    flock /tmp/bench.lock .venv/bin/python bench/ledger_growth.py --ids sequential --rows 1000000

--batch is the events per commit (16 by default: about what the writer commits at 80 % of
the peak, RESULTS.md session 16). --pragma (repeatable) runs a statement on every connection
the ledger opens, before the ledger's own settings (which win where both set one): to try a
setting before it goes into `storage.engine`, e.g. --pragma "PRAGMA wal_autocheckpoint=4000".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import IDS, body_ids  # noqa: E402,I001  (bench/ is the script's own directory)
from reconciler.apply import RecordEvent  # noqa: E402
from reconciler.events import parse_event  # noqa: E402
from storage.sql_ledger import SqlLedger  # noqa: E402
from tests.conftest import migrated_sqlite_url  # noqa: E402
from tests.webhooks import envelope  # noqa: E402


def events(first: int, count: int, ids: str) -> list[RecordEvent]:
    works = []
    for i in range(first, first + count):
        event_id, anchor_id, receipt_id = body_ids(i, ids)
        data = {"recordId": anchor_id, "receiptId": receipt_id, "customerId": "cus_bench", "delta": -12.5,
                "sequenceNumber": str(i), "verificationReference": f"vref_{i}"}
        body = json.dumps(envelope("delta.verified", data, id=event_id)).encode()
        works.append(RecordEvent(parse_event(body), body, 1_700_000_000, datetime.now(UTC)))
    return works


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", choices=IDS, default="random")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--segment", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pragma", action="append", default=[])
    args = parser.parse_args()
    if args.pragma:
        def extra_settings(dbapi_connection: Any, _record: Any) -> None:
            for statement in args.pragma:
                dbapi_connection.execute(statement)

        # on every engine (the ledger makes its own); a class-level listener runs before the engine's own
        event.listen(Engine, "connect", extra_settings)
    work = Path(tempfile.mkdtemp(prefix="pacrecon-ledger-growth-"))
    try:
        ledger = SqlLedger.from_url(migrated_sqlite_url(work / "ledger.db"))
        rows = 0
        while rows < args.rows:
            prepared = [events(rows + start, args.batch, args.ids) for start in range(0, args.segment, args.batch)]
            cpu, wall = time.process_time(), time.perf_counter()
            for works in prepared:
                ledger.commit_here(works)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            done = sum(len(works) for works in prepared)
            rows += done
            print(json.dumps({
                "ids": args.ids, "batch": args.batch, "pragmas": args.pragma, "rows": rows,
                "cpu_us_per_event": round(cpu / done * 1e6, 1), "wall_us_per_event": round(wall / done * 1e6, 1),
                "db_mb": round((work / "ledger.db").stat().st_size / 1e6),
                "wal_mb": round((work / "ledger.db-wal").stat().st_size / 1e6, 1),
            }), flush=True)
        ledger.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
