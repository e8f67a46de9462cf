"""`pacrecon demo`: the whole mission in under a minute, with no account and no setup.

It starts the sandbox (a local PacSpace that misbehaves on purpose) and the daemon on
free loopback ports with a new SQLite ledger in a temporary directory, emits a few
hundred deltas through the daemon's outbox while the sandbox drops, duplicates and
reorders webhooks, corrupts a receipt, fails one delta, forgets another and answers
a burst of 429s; waits for the webhooks, asks the daemon for a reconciliation pass,
and prints the report: every delta accounted for, what was fixed, what stays open.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import httpx

from reconciler.report import ReportPage, build_report, report_table
from storage.engine import make_engine
from storage.report_queries import ReportFilter
from storage.schema import upgrade_to_head
from storage.sql_ledger import SqlLedger

CUSTOMERS = ("cust_ada", "cust_bob", "cust_cyd", "cust_dee", "cust_eve")
BACKGROUND_FAULTS = {"drop_webhooks": 0.08, "duplicate_webhooks": 0.05, "late_webhooks": 0.1, "late_seconds": 1.5}
WHY_OPEN = {
    "receipt_mismatch": "PacSpace's proof names another receipt than the one it gave us at emit: ask PacSpace, then resolve it",
    "item_hash_mismatch": "an item hash differs from the one PacSpace gave us at emit: ask PacSpace, then resolve it",
    "amount_mismatch": "PacSpace recorded another amount than we emitted",
    "customer_mismatch": "PacSpace recorded the delta for another customer",
    "upstream_failed": "PacSpace failed the delta: the balance did not change; emit it again if it should",
    "not_found_upstream": "PacSpace does not know the delta, even after it was sent again with its idempotency key: ask PacSpace",
    "stuck": "pending at PacSpace for longer than the limit",
    "orphan_webhook": "a verified webhook for a delta we never emitted",
    "chain_broken": "PacSpace's proof chain for the customer has a gap",
    "conflicting_status": "PacSpace said two different things about the delta",
    "unverifiable": "PacSpace's proof does not check out",
}


class Progress:
    """A bar on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.tty = out, out.isatty()
        self._label, self._total, self._done, self._shown = "", 0, 0, -1

    def step(self, label: str, total: int = 0) -> None:
        self.finish()
        self._label, self._total, self._done, self._shown = label, total, 0, -1
        if not self.tty or not total:
            self.out.write(f"… {label}\n")
        self._draw()

    def advance(self, n: int = 1) -> None:
        self._done += n
        self._draw()

    def _draw(self) -> None:
        if not self._total:
            return
        if self.tty:
            filled = 30 * self._done // self._total
            self.out.write(f"\r  {self._label:<34} [{'#' * filled}{'.' * (30 - filled)}] {self._done}/{self._total}")
        else:
            quarter = 4 * self._done // self._total
            if quarter != self._shown and self._done:
                self._shown = quarter
                self.out.write(f"  {self._done}/{self._total}\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty and self._total:
            self.out.write("\n")
            self._total = 0


def _free_ports(count: int) -> list[int]:
    """Distinct ports: each probe stays bound until all are taken, or the kernel may hand the
    same port out twice (neither is listening yet when the second is picked)."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports.append(int(probe.getsockname()[1]))
        return ports


@dataclass
class Stack:
    workdir: Path
    seed: int
    ledger_url: str = ""
    webhook_secret: str = field(default_factory=lambda: f"whsec_demo_{secrets.token_hex(12)}")
    api_token: str = field(default_factory=lambda: f"demo_api_{secrets.token_hex(12)}")
    admin_token: str = field(default_factory=lambda: f"demo_admin_{secrets.token_hex(12)}")
    sandbox_key: str = "sk_sandbox_demo"
    daemon_port: int = 0  # 0: two free ports are picked together
    sandbox_port: int = 0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (self.daemon_port and self.sandbox_port):
            self.daemon_port, self.sandbox_port = _free_ports(2)

    @property
    def daemon_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon_port}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

    def start(self) -> None:
        self.ledger_url = f"sqlite:///{self.workdir / 'ledger.db'}"
        engine = make_engine(self.ledger_url)
        upgrade_to_head(engine)
        engine.dispose()
        self._spawn("sandbox", [
            "sandbox", "--port", str(self.sandbox_port), "--api-key", self.sandbox_key, "--seed", str(self.seed),
            "--webhook-url", f"{self.daemon_url}/webhooks/pacspace", "--webhook-secret", self.webhook_secret,
            "--verify-delay", "0.5", "--retry-backoff", "0.5",
        ], {}, f"{self.sandbox_url}/_sandbox/state")
        self._spawn("daemon", ["serve"], {
            "PACRECON_DATABASE_URL": self.ledger_url, "PACRECON_PORT": str(self.daemon_port),
            "PACRECON_WEBHOOK_SECRETS": self.webhook_secret, "PACRECON_API_TOKEN": self.api_token,
            "PACRECON_ADMIN_TOKEN": self.admin_token, "PACRECON_PACSPACE_BASE_URL": self.sandbox_url,
            "PACRECON_PACSPACE_API_KEY": self.sandbox_key, "PACRECON_STALE_AFTER_SECONDS": "2",
            "PACRECON_RECONCILE_INTERVAL_SECONDS": "3600",  # the demo asks for its passes itself
            "PACRECON_OUTBOX_RETRY_INTERVAL_SECONDS": "1", "PACRECON_LOG_FORMAT": "json",
        }, f"{self.daemon_url}/readyz")

    def _spawn(self, name: str, args: list[str], settings: dict[str, str], ready_url: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACRECON_")}
        env.update(settings)
        with (self.workdir / f"{name}.log").open("ab") as log:  # the child keeps its own handle
            process = subprocess.Popen([sys.executable, "-m", "pacrecon", *args], env=env, cwd=self.workdir,
                                       stdout=log, stderr=log, start_new_session=True)  # Ctrl-C is ours to pass on
        self.processes.append(process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log = self.workdir / f"{name}.log"
                last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(nothing)"]
                raise RuntimeError(f"the {name} exited at start; see {log} (its last line: {last[0][-300:]})")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the {name} did not start within 30 s")

    def stop(self) -> None:
        """The daemon first (it drains while PacSpace still answers), then the sandbox. A
        second Ctrl-C, or a child that does not stop within 40 s, gets it killed instead."""
        for process in reversed(self.processes):
            if process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(40)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                process.kill()
                process.wait()


def _amounts(rng: random.Random, count: int) -> list[Decimal]:
    fixed = [Decimal("-42.50"), Decimal("100"), Decimal("0.01"), Decimal("-0.99")]
    return [fixed[n] if n < len(fixed) else Decimal(rng.randint(-50_000, 50_000)).scaleb(-2) for n in range(count)]


def _delta(rng: random.Random, amount: Decimal, n: int) -> dict[str, Any]:
    return {"customerId": rng.choice(CUSTOMERS), "delta": amount, "reason": rng.choice(["usage", "refund", "top-up"]),
            "referenceId": f"demo-{n}"}


def _body(value: Any) -> bytes:
    from storage import jsonio

    return jsonio.dumps_bytes(value)


_stop_asked = threading.Event()


def _interrupt(signum: int, frame: object) -> None:
    _stop_asked.set()
    raise KeyboardInterrupt  # Ctrl-C and SIGTERM stop the demo through the clean-up


def _stop_if_asked() -> None:
    """Raised in a finalizer that happened to run (a socket's, say), a KeyboardInterrupt is
    swallowed ("Exception ignored in"): each step asks again."""
    if _stop_asked.is_set():
        raise KeyboardInterrupt


def run_demo(seed: int, singles: int, batches: int, out: TextIO, workdir: Path, keep: bool) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    rng = random.Random(seed)
    progress = Progress(out)
    stack = Stack(workdir=workdir, seed=seed)
    clients: list[httpx.Client] = []
    started = time.monotonic()
    try:
        progress.step("starting the PacSpace sandbox and the daemon")
        stack.start()
        out.write(f"  sandbox {stack.sandbox_url}, daemon {stack.daemon_url}, ledger {workdir / 'ledger.db'}\n")
        api = httpx.Client(base_url=stack.daemon_url, headers={"Authorization": f"Bearer {stack.api_token}",
                                                                "Content-Type": "application/json"}, timeout=60)
        upstream = httpx.Client(base_url=stack.sandbox_url, timeout=30)
        admin = httpx.Client(base_url=stack.daemon_url, headers={"Authorization": f"Bearer {stack.admin_token}"}, timeout=60)
        clients += [api, upstream, admin]
        upstream.put("/_sandbox/faults", json=BACKGROUND_FAULTS).raise_for_status()
        amounts = _amounts(rng, singles + 100 * batches + 3)
        emitted = 0

        def emit(payload: dict[str, Any], fault: str | None = None) -> None:
            nonlocal emitted
            _stop_if_asked()
            if fault:  # this fault alone, for this delta alone: settled and delivered at once
                upstream.put("/_sandbox/faults", json={fault: 1}).raise_for_status()
            answer = api.post("/v1/deltas", content=_body(payload))
            if fault:
                upstream.post("/_sandbox/flush").raise_for_status()
                upstream.put("/_sandbox/faults", json=BACKGROUND_FAULTS).raise_for_status()
            if answer.status_code not in (200, 202):
                raise RuntimeError(f"emit answered {answer.status_code}: {answer.text[:300]}")
            emitted += 1
            progress.advance()

        progress.step("emitting deltas through the outbox", singles + 100 * batches + 3)
        burst_at = singles // 2
        for n in range(singles):
            if n == burst_at:  # PacSpace says "slow down" for a moment: the outbox waits and resends
                upstream.patch("/_sandbox/faults", json={"rate_limit": 1, "retry_after": 0.3}).raise_for_status()
            if n == burst_at + 5:
                upstream.put("/_sandbox/faults", json=BACKGROUND_FAULTS).raise_for_status()
            emit(_delta(rng, amounts[n], n))
        for b in range(batches):
            _stop_if_asked()
            items = [_delta(rng, amounts[singles + 100 * b + i], singles + 100 * b + i) for i in range(100)]
            answer = api.post("/v1/deltas/batch", content=_body({"deltas": items}))
            if answer.status_code not in (200, 202):
                raise RuntimeError(f"batch emit answered {answer.status_code}: {answer.text[:300]}")
            emitted += 100
            progress.advance(100)
        ledger = SqlLedger.from_url(stack.ledger_url)
        try:
            _wait_until_quiet(ledger, timeout=20)
            tail = singles + 100 * batches
            for n, fault in enumerate(("corrupt_webhook_receipt", "fail_deltas", "forget_deltas")):
                emit(_delta(rng, amounts[tail + n], tail + n), fault)
            progress.step("waiting for PacSpace's webhooks")
            _wait_until_quiet(ledger, timeout=20)
            unsettled = _unsettled(ledger)
            out.write(f"  {unsettled} deltas still unsettled after the webhooks (lost webhooks, a forgotten delta)\n")
            time.sleep(2.1)  # older than the stale limit: the pass looks them up
            runs = []
            for attempt in range(2):  # the second pass shows that a gap seen twice is reported once
                progress.step(f"reconciliation pass {attempt + 1}")
                run = _reconcile(admin)
                runs.append(run)
                found = ", ".join(f"{k} {v}" for k, v in run["found"].items()) or "nothing"
                out.write(f"  run #{run['id']}: checked {run['checked']}, fixed {run['fixed']}, found {found}\n")
                _wait_until_quiet(ledger, timeout=10)
                if _unsettled(ledger) == 0:
                    break
                time.sleep(2.1)
            progress.finish()
            report = ledger.read_sync(lambda s: build_report(s, ReportFilter(), ReportPage(discrepancy_limit=20), datetime.now(UTC)))
            audit = ledger.read_sync(lambda s: [(a.action, a.actor) for a in s.audit_entries()])
        finally:
            ledger.close()
        throttled = _metric(httpx.get(f"{stack.daemon_url}/metrics", timeout=10).text, 'pacrecon_upstream_requests_total{endpoint="emit",status="429"}')
        _print_outcome(out, report, emitted, audit, throttled)
        out.write(f"\nDone in {time.monotonic() - started:.1f} s.\n")
        if keep:
            out.write(
                f"\nStill running (Ctrl-C stops everything):\n"
                f"  report (HTML): {stack.daemon_url}/admin/reconciliation/report\n"
                f"  admin token:   {stack.admin_token}\n"
                f"  e.g. curl -H 'Authorization: Bearer {stack.admin_token}' -H 'Accept: text/html' "
                f"{stack.daemon_url}/admin/reconciliation/report > report.html\n"
                f"  metrics:       {stack.daemon_url}/metrics\n"
            )
            out.flush()
            while all(p.poll() is None for p in stack.processes):
                _stop_if_asked()
                time.sleep(0.5)
        return 0
    except httpx.HTTPError as exc:
        raise RuntimeError(f"a request failed: {type(exc).__name__}: {exc}; logs in {workdir}") from None
    finally:
        progress.finish()
        for client in clients:
            client.close()
        stack.stop()


def _unsettled(ledger: SqlLedger) -> int:
    counts = ledger.read_sync(lambda s: s.report().delta_counts())
    return sum(counts.get(s, 0) for s in ("PENDING", "QUEUED", "PROCESSING"))


def _wait_until_quiet(ledger: SqlLedger, timeout: float) -> None:
    """Until the unsettled count has not moved for two seconds (or `timeout`)."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        _stop_if_asked()
        now_unsettled = _unsettled(ledger)
        if now_unsettled == 0:
            return
        if now_unsettled != last:
            last, since = now_unsettled, time.monotonic()
        elif time.monotonic() - since >= 2:
            return
        time.sleep(0.2)


def _reconcile(admin: httpx.Client) -> dict[str, Any]:
    started = admin.post("/admin/reconciliation/runs")
    if started.status_code != 202:
        raise RuntimeError(f"the pass did not start: {started.status_code} {started.text[:300]}")
    href = started.json()["href"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _stop_if_asked()
        run = admin.get(href).json()
        if run["status"] != "running":
            return dict(run)
        time.sleep(0.2)
    raise RuntimeError("the reconciliation pass did not finish within 30 s")


def _metric(exposition: str, name: str) -> int:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _print_outcome(out: TextIO, report: dict[str, Any], emitted: int, audit: list[tuple[str, str]], throttled: int) -> None:
    totals = {status: t["count"] for status, t in report["totals"].items()}
    out.write("\n" + report_table(report))
    accounted = sum(totals.values())
    out.write(f"\nEvery delta accounted for: emitted {emitted}, in the ledger {accounted}: "
              + ", ".join(f"{s.lower()} {n}" for s, n in totals.items() if n) + "\n")
    fixes: dict[str, int] = {}
    for action, actor in audit:
        if actor == "reconciler":
            fixes[action] = fixes.get(action, 0) + 1
    hooks = report["webhooks"]
    out.write(f"Webhooks: {hooks['received']} recorded once each; {hooks['duplicates']} duplicate deliveries answered "
              f"'duplicate'; late ones applied in whatever order they came\n")
    out.write(f"PacSpace answered 429 to {throttled} emit requests: the outbox waited and sent again, nothing lost\n")
    out.write("Fixed by the reconciler: " + (", ".join(f"{action} {n}" for action, n in sorted(fixes.items())) or "nothing") + "\n")
    rows = report["discrepancies"]["rows"]
    out.write(f"Open discrepancies: {report['discrepancies']['open']}\n")
    for row in rows:
        out.write(f"  #{row['id']} {row['kind']} ({row['subject']}, {row['customer_id']}): {WHY_OPEN.get(row['kind'], '')}\n")


@contextlib.contextmanager
def demo_directory(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    made = Path(tempfile.mkdtemp(prefix="pacrecon-demo-"))
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)
