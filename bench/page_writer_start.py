"""Benchmark: what starting a pass's page writer process costs (`pacrecon.page_writer`), the
cost `PACRECON_RECONCILE_WRITER=auto` spares a pass of less than a page.

    flock /tmp/bench.lock .venv/bin/python bench/page_writer_start.py [--runs 10] [--database-url URL]

Each run starts a `ProcessPages` on a migrated SQLite file (or the URL given), asks it one
read (so it is ready: imports, logging, its ledger open), closes it, and reaps it. Reported:
the child's CPU (user + system, from the reaped children's rusage) and the wall time from
the spawn to its first answer; medians and extremes over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
from operator import methodcaller
from pathlib import Path

from common import median  # noqa: I001  (common puts the repo on sys.path)

from pacrecon.page_writer import ProcessPages
from pacrecon.writer_child import WriterConfig
from tests.conftest import migrated_sqlite_url


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_start(url: str) -> tuple[float, float]:
    """(the child's CPU seconds, seconds from spawn to its first answer)."""
    cpu_before = children_cpu_seconds()
    started = time.perf_counter()
    pages = ProcessPages(WriterConfig(url, 5_000, "warning", "json", ()), deadline_seconds=60)
    asyncio.run(pages.read(methodcaller("count_open_discrepancies")))
    ready = time.perf_counter() - started
    assert pages.close_sync() == 0
    return children_cpu_seconds() - cpu_before, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--database-url", default=None, help="a migrated ledger (default: a new SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-page-writer-") as workdir:
        url = args.database_url or migrated_sqlite_url(Path(workdir) / "ledger.db")
        one_start(url)  # warm: the file cache, the .pyc files
        cpu, ready = zip(*(one_start(url) for _ in range(args.runs)), strict=True)
    print(json.dumps({
        "runs": args.runs,
        "child_cpu_s": {"median": round(median(list(cpu)), 3), "min": round(min(cpu), 3), "max": round(max(cpu), 3)},
        "spawn_to_first_answer_s": {"median": round(median(list(ready)), 3), "min": round(min(ready), 3), "max": round(max(ready), 3)},
    }))


if __name__ == "__main__":
    main()
