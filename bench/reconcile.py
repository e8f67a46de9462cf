"""Benchmark: a reconciliation pass over a large ledger, against the sandbox over loopback.

    flock /tmp/bench.lock .venv/bin/python bench/reconcile.py --backend sqlite
    flock /tmp/bench.lock .venv/bin/python bench/reconcile.py --backend postgres \
        --postgres-url postgresql://postgres@127.0.0.1:5432/test

Setup: a real `pacrecon sandbox` process (no webhook URL: every webhook fails, so the
deltas stay unsettled here); STALE deltas emitted there one per anchor and imported
with `import_records`; the sandbox flushed, so PacSpace has verified all of them. Two
ledgers hold the same stale rows: a "small" one with only them, a "large" one with
settled history bulk-seeded around them up to TOTAL rows.

Each round measures, one after the other:
  raw    the same STALE status lookups from a bare httpx loop (bench/raw_lookups.py) at
         the pass's concurrency, in its own process: the rate to compare against
  small  `pacrecon reconcile --once --json` on a fresh copy of the small ledger
  large  the same on a fresh copy of the large ledger
Each pass runs as its own process: its peak RSS is the kernel's VmHWM of that
process plus that of its page writer process when it starts one (bench/common.py
run_child: the sum of their peaks; not ru_maxrss, which counts this process too).
Rate = checked / (finished_at - started_at) of the pass's own summary; the process's
wall time (interpreter start, imports, schema check included) is reported too.
Every pass is checked: completed, checked == fixed == STALE, all missing_webhook, the
run row agrees, and every stale delta is VERIFIED by the reconciler afterwards.
"""

from __future__ import annotations

import argparse
import heapq
import json
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import REPO, conditions, cpu_seconds, median, pids_named, run_child  # noqa: I001  (common puts the repo on sys.path)

from sqlalchemy import text
from sqlalchemy.engine import make_url

import ledgers
from storage.engine import make_engine
from tests.daemon import SANDBOX_KEY, SandboxProcess, clean_environment

CONCURRENCY = 8  # the reconcile_concurrency default, which the passes run with
STALE_AGE = timedelta(hours=1)  # > stale_after_seconds (300 by default)
# (name, template ledger, runs --baseline-code)
SIZES = [("small", "small", False), ("large", "large", False), ("large_baseline_code", "large", True)]


