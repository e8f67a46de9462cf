"""Webhook ingest benchmark (issue 9): pacrecon against a bare Starlette baseline.

In one run, on loopback, with the same load generators and the same signed bodies:
  (a) bench/bare_app.py: Starlette under pacrecon's own serve_app, reads the body, answers 200;
  (b) `pacrecon serve` on SQLite (WAL, synchronous=FULL: every commit fsynced);
  (c) `pacrecon serve` on PostgreSQL (synchronous_commit=on), in a database of its own
      created on PACRECON_BENCH_DATABASE_URL's server and dropped at the end.
Peak: wrk (closed loop, one thread) at each of --connections' counts in turn (64 and 256 by
default), the fastest being the peak, for ROUNDS rounds, the targets interleaved within each
round; medians are reported, and each count's rate and ratio beside the peak's. In each round, right after the peaks, a
fixed-rate open-loop run (bench/openloop.c, built with gcc into the run's work directory and
run as its own process) drives each daemon at 80 % of the peak it reached in that round: this
host's speed drifts by 2x within minutes, and 80 % of a peak measured minutes earlier can be
more than the daemon can do by then. The p99 target is read as the median of those rounds.
The bare app runs open-loop at 80 % of its own round's peak as well: what this host and this
generator allow a server that does nothing at that share of its peak.
After the rounds, one open-loop run at 80 % of each daemon's median peak, and of the SQLite
rate against the bare app to show the generator keeps up; each open-loop run also reports the
generator's own CPU per request.
With --process-writer-too, each backend has a second daemon with PACRECON_WEBHOOK_WRITER=process
(`<backend>_process`), driven the same way, and also open-loop at its thread twin's rate
(`<backend>_process_at_thread_rate`): the two writers at one rate. Each wrk run reports the CPU
per request of the target's event-loop thread, its other threads, its child processes, the
PostgreSQL server and wrk itself.
With --process-writer-only, only those. With --baseline-code DIR, every daemon has a twin
running DIR's code (`<target>_baseline`, PYTHONPATH=DIR ahead of this checkout), driven in the
same rounds and also open-loop at its twin's rate (`<target>_baseline_at_twin_rate`): two
versions of the code compared in one run, on this noisy host, as bench/reconcile.py does; the
bare app gets a twin too (`bare_baseline`: DIR's `serve_app`, its uvicorn settings), and each
baseline daemon's ratio is taken against it.
Every body is a unique delta.verified event. After the runs each daemon is SIGKILLed and
its ledger counted: every 2xx must be a row ("recorded"); wrk abandons the requests in flight
when its time is up, so rows may exceed 2xx by at most those.

Run from the repository root, under the shared lock:
  flock /tmp/bench.lock .venv/bin/python bench/ingest.py [--rounds 3] [--seconds 8] [--connections 64,256] [--only sqlite]
      [--process-writer-too | --process-writer-only] [--baseline-code DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import children_of, cpu_seconds, pids_named, thread_cpu_seconds  # noqa: E402,I001  (bench/ is the script's own directory)
from storage.engine import make_engine  # noqa: E402
from storage.schema import upgrade_to_head  # noqa: E402
from tests.daemon import Daemon, free_port  # noqa: E402
from tests.webhooks import envelope, sign  # noqa: E402

HERE = Path(__file__).resolve().parent
CONNECTIONS = 64  # a single wrk run's (warm-ups, other benches)
PEAK_CONNECTIONS = "64,256"  # the peak scan's: 256 saturates where 64 does not (RESULTS.md, session 16)
WARMUP_BODIES = 80_000  # 2 s of the bare app on a quiet machine, with room
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


class BareApp:
    def __init__(self, workdir: Path, code: Path | None = None) -> None:
        """`code`: another checkout whose `serve_app` serves it (PYTHONPATH ahead of this one)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / ("bare.log" if code is None else "bare_baseline.log")).open("wb")
        env = os.environ if code is None else {**os.environ, "PYTHONPATH": str(code.resolve())}
        self.process = subprocess.Popen([sys.executable, str(HERE / "bare_app.py"), str(self.port)], stdout=self.log, stderr=self.log, env=env)
        wait_ready(self.url)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready")


