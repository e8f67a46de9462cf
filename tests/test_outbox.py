"""Emitting through pacrecon, against the sandbox over real HTTP: the outbox never loses
or doubles a delta. Both the daemon and the sandbox run as real processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from storage.engine import make_engine
from tests.conftest import migrated_sqlite_url
from tests.daemon import SANDBOX_KEY, Daemon, SandboxProcess, clean_environment, pacrecon
from tests.webhooks import TEST_SECRET

TOKEN = "api_token_for_tests_0123456789"


def daemon_settings(sandbox: SandboxProcess, **more: str) -> dict[str, str]:
    return {
        "PACRECON_API_TOKEN": TOKEN,
        "PACRECON_PACSPACE_BASE_URL": sandbox.url,
        "PACRECON_PACSPACE_API_KEY": SANDBOX_KEY,
        "PACRECON_PACSPACE_TIMEOUT_SECONDS": "1",
        "PACRECON_OUTBOX_RETRY_INTERVAL_SECONDS": "0.3",
        "PACRECON_OUTBOX_LEASE_SECONDS": "2",
        **more,
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outbox")


@pytest.fixture(scope="module")
def sandbox(workdir: Path) -> Iterator[SandboxProcess]:
    running = SandboxProcess(workdir, "--webhook-secret", TEST_SECRET, "--seed", "11", "--verify-delay", "600").start()
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def ledger_url(workdir: Path) -> str:
    return migrated_sqlite_url(workdir / "ledger.db")


@pytest.fixture(scope="module")
def daemon(sandbox: SandboxProcess, ledger_url: str, workdir: Path) -> Iterator[Daemon]:
    running = Daemon(ledger_url, workdir, **daemon_settings(sandbox)).start()
    with sandbox.api() as api:
        api.patch("/_sandbox/config", json={"webhook_url": f"{running.url}/webhooks/pacspace"}).raise_for_status()
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log_text()


@pytest.fixture
def upstream(sandbox: SandboxProcess, daemon: Daemon) -> Iterator[httpx.Client]:
    with sandbox.api() as api:
        api.put("/_sandbox/faults", json={}).raise_for_status()
        yield api


@pytest.fixture
def client(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
        yield http


def body(customer: str, delta: str = "-42.50", **fields: Any) -> bytes:
    return json.dumps({"customerId": customer, "delta": "D", "reason": "usage", **fields}).replace('"D"', delta).encode()


def parse(response: httpx.Response) -> Any:
    return json.loads(response.content, parse_float=Decimal)


def unique(prefix: str) -> str:
    return f"{prefix}_{time.time_ns()}"


def rows(url: str, where: str, **params: Any) -> list[dict[str, Any]]:
    engine = make_engine(url)
    with engine.connect() as connection:
        found = [dict(r._mapping) for r in connection.execute(text(f"SELECT * FROM local_delta WHERE {where} ORDER BY id"), params)]
    engine.dispose()
    return found


def wait_until(check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def upstream_count(upstream: httpx.Client, customer: str) -> int:
    """How many deltas PacSpace recorded for `customer`: each verified one takes a sequence number."""
    upstream.post("/_sandbox/flush").raise_for_status()
    return int(parse(upstream.get(f"/api/v1/balance/gaps/{customer}"))["data"]["latestSequence"])


def test_emit_commits_sends_and_records_the_answer(client: httpx.Client, upstream: httpx.Client, ledger_url: str) -> None:
    customer = unique("cust")
    response = client.post("/v1/deltas", content=body(customer, referenceId="inv_1", metadata={"plan": "growth", "n": 1.5}))
    assert response.status_code == 200, response.text
    answer = parse(response)
    assert isinstance(answer["id"], int) and answer["anchorId"].startswith("a_") and answer["status"] == "QUEUED"
    assert answer["delta"] == Decimal("-42.5") and answer["receiptId"] == answer["itemsRoot"]
    (row,) = rows(ledger_url, "customer_id = :c", c=customer)
    assert (row["status"], row["anchor_id"], row["receipt_id"], row["source"]) == ("QUEUED", answer["anchorId"], answer["receiptId"], "outbox")
    assert row["item_hash"] == answer["itemHashes"][0]
    upstream_status = parse(upstream.get(f"/api/v1/balance/delta/{answer['anchorId']}"))["data"]
    assert upstream_status["customerId"] == customer
    # and the sandbox's webhook then verifies it
    upstream.post("/_sandbox/flush").raise_for_status()
    wait_until(lambda: rows(ledger_url, "customer_id = :c", c=customer)[0]["status"] == "VERIFIED")
    view = parse(client.get(f"/v1/deltas/{answer['anchorId']}"))
    assert view["deltas"][0]["verifiedBy"] == "webhook" and view["deltas"][0]["metadata"] == {"plan": "growth", "n": Decimal("1.5")}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b'{"customerId": "bad id", "delta": -1, "reason": "r"}', "customerId"),
        (b'{"customerId": "c", "delta": 0, "reason": "r"}', "delta"),
        (b'{"customerId": "c", "delta": 1.0000000001, "reason": "r"}', "delta"),  # PacSpace takes it; our ledger could not
        (b'{"customerId": "c", "delta": 1}', "reason"),
        (b"[1]", "body"),
        (b"not json", "body"),
    ],
)
def test_invalid_requests_are_400_and_nothing_is_recorded_or_sent(client: httpx.Client, upstream: httpx.Client, ledger_url: str, payload: bytes, field: str) -> None:
    before = parse(upstream.get("/_sandbox/state"))["data"]["anchors"]
    count = len(rows(ledger_url, "1 = 1"))
    response = client.post("/v1/deltas", content=payload)
    assert response.status_code == 400 and response.json()["error"]["code"] == "validation_error"
    assert field in {d["field"] for d in response.json()["error"]["details"]}
    assert len(rows(ledger_url, "1 = 1")) == count and parse(upstream.get("/_sandbox/state"))["data"]["anchors"] == before


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_the_api_needs_its_token(daemon: Daemon, headers: dict[str, str]) -> None:
    for method, path in (("POST", "/v1/deltas"), ("GET", "/v1/deltas"), ("POST", "/v1/deltas/import")):
        response = httpx.request(method, f"{daemon.url}{path}", headers=headers, content=b"{}")
        assert (response.status_code, response.json()["error"]["code"]) == (401, "unauthorized")


def test_a_callers_idempotency_key(client: httpx.Client, upstream: httpx.Client) -> None:
    customer = unique("cust_idem")
    key = {"Idempotency-Key": unique("key")}
    first = client.post("/v1/deltas", content=body(customer), headers=key)
    again = client.post("/v1/deltas", content=body(customer), headers=key)
    assert first.status_code == again.status_code == 200 and first.content == again.content
    other = client.post("/v1/deltas", content=body(customer, delta="-1"), headers=key)
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_conflict")
    assert upstream_count(upstream, customer) == 1


def test_a_repeat_while_the_first_is_in_flight_is_202(client: httpx.Client, upstream: httpx.Client) -> None:
    upstream.patch("/_sandbox/faults", json={"slow": 1, "slow_seconds": 0.8}).raise_for_status()
    customer = unique("cust_inflight")
    key = {"Idempotency-Key": unique("key")}
    first: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: first.append(client.post("/v1/deltas", content=body(customer), headers=key)))
    sender.start()
    time.sleep(0.3)
    pending = client.post("/v1/deltas", content=body(customer), headers=key)
    sender.join()
    assert pending.status_code == 202 and pending.json()["status"] == "PENDING"
    assert first[0].status_code == 200
    upstream.put("/_sandbox/faults", json={}).raise_for_status()
    assert upstream_count(upstream, customer) == 1


@pytest.mark.parametrize(
    ("faults", "code"),
    [
        ({"rate_limit": 1, "retry_after": 0.2}, "RATE_LIMITED"),
        ({"unavailable": 1, "retry_after": 0.2}, "SERVICE_UNAVAILABLE"),
    ],
)
def test_an_upstream_that_does_not_accept_leaves_it_pending_and_it_is_sent_once_later(
    client: httpx.Client, upstream: httpx.Client, ledger_url: str, faults: dict[str, float], code: str
) -> None:
    upstream.patch("/_sandbox/faults", json=faults).raise_for_status()
    customer = unique("cust_retry")
    started = time.monotonic()
    response = client.post("/v1/deltas", content=body(customer))
    assert response.status_code == 202 and response.json()["status"] == "PENDING" and code in response.json()["message"]
    assert time.monotonic() - started >= 3 * 0.2  # three waits of Retry-After between four attempts
    (row,) = rows(ledger_url, "customer_id = :c", c=customer)
    assert row["status"] == "PENDING"
    upstream.put("/_sandbox/faults", json={}).raise_for_status()
    wait_until(lambda: rows(ledger_url, "customer_id = :c", c=customer)[0]["status"] == "QUEUED")
    assert upstream_count(upstream, customer) == 1


def test_a_timed_out_send_is_retried_under_the_same_key_and_recorded_once(client: httpx.Client, upstream: httpx.Client, ledger_url: str) -> None:
    upstream.patch("/_sandbox/faults", json={"slow": 1, "slow_seconds": 1.5}).raise_for_status()  # the client waits 1 s
    customer = unique("cust_timeout")
    started = time.monotonic()
    response = client.post("/v1/deltas", content=body(customer))
    assert time.monotonic() - started >= 1.0  # the first attempt timed out
    assert response.status_code in (200, 202)  # a retry got PacSpace's replayed answer, or it stays pending
    upstream.put("/_sandbox/faults", json={}).raise_for_status()
    wait_until(lambda: rows(ledger_url, "customer_id = :c", c=customer)[0]["status"] == "QUEUED")
    assert upstream_count(upstream, customer) == 1 and len(rows(ledger_url, "customer_id = :c", c=customer)) == 1


@pytest.mark.parametrize(("fault", "status"), [("insufficient_credits", 402), ("contract_not_deployed", 412)])
def test_a_final_refusal_rejects_the_delta(client: httpx.Client, upstream: httpx.Client, ledger_url: str, fault: str, status: int) -> None:
    upstream.patch("/_sandbox/faults", json={fault: 1}).raise_for_status()
    customer = unique("cust_refused")
    key = {"Idempotency-Key": unique("key")}
    response = client.post("/v1/deltas", content=body(customer), headers=key)
    assert response.status_code == status and response.json()["error"]["upstream"]["code"] == fault.upper()
    (row,) = rows(ledger_url, "customer_id = :c", c=customer)
    assert row["status"] == "REJECTED" and fault.upper() in row["status_reason"]
    upstream.put("/_sandbox/faults", json={}).raise_for_status()
    assert client.post("/v1/deltas", content=body(customer), headers=key).content == response.content  # replayed, not re-sent


def test_a_cadence_limit_is_not_retried_blindly(client: httpx.Client, upstream: httpx.Client, ledger_url: str) -> None:
    upstream.patch("/_sandbox/faults", json={"cadence_limit": 1}).raise_for_status()
    customer = unique("cust_cadence")
    started = time.monotonic()
    response = client.post("/v1/deltas", content=body(customer))
    assert response.status_code == 202 and "CADENCE_LIMIT" in response.json()["message"]
    assert time.monotonic() - started < 1  # the client did not retry it at once
    engine = make_engine(ledger_url)
    with engine.connect() as connection:
        wait = connection.execute(
            text("SELECT s.next_attempt_at, s.created_at FROM outbox_submission s JOIN local_delta d ON d.submission_id = s.id WHERE d.customer_id = :c"),
            {"c": customer},
        ).one()
    engine.dispose()
    next_attempt, created = (datetime.fromisoformat(str(v)) for v in wait)
    assert (next_attempt - created).total_seconds() >= 59


def test_a_batch_with_items_refused_upstream(client: httpx.Client, upstream: httpx.Client, ledger_url: str) -> None:
    upstream.patch("/_sandbox/faults", json={"reject_batch_items": 0.5}).raise_for_status()
    customer = unique("cust_batch")
    deltas = [{"customerId": customer, "delta": n + 1, "reason": "usage"} for n in range(8)]
    response = client.post("/v1/deltas/batch", json={"deltas": deltas})
    assert response.status_code == 200, response.text
    answer = parse(response)
    refused = [r for r in answer["results"] if r["status"] == "FAILED"]
    accepted = [r for r in answer["results"] if r["status"] == "QUEUED"]
    assert refused and accepted and all("id" in r for r in answer["results"])
    stored = {r["id"]: r for r in rows(ledger_url, "customer_id = :c", c=customer)}
    assert {stored[r["id"]]["status"] for r in refused} == {"REJECTED"}
    assert {stored[r["id"]]["status"] for r in accepted} == {"QUEUED"}
    assert len({stored[r["id"]]["anchor_id"] for r in accepted}) == 1  # one anchor for the batch


def test_an_invalid_batch_item_refuses_the_whole_batch_before_sending(client: httpx.Client) -> None:
    response = client.post("/v1/deltas/batch", json={"deltas": [{"customerId": "c", "delta": 1, "reason": "r"}, {"customerId": "c", "delta": 0, "reason": "r"}]})
    assert response.status_code == 400 and response.json()["error"]["details"][0]["field"] == "deltas[1].delta"


def test_import_registers_once_and_matches_orphans(client: httpx.Client, upstream: httpx.Client, ledger_url: str, daemon: Daemon) -> None:
    customer = unique("cust_import")
    emitted = parse(upstream.post("/api/v1/balance/delta", content=body(customer, delta="7")))  # emitted elsewhere
    upstream.post("/_sandbox/flush").raise_for_status()  # its webhook reaches us first: an orphan
    wait_until(lambda: any(e.get("anchor_id") == emitted["data"]["anchorId"] for e in daemon.log_events()))
    report = client.post("/v1/deltas/import", content=json.dumps({"records": [json.loads(json.dumps(emitted, default=str))]}))
    assert report.status_code == 200 and report.json()["imported"] == 1
    (row,) = rows(ledger_url, "customer_id = :c", c=customer)
    assert (row["source"], row["status"], row["verified_by"]) == ("import", "VERIFIED", "webhook")
    again = client.post("/v1/deltas/import", content=json.dumps([json.loads(json.dumps(emitted, default=str))]))
    assert again.json()["imported"] == 0 and again.json()["already_known"] == 1
    bad = client.post("/v1/deltas/import", content=json.dumps([{"anchorId": "a_x"}, {"data": 5}]))
    assert [i["record"] for i in bad.json()["invalid"]] == [1, 2]


def test_list_and_page_through_the_ledger(client: httpx.Client) -> None:
    customer = unique("cust_list")
    client.post("/v1/deltas/batch", json={"deltas": [{"customerId": customer, "delta": n + 1, "reason": "r"} for n in range(5)]}).raise_for_status()
    seen, cursor = [], None
    while True:
        page = parse(client.get("/v1/deltas", params={"customer_id": customer, "limit": 2, **({"cursor": cursor} if cursor else {})}))
        seen += [d["delta"] for d in page["deltas"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [Decimal(n + 1) for n in range(5)]
    queued = parse(client.get("/v1/deltas", params={"customer_id": customer, "status": "queued"}))["deltas"]
    assert len(queued) == 5
    assert client.get("/v1/deltas", params={"cursor": "garbage"}).status_code == 400
    assert client.get("/v1/deltas", params={"status": "nope"}).status_code == 400
    assert client.get("/v1/deltas/a_unknown").status_code == 404


def test_the_command_line_emits_through_the_daemon_and_directly(daemon: Daemon, sandbox: SandboxProcess, ledger_url: str, upstream: httpx.Client, tmp_path: Path) -> None:
    env = clean_environment(PACRECON_DATABASE_URL=ledger_url, **daemon_settings(sandbox))
    customer = unique("cust_cli")
    via_daemon = pacrecon(["emit", customer, "-42.50", "usage", "--metadata", "plan=growth", "--daemon-url", daemon.url], env, tmp_path)
    assert via_daemon.returncode == 0, via_daemon.stderr
    assert json.loads(via_daemon.stdout)["delta"] == -42.5
    direct = pacrecon(["emit", customer, "1.25", "refund", "--direct", "--reference-id", "r1"], env, tmp_path)
    assert direct.returncode == 0, direct.stderr
    stored = rows(ledger_url, "customer_id = :c", c=customer)
    assert [(r["status"], r["reference_id"]) for r in stored] == [("QUEUED", None), ("QUEUED", "r1")]
    assert upstream_count(upstream, customer) == 2
    bad = pacrecon(["emit", customer, "1e", "usage", "--direct"], env, tmp_path)
    assert bad.returncode == 2 and "not a number" in bad.stderr


def test_the_command_line_imports_a_file(sandbox: SandboxProcess, ledger_url: str, upstream: httpx.Client, tmp_path: Path) -> None:
    customer = unique("cust_file")
    single = upstream.post("/api/v1/balance/delta", content=body(customer)).text
    batch = upstream.post("/api/v1/balance/delta/batch", json={"deltas": [{"customerId": customer, "delta": 2, "reason": "r"}] * 2}).text
    path = tmp_path / "answers.jsonl"
    path.write_text(f"{single}\n\n{batch}\nnot json\n")
    env = clean_environment(PACRECON_DATABASE_URL=ledger_url)
    result = pacrecon(["import", str(path)], env, tmp_path)
    assert result.returncode == 1 and json.loads(result.stdout) == {"imported": 3, "already_known": 0, "invalid": [{"line": 4, "error": "not JSON"}]}
    path.write_text(f"{single}\n{batch}\n")
    again = pacrecon(["import", str(path)], env, tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["already_known"] == 3


def test_a_crash_between_commit_and_answer_still_emits_exactly_once(sandbox: SandboxProcess, upstream: httpx.Client, tmp_path: Path) -> None:
    """kill -9 while PacSpace is processing our request: the delta is committed locally,
    PacSpace has it, we never heard. After the restart the retry job sends it again with
    the same idempotency key: one delta upstream, one row here, QUEUED."""
    url = migrated_sqlite_url(tmp_path / "crash.db")
    daemon = Daemon(url, tmp_path, **daemon_settings(sandbox, PACRECON_PACSPACE_TIMEOUT_SECONDS="10")).start()
    upstream.patch("/_sandbox/faults", json={"slow": 1, "slow_seconds": 1.5}).raise_for_status()
    customer = unique("cust_crash")
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(httpx.post(f"{daemon.url}/v1/deltas", content=body(customer), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10))
        except httpx.TransportError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.6)  # committed locally, request sent, PacSpace still working
    assert rows(url, "customer_id = :c", c=customer)[0]["status"] == "PENDING"
    assert daemon.process is not None
    daemon.process.kill()
    daemon.process.wait()
    sender.join()
    assert isinstance(outcome[0], httpx.TransportError)  # the caller never got an answer
    upstream.put("/_sandbox/faults", json={}).raise_for_status()
    time.sleep(1.5)  # PacSpace finishes the request we sent before dying
    restarted = Daemon(url, tmp_path, **daemon_settings(sandbox)).start()
    try:
        wait_until(lambda: rows(url, "customer_id = :c", c=customer)[0]["status"] == "QUEUED")
        assert len(rows(url, "customer_id = :c", c=customer)) == 1
        assert upstream_count(upstream, customer) == 1
    finally:
        assert restarted.stop() == 0


def test_without_a_pacspace_key_emitting_is_disabled(tmp_path: Path) -> None:
    daemon = Daemon(migrated_sqlite_url(tmp_path / "off.db"), tmp_path, PACRECON_API_TOKEN=TOKEN).start()
    try:
        response = httpx.post(f"{daemon.url}/v1/deltas", content=body("c"), headers={"Authorization": f"Bearer {TOKEN}"})
        assert (response.status_code, response.json()["error"]["code"]) == (503, "pacspace_not_configured")
    finally:
        daemon.stop()
    daemon = Daemon(migrated_sqlite_url(tmp_path / "noapi.db"), tmp_path).start()
    try:
        response = httpx.get(f"{daemon.url}/v1/deltas")
        assert (response.status_code, response.json()["error"]["code"]) == (503, "api_disabled")
    finally:
        daemon.stop()


