"""How fast the admin report answers on a big ledger: 1,000,000 deltas, 10,000 open
discrepancies, ~950,000 webhook events, on SQLite and PostgreSQL.

For each database: a new ledger is migrated and seeded (bench/seed.py, with the
rollup triggers firing as they do in service), a real `pacrecon serve` is started on
it, and the JSON report is asked for over loopback HTTP, interleaved with `/healthz`
(the same server's bare HTTP cost, measured in the same run as the baseline).

    .venv/bin/python -m bench.report [--backends sqlite,postgres] [--requests 31] [--reuse]

`--reuse` keeps and reuses the seeded ledgers (bench/.data, database pacrecon_bench_report)
so that a second run skips the seeding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from bench.seed import Shape, seed
from storage.engine import make_engine
from storage.rollup_sql import POSTGRES_FOLD
from storage.schema import upgrade_to_head

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
ADMIN = "bench_admin_token"
PG_ADMIN_URL = os.environ.get("PACRECON_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
PG_NAME = "pacrecon_bench_report"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ledger_url(backend: str, reuse: bool) -> tuple[str, bool]:
    """The ledger's URL, and whether it must be seeded."""
    if backend == "sqlite":
        DATA.mkdir(exist_ok=True)
        path = DATA / "report-1m.db"
        if path.exists() and reuse:
            return f"sqlite:///{path}", False
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{path}", True
    admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": PG_NAME}).first()
        if exists and not reuse:
            connection.execute(text(f'DROP DATABASE "{PG_NAME}" WITH (FORCE)'))
        if not exists or not reuse:
            connection.execute(text(f'CREATE DATABASE "{PG_NAME}"'))
    admin.dispose()
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{PG_NAME}", not (exists and reuse)


def measure(url: str, requests: int) -> dict[str, Any]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACRECON_")}
    env.update(PACRECON_DATABASE_URL=url, PACRECON_WEBHOOK_SECRETS="whsec_bench", PACRECON_ADMIN_TOKEN=ADMIN,
               PACRECON_PORT=str(port), PACRECON_LOG_LEVEL="warning", PACRECON_LOG_FORMAT="json")
    server = subprocess.Popen([sys.executable, "-m", "pacrecon", "serve"], env=env, cwd=DATA if DATA.exists() else HERE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.1)
        timings: dict[str, list[float]] = {"healthz": [], "report_json": [], "report_html": [], "report_customer": []}
        targets = {
            "healthz": ("/healthz", {}),
            "report_json": ("/admin/reconciliation/report", {}),
            "report_html": ("/admin/reconciliation/report", {"format": "html"}),
            "report_customer": ("/admin/reconciliation/report", {"customer_id": "cust_00042"}),
        }
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as client:
            for _ in range(3):  # warm: connections, caches, the first query plans
                for path, params in targets.values():
                    client.get(path, params=params).raise_for_status()
            sizes = {}
            for _ in range(requests):
                for name, (path, params) in targets.items():  # interleaved: the same noise for each
                    started = time.perf_counter()
                    answer = client.get(path, params=params)
                    timings[name].append(time.perf_counter() - started)
                    answer.raise_for_status()
                    sizes[name] = len(answer.content)
            report = client.get("/admin/reconciliation/report").json()
    finally:
        server.terminate()
        server.wait(30)
    result: dict[str, Any] = {"deltas": report["summary"]["deltas"], "open_discrepancies": report["discrepancies"]["open"],
                              "events": report["webhooks"]["received"], "bytes": sizes}
    for name, values in timings.items():
        values.sort()
        result[name] = {"median_ms": round(statistics.median(values) * 1000, 1),
                        "p95_ms": round(values[int(0.95 * (len(values) - 1))] * 1000, 1),
                        "max_ms": round(values[-1] * 1000, 1)}
    return result


def fold(url: str) -> int:
    engine = make_engine(url)
    with engine.begin() as connection:
        pending = int(connection.execute(text("SELECT count(*) FROM ledger_rollup_journal")).scalar_one())
        if engine.dialect.name != "sqlite":
            connection.execute(text(POSTGRES_FOLD))
    if engine.dialect.name != "sqlite":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE ledger_rollup_journal"))
            connection.execute(text("VACUUM ANALYZE ledger_rollup"))
    engine.dispose()
    return pending


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--requests", type=int, default=31)
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
                               "cpus": os.cpu_count(), "python": platform.python_version(), "load_before": os.getloadavg()}
    for backend in args.backends.split(","):
        url, fresh = ledger_url(backend, args.reuse)
        if fresh:
            engine = make_engine(url)
            upgrade_to_head(engine)
            engine.dispose()
            started = time.monotonic()
            seed(url, Shape())
            results[f"{backend}_seed_seconds"] = round(time.monotonic() - started, 1)
        # a running daemon folds PostgreSQL's rollup journal every 10 s; a fresh bulk seed has not
        # been folded yet: fold it first (and say how much), as the daemon would have
        results[f"{backend}_journal_rows_folded"] = fold(url)
        results[backend] = measure(url, args.requests)
        print(json.dumps({backend: results[backend]}), flush=True)
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
