"""`pacrecon demo` end to end: what it prints is what its ledger holds."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from storage.sql_ledger import SqlLedger
from tests.daemon import clean_environment


def demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacrecon", "demo", *args], env=clean_environment(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)


def rows(url: str, sql: str) -> list[tuple[object, ...]]:
    ledger = SqlLedger.from_url(url)
    try:
        return ledger.read_sync(lambda s: [tuple(r) for r in s._session.execute(text(sql))])
    finally:
        ledger.close()


def test_the_demo_accounts_for_every_delta_it_emits(tmp_path: Path) -> None:
    run = demo(tmp_path, "--seed", "7", "--workdir", str(tmp_path / "work"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    url = f"sqlite:///{tmp_path / 'work' / 'ledger.db'}"
    statuses = dict(rows(url, "SELECT status, count(*) FROM local_delta GROUP BY status"))
    accounted = re.search(r"emitted (\d+), in the ledger (\d+): (.*)", out)
    assert accounted, out
    assert int(accounted[1]) == int(accounted[2]) == sum(statuses.values()) == 253  # type: ignore[arg-type]
    printed = dict((word.rsplit(" ", 1)[0].upper(), int(word.rsplit(" ", 1)[1])) for word in accounted[3].split(", "))
    assert printed == statuses
    open_rows = rows(url, "SELECT kind FROM discrepancy WHERE status = 'open'")
    assert f"Open discrepancies: {len(open_rows)}" in out
    # the faults it promises, each visible in the ledger
    assert Counter(k for (k,) in open_rows) == {"receipt_mismatch": 1, "not_found_upstream": 1}
    assert statuses.get("FAILED") == 1
    fixed = dict(rows(url, "SELECT action, count(*) FROM audit_entry WHERE actor = 'reconciler' GROUP BY action"))
    assert fixed.get("mark_verified", 0) >= 1  # dropped webhooks, found and fixed by the pass
    assert f"mark_verified {fixed['mark_verified']}" in out
    duplicates = rows(url, "SELECT coalesce(sum(count), 0) FROM webhook_tally WHERE outcome = 'duplicate'")[0][0]
    assert f"{duplicates} duplicate deliveries" in out
    throttled = re.search(r"PacSpace answered 429 to (\d+) emit requests", out)
    assert throttled and int(throttled[1]) >= 1
    assert "Traceback" not in run.stderr


def test_the_same_seed_emits_the_same_deltas(tmp_path: Path) -> None:
    emitted = []
    for n in range(2):
        run = demo(tmp_path, "--seed", "3", "--singles", "20", "--batches", "0", "--workdir", str(tmp_path / f"w{n}"))
        assert run.returncode == 0, run.stderr[-2000:]
        url = f"sqlite:///{tmp_path / f'w{n}' / 'ledger.db'}"
        emitted.append(sorted(rows(url, "SELECT customer_id, amount, reason, reference_id FROM local_delta")))
    assert emitted[0] == emitted[1] and len(emitted[0]) == 23


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_everything_and_leaves_nothing(tmp_path: Path, stop: signal.Signals) -> None:
    before = set(Path("/tmp").glob("pacrecon-demo-*"))
    process = subprocess.Popen([sys.executable, "-m", "pacrecon", "demo"], env=clean_environment(), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    ports: list[int] = []
    deadline = time.monotonic() + 60
    while not ports and time.monotonic() < deadline:
        line = process.stdout.readline()
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
    assert len(ports) == 2
    time.sleep(1)  # emitting
    process.send_signal(stop)
    assert process.wait(60) == 130
    for port in ports:  # the sandbox and the daemon are gone
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert set(Path("/tmp").glob("pacrecon-demo-*")) == before  # its temporary directory removed
