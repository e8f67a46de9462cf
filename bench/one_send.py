"""What answering in one send (pacrecon.http_protocol) saves: the bare app (bench/bare_app.py,
served by `serve_app`) on this checkout against the same app on another checkout's code,
in one run, under the same open-loop load.

Each pair of runs drives both apps in turn (the order alternates) with bench/openloop.c at
RATE requests/s for SECONDS, and reads the CPU each used per request (the app's process,
from /proc) and the generator's own (it reads the answers: one segment or two). Then, with
strace attached to each app for one short run, the write system calls per answer.

  flock /tmp/bench.lock .venv/bin/python bench/one_send.py --baseline-code DIR [--pairs 6] [--rate 5000]

DIR: a `git archive` of a commit before the change (its `serve_app` and uvicorn settings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import cpu_seconds  # noqa: I001  (bench/ is the script's own directory)
from ingest import BareApp, build_openloop, machine, run_openloop, write_bodies


def write_calls(app: BareApp, generator: Path, bodies: Path, rate: float, seconds: float) -> int:
    """write/sendto/writev calls the app's threads made during one open-loop run, by strace."""
    log = bodies.with_suffix(".strace")
    tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=write,writev,sendto,sendmsg", "-o", str(log), "-p", str(app.process.pid)],
                              stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached to every thread before the first request
    run_openloop(generator, app.port, bodies, rate, seconds)
    tracer.terminate()
    tracer.wait(30)
    calls = 0
    for line in log.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("write", "writev", "sendto", "sendmsg"):
            calls += int(fields[3])  # % time, seconds, usecs/call, calls, [errors], syscall
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-code", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    print(json.dumps(machine()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="pacrecon-one-send-"))
    apps = {"one_send": BareApp(work), "baseline": BareApp(work, args.baseline_code)}
    try:
        generator = build_openloop(work)
        bodies = work / "bodies.tsv"
        next_id = 0
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in apps}
        for pair in range(args.pairs):
            order = list(apps) if pair % 2 == 0 else list(reversed(apps))
            for name in order:
                count = int(args.rate * args.seconds) + 1
                write_bodies(bodies, next_id, count)
                next_id += count
                pid = apps[name].process.pid
                before = cpu_seconds([pid])
                result = run_openloop(generator, apps[name].port, bodies, args.rate, args.seconds)
                used = cpu_seconds([pid]) - before
                run = {"app_cpu_us_per_request": round(used / result["ok2xx"] * 1e6, 1),
                       "generator_cpu_us_per_request": result["generator_cpu_us_per_request"],
                       "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "non_2xx": result["sent"] - result["ok2xx"]}
                runs[name].append(run)
                print(json.dumps({"pair": pair, "app": name, **run}), flush=True)
        summary: dict[str, object] = {}
        for field in ("app_cpu_us_per_request", "generator_cpu_us_per_request", "p50_ms", "p99_ms"):
            ratios = [new[field] / old[field] for new, old in zip(runs["one_send"], runs["baseline"])]
            summary[field] = {"one_send_median": statistics.median(r[field] for r in runs["one_send"]),
                              "baseline_median": statistics.median(r[field] for r in runs["baseline"]),
                              "ratio_per_pair": [round(r, 3) for r in ratios], "ratio_median": round(statistics.median(ratios), 3)}
        if shutil.which("strace"):
            count = 2000
            for name, app in apps.items():
                write_bodies(bodies, next_id, count)
                next_id += count
                summary[f"write_calls_per_answer_{name}"] = round(write_calls(app, generator, bodies, 1000.0, count / 1000.0) / count, 2)
        print("RESULT " + json.dumps(summary), flush=True)
    finally:
        for app in apps.values():
            app.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
