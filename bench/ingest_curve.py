"""Latency against load (issue 9's p99 target): the bare app and the daemons (writer process,
the default) on SQLite and PostgreSQL, each driven open-loop at several shares of the peak it
reached a moment before, so that the p99 target ("≤ 25 ms at 80 % of peak") can be read
together with where each one's tail starts to grow, the bare app's included.

Per round and target: wrk's closed-loop peak (as bench/ingest.py: the fastest of wrk at each
of --connections' counts, 64 and 256 by default, SECONDS each),
then bench/openloop.c at each share of that peak, lowest first, OPENLOOP_SECONDS each. The
targets take turns within a round. Reported per target and share: the offered rate, p50, p99,
max and the generator's own lag, for every round, and the median p99 over the rounds.

  flock /tmp/bench.lock .venv/bin/python bench/ingest_curve.py [--rounds 2] [--shares 0.3,0.5,0.6,0.7,0.8,0.9] [--connections 64,256]
      [--only sqlite|postgres] [--twin PACRECON_SETTING=VALUE]

--twin: each daemon gets a twin started with that setting too (its own ledger), driven in
the same rounds right after it: a setting's effect, measured against the same moments of
this host's noise (`<target>_twin`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from common import REPO  # noqa: F401,I001  (bench/ is the script's own directory; puts the repository on sys.path)
from ingest import DEFAULT_PG, IDS, PEAK_CONNECTIONS, BareApp, parse_connections, scan_peak, write_scan_bodies, build_openloop, require_wrk, create_pg_database, drop_pg_database, machine, run_openloop, run_wrk, write_bodies
from storage.engine import make_engine
from storage.schema import upgrade_to_head
from tests.daemon import Daemon


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--openloop-seconds", type=float, default=8.0)
    parser.add_argument("--shares", default="0.3,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--connections", type=parse_connections, default=parse_connections(PEAK_CONNECTIONS))
    parser.add_argument("--ids", choices=IDS, default="random", help="the bodies' ids: random as PacSpace's (default), or counting up (easier)")
    parser.add_argument("--database-url", default=os.environ.get("PACRECON_BENCH_DATABASE_URL", DEFAULT_PG))
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--twin", metavar="PACRECON_SETTING=VALUE")
    args = parser.parse_args()
    twin: dict[str, str] = {}
    if args.twin:
        name, _, value = args.twin.partition("=")
        if not name.startswith("PACRECON_") or not _:
            parser.error("--twin takes PACRECON_SETTING=VALUE")
        twin[name] = value
    shares = sorted(float(s) for s in args.shares.split(","))
    print(json.dumps({**machine(args.database_url), "twin": twin, "ids": args.ids}), flush=True)
    work = Path(tempfile.mkdtemp(prefix="pacrecon-curve-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        generator = build_openloop(work)
        require_wrk()
        bare = BareApp(work)
        stack.callback(bare.stop)
        targets: dict[str, tuple[str, int]] = {"bare": (bare.url, bare.port)}
        for backend in ("sqlite", "postgres"):
            if args.only not in (None, backend):
                continue
            for suffix, settings in (("", {}), *((("_twin", twin),) if twin else ())):
                target = f"{backend}_process{suffix}"
                if backend == "sqlite":
                    url = f"sqlite:///{work / (target + '.db')}"
                    engine = make_engine(url)
                    upgrade_to_head(engine)
                    engine.dispose()
                else:
                    name, url = create_pg_database(args.database_url)
                    stack.callback(drop_pg_database, args.database_url, name)
                (work / target).mkdir()
                # a twin may set the writer too: its setting wins
                daemon = Daemon(url, work / target, **{"PACRECON_WEBHOOK_WRITER": "process", **settings}).start()
                stack.callback(daemon.stop)
                targets[target] = (daemon.url, daemon.port)

        bodies = work / "bodies.tsv"
        next_id = 0
        write_bodies(bodies, next_id, 40_000, args.ids)
        next_id += 40_000
        fastest = max(run_wrk(url, bodies, 1)["rps"] for url, _ in targets.values())  # warm-up
        curves: dict[str, dict[float, list[dict[str, float]]]] = {t: {s: [] for s in shares} for t in targets}
        for round_ in range(args.rounds):
            for target, (url, port) in targets.items():
                count = int(fastest * args.seconds * 2) + 5_000
                scan_bodies, next_id = write_scan_bodies(work, args.connections, next_id, count, args.ids)
                scanned = scan_peak(url, scan_bodies, args.seconds)
                peak = scanned["rps"]
                fastest = max(fastest, peak)
                print(json.dumps({"round": round_, "target": target, "peak_rps": round(peak), "connections": scanned["connections"],
                                  "rps_by_connections": {c: round(r) for c, r in scanned["rps_by_connections"].items()}}), flush=True)
                for share in shares:
                    rate = share * peak
                    count = int(rate * args.openloop_seconds) + 1
                    write_bodies(bodies, next_id, count, args.ids)
                    next_id += count
                    result = run_openloop(generator, port, bodies, rate, args.openloop_seconds)
                    run = {"share": share, "rate": round(rate), **{k: result[k] for k in ("p50_ms", "p99_ms", "max_ms", "generator_lag_p99_ms")},
                           "non_2xx": result["sent"] - result["ok2xx"]}
                    curves[target][share].append(run)
                    print(json.dumps({"round": round_, "target": target, **run}), flush=True)
        summary = {target: {f"{share:g}": {"p99_ms_per_round": [r["p99_ms"] for r in runs], "p99_ms_median": statistics.median(r["p99_ms"] for r in runs)}
                            for share, runs in by_share.items()} for target, by_share in curves.items()}
        print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