class Databases:
    """Template ledgers and throw-away copies of them, on SQLite files or a PostgreSQL server."""

    def __init__(self, backend: str, workdir: Path, postgres_url: str | None) -> None:
        self.backend, self.workdir, self.postgres_url = backend, workdir, postgres_url
        self.tag = uuid.uuid4().hex[:8]
        self.made: list[str] = []

    def url(self, name: str) -> str:
        if self.backend == "sqlite":
            return f"sqlite:///{self.workdir / (name + '.db')}"
        assert self.postgres_url
        return make_url(self.postgres_url).set(database=f"bench_{name}_{self.tag}").render_as_string(hide_password=False)

    def create(self, name: str, template: str | None = None) -> str:
        url = self.url(name)
        if self.backend == "sqlite":
            if template:
                shutil.copyfile(self.workdir / f"{template}.db", self.workdir / f"{name}.db")
            return url
        database = make_url(url).database
        source = f' TEMPLATE "{make_url(self.url(template)).database}"' if template else ""
        self._admin(f'CREATE DATABASE "{database}"{source}')
        self.made.append(database or "")
        return url

    def drop(self, name: str) -> None:
        if self.backend == "sqlite":
            for suffix in ("", "-wal", "-shm", ".reconcile.lock"):
                (self.workdir / f"{name}.db{suffix}").unlink(missing_ok=True)
            return
        database = make_url(self.url(name)).database
        self._admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        self.made = [d for d in self.made if d != database]

    def drop_all(self) -> None:
        for database in list(self.made):
            self._admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        self.made.clear()

    def _admin(self, statement: str) -> None:
        assert self.postgres_url
        engine = make_engine(self.postgres_url).execution_options(isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(text(statement))
        finally:
            engine.dispose()


def merged(stale: list[dict[str, Any]], total: int, now: datetime) -> Iterator[dict[str, Any]]:
    """History and stale rows in id order, as a ledger that grew over time lays them out."""
    skip = {row["id"] for row in stale}
    return heapq.merge(ledgers.history(total, skip, now), stale, key=lambda row: row["id"])


def run_pass(url: str, sandbox: SandboxProcess, rundir: Path, code: Path | None = None, profile: Path | None = None) -> dict[str, Any]:
    """One `pacrecon reconcile --once --json` process; `code`: run another checkout's code;
    `profile`: under py-spy, the samples of the thread holding the GIL (where the process's
    one core of Python goes) written there as collapsed stacks."""
    env = clean_environment(
        PACRECON_DATABASE_URL=url,
        PACRECON_PACSPACE_BASE_URL=sandbox.url,
        PACRECON_PACSPACE_API_KEY=SANDBOX_KEY,
        PACRECON_RECONCILE_CONCURRENCY=str(CONCURRENCY),
        PACRECON_LOG_FORMAT="json",
    )
    if code is not None:
        env["PYTHONPATH"] = str(code)  # ahead of the editable install of this worktree
    rundir.mkdir(exist_ok=True)  # no .env here: the configuration is the environment above
    with CpuOf(sandbox) as others:
        command = [sys.executable, "-m", "pacrecon", "reconcile", "--once", "--json"]
        if profile is not None:
            command = [str(Path(sys.executable).parent / "py-spy"), "record", "--gil", "--format", "raw", "--rate", "250", "--output", str(profile),
                       "--", *command]
        child = run_child(command, env, rundir)
    if child.returncode != 0:
        raise RuntimeError(f"pass exited {child.returncode}:\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}")
    # the summary is the JSON document in stdout (py-spy prints lines of its own around it)
    summary, _ = json.JSONDecoder().raw_decode(child.stdout[child.stdout.index("{") :])
    seconds = (datetime.fromisoformat(summary["finished_at"]) - datetime.fromisoformat(summary["started_at"])).total_seconds()
    return {"summary": summary, "pass_seconds": seconds, "wall_seconds": child.wall_seconds, "max_rss_mb": child.max_rss_mb,
            "max_rss_mb_by_process": list(child.max_rss_mb_by_process.values()),
            "cpu_seconds": {"pass": child.cpu_seconds, **others.used}}


def check_pass(url: str, result: dict[str, Any], stale: int) -> None:
    """The pass really did the work: every stale delta found verified upstream and fixed."""
    summary = result["summary"]
    assert summary["status"] == "completed" and summary["errors"] == 0, summary
    assert summary["checked"] == stale and summary["looked_up"] == stale and summary["fixed"] == stale, summary
    assert summary["found"] == {"missing_webhook": stale}, summary
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            run = connection.execute(
                text("SELECT status, checked, fixed FROM reconciliation_run WHERE id = :id"), {"id": summary["run_id"]}
            ).one()
            by_reconciler = connection.execute(
                text("SELECT count(*) FROM local_delta WHERE status = 'VERIFIED' AND verified_by = 'reconciler'")
            ).scalar_one()
            unsettled = connection.execute(text("SELECT count(*) FROM local_delta WHERE status IN ('QUEUED', 'PROCESSING')")).scalar_one()
    finally:
        engine.dispose()
    assert tuple(run) == ("completed", stale, stale), tuple(run)
    assert by_reconciler == stale and unsettled == 0, (by_reconciler, unsettled)


def raw_lookups(sandbox: SandboxProcess, anchors_file: Path, rundir: Path) -> dict[str, Any]:
    rundir.mkdir(exist_ok=True)
    with CpuOf(sandbox) as others:
        child = run_child(
            [sys.executable, str(REPO / "bench" / "raw_lookups.py"), sandbox.url, SANDBOX_KEY, str(anchors_file), str(CONCURRENCY)],
            clean_environment(),
            rundir,
        )
    if child.returncode != 0:
        raise RuntimeError(f"raw lookups exited {child.returncode}:\n{child.stderr[-4000:]}")
    measured = json.loads(child.stdout)
    return {"seconds": measured["seconds"], "rate": measured["lookups"] / measured["seconds"], "max_rss_mb": child.max_rss_mb,
            "cpu_seconds": {"raw": child.cpu_seconds, **others.used}}


class CpuOf:
    """CPU seconds the sandbox and the PostgreSQL server (every `postgres` process) used
    while the block ran: with the measured child's own, where the machine's two cores went."""

    def __init__(self, sandbox: SandboxProcess) -> None:
        assert sandbox.process is not None
        self.sandbox_pid = sandbox.process.pid
        self.used: dict[str, float] = {}

    def __enter__(self) -> CpuOf:
        self._before = (cpu_seconds([self.sandbox_pid]), cpu_seconds(pids_named("postgres")))
        return self

    def __exit__(self, *exc: object) -> None:
        sandbox, postgres = cpu_seconds([self.sandbox_pid]), cpu_seconds(pids_named("postgres"))
        self.used = {"sandbox": sandbox - self._before[0], "postgres": postgres - self._before[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--postgres-url", help="an admin URL on the server: the bench creates and drops its own databases")
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--stale", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--py-spy", type=Path, default=None, dest="py_spy",
                        help="after the rounds, one more large pass under py-spy (pip install py-spy): its collapsed stacks go here")
    parser.add_argument("--workdir", type=Path, default=None, help="where the SQLite files go (default: a temp dir)")
    parser.add_argument("--baseline-code", type=Path, default=None,
                        help="a checkout of other code (e.g. `git archive` of the previous commit): each round also runs "
                             "its pass on the large ledger, so a change is compared with what it changed in the same run")
    args = parser.parse_args()
    if args.backend == "postgres" and not args.postgres_url:
        parser.error("--postgres-url is needed with --backend postgres")

    workdir = Path(tempfile.mkdtemp(prefix="bench-reconcile-", dir=args.workdir))
    databases = Databases(args.backend, workdir, args.postgres_url)
    before = conditions()
    print(f"conditions: {before}", file=sys.stderr)
    # no --webhook-url: the sandbox's webhooks never reach a ledger, so nothing settles the deltas before the pass
    sandbox = SandboxProcess(workdir, "--seed", "11", "--verify-delay", "3600", "--max-attempts", "1").start()
    try:
        started = datetime.now(UTC)
        imported = ledgers.verified_stale(sandbox, workdir, args.stale)
        anchors_file = workdir / "anchors.txt"
        anchors_file.write_text("\n".join(row["anchor_id"] for row in imported))
        stale = ledgers.place_stale(imported, args.total, STALE_AGE)
        print(f"emitted and imported {len(imported)} stale deltas in {(datetime.now(UTC) - started).total_seconds():.1f} s", file=sys.stderr)

        seeded_at = datetime.now(UTC)
        ledgers.seed(databases.create("small"), iter(stale))
        ledgers.seed(databases.create("large"), merged(stale, args.total, seeded_at))
        seed_seconds = (datetime.now(UTC) - seeded_at).total_seconds()
        print(f"seeded both ledgers in {seed_seconds:.1f} s", file=sys.stderr)
        if args.backend == "sqlite":  # the history is stored as the ORM stores an imported row
            forms = ledgers.storage_forms(databases.url("large"), [stale[0]["id"], stale[0]["id"] - 1])
            real, bulk = forms.values()
            shared = {c: real[c] for c in real if c != "emitted_at_text" and "null" not in (real[c], bulk[c])}
            assert shared == {c: bulk[c] for c in shared}, (real, bulk)
            assert len(real["emitted_at_text"]) == len(bulk["emitted_at_text"]), (real, bulk)

        rounds: list[dict[str, Any]] = []
        for number in range(args.rounds):
            measured: dict[str, Any] = {"loadavg_before": conditions()["loadavg_1_5_15"]}
            measured["raw"] = raw_lookups(sandbox, anchors_file, workdir / "raw")
            for size, template, code in SIZES[: 3 if args.baseline_code else 2]:
                copy = f"{size}_run"
                url = databases.create(copy, template=template)
                try:
                    result = run_pass(url, sandbox, workdir / copy, args.baseline_code if code else None)
                    check_pass(url, result, args.stale)
                finally:
                    databases.drop(copy)
                measured[size] = result
                # the raw rate of this round: the machine is shared, and its load drifts between rounds
                result["rate_to_raw"] = args.stale / result["pass_seconds"] / measured["raw"]["rate"]
            print(f"round {number + 1}: " + json.dumps(_brief(measured)), file=sys.stderr)
            rounds.append(measured)
        if args.py_spy is not None:  # not in the figures: the sampler slows the pass down
            url = databases.create("profiled_run", template="large")
            try:
                check_pass(url, run_pass(url, sandbox, workdir / "profiled_run", profile=args.py_spy.resolve()), args.stale)
            finally:
                databases.drop("profiled_run")
    finally:
        sandbox.stop()
        databases.drop_all()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(args, before, seed_seconds, rounds)


def _brief(measured: dict[str, Any]) -> dict[str, Any]:
    brief: dict[str, Any] = {"raw_rate": round(measured["raw"]["rate"]), "loadavg_before": measured["loadavg_before"],
                             "raw_cpu_s": {k: round(v, 2) for k, v in measured["raw"]["cpu_seconds"].items()}}
    for size in _sizes(measured):
        r = measured[size]
        brief[size] = {"pass_s": round(r["pass_seconds"], 2), "wall_s": round(r["wall_seconds"], 2), "rss_mb": round(r["max_rss_mb"], 1),
                       "rss_mb_by_process": [round(mb, 1) for mb in r["max_rss_mb_by_process"]],
                       "rate_to_raw": round(r["rate_to_raw"], 3), "cpu_s": {k: round(v, 2) for k, v in r["cpu_seconds"].items()}}
    return brief


def _sizes(measured: dict[str, Any]) -> list[str]:
    return [size for size, _, _ in SIZES if size in measured]


def report(args: argparse.Namespace, before: dict[str, Any], seed_seconds: float, rounds: list[dict[str, Any]]) -> None:
    raw = median([r["raw"]["rate"] for r in rounds])
    figures: dict[str, Any] = {"raw_rate_median": raw}
    for size in _sizes(rounds[0]):
        seconds = median([r[size]["pass_seconds"] for r in rounds])
        figures[size] = {
            "pass_seconds_median": seconds,
            "rate_median": args.stale / seconds,
            "wall_seconds_median": median([r[size]["wall_seconds"] for r in rounds]),
            "max_rss_mb_median": median([r[size]["max_rss_mb"] for r in rounds]),
            "max_rss_mb_max": max(r[size]["max_rss_mb"] for r in rounds),
            "rate_to_raw_median_of_rounds": median([r[size]["rate_to_raw"] for r in rounds]),
        }
    figures["rate_ratio_large_to_raw"] = figures["large"]["rate_median"] / raw
    figures["time_ratio_large_to_small"] = figures["large"]["pass_seconds_median"] / figures["small"]["pass_seconds_median"]
    figures["time_ratio_large_to_small_median_of_rounds"] = median([r["large"]["pass_seconds"] / r["small"]["pass_seconds"] for r in rounds])
    print(json.dumps({"backend": args.backend, "total": args.total, "stale": args.stale, "concurrency": CONCURRENCY,
                      "conditions": before, "loadavg_after": conditions()["loadavg_1_5_15"], "seed_seconds": seed_seconds,
                      "figures": figures, "rounds": [_brief(r) for r in rounds]}, indent=2))


if __name__ == "__main__":
    main()
