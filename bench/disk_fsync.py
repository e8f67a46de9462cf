"""How long this machine's disk takes to make a small write durable, alone and while
other data is written without fsync: the floor under every commit's latency here.

A committing database appends a little to its log and fsyncs it (SQLite's WAL with
synchronous=FULL, PostgreSQL's WAL with synchronous_commit=on). Meanwhile its data pages
reach the page cache without an fsync (PostgreSQL's buffer writes, SQLite's checkpoints)
and the kernel writes them back later, 30 s after they were dirtied by default. This
script appends 8 KiB and calls fdatasync in a loop, in a directory on the disk under
test, for SECONDS: once alone, then while a child process writes WRITE_MB megabytes a
second of buffered data to another file there. It prints the latency percentiles and
every fsync slower than 10 ms, with when it happened.

  flock /tmp/bench.lock .venv/bin/python bench/disk_fsync.py [--dir /var/lib/postgresql] [--seconds 40] [--write-mb 10]

Run it for at least vm.dirty_expire_centisecs (printed) plus a few seconds: the
background writer's first data is written back only then.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from ingest import machine

APPEND = 8192
SLOW_MS = 10.0


def fsync_latencies(directory: Path, seconds: float) -> tuple[list[float], list[tuple[float, float]]]:
    """Every fdatasync's latency in ms, and (seconds since the start, ms) of the slow ones."""
    latencies: list[float] = []
    slow: list[tuple[float, float]] = []
    block = b"x" * APPEND
    with tempfile.NamedTemporaryFile(dir=directory, prefix="disk_fsync_") as log:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            os.write(log.fileno(), block)
            before = time.monotonic()
            os.fdatasync(log.fileno())
            took = (time.monotonic() - before) * 1000
            latencies.append(took)
            if took > SLOW_MS:
                slow.append((round(before - start, 2), round(took, 1)))
    return latencies, slow


def buffered_writer(directory: str, seconds: float, megabytes_per_second: float) -> None:
    """Writes at a steady rate, never fsyncs (the kernel writes it back when it expires)."""
    chunk = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="disk_fsync_bg_") as data:
        start, written = time.monotonic(), 0
        while time.monotonic() - start < seconds:
            os.write(data.fileno(), chunk)
            written += 1
            time.sleep(max(0.0, start + written / megabytes_per_second - time.monotonic()))


def summary(latencies: list[float], slow: list[tuple[float, float]], seconds: float) -> dict[str, object]:
    ordered = sorted(latencies)
    at = lambda share: round(ordered[min(len(ordered) - 1, int(len(ordered) * share))], 2)  # noqa: E731
    return {"fsyncs": len(ordered), "per_second": round(len(ordered) / seconds), "p50_ms": at(0.5), "p99_ms": at(0.99),
            "p999_ms": at(0.999), "max_ms": round(ordered[-1], 1), f"slower_than_{SLOW_MS:g}ms": slow}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="a directory on the disk under test")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--write-mb", type=float, default=10.0, help="the background writer's rate, MB/s")
    args = parser.parse_args()
    facts = machine()
    facts["dirty"] = {name: int(Path(f"/proc/sys/vm/{name}").read_text()) for name in
                      ("dirty_expire_centisecs", "dirty_writeback_centisecs", "dirty_background_ratio", "dirty_ratio")}
    print(json.dumps(facts), flush=True)
    alone = summary(*fsync_latencies(args.dir, args.seconds), args.seconds)
    print(json.dumps({"run": "fsync alone", "dir": str(args.dir), **alone}), flush=True)
    writer = multiprocessing.Process(target=buffered_writer, args=(str(args.dir), args.seconds + 2, args.write_mb))
    writer.start()
    try:
        time.sleep(1)
        loaded = summary(*fsync_latencies(args.dir, args.seconds), args.seconds)
    finally:
        writer.join()
    print(json.dumps({"run": f"fsync while {args.write_mb:g} MB/s are written without fsync", "dir": str(args.dir), **loaded}), flush=True)


if __name__ == "__main__":
    main()
