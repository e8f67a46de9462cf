"""Webhook ingest when every webhook names one of our deltas (issue 9): the usual case.

bench/ingest.py sends events for anchors the ledger does not know (each is stored as an
orphan: one row). A tenant's own deltas come back verified, though: each webhook then
finds its delta, compares receipt, amount and status, moves it to VERIFIED, and clears
what settling clears. This drives that path end to end over HTTP.

Each daemon (writer process, the default) gets a ledger of its own, seeded with SEED
QUEUED deltas whose anchors the bodies name (`a_bench_<n>`, as bench/ingest.py's bodies),
so every webhook it answers is a delta of ours verified once. With --baseline-code DIR,
each backend has a twin on DIR's code (PYTHONPATH=DIR ahead of this checkout), in the same
rounds. The bare app (bench/bare_app.py) runs in the rounds too, for the ratio.

Per round and target: wrk's closed-loop peak (64 connections, SECONDS), then
bench/openloop.c at 80 % of that peak (OPENLOOP_SECONDS). After the rounds: each daemon
open-loop at FIXED_RATE (one rate for every code: the same load on both), then SIGKILL, and
its ledger counted: every 2xx is a stored event, and every stored event that names a seeded
delta was applied to it (the delta is VERIFIED).

  flock /tmp/bench.lock .venv/bin/python bench/ingest_matched.py [--baseline-code DIR]
      [--rounds 3] [--seconds 6] [--openloop-seconds 6] [--fixed-rate 1500] [--only sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import text

from common import REPO  # noqa: F401,I001  (bench/ is the script's own directory; puts the repository on sys.path)
from ingest import DEFAULT_PG, BareApp, build_openloop, require_wrk, create_pg_database, drop_pg_database, machine, migrate, run_openloop, run_wrk, write_bodies
from seed import DELTA_COLUMNS, _seed_postgres, _seed_sqlite, _stamp
from storage.engine import make_engine
from storage.types import amount_to_units
from tests.daemon import Daemon

SEED = 600_000  # deltas per ledger: more than any daemon answers in a run (checked at the end)


def seed_queued(url: str, count: int) -> None:
    """`count` QUEUED deltas of customer cus_bench, anchors a_bench_0 .. a_bench_<count-1>,
    amount -12.50: what bench/ingest.py's bodies claim."""
    sqlite = url.startswith("sqlite")
    emitted = _stamp(datetime(2026, 12, 1, tzinfo=UTC), sqlite)
    amount: object = amount_to_units(Decimal("-12.50")) if sqlite else Decimal("-12.50")
    rows = [
        (n + 1, f"a_bench_{n}", None, "cus_bench", amount, "usage", None, None, f"bench:{n}", "outbox", None, None, "QUEUED",
         None, None, None, None, None, None, None, None, None, emitted, emitted, None, None, emitted, None)
        for n in range(count)
    ]
    tables = [("local_delta", DELTA_COLUMNS, rows)]
    if sqlite:
        _seed_sqlite(url.removeprefix("sqlite:///"), tables)
    else:
        _seed_postgres(url, tables)


