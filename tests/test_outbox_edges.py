"""The outbox and the client against odd upstream answers, races and hostile input.

Answers the sandbox never gives (a proxy's HTML page, a batch answer missing items,
an absurd Retry-After) come from an httpx.MockTransport; the ledger is real.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from pacrecon.settings import load_settings
from reconciler.errors import PacSpaceError
from reconciler.imports import import_records
from reconciler.outbox import InvalidRequest, Outbox, OutboxAnswer, parse_request
from reconciler.pacspace import PacSpaceClient, RetryPolicy
from storage import jsonio
from storage.sql_ledger import SqlLedger

FAST = RetryPolicy(attempts=2, base_seconds=0.01)


def client_answering(answer: Callable[[httpx.Request], httpx.Response]) -> tuple[httpx.AsyncClient, PacSpaceClient]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    return http, PacSpaceClient(http, "http://pacspace.test", "sk_test", FAST, sleep=lambda _: asyncio.sleep(0))


def single(customer: str = "cust_1", key: str | None = None) -> Any:
    return parse_request(json.dumps({"customerId": customer, "delta": 1, "reason": "r"}).encode(), "single", key)


def submit(ledger: SqlLedger, answer: Callable[[httpx.Request], httpx.Response], request: Any = None) -> OutboxAnswer:
    async def run() -> OutboxAnswer:
        http, client = client_answering(answer)
        async with http:
            return await Outbox(ledger, client, resend_base_seconds=0.01).submit(request or single())

    return asyncio.run(run())


def delta_status(ledger: SqlLedger) -> list[str]:
    return ledger.read_sync(lambda s: [d.status for d in s.list_deltas(customer_id=None, status=None, after_id=None, limit=100)])


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(401, json={"success": False, "error": {"code": "INVALID_API_KEY", "message": "bad key"}}),
        httpx.Response(404, text="<html>not here</html>"),
        httpx.Response(400, text="<html>bad request (a proxy)</html>"),
        httpx.Response(200, json={"success": False, "error": {"code": "WEIRD"}}),
        httpx.Response(200, text="not json"),
    ],
)
def test_what_is_not_pacspaces_final_word_stays_pending(ledger: SqlLedger, response: httpx.Response) -> None:
    answer = submit(ledger, lambda _: response)
    assert answer.status == 202 and delta_status(ledger) == ["PENDING"]


@pytest.mark.parametrize(("status", "code"), [(400, "VALIDATION_ERROR"), (402, "INSUFFICIENT_CREDITS"), (412, "CONTRACT_NOT_DEPLOYED")])
def test_pacspaces_final_refusals_reject(ledger: SqlLedger, status: int, code: str) -> None:
    answer = submit(ledger, lambda _: httpx.Response(status, json={"success": False, "error": {"code": code, "message": "no"}}))
    assert answer.status == status and delta_status(ledger) == ["REJECTED"]


@pytest.mark.parametrize(("header", "expected"), [("1e12", 3600.0), ("inf", None), ("nan", None), ("-5", 0.0), ("2", 2.0)])
def test_retry_after_is_bounded(header: str, expected: float | None) -> None:
    async def run() -> PacSpaceError:
        http, client = client_answering(lambda _: httpx.Response(503, headers={"Retry-After": header}))
        async with http:
            with pytest.raises(PacSpaceError) as caught:
                await client.delta_status("a_1")
            return caught.value

    assert asyncio.run(run()).retry_after == expected


def test_an_absurd_retry_after_leaves_a_pending_delta_not_a_500(ledger: SqlLedger) -> None:
    answer = submit(ledger, lambda _: httpx.Response(503, headers={"Retry-After": "1e12"}, json={"success": False, "error": {"code": "SERVICE_UNAVAILABLE"}}))
    assert answer.status == 202 and delta_status(ledger) == ["PENDING"]


def _batch_answer(results: Any, **extra: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _: httpx.Response(200, json={"success": True, "data": {"results": results, **extra}})


@pytest.mark.parametrize(
    "answer",
    [
        _batch_answer(None, totalQueued=None),
        _batch_answer([{"anchorId": "a_1", "itemHash": "0x1", "status": "QUEUED"}, {"anchorId": "a_1", "itemHash": "0x2", "status": "QUEUED"}]),  # no index
        _batch_answer([{"index": 0, "anchorId": "a_1", "itemHash": "0x1", "receiptId": "0xr", "status": "QUEUED"}]),  # item 1 missing
    ],
)
def test_a_batch_answer_that_does_not_account_for_every_item_is_not_trusted(ledger: SqlLedger, answer: Any) -> None:
    request = parse_request(json.dumps({"deltas": [{"customerId": "c", "delta": 1, "reason": "r"}] * 2}).encode(), "batch")
    result = submit(ledger, answer, request)
    assert result.status == 202 and b"INVALID_RESPONSE" in result.body
    assert delta_status(ledger) == ["PENDING", "PENDING"]


def test_one_bad_submission_does_not_hold_back_the_others(ledger: SqlLedger) -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        customer = json.loads(request.content)["customerId"]
        calls.append(customer)
        if customer == "cust_first":
            raise RuntimeError("something unexpected while sending")
        return httpx.Response(200, json={"success": True, "data": {"anchorId": f"a_{customer}", "itemHashes": [f"0x{customer}"], "receiptId": "0xr"}})

    async def run() -> int:
        http, client = client_answering(answer)
        async with http:
            outbox = Outbox(ledger, client, lease_seconds=0.01, resend_base_seconds=0.01)
            past = datetime.now(UTC) - timedelta(seconds=5)
            for customer in ("cust_first", "cust_second", "cust_third"):
                await ledger.transact(lambda s, c=customer: _pending(s, c, past))
            return await outbox.resend_due()

    assert asyncio.run(run()) == 3
    assert sorted(calls) == ["cust_first", "cust_second", "cust_third"]
    assert sorted(delta_status(ledger)) == ["PENDING", "QUEUED", "QUEUED"]


def _pending(session: Any, customer: str, due: datetime) -> None:
    from reconciler.outbox import _commit

    _commit(session, request=single(customer), now=due, lease_until=due)


@pytest.mark.postgres
def test_two_replicas_racing_on_one_caller_key(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("two processes' worth of writers need PostgreSQL")
    ledgers = [SqlLedger.from_url(database_url) for _ in range(2)]
    ok = lambda _: httpx.Response(200, json={"success": True, "data": {"anchorId": "a_race", "itemHashes": ["0xrace"], "receiptId": "0xr"}})

    async def run() -> list[OutboxAnswer]:
        http, client = client_answering(ok)
        async with http:
            outboxes = [Outbox(ledger, client) for ledger in ledgers]
            return await asyncio.gather(*(o.submit(single("cust_race", "key-race")) for o in outboxes))

    try:
        answers = asyncio.run(run())
        assert sorted(a.status for a in answers) in ([200, 200], [200, 202])
        assert len(delta_status(ledgers[0])) == 1
    finally:
        for ledger in ledgers:
            ledger.close()


@pytest.mark.parametrize(
    ("field", "value"),
    [("reason", "a\u0000b"), ("referenceId", "r\u0000"), ("metadata", {"k": "\ud800"}), ("reason", "\udfff")],
)
def test_text_no_database_can_store_is_refused_up_front(field: str, value: Any) -> None:
    body = {"customerId": "c", "delta": 1, "reason": "r", field: value}
    with pytest.raises(InvalidRequest) as caught:
        parse_request(json.dumps(body).encode(), "single")
    assert caught.value.errors[0].field == field


def test_import_reports_what_it_cannot_store_and_keeps_the_rest(ledger: SqlLedger) -> None:
    good = {"anchorId": "a_ok", "customerId": "c", "delta": 1, "itemHashes": ["0x1"], "receiptId": "0x1"}
    records = [
        good,
        {**good, "anchorId": "a_ref", "itemHashes": ["0x2"], "referenceId": "r" * 300},
        {**good, "anchorId": "a_hash", "itemHash": "0x" + "f" * 300},
        {**good, "anchorId": "a_nul", "itemHashes": ["0x3"], "reason": "x\u0000"},
        {**good, "anchorId": "a_meta", "itemHashes": ["0x4"], "metadata": {"k": "\ud800"}},
    ]
    now = datetime.now(UTC)
    report = ledger.transact_sync(lambda s: import_records(s, records, now))
    assert len(report.imported) == 1 and [n for n, _ in report.invalid] == [2, 3, 4, 5]


def test_nan_is_not_json() -> None:
    for text in ('{"x": NaN}', "[Infinity]", "-Infinity"):
        with pytest.raises(ValueError):
            jsonio.loads(text)


def test_an_empty_token_disables_instead_of_matching_an_empty_bearer() -> None:
    settings = load_settings(api_token="", admin_token="  ", pacspace_api_key="", _env_file=None)
    assert (settings.api_token, settings.admin_token, settings.pacspace_api_key) == (None, None, None)
