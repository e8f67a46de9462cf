"""The pass against answers the sandbox never gives (from an httpx.MockTransport), on a real ledger."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from reconciler.apply import record_event
from reconciler.events import parse_event
from reconciler.outbox import Outbox, parse_request
from reconciler.pacspace import PacSpaceClient, RetryPolicy
from reconciler.proofs import keccak256, merkle_root
from reconciler.reconcile import PassSummary, Reconciler
from storage.models import LocalDelta, WebhookEvent
from storage.sql_ledger import SqlLedger

NOW = datetime.now(UTC)


def H(label: str) -> str:
    return "0x" + keccak256(label.encode()).hex()


def run(ledger: SqlLedger, answer: Callable[[httpx.Request], httpx.Response], **options: Any) -> PassSummary:
    async def go() -> PassSummary:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            client = PacSpaceClient(http, "http://pacspace.test", "k", RetryPolicy(attempts=1), sleep=lambda _: asyncio.sleep(0))
            reconciler = Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=options.pop("stuck", 3600), **options)
            return await reconciler.run_pass()

    return asyncio.run(go())


def delta(n: int, anchor: str, **fields: Any) -> LocalDelta:
    values: dict[str, Any] = dict(
        anchor_id=anchor, item_hash=H(f"item{n}"), customer_id="cust", amount=__import__("decimal").Decimal(n), reason="r",
        idempotency_key=f"k{n}", source="import", status="QUEUED", receipt_id=H(f"item{n}"), items_root=H(f"item{n}"),
        item_hashes=[H(f"item{n}")], created_at=NOW, updated_at=NOW, emitted_at=NOW - timedelta(seconds=5),
    )
    values.update(fields)
    return LocalDelta(**values)


def add(ledger: SqlLedger, *rows: LocalDelta) -> list[int]:
    return ledger.transact_sync(lambda s: [s.add_delta(r).id for r in rows])


def ok(data: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json={"success": True, "data": data})


def state(ledger: SqlLedger, ids: list[int]) -> list[str]:
    return ledger.read_sync(lambda s: [s.get_delta(i).status for i in ids])  # type: ignore[union-attr]


def kinds(ledger: SqlLedger) -> list[str]:
    return sorted(d.kind for d in ledger.read_sync(lambda s: s.open_discrepancies()))


@pytest.mark.parametrize(
    "data",
    [
        {"status": "ANCHORED"},  # no hashes at all
        {"status": "ANCHORED", "deltaCount": 1, "deltas": [{"customerId": "someone", "delta": 9, "itemHash": H("other"), "status": "ANCHORED"}]},
    ],
)
def test_a_verification_that_does_not_name_our_item_is_never_taken(ledger: SqlLedger, data: dict[str, Any]) -> None:
    ids = add(ledger, delta(1, "a_1"))
    summary = run(ledger, lambda _: ok({"anchorId": "a_1", **data}))
    assert state(ledger, ids) == ["QUEUED"] and summary.fixed == 0
    assert kinds(ledger) in (["unverifiable"], ["item_hash_mismatch"])


def test_a_batch_entry_found_by_index_speaks_for_our_item(ledger: SqlLedger) -> None:
    ids = add(ledger, delta(1, "a_b", submission_index=0), delta(2, "a_b", submission_index=1, idempotency_key="k2b"))
    root = merkle_root([H("item1"), H("item2")])
    data = {"anchorId": "a_b", "status": "ANCHORED", "receiptId": root, "deltas": [
        {"index": 0, "status": "ANCHORED", "itemHash": H("item1"), "customerId": "cust", "delta": 1},
        {"index": 1, "status": "FAILED", "itemHash": H("item2"), "customerId": "cust", "delta": 2, "error": "no"},
    ]}
    ledger.transact_sync(lambda s: [setattr(s.get_delta(i), "receipt_id", root) for i in ids])
    run(ledger, lambda _: ok(data))
    assert state(ledger, ids) == ["VERIFIED", "FAILED"]


def test_one_malformed_answer_skips_that_delta_not_the_pass(ledger: SqlLedger) -> None:
    ids = add(ledger, delta(1, "a_bad"), delta(2, "a_good", idempotency_key="k2g"))

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("a_bad"):
            return ok({"anchorId": "a_bad", "status": "ANCHORED", "deltas": [{"itemHash": 12345, "status": "ANCHORED"}]})
        return ok({"anchorId": "a_good", "status": "ANCHORED", "receiptId": H("item2"), "itemHashes": [H("item2")], "customerId": "cust", "delta": 2})

    summary = run(ledger, answer)
    assert summary.status == "completed" and state(ledger, ids)[1] == "VERIFIED"
    run_row = ledger.read_sync(lambda s: s.get_run(summary.run_id or 0))
    assert run_row is not None and run_row.status == "completed"


def test_a_cancelled_pass_does_not_leave_its_run_running(ledger: SqlLedger) -> None:
    add(ledger, delta(1, "a_slow"))

    async def go() -> int | None:
        async def slow(_: httpx.Request) -> httpx.Response:
            await asyncio.sleep(30)
            return ok({})

        async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as http:
            client = PacSpaceClient(http, "http://pacspace.test", "k", RetryPolicy(attempts=1))
            reconciler = Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=3600)
            task = asyncio.create_task(reconciler.run_pass())
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return None

    asyncio.run(go())
    runs = ledger.read_sync(lambda s: [(r.status, r.error_detail) for r in s._session.query(__import__("storage.models", fromlist=["x"]).ReconciliationRun)])
    assert runs == [("failed", "interrupted")]


def test_resending_a_forgotten_anchor_never_moves_a_settled_sibling(ledger: SqlLedger) -> None:
    calls = {"n": 0}

    def emit_answer(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return ok({"totalQueued": 2, "results": [
            {"index": 0, "anchorId": "a_A", "itemHash": H("item1"), "receiptId": H("item1"), "status": "QUEUED", "customerId": "cust", "delta": 1},
            {"index": 1, "anchorId": "a_B", "itemHash": H("item2"), "receiptId": H("item2"), "status": "QUEUED", "customerId": "cust", "delta": 2},
        ]})

    async def emit() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(emit_answer)) as http:
            client = PacSpaceClient(http, "http://pacspace.test", "k", RetryPolicy(attempts=1))
            body = json.dumps({"deltas": [{"customerId": "cust", "delta": 1, "reason": "r"}, {"customerId": "cust", "delta": 2, "reason": "r"}]})
            await Outbox(ledger, client).submit(parse_request(body.encode(), "batch"))

    asyncio.run(emit())
    ids = ledger.read_sync(lambda s: [d.id for d in s.list_deltas(customer_id="cust", status=None, after_id=None, limit=10)])

    def lookups(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("a_A"):
            return ok({"anchorId": "a_A", "status": "ANCHORED", "receiptId": H("item1"), "itemHashes": [H("item1")], "customerId": "cust", "delta": 1})
        return httpx.Response(404, json={"success": False, "error": {"code": "NOT_FOUND", "message": "gone"}})

    run(ledger, lookups)
    assert state(ledger, ids) == ["VERIFIED", "QUEUED"]  # not sent again: half of it is settled
    assert kinds(ledger) == ["not_found_upstream"]
    submission = ledger.read_sync(lambda s: s.get_submission(s.get_delta(ids[0]).submission_id).status)  # type: ignore[union-attr]
    assert submission == "SENT"


def test_every_old_orphan_is_reported_once(ledger: SqlLedger) -> None:
    rows = [dict(event_id=f"evt_{n:05d}", event_type="delta.verified", raw_body=b"{}", signature_timestamp=0,
                 received_at=NOW - timedelta(hours=1), outcome="orphan", anchor_id=f"a_x{n}") for n in range(1005)]
    ledger.transact_sync(lambda s: s._session.execute(WebhookEvent.__table__.insert(), rows))
    first = run(ledger, lambda _: ok({}))
    second = run(ledger, lambda _: ok({}))
    assert first.found == {"orphan_webhook": 1005} and second.found == {}
    assert len(kinds(ledger)) == 1005


def test_a_matched_orphan_and_a_settled_stuck_delta_clear_their_discrepancies(ledger: SqlLedger) -> None:
    ids = add(ledger, delta(1, "a_s"))
    run(ledger, lambda _: ok({"anchorId": "a_s", "status": "QUEUED"}), stuck=0)
    assert kinds(ledger) == ["stuck"]
    verified = {"anchorId": "a_s", "status": "ANCHORED", "receiptId": H("item1"), "itemHashes": [H("item1")], "customerId": "cust", "delta": 1}
    run(ledger, lambda _: ok(verified))
    assert state(ledger, ids) == ["VERIFIED"] and kinds(ledger) == []
    raw = json.dumps({"id": "evt_early", "event": "delta.verified", "data": {"recordId": "a_later"}}).encode()
    ledger.transact_sync(lambda s: record_event(s, parse_event(raw), raw_body=raw, signature_timestamp=0, now=NOW - timedelta(hours=1)))
    run(ledger, lambda _: ok({}))
    assert kinds(ledger) == ["orphan_webhook"]
    from reconciler.apply import register_deltas

    ledger.transact_sync(lambda s: register_deltas(s, [delta(9, "a_later", idempotency_key="k9")], NOW))
    assert kinds(ledger) == []



def test_an_orphan_recorded_while_its_delta_was_registered_settles_it_in_the_next_pass(ledger: SqlLedger) -> None:
    # the race: the webhook is kept as an orphan, and the delta is added by a transaction
    # that did not see it (add_delta alone: register_deltas would have matched the orphan)
    data = {"recordId": "a_race", "receiptId": H("item7"), "itemsRoot": H("item7"), "itemHashes": [H("item7")],
            "itemHash": H("item7"), "customerId": "cust", "delta": 7, "sequenceNumber": "1"}
    raw = json.dumps({"id": "evt_race", "event": "delta.verified", "data": data}).encode()
    recorded = ledger.transact_sync(lambda s: record_event(s, parse_event(raw), raw_body=raw, signature_timestamp=0, now=NOW))
    assert recorded.outcome is not None and recorded.outcome.value == "orphan"
    ids = add(ledger, delta(7, "a_race"))
    asked: list[str] = []
    summary = run(ledger, lambda request: asked.append(request.url.path) or ok({}))
    assert state(ledger, ids) == ["VERIFIED"] and kinds(ledger) == []
    assert ledger.read_sync(lambda s: s.get_delta(ids[0]).verified_by) == "webhook"  # type: ignore[union-attr]
    # settled by the webhook's own evidence before the lookups: PacSpace was not asked about it
    assert summary.fixed == 1 and summary.looked_up == 0 and "/api/v1/balance/delta/a_race" not in asked
    outcome = ledger.read_sync(lambda s: s._session.scalars(select(WebhookEvent.outcome).where(WebhookEvent.event_id == "evt_race")).one())
    assert outcome == "applied"


def test_lookups_that_all_fail_stop_the_pass(ledger: SqlLedger) -> None:
    add(ledger, delta(1, "a_k"))
    summary = run(ledger, lambda _: httpx.Response(401, json={"success": False, "error": {"code": "INVALID_API_KEY", "message": "no"}}))
    assert summary.status == "failed" and "INVALID_API_KEY" in (summary.error_detail or "")


def test_a_status_answer_with_an_over_long_sequence_number_verifies_without_it(ledger: SqlLedger) -> None:
    """The column holds 64 characters: a longer claimed sequence number is dropped, as a
    webhook's is, instead of being cut short or refused by PostgreSQL with the whole update."""
    from reconciler.apply import apply_claim
    from reconciler.reconcile import claim_from_status
    from storage.vocabulary import VerifiedBy
    from tests.test_apply import H, local, register

    (delta_id,) = register(ledger, local(1, sequence_number=None))
    answer = {"status": "VERIFIED", "anchorId": "a_1", "receiptId": H("item1"), "itemHashes": [H("item1")],
              "deltas": [{"itemHash": H("item1"), "status": "VERIFIED", "customerId": "cust_1", "delta": "-42.50", "sequenceNumber": "7" * 100}]}

    def verify(session: Any) -> list[Any]:
        delta = session.get_delta(delta_id)
        claim = claim_from_status(answer, delta)
        assert claim is not None and claim.sequence_number is None
        return apply_claim(session, delta, claim, datetime(2026, 11, 27, 13, tzinfo=UTC), event_id=None, by=VerifiedBy.RECONCILER)

    assert ledger.transact_sync(verify) == []
    stored = ledger.read_sync(lambda s: s.get_delta(delta_id))
    assert stored is not None and stored.status == "VERIFIED" and stored.sequence_number is None
    exact = {**answer, "deltas": [{**answer["deltas"][0], "sequenceNumber": "7" * 64}]}
    assert claim_from_status(exact, stored).sequence_number == "7" * 64  # type: ignore[union-attr]


