"""Where `pacrecon serve` spends its time under the ingest benchmark's load.

Starts a daemon (SQLite by default, or the URL given), drives it with the same wrk
script and bodies as bench/ingest.py, and samples it with py-spy (`pip install py-spy`)
counting only the thread that holds the GIL: with one GIL, that is the CPU the process
can use, so the shares below add up to where each request's time goes.

  flock /tmp/bench.lock .venv/bin/python bench/profile_ingest.py [DATABASE_URL] [--webhook-writer process [--sample writer]] [--rate R]

`--sample writer` samples the writer process instead of the daemon's own process.
`--rate R` drives the daemon with the open-loop generator (bench/openloop.c) at R requests/s
instead of wrk's closed loop: the load of the p99 target at 80 % of peak, where fewer requests
arrive in each turn of the event loop than under wrk's 64 busy connections.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import build_openloop, require_wrk, create_pg_database, drop_pg_database, run_openloop, run_wrk, write_bodies  # noqa: E402
from storage.engine import make_engine  # noqa: E402
from storage.schema import upgrade_to_head  # noqa: E402
from tests.daemon import Daemon  # noqa: E402

SECONDS = 10
# (label, a frame that marks it), first match wins, most specific first
CATEGORIES = [
    ("writer: SAVEPOINT / RELEASE", ("begin_nested (sqlalchemy", "_release_savepoint_impl", "NestedTransaction")),
    ("writer: INSERT webhook_event (one per event, the slow path)", ("insert_event (storage/session.py",)),
    ("writer: multi-row INSERT webhook_event (per batch)", ("insert_events (storage/session.py",)),
    ("writer: SELECT local_delta by anchor (per event, the slow path)", ("deltas_by_anchor",)),
    ("writer: SELECT anchors with deltas (per batch)", ("anchors_with_deltas",)),
    ("writer: COMMIT (fsync)", ("do_commit",)),
    ("writer: other (session, batch)", ("_commit_batch",)),
    ("request: logging (structlog, the webhook line)", ("structlog/", "pacrecon/logs.py", "Logger.info", "Logger._log", "callHandlers")),
    ("request: HMAC signature check", ("verify_signature",)),
    ("request: JSON parse of the event", ("parse_event",)),
    ("request: metrics and tallies", ("observe_webhook", "pacrecon/metrics.py")),
    ("request: waiting on the writer (handoff)", ("transact (storage/sql_ledger.py", "_settle_waiters", "wrap_future", "_call_set_state", "_copy_future_state")),
    ("request: the writer process's socket (frames out and back)", ("pacrecon/webhook_writer.py",)),
    ("request: reading the body", ("read_limited_body",)),
    ("request: the rest of the webhook handler", ("receiver/webhook.py",)),
    ("request: sending the response (uvicorn write)", ("Response.__call__",)),
    ("request: Starlette routing / middleware", ("starlette/",)),
    ("request: uvicorn HTTP protocol (httptools)", ("uvicorn/protocols",)),
    ("event loop / other", ("",)),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("database_url", nargs="?")
    parser.add_argument("--webhook-writer", choices=["thread", "process"], default="thread", help="PACRECON_WEBHOOK_WRITER")
    parser.add_argument("--sample", choices=["daemon", "writer"], default="daemon",
                        help="the process to sample: the daemon's own, or (with --webhook-writer process) its writer process")
    parser.add_argument("--rate", type=float, help="open loop at this many requests/s (bench/openloop.c) instead of wrk")
    args = parser.parse_args()
    if args.sample == "writer" and args.webhook_writer != "process":
        parser.error("--sample writer needs --webhook-writer process")
    url = args.database_url
    work = Path(tempfile.mkdtemp(prefix="pacrecon-profile-"))
    pg_name = None
    try:
        if url is None:
            url = f"sqlite:///{work / 'ledger.db'}"
            engine = make_engine(url)
            upgrade_to_head(engine)
            engine.dispose()
        elif url.startswith("postgres"):
            admin, (pg_name, url) = url, create_pg_database(url)
        generator = None if args.rate is None else build_openloop(work)  # built before sampling starts
        if args.rate is None:
            require_wrk()
        daemon = Daemon(url, work, PACRECON_WEBHOOK_WRITER=args.webhook_writer).start()
        bodies = work / "bodies.tsv"
        write_bodies(bodies, 0, 200_000)  # more than the fastest daemon takes in the time
        assert daemon.process is not None
        pid = daemon.process.pid
        if args.sample == "writer":
            pid = next(int(e["pid"]) for e in daemon.log_events() if e.get("event") == "webhook_writer_ready")
        raw = work / "profile.txt"
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--gil", "-r", "250", "-d", str(SECONDS), "-f", "raw", "-o", str(raw), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        if generator is None:
            result = run_wrk(daemon.url, bodies, SECONDS - 1)
        else:
            opened = run_openloop(generator, daemon.port, bodies, args.rate, SECONDS - 1)
            result = {"rps": opened["ok2xx"] / opened["elapsed_s"], "p50_us": opened["p50_ms"] * 1000, "p99_us": opened["p99_ms"] * 1000}
        spy.wait()
        daemon.stop()
        totals: collections.Counter[str] = collections.Counter()
        leaves: collections.Counter[str] = collections.Counter()  # the function each sample was in
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            label = next(label for label, marks in CATEGORIES if any(mark in stack for mark in marks))
            totals[label] += int(count)
            leaves[stack.rsplit(";", 1)[-1]] += int(count)
        samples = sum(totals.values())
        print(json.dumps({"rps": round(result["rps"]), "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000, "gil_samples": samples}))
        for label, _ in CATEGORIES:
            print(f"{100 * totals[label] / samples:5.1f} %  {label}")
        print("functions the samples were in, the 15 most frequent:")
        for leaf, count in leaves.most_common(15):
            print(f"{100 * count / samples:5.1f} %  {leaf}")
        shutil.copy(raw, Path(tempfile.gettempdir()) / "pacrecon-ingest-profile.txt")
    finally:
        if pg_name is not None:
            drop_pg_database(admin, pg_name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
