"""The sandbox as a real process: PacSpace's API, lifecycle, webhooks and each fault."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from pacspace_sdk import Webhooks
from pacspace_sdk.errors import WebhookVerificationError

from reconciler.proofs import EMPTY_ROOT, item_hash, merkle_root, proof_item
from tests.collector import Collector, Received
from tests.daemon import SandboxProcess

SECRET = "whsec_sandbox_test_secret"
PREVIOUS = "whsec_sandbox_previous_secret"


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    running = Collector().start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sandbox(collector: Collector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    running = SandboxProcess(
        tmp_path_factory.mktemp("sandbox"),
        "--webhook-url", collector.url,
        "--webhook-secret", SECRET,
        "--seed", "7",
        "--verify-delay", "600",  # nothing settles unless a test flushes or lowers it
        "--retry-backoff", "0.1",
        "--max-attempts", "3",
    ).start()
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log_text()


@pytest.fixture
def api(sandbox: SandboxProcess, collector: Collector) -> Iterator[httpx.Client]:
    """A client with the API key, on a sandbox whose faults and settings are back to default."""
    with sandbox.api() as client:
        client.put("/_sandbox/faults", json={}).raise_for_status()
        client.patch(
            "/_sandbox/config",
            json={"webhook_url": collector.url, "webhook_secrets": [SECRET], "vocabulary": "status", "webhook_shape": "sdk", "verify_delay": 600},
        ).raise_for_status()
        collector.answers.clear()
        yield client


def parse(response: httpx.Response) -> Any:
    return json.loads(response.content, parse_float=Decimal)


def emit(api: httpx.Client, customer: str = "cust_1", delta: str = "-42.50", **fields: Any) -> dict[str, Any]:
    body = json.dumps({"customerId": customer, "delta": "DELTA", "reason": "usage", **fields}).replace('"DELTA"', delta)
    response = api.post("/api/v1/balance/delta", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return parse(response)["data"]


def faults(api: httpx.Client, **values: float) -> None:
    api.patch("/_sandbox/faults", json=values).raise_for_status()


def flush(api: httpx.Client) -> None:
    api.post("/_sandbox/flush").raise_for_status()


def for_anchor(anchor_id: str) -> Any:
    return lambda received: json.loads(received.body)["data"].get("recordId") == anchor_id


def sdk_verifies(received: Received, secret: str = SECRET) -> dict[str, Any]:
    return Webhooks(secret).verify_from_headers(received.headers, received.body.decode())


# -- the API -------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"X-Api-Key": "sk_wrong"}])
def test_an_api_key_is_required(sandbox: SandboxProcess, headers: dict[str, str]) -> None:
    response = httpx.post(f"{sandbox.url}/api/v1/balance/delta", json={}, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"success": False, "error": {"code": "INVALID_API_KEY", "message": response.json()["error"]["message"]}}


def test_emit_answers_with_a_receipt_that_recomputes(api: httpx.Client) -> None:
    data = emit(api, referenceId="inv_1", metadata={"plan": "growth"})
    assert data["status"] == "QUEUED" and data["delta"] == Decimal("-42.5") and data["estimatedVerifiedDeltas"] == 1
    assert data["receivedAt"].endswith("Z") and data["message"]
    expected_item = item_hash(
        proof_item(
            anchor_id=data["anchorId"], index=0, customer_id="cust_1", delta=Decimal("-42.50"),
            reason="usage", reference_id="inv_1", metadata={"plan": "growth"},
        )
    )
    assert data["itemHashes"] == [expected_item]
    assert data["receiptId"] == data["itemsRoot"] == merkle_root([expected_item]) == expected_item


def test_amounts_stay_exact_through_the_api(api: httpx.Client) -> None:
    data = emit(api, delta="0.1000000000000000055511151231257827")
    assert data["delta"] == Decimal("0.1000000000000000055511151231257827")


def test_validation_errors_name_every_field(api: httpx.Client) -> None:
    response = api.post("/api/v1/balance/delta", json={"customerId": "bad id", "delta": 0})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert {d["field"] for d in error["details"]} == {"customerId", "delta", "reason"}


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"deltas": 5}'])
def test_malformed_bodies_are_400(api: httpx.Client, body: bytes) -> None:
    for path in ("/api/v1/balance/delta", "/api/v1/balance/delta/batch"):
        response = api.post(path, content=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_a_batch_shares_one_anchor_and_fails_items_one_by_one(api: httpx.Client) -> None:
    deltas = [
        {"customerId": "cust_a", "delta": -100, "reason": "usage"},
        {"customerId": "cust_b", "delta": 0, "reason": "usage"},
        {"customerId": "cust_a", "delta": 5, "reason": "refund"},
    ]
    data = parse(api.post("/api/v1/balance/delta/batch", json={"deltas": deltas}))["data"]
    assert (data["totalQueued"], data["totalFailed"]) == (2, 1)
    ok = [r for r in data["results"] if r["status"] == "QUEUED"]
    failed = [r for r in data["results"] if r["status"] == "FAILED"]
    assert [r["index"] for r in ok] == [0, 2] and [r["index"] for r in failed] == [1]
    assert failed[0]["error"]["code"] == "VALIDATION_ERROR" and "deltas[1].delta" in failed[0]["error"]["message"]
    assert ok[0]["anchorId"] == ok[1]["anchorId"] and ok[0]["receiptId"] == ok[1]["receiptId"]
    assert ok[0]["receiptId"] == merkle_root([ok[0]["itemHash"], ok[1]["itemHash"]])
    assert data["_efficiency"]["uniqueCustomers"] == 1 and data["_efficiency"]["estimatedSlots"] == 1
    status = parse(api.get(f"/api/v1/balance/delta/{ok[0]['anchorId']}"))["data"]
    assert status["deltaCount"] == 2 and [d["customerId"] for d in status["deltas"]] == ["cust_a", "cust_a"]


@pytest.mark.parametrize("count", [0, 101])
def test_a_batch_holds_1_to_100(api: httpx.Client, count: int) -> None:
    response = api.post("/api/v1/balance/delta/batch", json={"deltas": [{"customerId": "c", "delta": 1, "reason": "r"}] * count})
    assert response.status_code == 400 and "1 to 100" in response.json()["error"]["message"]


def test_idempotency_replays_the_first_answer(api: httpx.Client) -> None:
    body = {"customerId": "cust_idem", "delta": -1, "reason": "usage"}
    key = {"Idempotency-Key": f"k-{time.time_ns()}"}
    first = api.post("/api/v1/balance/delta", json=body, headers=key)
    again = api.post("/api/v1/balance/delta", content=json.dumps(body, indent=2), headers=key)  # same body, other spacing
    assert first.status_code == again.status_code == 200 and first.content == again.content
    other = api.post("/api/v1/balance/delta", json={**body, "delta": -2}, headers=key)
    assert (other.status_code, other.json()["error"]["code"]) == (409, "IDEMPOTENCY_CONFLICT")
    assert api.get("/_sandbox/state").json()["data"]["anchors"]  # the repeat created no second anchor
    anchors_for_key = parse(first)["data"]["anchorId"] == parse(again)["data"]["anchorId"]
    assert anchors_for_key


def test_idempotency_answers_202_while_the_first_is_in_flight(api: httpx.Client) -> None:
    faults(api, slow=1, slow_seconds=1.5)
    body = {"customerId": "cust_pending", "delta": 3, "reason": "usage"}
    key = {"Idempotency-Key": f"k-{time.time_ns()}"}
    first: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: first.append(api.post("/api/v1/balance/delta", json=body, headers=key)))
    thread.start()
    time.sleep(0.5)
    pending = api.post("/api/v1/balance/delta", json=body, headers=key)
    thread.join()
    assert pending.status_code == 202
    assert pending.json()["error"]["code"] == "IDEMPOTENCY_PENDING" and pending.json()["error"]["retryAfterSeconds"] == 1
    assert first[0].status_code == 200


# -- lifecycle and webhooks --------------------------------------------------------


def test_lifecycle_in_the_status_endpoints_words(api: httpx.Client, collector: Collector) -> None:
    api.patch("/_sandbox/config", json={"verify_delay": 1}).raise_for_status()
    anchor = emit(api)["anchorId"]
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (not seen or seen[-1] != "ANCHORED"):
        status = parse(api.get(f"/api/v1/balance/delta/{anchor}"))["data"]["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.05)
    assert seen == ["QUEUED", "ANCHORING", "ANCHORED"]
    (received,) = collector.wait_for(1, where=for_anchor(anchor))
    assert sdk_verifies(received)["event"] == "delta.verified"


def test_the_sdk_vocabulary(api: httpx.Client) -> None:
    api.patch("/_sandbox/config", json={"vocabulary": "sdk"}).raise_for_status()
    anchor = emit(api)["anchorId"]
    flush(api)
    assert parse(api.get(f"/api/v1/balance/delta/{anchor}"))["data"]["status"] == "VERIFIED"


def test_a_verified_webhook_carries_the_proof(api: httpx.Client, collector: Collector) -> None:
    first = emit(api, customer="cust_chain")
    second = emit(api, customer="cust_chain")
    flush(api)
    webhooks = {json.loads(r.body)["data"]["recordId"]: json.loads(r.body, parse_float=Decimal) for r in collector.wait_for(2, where=lambda r: json.loads(r.body)["data"]["customerId"] == "cust_chain")}
    one, two = webhooks[first["anchorId"]], webhooks[second["anchorId"]]
    assert one["event"] == "delta.verified" and one["id"].startswith("evt_") and one["tenantId"]
    data = one["data"]
    assert data["receiptId"] == data["proof"]["proofHash"] == first["receiptId"]
    assert data["proof"]["contentHash"] == first["itemHashes"][0] and data["delta"] == Decimal("-42.5")
    assert data["sequenceNumber"] == "1" and data["proof"]["previousProofHash"] == EMPTY_ROOT
    assert two["data"]["sequenceNumber"] == "2" and two["data"]["proof"]["previousProofHash"] == first["receiptId"]


def test_webhooks_signed_with_two_secrets_during_a_rotation(api: httpx.Client, collector: Collector) -> None:
    api.patch("/_sandbox/config", json={"webhook_secrets": [SECRET, PREVIOUS]}).raise_for_status()
    anchor = emit(api)["anchorId"]
    flush(api)
    (received,) = collector.wait_for(1, where=for_anchor(anchor))
    assert received.headers["x-pacspace-signature"].count("v1=") == 2
    assert sdk_verifies(received, SECRET) and sdk_verifies(received, PREVIOUS)


def test_the_docs_shape(api: httpx.Client, collector: Collector) -> None:
    api.patch("/_sandbox/config", json={"webhook_shape": "docs"}).raise_for_status()
    anchor = emit(api)["anchorId"]
    flush(api)
    (received,) = collector.wait_for(1, where=for_anchor(anchor))
    body = sdk_verifies(received)
    assert "id" not in body and body["timestamp"] and body["data"]["proof"]["proofHash"]


def test_a_failing_endpoint_is_retried_then_listed_as_failed_and_the_retry_endpoint_resends(api: httpx.Client, collector: Collector) -> None:
    collector.answers.extend([500, 503, 500])  # three attempts, all refused
    anchor = emit(api)["anchorId"]
    flush(api)
    collector.wait_for(3, where=for_anchor(anchor))
    time.sleep(0.3)
    failed = parse(api.get("/api/v1/balance/webhooks", params={"status": "failed"}))["data"]["deliveries"]
    mine = [d for d in failed if d["recordId"] == anchor]
    assert len(mine) == 1 and mine[0]["attempts"] == 3 and mine[0]["lastStatusCode"] == 500
    retried = api.post(f"/api/v1/balance/webhooks/{mine[0]['eventId']}/retry")
    assert retried.status_code == 200
    arrivals = collector.wait_for(4, where=for_anchor(anchor))
    assert len(arrivals) == 4 and len({json.loads(r.body)["id"] for r in arrivals}) == 1
    time.sleep(0.2)
    delivered = parse(api.get("/api/v1/balance/webhooks", params={"status": "delivered"}))["data"]["deliveries"]
    assert any(d["eventId"] == mine[0]["eventId"] for d in delivered)


def test_retry_of_an_unknown_event_is_404(api: httpx.Client) -> None:
    assert api.post("/api/v1/balance/webhooks/evt_nope/retry").status_code == 404


# -- faults, one at a time -----------------------------------------------------------


def test_fault_drop_webhooks(api: httpx.Client, collector: Collector) -> None:
    faults(api, drop_webhooks=1)
    anchor = emit(api)["anchorId"]
    flush(api)
    time.sleep(0.3)
    assert collector.wait_for(1, timeout=0.5, where=for_anchor(anchor)) == []
    failed = [d for d in parse(api.get("/api/v1/balance/webhooks", params={"status": "failed"}))["data"]["deliveries"] if d["recordId"] == anchor]
    assert len(failed) == 1 and "dropped" in failed[0]["lastError"]
    api.post(f"/api/v1/balance/webhooks/{failed[0]['eventId']}/retry").raise_for_status()
    assert len(collector.wait_for(1, where=for_anchor(anchor))) == 1


def test_fault_duplicate_webhooks(api: httpx.Client, collector: Collector) -> None:
    faults(api, duplicate_webhooks=1, late_seconds=0.2)
    anchor = emit(api)["anchorId"]
    flush(api)
    copies = collector.wait_for(2, where=for_anchor(anchor))
    assert len(copies) == 2 and copies[0].body == copies[1].body
    assert copies[0].headers["x-pacspace-timestamp"] and all(sdk_verifies(c) for c in copies)


def test_fault_late_webhooks_arrive_out_of_order(api: httpx.Client, collector: Collector) -> None:
    faults(api, late_webhooks=1, late_seconds=1.5)
    anchors = [emit(api, customer="cust_late")["anchorId"] for _ in range(6)]
    started = time.time()
    flush(api)
    arrivals = collector.wait_for(6, where=lambda r: json.loads(r.body)["data"].get("recordId") in anchors)
    order = [json.loads(r.body)["data"]["recordId"] for r in arrivals]
    assert sorted(order) == sorted(anchors) and order != anchors  # seeded: deterministic for this sandbox run
    assert max(r.at for r in arrivals) - started > 0.3


def test_fault_bad_signature(api: httpx.Client, collector: Collector) -> None:
    faults(api, bad_signature=1)
    anchor = emit(api)["anchorId"]
    flush(api)
    (received, *_) = collector.wait_for(1, where=for_anchor(anchor))
    with pytest.raises(WebhookVerificationError):
        sdk_verifies(received)


@pytest.mark.parametrize("fault", ["corrupt_webhook_receipt", "corrupt_webhook_item_hash"])
def test_fault_corrupt_webhook(api: httpx.Client, collector: Collector, fault: str) -> None:
    faults(api, **{fault: 1})
    emitted = emit(api)
    flush(api)
    (received,) = collector.wait_for(1, where=for_anchor(emitted["anchorId"]))
    data = sdk_verifies(received)["data"]  # still genuinely signed
    if fault == "corrupt_webhook_receipt":
        assert data["receiptId"] != emitted["receiptId"] and data["itemHash"] == emitted["itemHashes"][0]
    else:
        assert data["receiptId"] == emitted["receiptId"] and data["proof"]["contentHash"] != emitted["itemHashes"][0]
        assert emitted["itemHashes"][0] not in data["itemHashes"]


@pytest.mark.parametrize("fault", ["corrupt_status_receipt", "corrupt_status_item_hash"])
def test_fault_corrupt_status(api: httpx.Client, fault: str) -> None:
    faults(api, **{fault: 1})
    emitted = emit(api)
    status = parse(api.get(f"/api/v1/balance/delta/{emitted['anchorId']}"))["data"]
    if fault == "corrupt_status_receipt":
        assert status["receiptId"] != emitted["receiptId"] and status["itemHashes"] == emitted["itemHashes"]
    else:
        assert status["receiptId"] == emitted["receiptId"] and status["itemHashes"] != emitted["itemHashes"]


def test_fault_fail_deltas(api: httpx.Client, collector: Collector) -> None:
    faults(api, fail_deltas=1)
    anchor = emit(api, customer="cust_fail")["anchorId"]
    flush(api)
    (received,) = collector.wait_for(1, where=for_anchor(anchor))
    body = sdk_verifies(received)
    assert body["event"] == "delta.failed" and "fail_deltas" in body["data"]["error"] and body["data"]["failedAt"]
    assert parse(api.get(f"/api/v1/balance/delta/{anchor}"))["data"]["status"] == "FAILED"


def test_fault_forget_deltas(api: httpx.Client, collector: Collector) -> None:
    faults(api, forget_deltas=1)
    anchor = emit(api)["anchorId"]
    flush(api)
    response = api.get(f"/api/v1/balance/delta/{anchor}")
    assert (response.status_code, response.json()["error"]["code"]) == (404, "NOT_FOUND")
    assert collector.wait_for(1, timeout=0.5, where=for_anchor(anchor)) == []


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("rate_limit", 429, "RATE_LIMITED"),
        ("unavailable", 503, "SERVICE_UNAVAILABLE"),
        ("cadence_limit", 429, "CADENCE_LIMIT"),
        ("insufficient_credits", 402, "INSUFFICIENT_CREDITS"),
        ("contract_not_deployed", 412, "CONTRACT_NOT_DEPLOYED"),
    ],
)
def test_fault_error_answers(api: httpx.Client, fault: str, status: int, code: str) -> None:
    faults(api, **{fault: 1, "retry_after": 2})
    response = api.post("/api/v1/balance/delta", json={"customerId": "c", "delta": 1, "reason": "r"})
    assert (response.status_code, response.json()["success"], response.json()["error"]["code"]) == (status, False, code)
    if code in ("RATE_LIMITED", "SERVICE_UNAVAILABLE"):
        assert response.headers["retry-after"] == "2" and response.json()["error"]["retryAfterSeconds"] == 2


def test_the_error_faults_spare_what_is_not_an_emit(api: httpx.Client) -> None:
    anchor = emit(api)["anchorId"]
    faults(api, cadence_limit=1, insufficient_credits=1, contract_not_deployed=1)
    assert api.get(f"/api/v1/balance/delta/{anchor}").status_code == 200


def test_fault_slow(api: httpx.Client) -> None:
    anchor = emit(api)["anchorId"]
    faults(api, slow=1, slow_seconds=0.6)
    started = time.monotonic()
    assert api.get(f"/api/v1/balance/delta/{anchor}").status_code == 200
    assert time.monotonic() - started >= 0.6


def test_a_fraction_is_a_fraction(api: httpx.Client) -> None:
    faults(api, rate_limit=0.5)
    statuses = [api.get("/api/v1/balance/webhooks").status_code for _ in range(200)]
    assert 60 < statuses.count(429) < 140 and statuses.count(200) == 200 - statuses.count(429)


# -- the other endpoints -------------------------------------------------------------


def test_gaps_show_a_failed_sequence_number(api: httpx.Client) -> None:
    customer = f"cust_gap_{time.time_ns()}"
    emit(api, customer=customer)
    flush(api)
    faults(api, fail_deltas=1)
    emit(api, customer=customer)
    flush(api)
    faults(api, fail_deltas=0)
    emit(api, customer=customer)
    flush(api)
    data = parse(api.get(f"/api/v1/balance/gaps/{customer}"))["data"]
    assert data["latestSequence"] == 3 and data["gaps"] == [{"fromSequence": 2, "toSequence": 2, "missing": 1}]
    assert parse(api.get(f"/api/v1/balance/gaps/{customer}", params={"toSequence": 1}))["data"]["gaps"] == []
    assert api.get(f"/api/v1/balance/gaps/{customer}", params={"limit": "x"}).status_code == 400


def test_verify_a_receipt_without_an_api_key(api: httpx.Client, sandbox: SandboxProcess) -> None:
    emitted = emit(api)
    flush(api)
    data = httpx.get(f"{sandbox.url}/api/v1/verify/{emitted['receiptId']}", params={"source": "both"}).json()["data"]
    assert data["verified"] is True and data["db"]["itemCount"] == 1 and data["chain"]["txHash"].startswith("0x")
    assert httpx.get(f"{sandbox.url}/api/v1/verify/0xunknown").status_code == 404
    assert httpx.get(f"{sandbox.url}/api/v1/verify/{emitted['receiptId']}", params={"source": "x"}).status_code == 400


def test_webhook_listing_validates_its_parameters(api: httpx.Client) -> None:
    assert api.get("/api/v1/balance/webhooks", params={"status": "weird"}).status_code == 400
    assert api.get("/api/v1/balance/webhooks", params={"limit": "0"}).status_code == 400
    page = parse(api.get("/api/v1/balance/webhooks", params={"limit": "2", "offset": "1"}))["data"]
    assert page["limit"] == 2 and page["offset"] == 1 and len(page["deliveries"]) <= 2


def test_unknown_faults_and_settings_are_refused(api: httpx.Client) -> None:
    response = api.patch("/_sandbox/faults", json={"drop_everything": 1})
    assert response.status_code == 400 and "unknown fault" in response.json()["error"]["message"]
    assert api.patch("/_sandbox/faults", json={"drop_webhooks": 1.5}).status_code == 400
    assert api.patch("/_sandbox/config", json={"vocabulary": "klingon"}).status_code == 400
    assert api.get("/_sandbox/config").json()["data"]["webhook_secrets"] == 1  # a count, never the secret


# -- processes of their own -------------------------------------------------------------


def _run_script(tmp_path: Path) -> list[str]:
    sandbox = SandboxProcess(tmp_path, "--seed", "42", "--verify-delay", "600").start()
    try:
        with sandbox.api() as api:
            single = emit(api)
            batch = parse(api.post("/api/v1/balance/delta/batch", json={"deltas": [{"customerId": "x", "delta": 1, "reason": "r"}] * 3}))
            return [single["anchorId"], single["receiptId"], batch["data"]["results"][2]["itemHash"]]
    finally:
        sandbox.stop()


def test_a_seed_makes_ids_and_hashes_repeatable(tmp_path: Path) -> None:
    assert _run_script(tmp_path) == _run_script(tmp_path)


def test_faults_from_the_command_line(tmp_path: Path) -> None:
    sandbox = SandboxProcess(tmp_path, "--faults", "insufficient_credits=1").start()
    try:
        with sandbox.api() as api:
            assert api.post("/api/v1/balance/delta", json={"customerId": "c", "delta": 1, "reason": "r"}).status_code == 402
            assert api.get("/_sandbox/faults").json()["data"]["insufficient_credits"] == 1
    finally:
        assert sandbox.stop() == 0


def test_bad_command_line_options_are_refused(tmp_path: Path) -> None:
    from tests.daemon import clean_environment, pacrecon

    for options in (["--faults", "nope=1"], ["--faults", "slow=2"], ["--webhook-secret", "a", "--webhook-secret", "b", "--webhook-secret", "c"]):
        result = pacrecon(["sandbox", *options], clean_environment(), tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
