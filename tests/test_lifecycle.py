"""The process lifecycle with real `pacrecon serve` processes: SIGTERM while work is in
flight, and systemd's notification protocol on a socket the test listens on."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from reconciler.imports import import_records
from storage import jsonio
from storage.models import ReconciliationRun
from storage.sql_ledger import SqlLedger
from tests.conftest import migrated_sqlite_url
from tests.daemon import SANDBOX_KEY, Daemon, SandboxProcess, stored_events
from tests.webhooks import envelope, sign


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def post_webhook(daemon: Daemon, body: dict[str, object]) -> httpx.Response:
    webhook = sign(body)
    return httpx.post(f"{daemon.url}/webhooks/pacspace", content=webhook.body, headers=webhook.headers, timeout=60)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigterm_with_a_webhook_in_flight(tmp_path: Path, writer: str) -> None:
    """/readyz turns 503 at once, new work is refused, the webhook in flight is recorded
    (with the writer process: drained through it before it is let go), and the process
    exits 0."""
    url = migrated_sqlite_url(tmp_path / "ledger.db")
    daemon = Daemon(url, tmp_path, PACRECON_LOCK_TIMEOUT_MS="30000", PACRECON_WEBHOOK_WRITER=writer).start()
    # another writer holds the SQLite write lock: the daemon's commit waits for it
    blocker = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    in_flight = envelope(data={"recordId": "a_in_flight", "delta": 1})
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(post_webhook(daemon, in_flight)))
    try:
        sender.start()
        time.sleep(0.5)
        assert sender.is_alive(), "the webhook was answered before the write lock was released"
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        ready = httpx.get(f"{daemon.url}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
        assert time.monotonic() - signalled < 2
        refused_body = envelope(data={"recordId": "a_refused"})
        refused = post_webhook(daemon, refused_body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["Retry-After"]
        assert httpx.get(f"{daemon.url}/healthz", timeout=5).status_code == 200  # alive, just not ready
        # the refused delivery is counted: PacSpace will retry it, as after a ledger outage
        metrics = httpx.get(f"{daemon.url}/metrics", timeout=5).text
        assert 'pacrecon_webhooks_received_total{outcome="unavailable"} 1.0' in metrics.splitlines()
        time.sleep(0.5)
        assert daemon.process.poll() is None and sender.is_alive(), "it stopped without waiting for the webhook"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    sender.join(30)
    assert answers and (answers[0].status_code, answers[0].json()) == (200, {"status": "recorded"})
    assert daemon.process.wait(15) == 0
    assert stored_events(url, in_flight["id"]) == 1 and stored_events(url, refused_body["id"]) == 0
    events = [e["event"] for e in daemon.log_events()]
    assert "draining" in events and "Traceback" not in daemon.log_text()


@pytest.fixture
def slow_sandbox(tmp_path: Path) -> Iterator[SandboxProcess]:
    sandbox = SandboxProcess(tmp_path, "--seed", "8", "--verify-delay", "600", "--max-attempts", "1").start()
    yield sandbox
    assert sandbox.stop() == 0


def test_sigterm_during_a_reconciliation_pass_stops_it_after_the_current_page(tmp_path: Path, slow_sandbox: SandboxProcess) -> None:
    url = migrated_sqlite_url(tmp_path / "ledger.db")
    with slow_sandbox.api() as api:
        # 201 stale deltas: two pages of the pass (200 a page), three anchors
        answers = [
            jsonio.loads(api.post("/api/v1/balance/delta/batch", json={"deltas": [
                {"customerId": "cust_stop", "delta": n + 1, "reason": "usage"} for n in range(size)
            ]}).content)
            for size in (100, 100, 1)
        ]
        ledger = SqlLedger.from_url(url)
        try:
            assert len(ledger.transact_sync(lambda s: import_records(s, answers, datetime.now(UTC)).imported)) == 201
        finally:
            ledger.close()
        api.patch("/_sandbox/faults", json={"slow": 1, "slow_seconds": 2}).raise_for_status()  # page 1: ~4 s of lookups
    time.sleep(1.1)  # stale after 1 s
    daemon = Daemon(
        url, tmp_path,
        PACRECON_PACSPACE_BASE_URL=slow_sandbox.url, PACRECON_PACSPACE_API_KEY=SANDBOX_KEY,
        PACRECON_STALE_AFTER_SECONDS="1", PACRECON_RECONCILE_INTERVAL_SECONDS="1", PACRECON_RECONCILE_CONCURRENCY="1",
    ).start()
    ledger = SqlLedger.from_url(url)
    try:
        runs = lambda: ledger.read_sync(lambda s: [(r.status, r.checked, r.error_detail) for r in s._session.query(ReconciliationRun)])  # noqa: E731
        wait_for(lambda: bool(runs()), 15, "a pass to start")
        time.sleep(1)  # inside page 1's lookups
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 503
        assert daemon.process.wait(30) == 0
        took = time.monotonic() - signalled
        [(status, checked, detail)] = runs()
    finally:
        ledger.close()
    assert (status, checked) == ("failed", 200), daemon.log_text()[-3000:]  # page 1 done and committed, page 2 not begun
    assert "shutting down" in (detail or "")
    assert took < 15
    assert "Traceback" not in daemon.log_text()


class NotifyListener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="notify", dir="/tmp")  # AF_UNIX paths are short
        self.path = os.path.join(self.directory, "notify.sock")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._running = True
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while self._running:
            try:
                self.messages.append((time.monotonic(), self.socket.recv(4096).decode()))
            except TimeoutError:
                continue

    def states(self) -> list[str]:
        return [line for _, message in self.messages for line in message.splitlines()]

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self.socket.close()
        os.unlink(self.path)
        os.rmdir(self.directory)


@pytest.fixture
def notify_socket() -> Iterator[NotifyListener]:
    listener = NotifyListener()
    yield listener
    listener.close()


def test_systemd_hears_ready_watchdog_and_stopping(tmp_path: Path, notify_socket: NotifyListener) -> None:
    daemon = Daemon(migrated_sqlite_url(tmp_path / "ledger.db"), tmp_path,
                    NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="400000").start()
    try:
        wait_for(lambda: notify_socket.states().count("WATCHDOG=1") >= 4, 10, "four watchdog pings")
    finally:
        assert daemon.stop() == 0
    wait_for(lambda: "STOPPING=1" in notify_socket.states(), 5, "STOPPING=1")
    states = notify_socket.states()
    assert states[0] == "READY=1" and any(s.startswith("STATUS=serving on ") for s in states)
    assert states.index("STOPPING=1") > states.index("READY=1")
    pings = [at for at, message in notify_socket.messages if message == "WATCHDOG=1"]
    # every half of WATCHDOG_USEC (0.2 s), on average: single gaps jitter on a busy machine
    assert 0.1 < (pings[-1] - pings[0]) / (len(pings) - 1) < 0.4, pings  # 0.4 s: what systemd would not forgive


def test_a_watchdog_meant_for_another_process_is_not_pinged(tmp_path: Path, notify_socket: NotifyListener) -> None:
    daemon = Daemon(migrated_sqlite_url(tmp_path / "ledger.db"), tmp_path,
                    NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="200000", WATCHDOG_PID="1").start()
    try:
        wait_for(lambda: "READY=1" in notify_socket.states(), 5, "READY=1")
        time.sleep(0.5)
    finally:
        assert daemon.stop() == 0
    assert "WATCHDOG=1" not in notify_socket.states()


def test_a_daemon_without_notify_socket_logs_nothing_about_systemd(tmp_path: Path) -> None:
    daemon = Daemon(migrated_sqlite_url(tmp_path / "ledger.db"), tmp_path).start()
    assert daemon.stop() == 0
    assert not [e for e in daemon.log_events() if str(e.get("event", "")).startswith("systemd")]
    assert json.dumps(daemon.log_events())  # every line is JSON


def test_the_daemon_is_busy_from_busy_in_flight_writes_on() -> None:
    """What a pass yields to (`Reconciler.foreground_busy`): BUSY_IN_FLIGHT writes in flight."""
    from pacrecon.lifecycle import BUSY_IN_FLIGHT, Lifecycle

    lifecycle = Lifecycle()
    for _ in range(BUSY_IN_FLIGHT - 1):
        lifecycle.begin()
    assert not lifecycle.busy()
    lifecycle.begin()
    assert lifecycle.busy()
    lifecycle.end()
    assert not lifecycle.busy()
