"""Benchmark: how fast `pacrecon serve` is ready, and how much memory it holds when idle.

    flock /tmp/bench.lock .venv/bin/python bench/startup.py [--runs 7] [--idle 10]

The daemon runs as deployed by `make run`: SQLite ledger (migrated once beforehand, not
timed), webhook secrets, PacSpace configured (a real `pacrecon sandbox` on loopback), so
the scheduler with the outbox and reconcile jobs is up. Each run:
  start-to-ready  from just before the process is spawned (the `pacrecon` console script,
                  as a user types it) to the first 200 from GET /readyz, polled every 10 ms
  idle RSS        VmRSS from /proc after `--idle` seconds of no traffic (the outbox job runs
                  every 5 s meanwhile), and VmHWM, the peak so far; the daemon's and its
                  child processes' (the webhook writer) added up; their PSS; and their
                  resident memory together, each physical page once (from pagemap: what
                  the daemon's processes hold in RAM between them; root only)
then SIGTERM. Medians over the runs are printed as JSON.

--deployed measures the daemon as deploy/Dockerfile installs it: `pip install .` into a
new virtual environment, without the test extra (whose packages, rich for one, some of
the daemon's dependencies import when they are present).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, children_of, conditions, median, proc_status_mb, resident_mb_together  # noqa: I001  (puts the repo on sys.path)

import httpx

from tests.daemon import SANDBOX_KEY, SandboxProcess, clean_environment, free_port

POLL_SECONDS = 0.01


def one_run(pacrecon: str, env: dict[str, str], workdir: Path, idle: float) -> dict[str, Any]:
    port = free_port()
    env = {**env, "PACRECON_PORT": str(port)}
    url = f"http://127.0.0.1:{port}/readyz"
    with (workdir / f"serve-{port}.log").open("wb") as log, httpx.Client(timeout=1) as poll:
        started = time.perf_counter()
        process = subprocess.Popen([pacrecon, "serve"], env=env, cwd=workdir, stdout=log, stderr=log)
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"serve exited with {process.returncode}; see {log.name}")
                try:
                    if poll.get(url).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(POLL_SECONDS)
            ready = time.perf_counter() - started
            rss_at_ready = _together(process.pid, "VmRSS")
            time.sleep(idle)
            return {
                "ready_seconds": ready,
                "rss_at_ready_mb": rss_at_ready,
                "idle_rss_mb": _together(process.pid, "VmRSS"),
                "idle_pss_mb": sum(_pss_mb(pid) for pid in [process.pid, *children_of(process.pid)]),
                "idle_resident_together_mb": resident_mb_together([process.pid, *children_of(process.pid)]),
                "hwm_mb": _together(process.pid, "VmHWM"),
                "processes": 1 + len(children_of(process.pid)),
            }
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _together(pid: int, field: str) -> float:
    """`field` of the daemon and of its children, added up."""
    return sum(proc_status_mb(one, field) for one in [pid, *children_of(pid)])


def _pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise KeyError("Pss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle before RSS is read")
    parser.add_argument("--webhook-writer", choices=["thread", "process"], default="thread", help="PACRECON_WEBHOOK_WRITER")
    parser.add_argument("--deployed", action="store_true", help="a new venv with `pip install .` (no test extra)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    pacrecon = str(Path(sys.executable).parent / "pacrecon")
    if args.deployed:
        subprocess.run([sys.executable, "-m", "venv", workdir / "venv"], check=True)
        subprocess.run([workdir / "venv/bin/pip", "install", "--quiet", str(REPO)], check=True)
        pacrecon = str(workdir / "venv/bin/pacrecon")
    before = conditions()
    sandbox = SandboxProcess(workdir, "--webhook-secret", "whsec_bench_startup").start()
    try:
        env = clean_environment(
            PACRECON_DATABASE_URL=f"sqlite:///{workdir / 'pacrecon.db'}",
            PACRECON_WEBHOOK_SECRETS="whsec_bench_startup",
            PACRECON_API_TOKEN="bench_token",
            PACRECON_PACSPACE_BASE_URL=sandbox.url,
            PACRECON_PACSPACE_API_KEY=SANDBOX_KEY,
            PACRECON_LOG_FORMAT="json",
            PACRECON_WEBHOOK_WRITER=args.webhook_writer,
        )
        subprocess.run([pacrecon, "migrate"], env=env, cwd=workdir, check=True, capture_output=True)
        runs = []
        for number in range(args.runs):
            runs.append(one_run(pacrecon, env, workdir, args.idle))
            print(f"run {number + 1}: {json.dumps({k: round(v, 3) for k, v in runs[-1].items()})}", file=sys.stderr)
    finally:
        sandbox.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    figures = {name: median([r[name] for r in runs]) for name in runs[0]}
    figures["ready_seconds_max"] = max(r["ready_seconds"] for r in runs)
    figures["idle_rss_mb_max"] = max(r["idle_rss_mb"] for r in runs)
    print(json.dumps({"runs": args.runs, "idle_seconds": args.idle, "webhook_writer": args.webhook_writer,
                      "deployed": args.deployed, "conditions": before,
                      "loadavg_after": conditions()["loadavg_1_5_15"], "medians": figures,
                      "each": [{k: round(v, 3) for k, v in r.items()} for r in runs], "repo": str(REPO)}, indent=2))


if __name__ == "__main__":
    main()
