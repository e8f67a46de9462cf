"""The reconciler's own work per stale delta, without the lookups: `_apply_page` of pages of
200 QUEUED deltas that PacSpace's answers (the sandbox's status shape, sequence number and
proofs included) verify, each page one transaction on the ledger's writer thread, on a
fresh SQLite ledger file. Every delta is checked VERIFIED by the reconciler at the end.

Prints the CPU time per delta of PAGES pages (after WARMUP pages). On this noisy host
compare code by instruction count instead, which other load does not change:

    for code in . /tmp/baseline; do for n in 10 30; do
      PAGES=$n PYTHONPATH=$code valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.page.$n.out \\
        .venv/bin/python bench/page_write.py 2>&1 | grep Collected
    done; done

(both seed the same 35 pages of deltas: instructions of 20 pages = the 30 run's minus the
10 run's; per delta: / 4,000).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: PYTHONPATH chooses the code compared

from sqlalchemy import insert, text  # noqa: E402

import reconciler.reconcile as reconcile  # noqa: E402
from reconciler.pacspace import StatusAnswer, status_from  # noqa: E402
from storage.engine import make_engine  # noqa: E402
from storage.models import LocalDelta  # noqa: E402
from storage.schema import upgrade_to_head  # noqa: E402
from storage.sql_ledger import SqlLedger  # noqa: E402

PAGE = 200  # the reconciler's page_size default
WARMUP = 5
SEEDED_PAGES = 30  # at least: runs of 10 and 30 pages seed the same rows, and differ only by 20 pages of work
CUSTOMERS = 50
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
EMITTED = NOW - timedelta(hours=1)


def item_hash(n: int) -> str:
    return f"0x{n:064x}"


def delta_rows(count: int) -> list[dict[str, Any]]:
    """Imported, QUEUED deltas, one per anchor, as `pacrecon import` leaves them."""
    return [
        {
            "id": n, "anchor_id": f"a_{n}", "item_hash": item_hash(n), "customer_id": f"cust_{n % CUSTOMERS}",
            "amount": Decimal("-12.50"), "reason": "usage", "idempotency_key": f"k_{n}", "source": "import",
            "status": "QUEUED", "receipt_id": item_hash(n), "items_root": item_hash(n), "item_hashes": [item_hash(n)],
            "created_at": EMITTED, "emitted_at": EMITTED, "updated_at": EMITTED,
        }
        for n in range(1, count + 1)
    ]


def answer(n: int) -> StatusAnswer:
    """The sandbox's status answer verifying delta n's single-item anchor."""
    data = {
        "anchorId": f"a_{n}", "status": "VERIFIED", "receiptId": item_hash(n), "itemsRoot": item_hash(n),
        "itemHashes": [item_hash(n)], "txHash": f"0x{n:064x}", "receivedAt": EMITTED.isoformat(),
        "customerId": f"cust_{n % CUSTOMERS}", "delta": "-12.50", "itemHash": item_hash(n),
        "sequenceNumber": str(n // CUSTOMERS),
    }
    return StatusAnswer(f"a_{n}", status_from(data["status"]), data["status"], data)


def main() -> None:
    pages = int(os.environ.get("PAGES", "40"))
    work = Path(tempfile.mkdtemp(prefix="pacrecon-page-write-"))
    try:
        url = f"sqlite:///{work / 'ledger.db'}"
        engine = make_engine(url)
        upgrade_to_head(engine)
        engine.dispose()
        ledger = SqlLedger.from_url(url)
        total = (WARMUP + max(pages, SEEDED_PAGES)) * PAGE
        rows = delta_rows(total)
        for start in range(0, total, 1000):  # a transaction must commit within 30 s, under valgrind too
            ledger.transact_sync(lambda s: s._session.execute(insert(LocalDelta.__table__), rows[start : start + 1000]))  # noqa: B023
        ids = list(range(1, (WARMUP + pages) * PAGE + 1))
        prepared = [
            partial(reconcile._apply_page, delta_ids=ids[start : start + PAGE], answers={f"a_{n}": answer(n) for n in ids[start : start + PAGE]},
                    now=NOW, stuck_cutoff=NOW - timedelta(minutes=30), run_id=None)
            for start in range(0, len(ids), PAGE)
        ]
        for page in prepared[:WARMUP]:
            ledger.transact_sync(page)
        started = time.process_time()
        fixed = sum(ledger.transact_sync(page).fixed for page in prepared[WARMUP:])
        seconds = time.process_time() - started
        verified = ledger.read_sync(lambda s: s._session.execute(
            text("SELECT count(*) FROM local_delta WHERE status = 'VERIFIED' AND verified_by = 'reconciler' AND tx_hash IS NOT NULL")).scalar_one())
        assert fixed == pages * PAGE and verified == len(ids), (fixed, verified)
        ledger.close()
        print(json.dumps({"pages": pages, "deltas": fixed, "cpu_us_per_delta": round(seconds / fixed * 1e6, 1)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