# How the bodies' ids look. "random" (the default): as PacSpace's and the sandbox's, an event id
# and an anchor id of 16 random-looking hex digits and a receipt id of a 32-byte hash, so each
# new event lands at a random place in the ledger's unique and orphan indexes. "sequential":
# ids that count up (every insert at the indexes' right edge), what this bench used until
# session 18: 2.4-3.1x less of the writer's CPU per event than random ids on ledgers of
# 0.1-1 M rows (RESULTS.md, session 18's table), so it measured an easier load than a real one.
IDS = ("random", "sequential")


def _mix64(n: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit integers, so distinct inputs give distinct,
    random-looking ids (every body stays a new event); its increment first, so 0 is no id of zeros."""
    n = (n + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    n = (n ^ (n >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    n = (n ^ (n >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return n ^ (n >> 31)


def body_ids(i: int, ids: str = "random") -> tuple[str, str, str]:
    """Body number i's (event id, anchor id, receipt id), in the style `ids` names (of IDS)."""
    if ids == "sequential":
        return f"evt_bench_{i:09d}", f"a_bench_{i}", f"0x{i:064x}"
    return f"evt_{_mix64(i):016x}", f"a_{_mix64(i | 1 << 63):016x}", "0x" + hashlib.sha256(b"receipt:%d" % i).hexdigest()


def write_bodies(path: Path, first: int, count: int, ids: str = "random") -> None:
    """`count` unique delta.verified webhooks, numbers first..first+count-1, signed now."""
    with path.open("wb") as out:
        for i in range(first, first + count):
            event_id, anchor_id, receipt_id = body_ids(i, ids)
            body = envelope(
                "delta.verified",
                {
                    "recordId": anchor_id,
                    "receiptId": receipt_id,
                    "customerId": "cus_bench",
                    "delta": -12.5,
                    "sequenceNumber": str(i),
                    "verificationReference": f"vref_{i}",
                },
                id=event_id,
            )
            signed = sign(body)
            out.write(b"%s\t%s\t%s\n" % (signed.headers["X-PacSpace-Timestamp"].encode(), signed.headers["X-PacSpace-Signature"].encode(), signed.body))


def require_wrk() -> None:
    """Fail at once, with what to do, where a run would meet a missing wrk only after its set-up."""
    if shutil.which("wrk") is None:
        raise SystemExit("this bench drives its peaks with wrk, which is not installed (apt-get install wrk)")


def run_wrk(url: str, bodies: Path, seconds: float, connections: int = CONNECTIONS) -> dict[str, float]:
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s", "-s", str(HERE / "ingest.lua"), url, "--", str(bodies), "1"],
        capture_output=True, text=True, check=True,
    )
    line = next(l for l in result.stdout.splitlines() if l.startswith("WRKJSON "))
    out = json.loads(line.removeprefix("WRKJSON "))
    if out["exhausted"]:
        raise RuntimeError(f"wrk ran out of bodies against {url}: make more ({out})")
    out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
    out["unanswered"] = out["sent"] - out["ok2xx"] - out["other"]  # in flight when time was up
    out["connections"] = connections
    return out


def parse_connections(value: str) -> list[int]:
    counts = sorted({int(c) for c in value.split(",")})
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("--connections takes counts of 1 or more, comma-separated: 64,256")
    return counts


def write_scan_bodies(workdir: Path, counts: list[int], first: int, count: int, ids: str = "random") -> tuple[dict[int, Path], int]:
    """A bodies file per connection count, each of `count` bodies no other file holds: a target
    driven at every count gets only new events (a repeated one is a cheaper duplicate).
    Returns the files and the next unused id."""
    files = {}
    for connections in counts:
        files[connections] = workdir / f"bodies-c{connections}.tsv"
        write_bodies(files[connections], first, count, ids)
        first += count
    return files, first