def ledger_counts(url: str) -> dict[str, Any]:
    engine = make_engine(url)
    with engine.connect() as connection:
        outcomes = dict(connection.execute(text("SELECT outcome, count(*) FROM webhook_event GROUP BY outcome")).all())
        verified = connection.execute(text("SELECT count(*) FROM local_delta WHERE status = 'VERIFIED'")).scalar_one()
        highest = connection.execute(text("SELECT max(CAST(substr(anchor_id, 9) AS INTEGER)) FROM webhook_event")).scalar_one()
    engine.dispose()
    return {"events": {k: int(v) for k, v in outcomes.items()}, "deltas_verified": int(verified), "highest_anchor": highest}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--openloop-seconds", type=float, default=6.0)
    parser.add_argument("--fixed-rate", type=float, default=1500.0, help="every daemon open-loop at this rate after the rounds")
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--baseline-code", type=Path)
    parser.add_argument("--database-url", default=os.environ.get("PACRECON_BENCH_DATABASE_URL", DEFAULT_PG))
    args = parser.parse_args()
    print(json.dumps(machine(args.database_url if args.only != "sqlite" else None)), flush=True)
    codes = {"": None} | ({"_baseline": args.baseline_code.resolve()} if args.baseline_code else {})
    backends = [b for b in ("sqlite", "postgres") if args.only in (None, b)]
    work = Path(tempfile.mkdtemp(prefix="pacrecon-matched-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        generator = build_openloop(work)
        require_wrk()
        urls: dict[str, str] = {}
        for backend in backends:
            for suffix in codes:
                target = backend + suffix
                if backend == "sqlite":
                    urls[target] = f"sqlite:///{work / (target + '.db')}"
                    migrate(urls[target], codes[suffix])
                else:
                    name, urls[target] = create_pg_database(args.database_url, codes[suffix])
                    stack.callback(drop_pg_database, args.database_url, name)
                seed_queued(urls[target], SEED)
        bare = BareApp(work)
        stack.callback(bare.stop)
        daemons: dict[str, Daemon] = {}
        for target, url in urls.items():
            code = codes[target.removeprefix("sqlite").removeprefix("postgres")]
            settings = {"PYTHONPATH": str(code)} if code else {}
            (work / target).mkdir()
            daemons[target] = Daemon(url, work / target, PACRECON_WEBHOOK_WRITER="process", **settings).start()
            stack.callback(daemons[target].stop)
        targets = {"bare": (bare.url, bare.port)} | {t: (d.url, d.port) for t, d in daemons.items()}

        # each target its own stream of bodies: a daemon's must name deltas it has not seen
        next_id = dict.fromkeys(targets, 0)
        bodies = work / "bodies.tsv"
        fastest = dict.fromkeys(targets, 30_000.0)  # until measured: the bare app's pace on a fast moment
        acknowledged = dict.fromkeys(targets, 0)  # 2xx answers, each an event the ledger must hold
        unanswered = dict.fromkeys(targets, 0)  # in flight at a run's end: stored or not, never acknowledged

        def take(target: str, count: int) -> None:
            write_bodies(bodies, next_id[target], count)
            next_id[target] += count

        def peak(target: str, seconds: float) -> dict[str, Any]:
            """wrk against `target` with bodies for twice its fastest pace so far; those it did
            not send are the next run's (a daemon's must each name a delta not verified yet)."""
            count = int(fastest[target] * seconds * 2) + 20_000
            take(target, count)
            result = run_wrk(targets[target][0], bodies, seconds)
            next_id[target] -= count - result["sent"]
            fastest[target] = max(fastest[target], result["rps"])
            acknowledged[target] += result["ok2xx"]
            unanswered[target] += result["unanswered"]
            return result

        for target in targets:  # warm-up
            peak(target, 1)
        peaks: dict[str, list[float]] = {t: [] for t in targets}
        p99s: dict[str, list[float]] = {t: [] for t in targets}
        for round_ in range(args.rounds):
            for target, (_, port) in targets.items():
                result = peak(target, args.seconds)
                peaks[target].append(result["rps"])
                rate = 0.8 * result["rps"]
                take(target, int(rate * args.openloop_seconds) + 1)
                loop = run_openloop(generator, port, bodies, rate, args.openloop_seconds)
                p99s[target].append(loop["p99_ms"])
                acknowledged[target] += loop["ok2xx"]
                unanswered[target] += loop["sent"] - loop["ok2xx"] - loop["other"]
                print(json.dumps({"round": round_, "target": target, "peak_rps": round(result["rps"]), "non_2xx_peak": result["other"],
                                  "openloop_rate": round(rate), "p50_ms": loop["p50_ms"], "p99_ms": loop["p99_ms"],
                                  "non_2xx_openloop": loop["sent"] - loop["ok2xx"], "generator_lag_p99_ms": loop["generator_lag_p99_ms"]}), flush=True)
        fixed: dict[str, dict[str, float]] = {}
        for target in daemons:
            take(target, int(args.fixed_rate * args.openloop_seconds) + 1)
            loop = run_openloop(generator, targets[target][1], bodies, args.fixed_rate, args.openloop_seconds)
            fixed[target] = {k: loop[k] for k in ("p50_ms", "p99_ms", "max_ms")} | {"non_2xx": loop["sent"] - loop["ok2xx"]}
            acknowledged[target] += loop["ok2xx"]
            unanswered[target] += loop["sent"] - loop["ok2xx"] - loop["other"]
            print(json.dumps({"fixed_rate": args.fixed_rate, "target": target, **fixed[target]}), flush=True)
        ledgers: dict[str, dict[str, Any]] = {}
        for target, daemon in daemons.items():
            assert daemon.process is not None
            daemon.process.kill()
            daemon.process.wait()
        time.sleep(2)  # the writer processes see their daemon gone and exit (what they held was never acknowledged)
        for target in daemons:
            ledgers[target] = ledger_counts(urls[target])
            stored = sum(ledgers[target]["events"].values())
            matched = ledgers[target]["events"].get("applied", 0)
            ledgers[target]["every_event_applied"] = matched == stored == ledgers[target]["deltas_verified"]
            ledgers[target]["within_seed"] = (ledgers[target]["highest_anchor"] or 0) < SEED
            ledgers[target]["acknowledged"] = acknowledged[target]
            ledgers[target]["unanswered"] = unanswered[target]
            ledgers[target]["every_2xx_stored"] = acknowledged[target] <= stored <= acknowledged[target] + unanswered[target]
            print(json.dumps({"ledger": target, **ledgers[target]}), flush=True)
        summary: dict[str, Any] = {}
        for target in targets:
            summary[target] = {"peak_rps_median": round(statistics.median(peaks[target])), "peak_rps": [round(p) for p in peaks[target]],
                               "p99_ms_at_80pct": p99s[target], "p99_ms_at_80pct_median": statistics.median(p99s[target])}
            if target != "bare":
                summary[target]["ratio_to_bare"] = round(statistics.median(p / b for p, b in zip(peaks[target], peaks["bare"])), 3)
                summary[target]["at_fixed_rate"] = fixed[target]
            twin = target + "_baseline"
            if twin in peaks:
                summary[target]["peak_ratio_to_baseline"] = round(statistics.median(p / b for p, b in zip(peaks[target], peaks[twin])), 3)
        print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
