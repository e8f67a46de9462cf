"""Reconciliation passes against the sandbox, one fault at a time, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from storage.engine import make_engine

from reconciler.imports import import_records
from reconciler.outbox import Outbox, parse_request
from reconciler.pacspace import PacSpaceClient, RetryPolicy
from reconciler.reconcile import PassSummary, Reconciler
from storage import jsonio
from storage.sql_ledger import SqlLedger
from tests.daemon import SANDBOX_KEY, SandboxProcess, clean_environment
from tests.webhooks import TEST_SECRET


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    # no webhook URL: every delivery fails, as if PacSpace's webhooks never reached us
    running = SandboxProcess(
        tmp_path_factory.mktemp("reconcile"), "--webhook-secret", TEST_SECRET, "--seed", "5",
        "--verify-delay", "600", "--max-attempts", "1",
    ).start()
    yield running
    assert running.stop() == 0


@pytest.fixture
def upstream(sandbox: SandboxProcess) -> Iterator[httpx.Client]:
    with sandbox.api() as api:
        api.put("/_sandbox/faults", json={}).raise_for_status()
        yield api


async def _with_client(sandbox: SandboxProcess, work: Any) -> Any:
    async with httpx.AsyncClient(timeout=5) as http:
        client = PacSpaceClient(http, sandbox.url, SANDBOX_KEY, RetryPolicy(attempts=2, base_seconds=0.05))
        return await work(client)


def run_pass(ledger: SqlLedger, sandbox: SandboxProcess, dry_run: bool = False, stuck_after: float = 3600) -> PassSummary:
    async def work(client: PacSpaceClient) -> PassSummary:
        reconciler = Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=stuck_after, concurrency=4)
        return await reconciler.run_pass(dry_run=dry_run)

    return asyncio.run(_with_client(sandbox, work))


def imported(ledger: SqlLedger, upstream: httpx.Client, count: int, customer: str) -> list[int]:
    """Deltas emitted at the sandbox and registered here, as the import does."""
    answers = [jsonio.loads(upstream.post("/api/v1/balance/delta", json={"customerId": customer, "delta": n + 1, "reason": "usage"}).content) for n in range(count)]
    now = datetime.now(UTC)
    return ledger.transact_sync(lambda s: import_records(s, answers, now).imported)


def through_outbox(ledger: SqlLedger, sandbox: SandboxProcess, customer: str) -> int:
    async def work(client: PacSpaceClient) -> int:
        answer = await Outbox(ledger, client).submit(parse_request(json.dumps({"customerId": customer, "delta": 3, "reason": "r"}).encode(), "single"))
        assert answer.status == 200
        return int(jsonio.loads(answer.body)["id"])

    return asyncio.run(_with_client(sandbox, work))


def statuses(ledger: SqlLedger, ids: list[int]) -> list[str]:
    return ledger.read_sync(lambda s: [s.get_delta(i).status for i in ids])  # type: ignore[union-attr]


def open_kinds(ledger: SqlLedger) -> dict[str, int]:
    rows = ledger.read_sync(lambda s: [(d.kind, d.occurrences) for d in s.open_discrepancies()])
    counted: dict[str, int] = {}
    for kind, _ in rows:
        counted[kind] = counted.get(kind, 0) + 1
    return counted


def test_every_missing_webhook_is_fixed_by_one_pass(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    upstream.patch("/_sandbox/faults", json={"drop_webhooks": 1}).raise_for_status()
    ids = imported(ledger, upstream, 5, "cust_missing")
    upstream.post("/_sandbox/flush").raise_for_status()
    summary = run_pass(ledger, sandbox)
    assert summary.status == "completed" and summary.checked == 5 and summary.fixed == 5
    assert summary.found == {"missing_webhook": 5} and summary.redeliveries >= 5
    assert statuses(ledger, ids) == ["VERIFIED"] * 5 and open_kinds(ledger) == {}
    rows = ledger.read_sync(lambda s: [s.get_delta(i) for i in ids])
    assert {r.verified_by for r in rows} == {"reconciler"} and all(r.sequence_number for r in rows)
    audit = ledger.read_sync(lambda s: s.audit_entries(ids[0]))
    assert [(a.action, a.actor, a.before["status"], a.after["status"], a.run_id) for a in audit] == [
        ("mark_verified", "reconciler", "QUEUED", "VERIFIED", summary.run_id)
    ]
    run = ledger.read_sync(lambda s: s.get_run(summary.run_id or 0))
    assert run is not None and (run.status, run.checked, run.fixed, run.found) == ("completed", 5, 5, {"missing_webhook": 5})
    fixed = ledger.read_sync(lambda s: s._session.execute(text("SELECT kind, status FROM discrepancy")).all())
    assert set(fixed) == {("missing_webhook", "resolved")}


@pytest.mark.parametrize(
    ("fault", "kind"),
    [("corrupt_status_receipt", "receipt_mismatch"), ("corrupt_status_item_hash", "item_hash_mismatch")],
)
def test_a_corrupted_answer_is_an_open_discrepancy_and_our_record_stays(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client, fault: str, kind: str) -> None:
    upstream.patch("/_sandbox/faults", json={fault: 1}).raise_for_status()
    ids = imported(ledger, upstream, 3, f"cust_{fault}")
    before = ledger.read_sync(lambda s: [(s.get_delta(i).receipt_id, s.get_delta(i).item_hash) for i in ids])  # type: ignore[union-attr]
    upstream.post("/_sandbox/flush").raise_for_status()
    summary = run_pass(ledger, sandbox)
    assert summary.found[kind] == 3 and summary.fixed == 0
    assert open_kinds(ledger) == {kind: 3}
    assert statuses(ledger, ids) == ["QUEUED"] * 3
    assert ledger.read_sync(lambda s: [(s.get_delta(i).receipt_id, s.get_delta(i).item_hash) for i in ids]) == before  # type: ignore[union-attr]


def test_an_upstream_failure_fails_the_delta_and_stays_reported(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    upstream.patch("/_sandbox/faults", json={"fail_deltas": 1}).raise_for_status()
    ids = imported(ledger, upstream, 2, "cust_failed")
    upstream.post("/_sandbox/flush").raise_for_status()
    summary = run_pass(ledger, sandbox)
    assert statuses(ledger, ids) == ["FAILED", "FAILED"] and summary.fixed == 2
    assert open_kinds(ledger) == {"upstream_failed": 2}
    assert [a.action for a in ledger.read_sync(lambda s: s.audit_entries(ids[0]))] == ["mark_failed"]


def test_a_delta_pacspace_forgot_is_sent_again_with_its_original_key(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    upstream.patch("/_sandbox/faults", json={"forget_deltas": 1}).raise_for_status()
    delta_id = through_outbox(ledger, sandbox, "cust_forgotten")
    key_before = ledger.read_sync(lambda s: s.get_submission(s.get_delta(delta_id).submission_id).idempotency_key)  # type: ignore[union-attr]
    summary = run_pass(ledger, sandbox)
    assert summary.found == {"not_found_upstream": 1} and summary.fixed == 1
    submission = ledger.read_sync(lambda s: s.get_submission(s.get_delta(delta_id).submission_id))  # type: ignore[union-attr]
    assert submission is not None and (submission.status, submission.idempotency_key) == ("PENDING", key_before)
    assert statuses(ledger, [delta_id]) == ["PENDING"]  # the outbox's resend job owns it now
    assert [a.action for a in ledger.read_sync(lambda s: s.audit_entries(delta_id))] == ["resend"]


def test_an_imported_delta_pacspace_forgot_is_reported(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    upstream.patch("/_sandbox/faults", json={"forget_deltas": 1}).raise_for_status()
    ids = imported(ledger, upstream, 1, "cust_forgot_import")
    run_pass(ledger, sandbox)
    assert open_kinds(ledger) == {"not_found_upstream": 1} and statuses(ledger, ids) == ["QUEUED"]


def test_a_delta_pending_past_the_limit_is_stuck(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    ids = imported(ledger, upstream, 2, "cust_stuck")  # never flushed: still QUEUED upstream
    summary = run_pass(ledger, sandbox, stuck_after=0)
    assert summary.found == {"stuck": 2} and open_kinds(ledger) == {"stuck": 2} and statuses(ledger, ids) == ["QUEUED"] * 2
    not_yet = run_pass(ledger, sandbox, stuck_after=3600)
    assert "stuck" not in not_yet.found


def test_an_old_orphan_webhook_is_reported(ledger: SqlLedger, sandbox: SandboxProcess) -> None:
    from reconciler.apply import record_event
    from reconciler.events import parse_event

    raw = json.dumps({"id": "evt_orphan_1", "event": "delta.verified", "data": {"recordId": "a_nobody"}}).encode()
    ledger.transact_sync(lambda s: record_event(s, parse_event(raw), raw_body=raw, signature_timestamp=0, now=datetime(2026, 1, 1, tzinfo=UTC)))
    summary = run_pass(ledger, sandbox)
    assert summary.found == {"orphan_webhook": 1} and open_kinds(ledger) == {"orphan_webhook": 1}


def test_a_429_burst_slows_the_pass_and_does_not_fail_it(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    import threading

    ids = imported(ledger, upstream, 12, "cust_burst")
    upstream.post("/_sandbox/flush").raise_for_status()
    upstream.patch("/_sandbox/faults", json={"rate_limit": 1, "retry_after": 0.2}).raise_for_status()
    lift = threading.Timer(0.5, lambda: upstream.patch("/_sandbox/faults", json={"rate_limit": 0}))  # the burst ends
    started = time.monotonic()
    lift.start()
    summary = run_pass(ledger, sandbox)
    lift.join()
    assert summary.status == "completed" and summary.errors == 0 and summary.looked_up == 12
    assert statuses(ledger, ids) == ["VERIFIED"] * 12 and summary.fixed == 12
    assert time.monotonic() - started >= 0.5  # it waited the burst out



def test_redeliveries_are_concurrent_and_wait_out_a_429_burst(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    import threading

    imported(ledger, upstream, 6, "cust_redeliver")
    upstream.post("/_sandbox/flush").raise_for_status()
    failed = upstream.get("/api/v1/balance/webhooks", params={"status": "failed", "limit": 100}).json()["data"]["deliveries"]
    event_ids = [d["eventId"] for d in failed][:6]
    assert len(event_ids) == 6
    upstream.patch("/_sandbox/faults", json={"rate_limit": 1, "retry_after": 0.2}).raise_for_status()
    lift = threading.Timer(0.5, lambda: upstream.patch("/_sandbox/faults", json={"rate_limit": 0}))

    async def work(client: PacSpaceClient) -> PassSummary:
        summary = PassSummary(dry_run=False)
        reconciler = Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=3600, concurrency=4)
        await reconciler.request_redeliveries(event_ids + event_ids[:2], summary)  # a repeated id is asked once
        return summary

    started = time.monotonic()
    lift.start()
    summary = asyncio.run(_with_client(sandbox, work))
    lift.join()
    assert (summary.redeliveries, summary.errors) == (6, 0)
    assert time.monotonic() - started >= 0.5  # it waited the burst out instead of counting errors

def test_a_dry_run_changes_nothing(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    upstream.patch("/_sandbox/faults", json={"corrupt_status_receipt": 0.5, "fail_deltas": 0.3}).raise_for_status()
    ids = imported(ledger, upstream, 6, "cust_dry")
    upstream.post("/_sandbox/flush").raise_for_status()

    def snapshot() -> Any:
        return ledger.read_sync(
            lambda s: [
                s._session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                for table in ("discrepancy", "audit_entry", "reconciliation_run")
            ] + [s.get_delta(i).status for i in ids]  # type: ignore[union-attr]
        )

    before = snapshot()
    dry = run_pass(ledger, sandbox, dry_run=True)
    assert snapshot() == before and dry.run_id is None and dry.checked == 6
    real = run_pass(ledger, sandbox)
    assert dry.found == real.found and dry.fixed == real.fixed  # it said what a pass would do


def test_two_passes_give_the_same_discrepancies_as_one(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    upstream.patch("/_sandbox/faults", json={"corrupt_status_item_hash": 1}).raise_for_status()
    imported(ledger, upstream, 3, "cust_twice")
    upstream.post("/_sandbox/flush").raise_for_status()
    run_pass(ledger, sandbox)
    once = open_kinds(ledger)
    run_pass(ledger, sandbox)
    assert open_kinds(ledger) == once == {"item_hash_mismatch": 3}
    assert {d.occurrences for d in ledger.read_sync(lambda s: s.open_discrepancies())} == {2}


def test_a_pass_while_pacspace_is_down_stops_and_changes_nothing(ledger: SqlLedger, upstream: httpx.Client, tmp_path: Path) -> None:
    ids = imported(ledger, upstream, 2, "cust_down")
    gone = SandboxProcess(tmp_path)  # never started: nothing listens on its port
    started = time.monotonic()
    summary = run_pass(ledger, gone)
    assert summary.status == "failed" and "answered no lookup" in (summary.error_detail or "")
    assert statuses(ledger, ids) == ["QUEUED"] * 2 and open_kinds(ledger) == {}
    assert time.monotonic() - started < 10
    run = ledger.read_sync(lambda s: s.get_run(summary.run_id or 0))
    assert run is not None and run.status == "failed"


def _reconcile_process(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pacrecon", "reconcile", "--once", "--json"], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_never_run_a_pass_at_once(database_url: str, sandbox: SandboxProcess, upstream: httpx.Client, tmp_path: Path) -> None:
    ledger = SqlLedger.from_url(database_url)
    try:
        imported(ledger, upstream, 4, "cust_lock")
    finally:
        ledger.close()
    upstream.post("/_sandbox/flush").raise_for_status()
    upstream.patch("/_sandbox/faults", json={"slow": 1, "slow_seconds": 1.0}).raise_for_status()
    env = clean_environment(
        PACRECON_DATABASE_URL=database_url, PACRECON_PACSPACE_BASE_URL=sandbox.url, PACRECON_PACSPACE_API_KEY=SANDBOX_KEY,
        PACRECON_STALE_AFTER_SECONDS="1", PACRECON_RECONCILE_CONCURRENCY="1",
    )
    time.sleep(1.1)  # the deltas become stale
    first = _reconcile_process(env, tmp_path)
    time.sleep(1.0)  # the first holds the lock and waits on a slow PacSpace
    second = _reconcile_process(env, tmp_path)
    outputs = [process.communicate(timeout=60) for process in (first, second)]
    summaries = [json.loads(out) for out, _ in outputs]
    assert [s["status"] for s in summaries] == ["completed", "skipped"], outputs
    assert second.returncode == 2 and first.returncode == 0
    assert summaries[0]["fixed"] == 4


def test_the_command_line_exit_codes(database_url: str, sandbox: SandboxProcess, upstream: httpx.Client, tmp_path: Path) -> None:
    env = clean_environment(
        PACRECON_DATABASE_URL=database_url, PACRECON_PACSPACE_BASE_URL=sandbox.url, PACRECON_PACSPACE_API_KEY=SANDBOX_KEY,
        PACRECON_STALE_AFTER_SECONDS="1",
    )
    clean = subprocess.run([sys.executable, "-m", "pacrecon", "reconcile", "--once"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert clean.returncode == 0 and "open discrepancies" in clean.stdout, clean.stderr
    ledger = SqlLedger.from_url(database_url)
    try:
        upstream.patch("/_sandbox/faults", json={"corrupt_status_receipt": 1}).raise_for_status()
        imported(ledger, upstream, 1, "cust_cli")
    finally:
        ledger.close()
    upstream.post("/_sandbox/flush").raise_for_status()
    time.sleep(1.1)
    dry = subprocess.run([sys.executable, "-m", "pacrecon", "reconcile", "--once", "--dry-run", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert dry.returncode == 1 and json.loads(dry.stdout)["found"] == {"receipt_mismatch": 1}  # it would be open
    assert json.loads(dry.stdout)["open_discrepancies"] == 1
    engine = make_engine(database_url)
    with engine.connect() as connection:  # the dry run opened nothing
        assert connection.execute(text("SELECT count(*) FROM discrepancy")).scalar_one() == 0
    engine.dispose()
    found = subprocess.run([sys.executable, "-m", "pacrecon", "reconcile", "--once", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert found.returncode == 1 and json.loads(found.stdout)["open_discrepancies"] == 1
    no_key = subprocess.run([sys.executable, "-m", "pacrecon", "reconcile", "--once"], env={**env, "PACRECON_PACSPACE_API_KEY": ""}, cwd=tmp_path, capture_output=True, text=True)
    assert no_key.returncode == 2 and "PACRECON_PACSPACE_API_KEY" in no_key.stderr


def _daemon_env(sandbox: SandboxProcess, **more: str) -> dict[str, str]:
    return {
        "PACRECON_API_TOKEN": "token_reconcile_tests",
        "PACRECON_PACSPACE_BASE_URL": sandbox.url,
        "PACRECON_PACSPACE_API_KEY": SANDBOX_KEY,
        "PACRECON_STALE_AFTER_SECONDS": "1",
        "PACRECON_RECONCILE_INTERVAL_SECONDS": "1",
        **more,
    }


def test_the_daemon_reconciles_on_its_schedule(sandbox: SandboxProcess, upstream: httpx.Client, tmp_path: Path) -> None:
    """No webhook ever arrives (the sandbox has nowhere to send it): the daemon's own
    scheduled pass finds the verified delta and fixes it."""
    from tests.conftest import migrated_sqlite_url
    from tests.daemon import Daemon

    url = migrated_sqlite_url(tmp_path / "scheduled.db")
    daemon = Daemon(url, tmp_path, **_daemon_env(sandbox)).start()
    try:
        emitted = httpx.post(f"{daemon.url}/v1/deltas", json={"customerId": "cust_sched", "delta": 2, "reason": "r"},
                             headers={"Authorization": "Bearer token_reconcile_tests"}, timeout=10)
        assert emitted.status_code == 200
        anchor = emitted.json()["anchorId"]
        upstream.post("/_sandbox/flush").raise_for_status()
        ledger = SqlLedger.from_url(url)
        try:
            deadline = time.monotonic() + 20
            while ledger.read_sync(lambda s: s.deltas_by_anchor(anchor)[0].status) != "VERIFIED":
                assert time.monotonic() < deadline, daemon.log_text()[-2000:]
                time.sleep(0.2)
            assert ledger.read_sync(lambda s: s.deltas_by_anchor(anchor)[0].verified_by) == "reconciler"
        finally:
            ledger.close()
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_text()


def test_two_daemons_on_one_database_never_overlap_their_passes(database_url: str, sandbox: SandboxProcess, upstream: httpx.Client, tmp_path: Path) -> None:
    upstream.patch("/_sandbox/faults", json={"corrupt_status_receipt": 1}).raise_for_status()  # they stay unsettled
    ledger = SqlLedger.from_url(database_url)
    try:
        imported(ledger, upstream, 3, "cust_two_daemons")
    finally:
        ledger.close()
    upstream.post("/_sandbox/flush").raise_for_status()
    upstream.patch("/_sandbox/faults", json={"slow": 1, "slow_seconds": 0.5}).raise_for_status()  # every pass takes ~1.5 s
    from tests.daemon import Daemon

    env = _daemon_env(sandbox, PACRECON_RECONCILE_CONCURRENCY="1", PACRECON_STUCK_AFTER_SECONDS="1")
    daemons = [Daemon(database_url, tmp_path, **env).start() for _ in range(2)]
    try:
        time.sleep(6)
    finally:
        for daemon in daemons:
            assert daemon.stop() == 0
    ledger = SqlLedger.from_url(database_url)
    try:
        runs = ledger.read_sync(
            lambda s: [(r.started_at, r.finished_at) for r in s._session.query(__import__("storage.models", fromlist=["ReconciliationRun"]).ReconciliationRun).order_by("started_at")]
        )
    finally:
        ledger.close()
    assert len(runs) >= 3, runs
    for (_, first_end), (second_start, _) in zip(runs, runs[1:]):
        assert first_end is not None and first_end <= second_start  # one pass at a time
    passes = [e for d in daemons for e in d.log_events() if e.get("event") == "reconcile_pass"]
    assert {e["status"] for e in passes} >= {"completed", "skipped"}  # both tried; the lock let one run
