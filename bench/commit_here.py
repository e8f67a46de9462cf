"""The writer process's own work per webhook: `SqlLedger.commit_here` of batches of 64 orphan
`delta.verified` events (parsed by `parse_event` first), on a fresh SQLite ledger file.
BATCH=n sets another batch size: under an open loop below the peak the writer commits small
batches, and what each batch costs whatever its size weighs more there.

Prints the CPU time per event of BATCHES batches (after 20 batches of warm-up). On this
noisy host compare code by instruction count instead, which other load does not change:

    for code in . /tmp/baseline; do for n in 50 150; do
      BATCHES=$n PYTHONPATH=$code valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n.out \\
        .venv/bin/python bench/commit_here.py 2>&1 | grep Collected
    done; done

(instructions of 100 batches = the 150 run's minus the 50 run's; per event: / (100 x BATCH)).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: PYTHONPATH chooses the code compared

from reconciler.apply import RecordEvent  # noqa: E402
from reconciler.events import parse_event  # noqa: E402
from storage.engine import make_engine  # noqa: E402
from storage.schema import upgrade_to_head  # noqa: E402
from storage.sql_ledger import SqlLedger  # noqa: E402
from tests.webhooks import envelope  # noqa: E402

BATCH = int(os.environ.get("BATCH", "64"))
WARMUP = 20


def events(first: int) -> list[RecordEvent]:
    works = []
    for n in range(first, first + BATCH):
        data = {"recordId": f"a_{n}", "receiptId": f"0x{n:064x}", "customerId": "cus_1", "delta": -12.5}
        body = json.dumps(envelope("delta.verified", data, id=f"evt_{n}")).encode()
        works.append(RecordEvent(parse_event(body), body, 1_700_000_000, datetime.now(UTC)))
    return works


def main() -> None:
    batches = int(os.environ.get("BATCHES", "300"))
    work = Path(tempfile.mkdtemp(prefix="pacrecon-commit-here-"))
    try:
        url = f"sqlite:///{work / 'ledger.db'}"
        engine = make_engine(url)
        upgrade_to_head(engine)
        engine.dispose()
        ledger = SqlLedger.from_url(url)
        for number in range(WARMUP):
            ledger.commit_here(events(number * BATCH))
        prepared = [events((WARMUP + number) * BATCH) for number in range(batches)]
        started = time.process_time()
        for works in prepared:
            ledger.commit_here(works)
        used = time.process_time() - started
        ledger.close()
        print(json.dumps({"batches": batches, "cpu_us_per_event": round(used / (batches * BATCH) * 1e6, 2)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
