"""Benchmark: a reconciliation pass run by `pacrecon serve` while webhooks arrive at a fixed
rate, with each webhook writer (PACRECON_WEBHOOK_WRITER=thread, =process), on SQLite or
PostgreSQL.

    flock /tmp/bench.lock .venv/bin/python bench/ingest_during_pass.py [--stale 8000] [--rounds 3] [--rate 2800]
    flock /tmp/bench.lock .venv/bin/python bench/ingest_during_pass.py --backend postgres \
        [--postgres-url postgresql://postgres@127.0.0.1:5432/test] [--stale 8000] [--rounds 2] [--rate 2800]

The question: on SQLite, with the writer process, the daemon's own writes (the pass's page
transactions, on the daemon's ledger writer thread) and the child's webhook batch commits
compete for SQLite's one write lock across two processes (busy handler: polling sleeps, no
fairness); with the thread writer every write queues in one thread. On PostgreSQL the same
writes run as concurrent transactions on the server (row locks, lock_timeout, the server's
CPU shared with the daemon on this machine). Does the pass still complete, how much slower
is it under load, and what does the pass do to webhook latency?

Setup, once (as bench/reconcile.py builds its "small" ledger, with its Databases): a real
`pacrecon sandbox` (no webhook URL: nothing settles the deltas), STALE single-anchor deltas
emitted there and imported with `import_records`, the sandbox flushed (PacSpace has verified
all of them), the rows made an hour old and seeded into a template ledger: a SQLite file, or
on PostgreSQL a database `bench_idp_small_<tag>` created on the --postgres-url server. Every
measurement runs a new `pacrecon serve` on a fresh copy of it (a file copy; CREATE DATABASE
... TEMPLATE), with PACRECON_RECONCILE_INTERVAL_SECONDS=86400 (the scheduled pass never fires
in a run) and the pass started through the admin API (POST /admin/reconciliation/runs, then
GET .../runs/{id} polled until it is no longer running). Each copy is dropped once its daemon
has stopped, and every database the run created is dropped at the end, also on failure.

Load: bench/openloop.c (the generator bench/ingest.py uses), built with gcc into the work
directory; after its run it writes each request's latency and status to the file named by
OPENLOOP_DUMP (its JSON line and its timing are unchanged; the dump is written after the
measurement). The rate is FRACTION of the thread writer's peak on this
machine, measured first with wrk as bench/ingest.py does (64 connections, a 2 s warm-up,
then PEAK_RUNS x PEAK_SECONDS s; median).

Each round, per writer (the writers' order alternates between rounds; with --yield-shares, per
writer and share, `<writer>@<share>`; with --page-writers, per page writer too, `<writer>:<pages>`,
PACRECON_RECONCILE_WRITER, the pass's page writer process then sampled for its peak RSS at each
poll of the pass and its CPU counted once the daemon has reaped it):
  alone     the pass with no webhook load
  loaded    the generator for LOAD seconds; LEAD s after it starts, the pass is started
  no_pass   the generator alone, same rate and LOAD seconds
LOAD = LEAD + FACTOR x (the first `alone` pass's seconds) + TAIL, the same for every run.
Webhook latency (due time to full answer, as openloop measures it) is split by each request's
due time: before the pass, during it (started_at..finished_at of the run row, mapped onto
CLOCK_MONOTONIC), after it; for `no_pass`, the same windows (same offsets from the
generator's start as in that round's `loaded` run of the same writer). Each run is checked:
the pass completed with checked == fixed == STALE and no errors, every stale delta is
VERIFIED by the reconciler; each 2xx answer is a webhook_event row. Each daemon's log is
scanned for warning/error lines and for lock trouble (LOCK_WORDS: SQLite's "locked"/"busy",
PostgreSQL's lock timeouts and deadlocks). On PostgreSQL the CPU figures include the server's
(every `postgres` process).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import children_of, conditions, cpu_seconds, median, pids_named, proc_status_mb, thread_cpu_seconds  # noqa: I001  (puts the repo on sys.path)

import httpx
from sqlalchemy import text

import ledgers
from ingest import DEFAULT_PG, build_openloop, require_wrk, run_wrk, write_bodies
from reconcile import CONCURRENCY, STALE_AGE, Databases
from storage.engine import make_engine
from tests.daemon import SANDBOX_KEY, Daemon, SandboxProcess

HERE = Path(__file__).resolve().parent
WRITERS = ("thread", "process")
ADMIN_TOKEN = "bench-admin-token-4711"
PEAK_RUNS, PEAK_SECONDS = 3, 5
POLL_SECONDS = 0.2
PASS_TIMEOUT = 600.0
PERCENTILES = (50, 90, 99)
TEMPLATE = "idp_small"  # Databases names it bench_idp_small_<tag> on PostgreSQL; each copy bench_idp_run..._<tag>
# log lines that tell of lock trouble: SQLite's busy handler giving up ("database is locked"),
# PostgreSQL's lock_timeout ("canceling statement due to lock timeout", LockNotAvailable), deadlocks
LOCK_WORDS = ("locked", "busy", "lock timeout", "locknotavailable", "deadlock")



def read_dump(path: Path) -> tuple[int, array.array, array.array]:
    data = path.read_bytes()
    start, n = array.array("q", data[:16])
    lat = array.array("q", data[16 : 16 + 8 * n])
    status = array.array("i", data[16 + 8 * n : 16 + 12 * n])
    assert len(lat) == n and len(status) == n, (n, len(lat), len(status))
    return start, lat, status


def _pct(sorted_ns: list[int], q: float) -> float | None:
    k = len(sorted_ns)
    if not k:
        return None
    return round(sorted_ns[min(k - 1, int(q / 100 * k))] / 1e6, 2)  # as openloop.c: sorted[min(k-1, int(q/100*k))]


def window_stats(lat: array.array, status: array.array, first: int, last: int) -> dict[str, Any]:
    """Latency of requests first..last-1 (by due time), as openloop.c reports it: every
    answered request, whatever its status; non-2xx and unanswered counted apart."""
    answered = sorted(lat[i] for i in range(first, last) if lat[i] >= 0)
    non_2xx = sum(1 for i in range(first, last) if lat[i] >= 0 and not 200 <= status[i] < 300)
    out: dict[str, Any] = {"requests": last - first, "answered": len(answered), "non_2xx": non_2xx,
                           "unanswered": (last - first) - len(answered)}
    for q in PERCENTILES:
        out[f"p{q}_ms"] = _pct(answered, q)
    out["max_ms"] = round(answered[-1] / 1e6, 2) if answered else None
    out["over_100ms"] = sum(1 for v in answered if v > 100_000_000)
    out["over_1s"] = sum(1 for v in answered if v > 1_000_000_000)
    statuses: dict[str, int] = {}
    for i in range(first, last):
        if lat[i] >= 0 and not 200 <= status[i] < 300:
            statuses[str(status[i])] = statuses.get(str(status[i]), 0) + 1
    if statuses:
        out["non_2xx_by_status"] = statuses
    return out


def timeline(lat: array.array, rate: float, origin_ns: float, bucket_s: float = 1.0) -> list[list[float]]:
    """Per bucket of due time (offset of its start from `origin_ns`, the pass's start):
    [offset s, p50 ms, p99 ms, max ms, unanswered] of the requests due in it."""
    buckets: dict[int, list[int]] = {}
    missing: dict[int, int] = {}
    for i, value in enumerate(lat):
        key = int((i * 1e9 / rate - origin_ns) // (bucket_s * 1e9))
        if value >= 0:
            buckets.setdefault(key, []).append(value)
        else:
            missing[key] = missing.get(key, 0) + 1
    rows = []
    for key in sorted(set(buckets) | set(missing)):
        values = sorted(buckets.get(key, []))
        rows.append([key * bucket_s, _pct(values, 50), _pct(values, 99), round(values[-1] / 1e6, 1) if values else None, missing.get(key, 0)])
    return rows


def index_at(offset_ns: float, rate: float, n: int) -> int:
    """The first request due at or after `offset_ns` from the generator's start."""
    if offset_ns <= 0:
        return 0
    i = int(offset_ns * rate / 1e9)
    while i < n and int(i * 1e9 / rate) < offset_ns:  # due(i) as openloop.c computes it
        i += 1
    while i > 0 and int((i - 1) * 1e9 / rate) >= offset_ns:
        i -= 1
    return min(i, n)


def wall_minus_monotonic_ns() -> int:
    """time.time_ns() - CLOCK_MONOTONIC now (the daemon stamps the pass with the first; the
    generator's due times are the second): the smallest of a few samples' brackets."""
    best = None
    for _ in range(5):
        m0 = time.monotonic_ns()
        w = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, w - (m0 + m1) // 2)
    assert best is not None
    return best[1]


def peak_rss_mb(daemon: Daemon, gone_children: dict[int, float]) -> dict[str, float]:
    """The kernel's high-water mark of the resident set (VmHWM) of the daemon and of its
    writer process, so far (read before it stops); and the highest of the children seen while
    the pass ran that have gone since (a pass's page writer process: `gone_children`, sampled
    at each poll of the pass)."""
    assert daemon.process is not None
    pid = daemon.process.pid
    peaks = {"daemon": round(proc_status_mb(pid, "VmHWM"), 1)}
    running = children_of(pid)
    for child in running:
        peaks["writer_process"] = round(proc_status_mb(child, "VmHWM"), 1)
    gone = [mb for child, mb in gone_children.items() if child not in running]
    if gone:
        peaks["page_writer_process"] = round(max(gone), 1)
    return peaks


def reaped_children_cpu_seconds(pid: int) -> float:
    """User + system time of the children `pid` has reaped so far (cutime, cstime: a pass's
    page writer process once it has gone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, databases: Databases, sandbox: SandboxProcess, generator: Path) -> None:
        self.args, self.workdir, self.databases, self.sandbox, self.generator = args, workdir, databases, sandbox, generator
        self.runs = 0
        self.next_body = 0

    # -- one daemon on a fresh copy ------------------------------------------------------

    def fresh(self, variant: str) -> tuple[Daemon, Path, str]:
        """A daemon on a new copy of the template ledger; returns it, its directory, the copy's name.
        `variant`: the webhook writer, after an "@" the yield share, after a ":" the page
        writer (PACRECON_RECONCILE_WRITER); each else the daemon's default."""
        self.runs += 1
        variant, _, pages = variant.partition(":")
        writer, _, share = variant.partition("@")
        name = f"idp_run{self.runs:03d}_{writer}"
        rundir = self.workdir / name
        rundir.mkdir()
        url = self.databases.create(name, template=TEMPLATE)
        daemon = Daemon(
            url,
            rundir,
            **({"PACRECON_RECONCILE_YIELD_SHARE": share} if share else {}),
            **({"PACRECON_RECONCILE_WRITER": pages} if pages else {}),
            PACRECON_WEBHOOK_WRITER=writer,
            PACRECON_PACSPACE_BASE_URL=self.sandbox.url,
            PACRECON_PACSPACE_API_KEY=SANDBOX_KEY,
            PACRECON_ADMIN_TOKEN=ADMIN_TOKEN,
            PACRECON_RECONCILE_CONCURRENCY=str(CONCURRENCY),
            PACRECON_RECONCILE_INTERVAL_SECONDS="86400",  # no scheduled pass within a run
        ).start()
        return daemon, rundir, name

    def finish(self, daemon: Daemon, rundir: Path, name: str) -> dict[str, Any]:
        """Stop the daemon, scan its log, and drop its copy (kept with --keep on SQLite only:
        a PostgreSQL database never outlives the run)."""
        try:
            code = daemon.stop()
            log = scan_log(daemon.log_path)
            log["exit_code"] = code
        finally:
            if not (self.args.keep and self.args.backend == "sqlite"):
                self.databases.drop(name)
            if not self.args.keep:
                shutil.rmtree(rundir, ignore_errors=True)
        return log

    # -- the pass, through the admin API ---------------------------------------------------

    def start_pass(self, admin: httpx.Client) -> int:
        reply = admin.post("/admin/reconciliation/runs")
        if reply.status_code != 202:
            raise RuntimeError(f"the pass did not start: {reply.status_code} {reply.text[:500]}")
        return int(reply.json()["run_id"])

    def wait_pass(self, admin: httpx.Client, run_id: int, daemon: Daemon, children: dict[int, float]) -> dict[str, Any]:
        """The run once it is no longer running; meanwhile the peak (VmHWM) of each child of
        the daemon, by pid, into `children`."""
        assert daemon.process is not None
        deadline = time.monotonic() + PASS_TIMEOUT
        polls = 0
        while time.monotonic() < deadline:
            polls += 1
            for child in children_of(daemon.process.pid):
                with contextlib.suppress(OSError, KeyError):  # gone meanwhile
                    children[child] = max(children.get(child, 0.0), proc_status_mb(child, "VmHWM"))
            reply = admin.get(f"/admin/reconciliation/runs/{run_id}")
            reply.raise_for_status()
            run = reply.json()
            if run["status"] != "running":
                run["polls"] = polls
                return run
            time.sleep(POLL_SECONDS)
        raise RuntimeError(f"pass {run_id} still running after {PASS_TIMEOUT} s")

    def alone(self, writer: str) -> dict[str, Any]:
        """The pass with no webhook load."""
        daemon, rundir, name = self.fresh(writer)
        children: dict[int, float] = {}
        try:
            with self.admin(daemon) as admin:
                before = self.cpu(daemon)
                run = self.wait_pass(admin, self.start_pass(admin), daemon, children)
                cpu = self.cpu_used(daemon, before)
            peak_mb = peak_rss_mb(daemon, children)
            checks = check_ledger(self.databases.url(name), run, self.args.stale, ok2xx=None)
        finally:
            log = self.finish(daemon, rundir, name)
        return {"pass": brief_run(run), "pass_seconds": pass_seconds(run), "checks": checks, "cpu_seconds": cpu, "peak_rss_mb": peak_mb, "log": log}

    def loaded(self, writer: str, rate: float, seconds: float, with_pass: bool, same_window: tuple[float, float] | None = None) -> dict[str, Any]:
        """The generator at `rate` for `seconds`; with `with_pass`, the pass started LEAD s in."""
        daemon, rundir, name = self.fresh(writer)
        children: dict[int, float] = {}
        try:
            count = int(rate * seconds) + 1
            bodies = rundir / "bodies.tsv"
            write_bodies(bodies, self.next_body, count)  # signed now: within the tolerance of the run that follows
            self.next_body += count
            dump = rundir / "latency.bin"
            offset = wall_minus_monotonic_ns()
            with self.admin(daemon) as admin:
                before = self.cpu(daemon)
                gen_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
                generator = subprocess.Popen(
                    [str(self.generator), "127.0.0.1", str(daemon.port), str(bodies), f"{rate:.1f}", str(seconds)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OPENLOOP_DUMP": str(dump)},
                )
                run: dict[str, Any] | None = None
                pass_error = None
                if with_pass:
                    time.sleep(self.args.lead)
                    try:
                        run = self.wait_pass(admin, self.start_pass(admin), daemon, children)
                    except Exception as exc:  # recorded, and the load still finishes
                        pass_error = f"{type(exc).__name__}: {exc}"[:1000]
                    generator_running_at_pass_end = generator.poll() is None
                out, err = generator.communicate(timeout=seconds + 120)
                gen_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = self.cpu_used(daemon, before)
            peak_mb = peak_rss_mb(daemon, children)
            cpu["generator"] = round((gen_after.ru_utime + gen_after.ru_stime) - (gen_usage.ru_utime + gen_usage.ru_stime), 2)
            if generator.returncode != 0:
                raise RuntimeError(f"the generator failed ({generator.returncode}): {err.strip()}")
            totals = json.loads(out)
            start, lat, status = read_dump(dump)
            n = len(lat)
            result: dict[str, Any] = {"generator": totals, "cpu_seconds": cpu, "peak_rss_mb": peak_mb, "whole_run": window_stats(lat, status, 0, n)}
            if with_pass:
                result["pass_error"] = pass_error
                if run is not None:
                    result["pass"] = brief_run(run)
                    result["pass_seconds"] = pass_seconds(run)
                    result["load_covered_pass"] = generator_running_at_pass_end
                    began = datetime.fromisoformat(run["started_at"]).timestamp() * 1e9 - offset - start
                    ended = datetime.fromisoformat(run["finished_at"]).timestamp() * 1e9 - offset - start
                    result["pass_window_s"] = [round(began / 1e9, 3), round(ended / 1e9, 3)]
                    same_window = (began, ended)
            if same_window is not None:
                first, last = index_at(same_window[0], rate, n), index_at(same_window[1], rate, n)
                result["before_pass"] = window_stats(lat, status, 0, first)
                result["during_pass"] = window_stats(lat, status, first, last)
                result["after_pass"] = window_stats(lat, status, last, n)
                result["window_ns"] = same_window
                result["timeline_from_pass_start"] = timeline(lat, rate, same_window[0])
            result["checks"] = check_ledger(self.databases.url(name), run, self.args.stale if with_pass else None, ok2xx=totals["ok2xx"])
        finally:
            result_log = self.finish(daemon, rundir, name)
        result["log"] = result_log
        return result

    def admin(self, daemon: Daemon) -> httpx.Client:
        return httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)

    def cpu(self, daemon: Daemon) -> tuple[dict[str, float], float, float, float, float | None]:
        """CPU seconds so far of the daemon's threads, its writer process, the children it has
        reaped (a pass's page writer process), the sandbox, and on PostgreSQL the server (it
        shares the machine's cores with the daemon)."""
        assert daemon.process is not None and self.sandbox.process is not None
        pid = daemon.process.pid
        postgres = cpu_seconds(pids_named("postgres")) if self.args.backend == "postgres" else None
        return (thread_cpu_seconds(pid), cpu_seconds(children_of(pid)), reaped_children_cpu_seconds(pid),
                cpu_seconds([self.sandbox.process.pid]), postgres)

    def cpu_used(self, daemon: Daemon, before: tuple[dict[str, float], float, float, float, float | None]) -> dict[str, float]:
        threads, child, reaped, sandbox, postgres = self.cpu(daemon)
        used = {
            "daemon_main_thread": round(threads["main_thread"] - before[0]["main_thread"], 2),
            "daemon_other_threads": round(threads["other_threads"] - before[0]["other_threads"], 2),
            "writer_process": round(child - before[1], 2),
            "page_writer_process": round(reaped - before[2], 2),
            "sandbox": round(sandbox - before[3], 2),
        }
        if postgres is not None and before[4] is not None:
            used["postgres"] = round(postgres - before[4], 2)
        return used

    # -- peak ------------------------------------------------------------------------------

    def peak(self) -> dict[str, Any]:
        """The thread writer's peak: wrk as bench/ingest.py runs it, on a fresh copy of the ledger."""
        daemon, rundir, name = self.fresh("thread")
        try:
            bodies = rundir / "bodies.tsv"
            write_bodies(bodies, self.next_body, 60_000)
            self.next_body += 60_000
            warm = run_wrk(daemon.url, bodies, 2)
            runs = []
            for _ in range(PEAK_RUNS):
                size = int(max(warm["rps"], 1000) * PEAK_SECONDS * 1.8) + 5_000
                write_bodies(bodies, self.next_body, size)
                self.next_body += size
                result = run_wrk(daemon.url, bodies, PEAK_SECONDS)
                runs.append({k: result[k] for k in ("rps", "p50_us", "p99_us", "ok2xx", "other")})
        finally:
            log = self.finish(daemon, rundir, name)
        return {"warmup_rps": round(warm["rps"]), "runs": runs, "rps_median": median([r["rps"] for r in runs]), "log": log}


def pass_seconds(run: dict[str, Any]) -> float | None:
    if not run.get("finished_at"):
        return None
    return (datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])).total_seconds()