@pytest.mark.parametrize(("previous", "settled"), [(H("item1"), True), (H("elsewhere"), False)])
def test_a_status_answer_that_names_the_previous_proof_is_checked_against_the_chain(
    ledger: SqlLedger, previous: str, settled: bool
) -> None:
    """PacSpace's documented status answer carries no proof link; one that does (at the top
    or in a `proof` object, as webhooks do) is held to it like a webhook."""
    add(ledger, delta(1, "a_first", status="VERIFIED", sequence_number="1"))
    [second] = add(ledger, delta(2, "a_second"))
    answer = {"anchorId": "a_second", "status": "VERIFIED", "receiptId": H("item2"), "itemHashes": [H("item2")],
              "customerId": "cust", "delta": 2, "sequenceNumber": "2", "proof": {"previousProofHash": previous}}
    run(ledger, lambda request: ok(answer) if request.url.path.endswith("/a_second") else ok({}))
    assert state(ledger, [second]) == (["VERIFIED"] if settled else ["QUEUED"])
    assert kinds(ledger) == ([] if settled else ["chain_broken"])


def test_a_pass_waits_while_the_daemons_webhooks_are_busy_and_always_moves_on(ledger: SqlLedger) -> None:
    """Webhooks first: each lookup and each page write waits while `foreground_busy` says so,
    a step at a time and at most MAX_STEPS steps at once, and for at most `yield_share` of
    the pass's time; then the pass goes on regardless."""
    from reconciler.give_way import MAX_STEPS, STEP_SECONDS

    ids = add(ledger, delta(1, "a_y1"), delta(2, "a_y2", idempotency_key="k2y"))
    slept: list[float] = []
    clock = [0.0]  # the pass's monotonic clock: each lookup takes 0.1 s of it, each wait its steps
    busy_answers = iter([True] * 3)  # busy for three checks, then quiet

    def answer(request: httpx.Request) -> httpx.Response:
        clock[0] += 0.1
        anchor = request.url.path.rsplit("/", 1)[-1]
        if anchor.startswith("a_y"):
            n = anchor[-1]
            return ok({"anchorId": anchor, "status": "ANCHORED", "receiptId": H(f"item{n}"), "itemHashes": [H(f"item{n}")],
                       "customerId": "cust", "delta": int(n)})
        return ok({"deliveries": []})

    async def go(busy: Callable[[], bool], share: float = 1.0) -> PassSummary:
        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            clock[0] += seconds

        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            client = PacSpaceClient(http, "http://pacspace.test", "k", RetryPolicy(attempts=1), sleep=lambda _: asyncio.sleep(0))
            reconciler = Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=3600, concurrency=1,
                                    sleep=sleep, foreground_busy=busy, yield_share=share, monotonic=lambda: clock[0])
            return await reconciler.run_pass()

    # the first check comes before any lookup: a pass that has done nothing has earned no wait
    summary = asyncio.run(go(lambda: next(busy_answers, False)))
    assert (summary.status, summary.fixed) == ("completed", 2) and state(ledger, ids) == ["VERIFIED", "VERIFIED"]
    assert slept == [STEP_SECONDS] * 2 and summary.yielded_seconds == pytest.approx(2 * STEP_SECONDS)

    # busy for good, the whole pass's time allowed: every wait stops at the cap, and the pass still completes
    ids = add(ledger, delta(3, "a_y3", idempotency_key="k3y"))
    slept.clear()
    summary = asyncio.run(go(lambda: True))
    assert (summary.status, summary.fixed) == ("completed", 1) and state(ledger, ids) == ["VERIFIED"]
    # the lookup came first and had earned no wait; the page write waited to the cap (no redelivery to ask for)
    assert slept == [STEP_SECONDS] * MAX_STEPS

    # busy for good, a quarter of the pass's time: the waits stop there
    ids = add(ledger, *(delta(n, f"a_y{n}") for n in range(4, 10)))
    slept.clear()
    started = clock[0]
    summary = asyncio.run(go(lambda: True, share=0.25))
    assert (summary.status, summary.fixed) == ("completed", 6) and state(ledger, ids) == ["VERIFIED"] * 6
    assert 0 < summary.yielded_seconds == pytest.approx(sum(slept))
    assert summary.yielded_seconds <= 0.25 * (clock[0] - started) + STEP_SECONDS
