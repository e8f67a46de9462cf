"""The daemon's scheduled passes while PacSpace answers 503, then 429, then hangs (down):
each pass backs off and fails cleanly, the daemon stays up and keeps receiving webhooks,
and once PacSpace is back the next pass completes with no duplicate discrepancy.
(One pass against each fault in isolation is tests/test_reconcile.py.)"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from storage.sql_ledger import SqlLedger
from tests.conftest import migrated_sqlite_url
from tests.daemon import SANDBOX_KEY, Daemon, SandboxProcess
from tests.test_reconcile import imported
from tests.webhooks import TEST_SECRET, envelope, sign

DELTAS = 4


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxProcess]:
    # no webhook URL: webhooks never arrive, so only the passes can settle the deltas
    running = SandboxProcess(tmp_path, "--webhook-secret", TEST_SECRET, "--seed", "9", "--verify-delay", "0", "--max-attempts", "1").start()
    yield running
    assert running.process is not None
    running.process.send_signal(signal.SIGCONT)  # in case a failed test left it frozen
    assert running.stop() == 0


def _passes_after(daemon: Daemon, mark: int) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events()[mark:] if e.get("event") == "reconcile_pass"]


def _wait(daemon: Daemon, condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert daemon.process is not None and daemon.process.poll() is None, f"the daemon died:\n{daemon.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}\n{daemon.log_text()[-3000:]}"
        time.sleep(0.2)


def _still_serving(daemon: Daemon) -> None:
    assert httpx.get(f"{daemon.url}/healthz", timeout=5).status_code == 200
    webhook = sign(envelope(data={"recordId": "a_meanwhile"}))
    answer = httpx.post(f"{daemon.url}/webhooks/pacspace", content=webhook.body, headers=webhook.headers, timeout=10)
    assert answer.json() == {"status": "recorded"}


def test_passes_back_off_while_pacspace_fails_and_the_next_one_completes(sandbox: SandboxProcess, tmp_path: Path) -> None:
    url = migrated_sqlite_url(tmp_path / "faults.db")
    with sandbox.api() as upstream:
        # every status lookup reports a wrong receipt: each delta is one discrepancy, however many passes see it
        upstream.put("/_sandbox/faults", json={"corrupt_status_receipt": 1}).raise_for_status()
        ledger = SqlLedger.from_url(url)
        try:
            imported(ledger, upstream, DELTAS, "cust_faults")
        finally:
            ledger.close()
        upstream.post("/_sandbox/flush").raise_for_status()
        upstream.patch("/_sandbox/faults", json={"unavailable": 1}).raise_for_status()
        daemon = Daemon(
            url, tmp_path,
            PACRECON_API_TOKEN="token_faults", PACRECON_PACSPACE_BASE_URL=sandbox.url, PACRECON_PACSPACE_API_KEY=SANDBOX_KEY,
            PACRECON_STALE_AFTER_SECONDS="1", PACRECON_RECONCILE_INTERVAL_SECONDS="1", PACRECON_PACSPACE_TIMEOUT_SECONDS="1",
        ).start()
        try:
            phases: dict[str, dict[str, Any]] = {}
            for phase, faults in (("503", {}), ("429", {"unavailable": 0, "rate_limit": 1, "retry_after": 0.3})):
                if faults:
                    upstream.patch("/_sandbox/faults", json=faults).raise_for_status()
                mark = len(daemon.log_events())
                _wait(daemon, lambda: any(p["status"] == "failed" for p in _passes_after(daemon, mark)), 40, f"a failed pass during {phase}")
                events = daemon.log_events()[mark:]
                phases[phase] = next(p for p in _passes_after(daemon, mark) if p["status"] == "failed")
                # it slowed down for PacSpace (Retry-After / backoff) before giving up on this pass
                assert any(e.get("event") == "reconcile_throttled" for e in events), phase
                _still_serving(daemon)
            assert "answered no lookup: SERVICE_UNAVAILABLE" in phases["503"]["error_detail"], phases["503"]
            assert "answered no lookup: RATE_LIMITED" in phases["429"]["error_detail"], phases["429"]

            # PacSpace down: its process frozen, so every lookup times out
            upstream.patch("/_sandbox/faults", json={"rate_limit": 0}).raise_for_status()
            assert sandbox.process is not None
            sandbox.process.send_signal(signal.SIGSTOP)
            try:
                mark = len(daemon.log_events())
                _wait(daemon, lambda: any(p["status"] == "failed" for p in _passes_after(daemon, mark)), 40, "a failed pass while PacSpace is down")
                _still_serving(daemon)
            finally:
                sandbox.process.send_signal(signal.SIGCONT)

            # back: the next passes complete and find each delta's discrepancy once
            mark = len(daemon.log_events())
            _wait(daemon, lambda: sum(p["status"] == "completed" and p["checked"] == DELTAS for p in _passes_after(daemon, mark)) >= 2,
                  40, "two completed passes after PacSpace came back")
            _still_serving(daemon)
        finally:
            assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_text()
    ledger = SqlLedger.from_url(url)
    try:
        open_ = ledger.read_sync(lambda s: [(d.kind, d.subject, d.status) for d in s.open_discrepancies()])
    finally:
        ledger.close()
    mismatches = [(kind, subject) for kind, subject, _ in open_ if kind == "receipt_mismatch"]
    assert len(mismatches) == DELTAS and len(set(mismatches)) == DELTAS, Counter(open_)