def brief_run(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run.get(k) for k in ("id", "status", "checked", "fixed", "errors", "found", "error_detail", "started_at", "finished_at", "duration_seconds")}


def check_ledger(url: str, run: dict[str, Any] | None, stale: int | None, ok2xx: int | None) -> dict[str, Any]:
    """What the ledger at `url` holds after the run: the pass's work done, every 2xx a row (read
    while the daemon still runs: rows may exceed 2xx by requests not yet answered, never fall short)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            by_reconciler = connection.execute(
                text("SELECT count(*) FROM local_delta WHERE status = 'VERIFIED' AND verified_by = 'reconciler'")).scalar_one()
            unsettled = connection.execute(text("SELECT count(*) FROM local_delta WHERE status IN ('QUEUED', 'PROCESSING')")).scalar_one()
            events = connection.execute(text("SELECT count(*) FROM webhook_event")).scalar_one()
    finally:
        engine.dispose()
    checks: dict[str, Any] = {"verified_by_reconciler": by_reconciler, "unsettled": unsettled, "webhook_rows": events}
    problems = []
    if stale is not None:
        if run is None:
            problems.append("no pass result")
        else:
            if run["status"] != "completed":
                problems.append(f"pass {run['status']}: {run.get('error_detail')}")
            if run["checked"] != stale or run["fixed"] != stale or run["errors"]:
                problems.append(f"pass checked {run['checked']} fixed {run['fixed']} errors {run['errors']} (stale {stale})")
            if by_reconciler != stale or unsettled:
                problems.append(f"ledger: {by_reconciler} verified by the reconciler, {unsettled} unsettled (stale {stale})")
    if ok2xx is not None and events < ok2xx:
        problems.append(f"{ok2xx} webhooks answered 2xx, {events} rows")
    checks["problems"] = problems
    return checks


def scan_log(path: Path) -> dict[str, Any]:
    """The daemon's log (and its writer process's, which shares it): lines per event at
    warning level and above, and every line with one of LOCK_WORDS."""
    by_event: dict[str, int] = {}
    lock_lines: list[str] = []
    samples: list[str] = []
    lines = webhook_lines = locked = 0
    passes: list[dict[str, Any]] = []
    with path.open(errors="replace") as log:
        for line in log:
            lines += 1
            if ('"event":"webhook"' in line or '"event": "webhook"' in line) and ('"level":"info"' in line or '"level": "info"' in line):
                webhook_lines += 1
                continue
            lowered = line.lower()
            if any(word in lowered for word in LOCK_WORDS):
                locked += 1
                if len(lock_lines) < 5:
                    lock_lines.append(line.strip()[:600])
            try:
                entry = json.loads(line)
            except ValueError:
                by_event["<not json>"] = by_event.get("<not json>", 0) + 1
                if len(samples) < 5:
                    samples.append(line.strip()[:600])
                continue
            if entry.get("event") == "reconcile_pass":
                passes.append({k: entry.get(k) for k in ("status", "checked", "looked_up", "fixed", "errors", "redeliveries_requested", "error_detail",
                                                          "yielded_seconds")})
            level = str(entry.get("level", "")).lower()
            if level in ("warning", "error", "critical", "exception"):
                key = f"{level}:{entry.get('event')}"
                by_event[key] = by_event.get(key, 0) + 1
                if len(samples) < 5:
                    samples.append(line.strip()[:600])
    return {"lines": lines, "webhook_info_lines": webhook_lines, "warnings_and_errors": by_event,
            "locked_or_busy_lines": locked, "locked_or_busy_samples": lock_lines, "samples": samples,
            "reconcile_pass_lines": passes}


def summarize(rounds: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for writer in variants:
        cases = [r[writer] for r in rounds]
        alone = [c["alone"]["pass_seconds"] for c in cases if c["alone"].get("pass_seconds") is not None]
        under = [c["loaded"]["pass_seconds"] for c in cases if c["loaded"].get("pass_seconds") is not None]
        ratios = [c["loaded"]["pass_seconds"] / c["alone"]["pass_seconds"] for c in cases
                  if c["loaded"].get("pass_seconds") and c["alone"].get("pass_seconds")]

        def med(case: str, window: str, key: str) -> float | None:
            values = [c[case][window][key] for c in cases if window in c[case] and c[case][window].get(key) is not None]
            return round(median(values), 2) if values else None

        figures[writer] = {
            "pass_statuses_alone": [c["alone"]["pass"]["status"] for c in cases],
            "pass_statuses_loaded": [c["loaded"].get("pass", {}).get("status") for c in cases],
            "pass_seconds_alone_median": round(median(alone), 2) if alone else None,
            "pass_seconds_loaded_median": round(median(under), 2) if under else None,
            "slowdown_median_of_rounds": round(median(ratios), 2) if ratios else None,
            "slowdown_per_round": [round(r, 2) for r in ratios],
            "latency_ms_median_of_rounds": {
                f"{case}:{window}": {k: med(case, window, k) for k in ("p50_ms", "p99_ms", "max_ms")}
                for case, window in (("loaded", "during_pass"), ("no_pass", "during_pass"), ("loaded", "before_pass"),
                                     ("loaded", "after_pass"), ("no_pass", "whole_run"), ("loaded", "whole_run"))
            },
            "non_2xx_total": {case: sum(c[case]["whole_run"]["non_2xx"] for c in cases) for case in ("loaded", "no_pass")},
            "unanswered_total": {case: sum(c[case]["whole_run"]["unanswered"] for c in cases) for case in ("loaded", "no_pass")},
            "log_warnings_and_errors": {case: _sum_counts([c[case]["log"]["warnings_and_errors"] for c in cases]) for case in ("alone", "loaded", "no_pass")},
            "log_locked_or_busy_lines": {case: sum(c[case]["log"]["locked_or_busy_lines"] for c in cases) for case in ("alone", "loaded", "no_pass")},
            "problems": {case: [p for c in cases for p in c[case]["checks"]["problems"]] for case in ("alone", "loaded", "no_pass")},
        }
    return figures


def _sum_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _brief(case: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "pass_seconds" in case:
        out["pass_s"] = round(case["pass_seconds"], 2) if case["pass_seconds"] is not None else None
        out["status"] = case.get("pass", {}).get("status")
    for window in ("during_pass", "whole_run"):
        if window in case:
            w = case[window]
            out[window] = {k: w[k] for k in ("p50_ms", "p99_ms", "max_ms", "non_2xx", "unanswered")}
    if "peak_rss_mb" in case:
        out["peak_rss_mb"] = case["peak_rss_mb"]
    if "log" in case:
        out["log_warn"] = case["log"]["warnings_and_errors"]
        out["yielded_s"] = [p.get("yielded_seconds") for p in case["log"]["reconcile_pass_lines"]]
    if case.get("checks", {}).get("problems"):
        out["problems"] = case["checks"]["problems"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--postgres-url", default=DEFAULT_PG,
                        help="an admin URL on the server (--backend postgres): the bench creates and drops its own databases there")
    parser.add_argument("--stale", type=int, default=8_000)
    parser.add_argument("--total", type=int, default=1_000_000, help="the id space the stale rows are spread over (as bench/reconcile.py)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.55, help="of the thread writer's wrk peak")
    parser.add_argument("--rate", type=float, default=None, help="webhooks a second (skips the peak measurement)")
    parser.add_argument("--lead", type=float, default=5.0, help="seconds of load before the pass starts")
    parser.add_argument("--tail", type=float, default=5.0, help="seconds of load planned after the pass")
    parser.add_argument("--factor", type=float, default=4.0, help="the load covers this many times the pass's unloaded duration")
    parser.add_argument("--load-seconds", type=float, default=None, help="fixed load duration (instead of lead + factor x pass + tail)")
    parser.add_argument("--keep", action="store_true",
                        help="keep each run's directory (log; on SQLite the ledgers too) in the work directory; PostgreSQL databases are always dropped")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary directory goes")
    parser.add_argument("--writers", default=",".join(WRITERS), help="the webhook writers to run, comma-separated")
    parser.add_argument("--yield-shares", default=None,
                        help="PACRECON_RECONCILE_YIELD_SHARE values, comma-separated: each writer runs with each (default: the daemon's own)")
    parser.add_argument("--page-writers", default=None,
                        help="PACRECON_RECONCILE_WRITER values (auto, process, thread), comma-separated: each variant runs with each (default: the daemon's own)")
    args = parser.parse_args()
    writers = args.writers.split(",")
    if not set(writers) <= set(WRITERS):
        parser.error(f"--writers: choose from {', '.join(WRITERS)}")
    shares = args.yield_shares.split(",") if args.yield_shares else [""]
    page_writers = args.page_writers.split(",") if args.page_writers else [""]
    variants = [
        (f"{writer}@{share}" if share else writer) + (f":{pages}" if pages else "")
        for writer in writers for share in shares for pages in page_writers
    ]

    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-pass-", dir=args.workdir))
    databases = Databases(args.backend, workdir, args.postgres_url)
    before = conditions()
    print(f"conditions: {json.dumps(before)}", file=sys.stderr, flush=True)
    rounds: list[dict[str, Any]] = []
    sandbox = SandboxProcess(workdir, "--seed", "11", "--verify-delay", "3600", "--max-attempts", "1").start()
    try:
        generator = build_openloop(workdir)
        require_wrk()
        started = time.monotonic()
        imported = ledgers.verified_stale(sandbox, workdir, args.stale)
        ledgers.seed(databases.create(TEMPLATE), iter(ledgers.place_stale(imported, args.total, STALE_AGE)))
        print(f"ledger of {args.stale} stale deltas ready in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)

        bench = Bench(args, workdir, databases, sandbox, generator)
        peak: dict[str, Any] | None = None
        if args.rate is None:
            peak = bench.peak()
            rate = args.fraction * peak["rps_median"]
            print(f"thread writer peak: {json.dumps({k: peak[k] for k in ('warmup_rps', 'rps_median')})} -> rate {rate:.0f}/s",
                  file=sys.stderr, flush=True)
        else:
            rate = args.rate
        rate = float(f"{rate:.1f}")
        load_seconds = args.load_seconds
        for number in range(args.rounds):
            measured: dict[str, Any] = {"loadavg_before": os.getloadavg()}
            order = variants if number % 2 == 0 else variants[::-1]
            for writer in order:
                case: dict[str, Any] = {"alone": bench.alone(writer)}
                if load_seconds is None:  # fixed once, from the first pass alone: every run has the same load
                    load_seconds = float(int(args.lead + args.factor * (case["alone"]["pass_seconds"] or 10) + args.tail + 0.999))
                    print(f"load duration: {load_seconds} s", file=sys.stderr, flush=True)
                case["loaded"] = bench.loaded(writer, rate, load_seconds, with_pass=True)
                case["no_pass"] = bench.loaded(writer, rate, load_seconds, with_pass=False, same_window=case["loaded"].get("window_ns"))
                measured[writer] = case
                print(f"round {number + 1} {writer}: " + json.dumps({k: _brief(v) for k, v in case.items()}), file=sys.stderr, flush=True)
            rounds.append(measured)
    finally:
        try:
            sandbox.stop()
        finally:
            databases.drop_all()  # PostgreSQL: the template and any copy a failed run left behind
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept: {workdir}", file=sys.stderr)
    print(json.dumps({
        "backend": args.backend, "stale": args.stale, "rate": rate, "fraction_of_thread_peak": args.fraction if args.rate is None else None,
        "load_seconds": load_seconds, "lead_seconds": args.lead, "concurrency": CONCURRENCY,
        "conditions": before, "loadavg_after": os.getloadavg(),
        "peak": peak, "medians": summarize(rounds, variants), "rounds": rounds,
    }, indent=2, default=str))


if __name__ == "__main__":
    main()