def scan_peak(url: str, bodies: dict[int, Path], seconds: float, pid: int | None = None) -> dict[str, Any]:
    """wrk at each connection count in turn; the peak is the fastest of them. 64 connections
    reach only 0.84-0.89 of this host's SQLite daemon's rate at 128-256 (RESULTS.md, session 16),
    so a share "of peak" taken at one count can be a share of something less than the peak.
    The best run's figures, with every count's rate beside them."""
    runs = []
    for connections, path in bodies.items():
        if pid is not None:
            before = (thread_cpu_seconds(pid), cpu_seconds(pids_named("postgres")), os.times(), cpu_seconds(children_of(pid)))
        run = run_wrk(url, path, seconds, connections)
        if pid is not None:
            run["cpu_us_per_request"] = cpu_per_request(before, pid, run["requests"])
        runs.append(run)
    best = dict(max(runs, key=lambda run: run["rps"]))
    best["rps_by_connections"] = {run["connections"]: run["rps"] for run in runs}
    best["runs"] = runs  # every run's answers, for the durability count
    return best


def cpu_per_request(before: tuple[dict[str, float], float, os.times_result, float], pid: int, requests: int) -> dict[str, float]:
    """Microseconds of CPU per request a wrk run cost: the target's event-loop thread, its
    other threads, its child processes (the webhook writer), the PostgreSQL server, and
    wrk itself (this process's reaped children)."""
    threads, postgres, times = thread_cpu_seconds(pid), cpu_seconds(pids_named("postgres")), os.times()
    used = {name: threads[name] - before[0][name] for name in threads}
    used["child_processes"] = cpu_seconds(children_of(pid)) - before[3]
    used["postgres"] = postgres - before[1]
    used["wrk"] = (times.children_user + times.children_system) - (before[2].children_user + before[2].children_system)
    return {name: round(seconds / max(requests, 1) * 1e6, 1) for name, seconds in used.items()}


