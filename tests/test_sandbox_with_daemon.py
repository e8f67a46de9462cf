"""The sandbox as the daemon's upstream: its webhooks verify, apply, and its faults are caught."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from reconciler.apply import register_deltas
from storage.models import LocalDelta
from storage.sql_ledger import SqlLedger
from tests.conftest import migrated_sqlite_url
from tests.daemon import Daemon, SandboxProcess
from tests.webhooks import TEST_SECRET


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SandboxProcess, Daemon, SqlLedger]]:
    workdir = tmp_path_factory.mktemp("stack")
    url = migrated_sqlite_url(workdir / "ledger.db")
    daemon = Daemon(url, workdir).start()
    sandbox = SandboxProcess(
        workdir, "--webhook-url", f"{daemon.url}/webhooks/pacspace", "--webhook-secret", TEST_SECRET,
        "--seed", "3", "--verify-delay", "600", "--retry-backoff", "0.2",
    ).start()
    ledger = SqlLedger.from_url(url)
    yield sandbox, daemon, ledger
    ledger.close()
    assert sandbox.stop() == 0 and daemon.stop() == 0
    assert "Traceback" not in daemon.log_text() + sandbox.log_text()


@pytest.fixture
def api(stack: tuple[SandboxProcess, Daemon, SqlLedger]) -> Iterator[httpx.Client]:
    with stack[0].api() as client:
        client.put("/_sandbox/faults", json={}).raise_for_status()
        yield client


def emit_and_register(api: httpx.Client, ledger: SqlLedger, deltas: list[dict[str, Any]]) -> list[int]:
    """Emit through the sandbox, then record its answers in our ledger as the outbox will."""
    raw = api.post("/api/v1/balance/delta/batch", json={"deltas": deltas})
    answer = json.loads(raw.content, parse_float=Decimal, parse_int=Decimal)["data"]
    now = datetime.now(UTC)
    rows = [
        LocalDelta(
            anchor_id=result["anchorId"],
            item_hash=result["itemHash"],
            customer_id=result["customerId"],
            amount=result["delta"],
            reason=deltas[int(result["index"])]["reason"],
            idempotency_key=f"test-{result['anchorId']}-{result['index']}",
            source="import",
            status="QUEUED",
            receipt_id=result["receiptId"],
            items_root=result["receiptId"],
            item_hashes=[r["itemHash"] for r in answer["results"]],
            created_at=now,
            updated_at=now,
            emitted_at=now,
        )
        for result in answer["results"]
    ]
    return ledger.transact_sync(lambda s: [d.id for d in register_deltas(s, rows, now)])


def wait_until(check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def statuses(ledger: SqlLedger, ids: list[int]) -> list[str]:
    return ledger.read_sync(lambda s: [s.get_delta(i).status for i in ids])  # type: ignore[union-attr]


def open_kinds(ledger: SqlLedger, ids: list[int]) -> set[str]:
    return {d.kind for i in ids for d in ledger.read_sync(lambda s, i=i: s.open_discrepancies(f"delta:{i}"))}


def test_sandbox_webhooks_verify_the_deltas_in_the_daemon(api: httpx.Client, stack: Any) -> None:
    _, _, ledger = stack
    ids = emit_and_register(
        api,
        ledger,
        [
            {"customerId": "cust_e2e", "delta": -42.50, "reason": "usage"},
            {"customerId": "cust_e2e", "delta": 10, "reason": "refund"},
            {"customerId": "cust_other", "delta": 0.1, "reason": "usage"},
        ],
    )
    api.post("/_sandbox/flush").raise_for_status()
    wait_until(lambda: statuses(ledger, ids) == ["VERIFIED"] * 3)
    assert open_kinds(ledger, ids) == set()
    rows = ledger.read_sync(lambda s: [s.get_delta(i) for i in ids])
    assert [r.sequence_number for r in rows] == ["1", "2", "1"]  # per-customer chains
    assert rows[0].amount == Decimal("-42.5") and rows[2].amount == Decimal("0.1")
    assert {r.verified_by for r in rows} == {"webhook"}


@pytest.mark.parametrize(
    ("fault", "kind"),
    [("corrupt_webhook_receipt", "receipt_mismatch"), ("corrupt_webhook_item_hash", "item_hash_mismatch")],
)
def test_a_corrupted_webhook_is_a_discrepancy_not_a_verification(api: httpx.Client, stack: Any, fault: str, kind: str) -> None:
    _, _, ledger = stack
    api.patch("/_sandbox/faults", json={fault: 1}).raise_for_status()
    (delta_id,) = emit_and_register(api, ledger, [{"customerId": f"cust_{fault}", "delta": 5, "reason": "usage"}])
    api.post("/_sandbox/flush").raise_for_status()
    wait_until(lambda: kind in open_kinds(ledger, [delta_id]))
    assert statuses(ledger, [delta_id]) == ["QUEUED"]


def test_a_failed_delta_is_failed(api: httpx.Client, stack: Any) -> None:
    _, _, ledger = stack
    api.patch("/_sandbox/faults", json={"fail_deltas": 1}).raise_for_status()
    (delta_id,) = emit_and_register(api, ledger, [{"customerId": "cust_fails", "delta": 5, "reason": "usage"}])
    api.post("/_sandbox/flush").raise_for_status()
    wait_until(lambda: statuses(ledger, [delta_id]) == ["FAILED"])


def test_duplicated_and_badly_signed_deliveries_change_nothing_twice(api: httpx.Client, stack: Any) -> None:
    sandbox, daemon, ledger = stack
    api.patch("/_sandbox/faults", json={"duplicate_webhooks": 1, "late_seconds": 0.3}).raise_for_status()
    (delta_id,) = emit_and_register(api, ledger, [{"customerId": "cust_dup", "delta": 5, "reason": "usage"}])
    api.post("/_sandbox/flush").raise_for_status()
    wait_until(lambda: statuses(ledger, [delta_id]) == ["VERIFIED"])
    anchor = ledger.read_sync(lambda s: s.get_delta(delta_id)).anchor_id  # type: ignore[union-attr]
    wait_until(lambda: sum(1 for e in daemon.log_events() if e.get("event") == "webhook" and e.get("anchor_id") == anchor) == 2)
    outcomes = [e["outcome"] for e in daemon.log_events() if e.get("event") == "webhook" and e.get("anchor_id") == anchor]
    assert sorted(outcomes) == ["applied", "duplicate"]
    # a badly signed delivery is refused (401) and retried until it is signed right
    api.patch("/_sandbox/faults", json={"duplicate_webhooks": 0, "bad_signature": 0.5}).raise_for_status()
    ids = emit_and_register(api, ledger, [{"customerId": "cust_sig", "delta": n + 1, "reason": "usage"} for n in range(6)])
    api.post("/_sandbox/flush").raise_for_status()
    wait_until(lambda: statuses(ledger, ids) == ["VERIFIED"] * 6, timeout=30)
    assert any(e.get("reason") == "invalid_signature" for e in daemon.log_events())


def test_an_early_webhook_waits_as_an_orphan(api: httpx.Client, stack: Any) -> None:
    """The webhook arrives before our ledger knows the delta (emitted elsewhere, imported late)."""
    _, daemon, ledger = stack
    raw = api.post("/api/v1/balance/delta", json={"customerId": "cust_late_import", "delta": 7, "reason": "usage"})
    answer = json.loads(raw.content, parse_float=Decimal, parse_int=Decimal)["data"]
    api.post("/_sandbox/flush").raise_for_status()
    wait_until(lambda: any(e.get("anchor_id") == answer["anchorId"] and e.get("outcome") == "orphan" for e in daemon.log_events()))
    now = datetime.now(UTC)
    row = LocalDelta(
        anchor_id=answer["anchorId"], item_hash=answer["itemHashes"][0], customer_id="cust_late_import",
        amount=answer["delta"], reason="usage", idempotency_key=f"late-{answer['anchorId']}", source="import",
        status="QUEUED", receipt_id=answer["receiptId"], items_root=answer["itemsRoot"],
        item_hashes=answer["itemHashes"], created_at=now, updated_at=now, emitted_at=now,
    )
    (delta_id,) = ledger.transact_sync(lambda s: [d.id for d in register_deltas(s, [row], now)])
    assert statuses(ledger, [delta_id]) == ["VERIFIED"]
