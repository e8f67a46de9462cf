"""The ledger's writer thread alone (no HTTP): N webhook jobs submitted at once, timed
until the last one is committed; microseconds of wall time per event.

This is what the webhook route hands the ledger, without the event loop in the way:
the work object the route submits (reconciler.apply.RecordEvent when it exists, else
the older `partial(record_event, ...)`), so one script A/B-tests two checkouts:

  flock /tmp/bench.lock .venv/bin/python bench/writer.py [--events 3000] [--repeat 3]
      [--matched 0.0] [--postgres postgresql://postgres@127.0.0.1:5432/test]
  PYTHONPATH=/tmp/other-checkout .venv/bin/python bench/writer.py ...   (the other side)

--matched F: that fraction of events names a delta the ledger holds (insert, lookup,
compare, status update) instead of none (an orphan: insert + lookup).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
import statistics
import sys
import tempfile
import time
from concurrent.futures import wait
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

if not os.environ.get("PYTHONPATH"):  # else the other checkout named there is measured
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reconciler.apply as apply  # noqa: E402
from reconciler.events import parse_event  # noqa: E402
from storage.models import LocalDelta  # noqa: E402
from storage.sql_ledger import SqlLedger  # noqa: E402
from storage.vocabulary import DeltaStatus  # noqa: E402


def body(i: int, run: str) -> bytes:
    return json.dumps({
        "id": f"evt_{run}_{i:09d}", "event": "delta.verified", "tenantId": "ten",
        "createdAt": "2026-11-27T10:00:00.000Z",
        "data": {"recordId": f"a_{run}_{i}", "receiptId": f"0x{i:064x}", "customerId": "cus_bench",
                 "delta": -12.5, "verificationReference": f"vref_{i}"},
    }).encode()


def work_for(raw: bytes, now: datetime) -> Any:
    event = parse_event(raw)
    make = getattr(apply, "RecordEvent", None)
    if make is not None:
        return make(event, raw, int(now.timestamp()), now)
    return partial(apply.record_event, event=event, raw_body=raw, signature_timestamp=int(now.timestamp()), now=now)


def seed(ledger: SqlLedger, run: str, indexes: list[int], now: datetime) -> None:
    deltas = [
        LocalDelta(anchor_id=f"a_{run}_{i}", item_hash=None, customer_id="cus_bench", amount=Decimal("-12.5"),
                   reason="bench", idempotency_key=f"k_{run}_{i}", source="outbox", status=DeltaStatus.QUEUED.value,
                   created_at=now, updated_at=now, emitted_at=now)
        for i in indexes
    ]
    ledger.transact_sync(lambda s: [s.add_delta(d) and None for d in deltas])


def one_round(ledger: SqlLedger, run: str, events: int, matched: float) -> float:
    now = datetime.now(UTC)
    step = int(1 / matched) if matched else 0
    if step:
        seed(ledger, run, list(range(0, events, step)), now)
    works = [work_for(body(i, run), now) for i in range(events)]
    started = time.perf_counter()
    futures = [ledger._writer.submit(w) for w in works]  # as the route does, minus the loop
    wait(futures)
    elapsed = time.perf_counter() - started
    for future in futures:
        future.result()  # any failure fails the run
    return elapsed / events * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--matched", type=float, default=0.0)
    parser.add_argument("--postgres", metavar="ADMIN_URL", help="a database of its own on this server, dropped after")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacrecon-writer-"))
    try:
        from sqlalchemy import text
        from sqlalchemy.engine import make_url

        from storage.engine import make_engine
        from storage.schema import upgrade_to_head

        url = f"sqlite:///{work / 'ledger.db'}"
        if args.postgres:
            name = f"pacrecon_writer_{uuid.uuid4().hex[:10]}"
            admin = make_engine(args.postgres).execution_options(isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
        engine = make_engine(url)
        upgrade_to_head(engine)
        engine.dispose()
        ledger = SqlLedger.from_url(url)
        tag = f"{time.time_ns() % 10**10}"
        one_round(ledger, f"w{tag}", 300, args.matched)  # warm-up
        results = [one_round(ledger, f"r{n}{tag}", args.events, args.matched) for n in range(args.repeat)]
        ledger.close()
        print(json.dumps({"code": str(Path(apply.__file__).resolve().parent.parent), "matched": args.matched,
                          "us_per_event": [round(r) for r in results], "median": round(statistics.median(results))}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.postgres:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    main()