def build_openloop(workdir: Path) -> Path:
    """Compile the open-loop generator (bench/openloop.c) once per run, into the run's work directory."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("bench/ingest.py needs gcc to build its open-loop generator bench/openloop.c (apt-get install gcc)")
    binary = workdir / "openloop"
    built = subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-std=gnu11", "-o", str(binary), str(HERE / "openloop.c"), "-lm"],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"gcc could not build bench/openloop.c:\n{built.stderr}")
    return binary


def run_openloop(generator: Path, port: int, bodies: Path, rate: float, seconds: float) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([str(generator), "127.0.0.1", str(port), str(bodies), f"{rate:.1f}", str(seconds)], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"the open-loop generator failed ({result.returncode}): {result.stderr.strip()}")
    out = json.loads(result.stdout)
    # its own CPU (this process's reaped children: only the generator ran and ended in between)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out["generator_cpu_us_per_request"] = round(cpu / max(out["sent"], 1) * 1e6, 1)
    return out


def count_rows(url: str) -> int:
    engine = make_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT count(*) FROM webhook_event")).scalar_one()
    engine.dispose()
    return int(rows)


def migrate(url: str, code: Path | None = None) -> None:
    """Upgrade the ledger at `url` to this checkout's head, or to that of `code` (another
    checkout: its daemons refuse a schema past their own head)."""
    if code is None:
        engine = make_engine(url)
        upgrade_to_head(engine)
        engine.dispose()
        return
    upgrade = "import sys; from storage.engine import make_engine; from storage.schema import upgrade_to_head; upgrade_to_head(make_engine(sys.argv[1]))"
    # in `code`'s directory: `-c` puts the working directory ahead of PYTHONPATH
    subprocess.run([sys.executable, "-c", upgrade, url], env={**os.environ, "PYTHONPATH": str(code.resolve())}, cwd=code, check=True)


def create_pg_database(admin_url: str, code: Path | None = None) -> tuple[str, str]:
    """A new database on `admin_url`'s server, migrated (by `code`'s migrations, if given)."""
    name = f"pacrecon_bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    migrate(url, code)
    return name, url


def drop_pg_database(admin_url: str, name: str) -> None:
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# what makes one PostgreSQL server's figures unlike another's. With autovacuum off nothing
# ANALYZEs a table as it grows, and a plan cached while it was small stays (session 14)
_SERVER_SETTINGS = ("server_version", "autovacuum", "shared_buffers", "synchronous_commit", "fsync", "plan_cache_mode")


def machine(database_url: str | None = None) -> dict[str, object]:
    """This host, and with `database_url` the PostgreSQL server's settings that move the figures."""
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    facts: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0] if shutil.which("wrk") else None,
        "loadavg_start": os.getloadavg(),
    }
    if database_url is not None:
        engine = make_engine(database_url)
        try:
            with engine.connect() as connection:
                facts["postgres"] = {name: connection.execute(text(f"SHOW {name}")).scalar_one() for name in _SERVER_SETTINGS}
        finally:
            engine.dispose()
    return facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=parse_connections, default=parse_connections(PEAK_CONNECTIONS),
                        help=f"wrk's connection counts, comma-separated; the peak is the fastest (default {PEAK_CONNECTIONS})")
    parser.add_argument("--openloop-seconds", type=float, default=10.0)
    parser.add_argument("--ids", choices=IDS, default="random", help="the bodies' ids: random as PacSpace's (default), or counting up (easier)")
    parser.add_argument("--only", choices=["sqlite", "postgres"], action="append")
    parser.add_argument("--database-url", default=os.environ.get("PACRECON_BENCH_DATABASE_URL", DEFAULT_PG))
    parser.add_argument("--process-writer-too", action="store_true",
                        help="also drive a daemon per backend with PACRECON_WEBHOOK_WRITER=process (targets sqlite_process, postgres_process)")
    parser.add_argument("--process-writer-only", action="store_true", help="only the daemons with PACRECON_WEBHOOK_WRITER=process")
    parser.add_argument("--baseline-code", type=Path, default=None,
                        help="a checkout of other code (say a `git archive` of the commit before): each daemon gets a twin running "
                             "that code (`<target>_baseline`), driven in the same rounds, so that two versions are compared in one run")
    args = parser.parse_args()
    backends = args.only or ["sqlite", "postgres"]
    if args.process_writer_only:
        backends = [f"{b}_process" for b in backends]
    elif args.process_writer_too:
        backends += [f"{b}_process" for b in backends]
    if args.baseline_code is not None:
        if not (args.baseline_code / "pacrecon" / "__init__.py").is_file():
            parser.error(f"--baseline-code {args.baseline_code} holds no pacrecon package")
        backends = [name for b in backends for name in (b, f"{b}_baseline")]
    uses_postgres = any(b.startswith("postgres") for b in backends)
    report: dict[str, object] = {"machine": machine(args.database_url if uses_postgres else None), "connections": args.connections, "seconds": args.seconds, "rounds": args.rounds, "ids": args.ids}
    print(json.dumps(report["machine"]), flush=True)

    work = Path(tempfile.mkdtemp(prefix="pacrecon-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        generator = build_openloop(work)  # before the long peak runs: a missing gcc fails at once
        require_wrk()
        databases: dict[str, str] = {}
        for backend in backends:  # each daemon a database of its own: its rows are counted against its answers
            code = args.baseline_code if backend.endswith("_baseline") else None
            if backend.startswith("sqlite"):
                databases[backend] = f"sqlite:///{work / (backend + '.db')}"
                migrate(databases[backend], code)
            else:
                name, databases[backend] = create_pg_database(args.database_url, code)
                stack.callback(drop_pg_database, args.database_url, name)
        bares = {"bare": BareApp(work)}
        if args.baseline_code is not None:  # the baseline code's uvicorn settings too
            bares["bare_baseline"] = BareApp(work, args.baseline_code)
        for bare in bares.values():
            stack.callback(bare.stop)
        daemons: dict[str, Daemon] = {}
        for backend, url in databases.items():
            settings = {"PACRECON_WEBHOOK_WRITER": "process" if "_process" in backend else "thread"}
            if backend.endswith("_baseline"):
                settings["PYTHONPATH"] = str(args.baseline_code.resolve())  # ahead of this checkout's editable install
            daemons[backend] = Daemon(url, work / backend if (work / backend).mkdir() is None else work, **settings).start()
            stack.callback(daemons[backend].stop)
        targets: dict[str, tuple[str, int]] = {**{t: (a.url, a.port) for t, a in bares.items()}, **{b: (d.url, d.port) for b, d in daemons.items()}}

        next_id = 0
        peaks: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
        round_openloop: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
        # warm-up: imports, connection pools, the first pages of the database files
        bodies = work / "bodies.tsv"
        write_bodies(bodies, next_id, WARMUP_BODIES, args.ids)
        next_id += WARMUP_BODIES
        warm = {t: run_wrk(url, bodies, 2) for t, (url, _) in targets.items()}
        print(json.dumps({"warmup": {t: round(w["rps"]) for t, w in warm.items()}}), flush=True)
        for round_ in range(args.rounds):
            # room for the fastest target so far to double its pace (this host's speed drifts 2x)
            fastest = max([w["rps"] for w in warm.values()] + [p["rps"] for runs in peaks.values() for p in runs])
            size = int(fastest * args.seconds * 2) + 5_000
            # the same bodies for every target of this round, a file per connection count
            scan_bodies, next_id = write_scan_bodies(work, args.connections, next_id, size, args.ids)
            for target, (url, _) in targets.items():
                pid = bares[target].process.pid if target in bares else daemons[target].process.pid  # type: ignore[union-attr]
                result = scan_peak(url, scan_bodies, args.seconds, pid)
                result["loadavg"] = os.getloadavg()[0]
                peaks[target].append(result)
                print(json.dumps({"round": round_, "target": target, **{k: result[k] for k in (
                    "rps", "connections", "rps_by_connections", "p50_us", "p99_us", "ok2xx", "other", "unanswered", "cpu_us_per_request")}}), flush=True)
            # each at 80 % of the peak it reached a moment ago; the bare app too, to show what this
            # host and generator allow any server at that share of its peak
            for target in targets:
                rate = 0.8 * peaks[target][-1]["rps"]
                count = int(rate * args.openloop_seconds) + 1
                write_bodies(bodies, next_id, count, args.ids)
                next_id += count
                result = run_openloop(generator, targets[target][1], bodies, rate, args.openloop_seconds)
                result["loadavg"] = os.getloadavg()[0]
                round_openloop[target].append(result)
                print(json.dumps({"round": round_, "openloop_at_80_percent_of_this_round": target, **result}), flush=True)

        summary: dict[str, dict[str, float]] = {}
        for target, runs in peaks.items():
            summary[target] = {
                "rps_median": statistics.median(r["rps"] for r in runs),
                "connections_of_peak_per_round": [r["connections"] for r in runs],
                "rps_median_by_connections": {c: statistics.median(r["rps_by_connections"][c] for r in runs) for c in args.connections},
                "p50_ms_median": statistics.median(r["p50_us"] for r in runs) / 1000,
                "p99_ms_median": statistics.median(r["p99_us"] for r in runs) / 1000,
                "non_2xx": sum(r["other"] for r in runs),
                "cpu_us_per_request_median": {
                    part: round(statistics.median(r["cpu_us_per_request"][part] for r in runs), 1) for part in runs[0]["cpu_us_per_request"]
                },
            }
        for target, runs in round_openloop.items():
            summary[target]["openloop_80_percent_of_round_peak"] = {
                "rate_per_round": [round(r["offered_rate"]) for r in runs],
                "p99_ms_per_round": [r["p99_ms"] for r in runs],
                "p99_ms_median": statistics.median(r["p99_ms"] for r in runs),
                "max_ms_per_round": [r["max_ms"] for r in runs],
                "generator_lag_p99_ms_max": max(r["generator_lag_p99_ms"] for r in runs),
                "non_2xx": sum(r["sent"] - r["ok2xx"] for r in runs),
            }
        for backend in daemons:
            # each daemon against the bare app of its own code (the baseline's, when it has one)
            bare_peaks = peaks["bare_baseline" if backend.endswith("_baseline") and "bare_baseline" in peaks else "bare"]
            ratios = [b["rps"] / a["rps"] for a, b in zip(bare_peaks, peaks[backend])]
            summary[backend]["ratio_per_round"] = [round(r, 3) for r in ratios]
            summary[backend]["ratio_median"] = statistics.median(ratios)
            summary[backend]["ratio_median_by_connections"] = {  # each count against the bare app at that count
                c: round(statistics.median(b["rps_by_connections"][c] / a["rps_by_connections"][c] for a, b in zip(bare_peaks, peaks[backend])), 3)
                for c in args.connections}

        # open loop at 80 % of each daemon's median peak; the bare app at the SQLite rate checks the generator
        openloop: dict[str, dict[str, float]] = {}
        plan = [(b, b, 0.8 * summary[b]["rps_median"]) for b in daemons]
        plan.insert(1 if "sqlite" in daemons else 0, ("bare", "bare", plan[0][2]))
        # the two writers compared at one rate too: each writer-process daemon at its thread twin's rate
        plan += [(f"{b}_at_thread_rate", b, 0.8 * summary[b.removesuffix("_process")]["rps_median"])
                 for b in daemons if b.endswith("_process") and b.removesuffix("_process") in summary]
        # the baseline code at its twin's rate too: two versions compared at one offered load
        plan += [(f"{b}_at_twin_rate", b, 0.8 * summary[b.removesuffix("_baseline")]["rps_median"]) for b in daemons if b.endswith("_baseline")]
        # every open-loop run each target answered (the rounds' too), for the daemons' durability count
        answered = {target: list(runs) for target, runs in round_openloop.items()}
        for name, target, rate in plan:
            count = int(rate * args.openloop_seconds) + 1
            write_bodies(bodies, next_id, count, args.ids)
            next_id += count
            result = run_openloop(generator, targets[target][1], bodies, rate, args.openloop_seconds)
            result["loadavg"] = os.getloadavg()[0]
            openloop[name] = result
            answered[target].append(result)
            print(json.dumps({"openloop": name, **result}), flush=True)

        # durability: SIGKILL each daemon, then count its ledger against the 2xx answers it gave
        durability: dict[str, dict[str, int]] = {}
        for backend, daemon in daemons.items():
            assert daemon.process is not None
            daemon.process.kill()
            daemon.process.wait()
            wrk_runs = [run for peak in peaks[backend] for run in peak["runs"]]
            runs = wrk_runs + answered[backend]
            acknowledged = warm[backend]["ok2xx"] + sum(r["ok2xx"] for r in runs)
            recorded = warm[backend]["recorded"] + sum(r["recorded"] for r in runs)
            # in flight at wrk's cutoff, or an open-loop request never answered: either may
            # still have been committed
            unanswered = (warm[backend]["unanswered"] + sum(r["unanswered"] for r in wrk_runs)
                          + sum(r["errors"] for r in answered[backend]))
            rows = count_rows(databases[backend])
            durability[backend] = {"acknowledged_2xx": acknowledged, "recorded_answers": recorded, "rows": rows, "unanswered": unanswered}
            ok = recorded == acknowledged and acknowledged <= rows <= acknowledged + unanswered
            durability[backend]["ok"] = ok
            print(json.dumps({"durability": backend, **durability[backend]}), flush=True)

        report.update({"peak": summary, "openloop": openloop, "durability": durability, "loadavg_end": os.getloadavg()})
        print("RESULT " + json.dumps(report, default=str), flush=True)


if __name__ == "__main__":
    main()
