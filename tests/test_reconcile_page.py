"""A page reconciled all together leaves exactly the rows the delta-by-delta path leaves,
on real SQLite and PostgreSQL, for a page that mixes every case the pass meets."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text

import reconciler.reconcile as reconcile
from reconciler.errors import PacSpaceError
from reconciler.pacspace import StatusAnswer, status_from
from reconciler.proofs import keccak256, merkle_root
from storage.errors import StorageUnavailable
from storage.models import Discrepancy, LocalDelta, OutboxSubmission
from storage.session import LedgerSession
from storage.sql_ledger import SqlLedger

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(hours=2)  # emitted before the stuck cutoff
STUCK_CUTOFF = NOW - timedelta(hours=1)
RUN_ID = None


def H(label: str) -> str:
    return "0x" + keccak256(label.encode()).hex()


def delta(name: str, status: str = "QUEUED", **fields: Any) -> LocalDelta:
    values: dict[str, Any] = dict(
        anchor_id=f"a_{name}", item_hash=H(name), customer_id="cust", amount=Decimal("-42.50"), reason="usage",
        idempotency_key=f"k_{name}", source="import", status=status, receipt_id=H(name), items_root=H(name),
        item_hashes=[H(name)], created_at=OLD, updated_at=OLD, emitted_at=OLD,
    )
    values.update(fields)
    return LocalDelta(**values)


def verified(name: str, **data: Any) -> dict[str, Any]:
    """PacSpace's answer verifying the single-item anchor of `name`, proofs and all."""
    answer = {"anchorId": f"a_{name}", "status": "ANCHORED", "receiptId": H(name), "itemHashes": [H(name)],
              "customerId": "cust", "delta": "-42.50", "txHash": f"0xtx_{name}"}
    answer.update(data)
    return {k: v for k, v in answer.items() if v is not None}


class Unforeseen(dict):  # type: ignore[type-arg]
    """An answer whose reading raises, as one we did not foresee would."""

    def get(self, *args: Any) -> Any:
        raise RuntimeError("an answer we did not foresee")


def seed(ledger: SqlLedger) -> tuple[list[int], dict[str, Any]]:
    """The page's deltas (ids in page order), their settled neighbours, open findings
    from earlier passes, and PacSpace's answers by anchor."""

    def work(s: LedgerSession) -> tuple[list[int], dict[str, Any]]:
        submissions = {
            name: s.add_submission(OutboxSubmission(
                kind="single", idempotency_key=f"idem_{name}", fingerprint="f" * 64, request_body=b"{}", status="SENT",
                attempts=1, next_attempt_at=OLD, created_at=OLD, sent_at=OLD)).id
            for name in ("resend", "resent")
        }
        # settled history: customer "chain"'s sequence 10; "cust"'s 4, whose link names a proof no one has
        s.add_delta(delta("h10", "VERIFIED", customer_id="chain", sequence_number="10"))
        s.add_delta(delta("h4", "VERIFIED", sequence_number="4", previous_proof_hash=H("nobody")))
        s.add_delta(delta("settled", "VERIFIED"))
        page = [
            delta("ok"),
            delta("chain11", customer_id="chain"),
            delta("chain13", customer_id="chain", previous_proof_hash=H("nobody")),
            delta("chain12", customer_id="chain"),
            delta("failed", "PROCESSING"),
            delta("stuck"),
            delta("resend", source="outbox", submission_id=submissions["resend"], submission_index=0),
            delta("resent", source="outbox", submission_id=submissions["resent"], submission_index=0),
            delta("forgotten"),
            delta("receipt"),
            delta("itemhash", receipt_id=None, items_root=None),
            delta("amount"),
            delta("word"),
            delta("noproof"),
            delta("batch1", anchor_id="a_batch", submission_index=0),
            delta("batch2", anchor_id="a_batch", submission_index=1),
            delta("unasked"),
            delta("throttled"),
            delta("unforeseen"),
        ]
        ids = {d.item_hash: s.add_delta(d).id for d in page}
        settled = s.deltas_by_item_hash(H("settled"))[0].id
        finding = {"detected_by": "reconciler", "evidence": {"detail": "an earlier pass"}}
        s.open_discrepancy(Discrepancy(kind="stuck", subject=f"delta:{ids[H('ok')]}", delta_id=ids[H("ok")], **finding), OLD)
        s.open_discrepancy(Discrepancy(kind="not_found_upstream", subject=f"delta:{ids[H('resent')]}", delta_id=ids[H("resent")], **finding), OLD)
        batch_root = merkle_root([H("batch1"), H("batch2")])
        for name in ("batch1", "batch2"):
            s.get_delta(ids[H(name)]).receipt_id = batch_root  # type: ignore[union-attr]
        raw = {
            "a_ok": verified("ok", sequenceNumber="3"),
            "a_chain11": verified("chain11", customerId="chain", sequenceNumber="11"),
            "a_chain13": verified("chain13", customerId="chain", sequenceNumber="13"),
            # its next link is chain13, which takes sequence 13 earlier in this very page and names another proof
            "a_chain12": verified("chain12", customerId="chain", sequenceNumber="12"),
            "a_failed": {"anchorId": "a_failed", "status": "FAILED", "error": "INSUFFICIENT_FUNDS"},
            "a_stuck": {"anchorId": "a_stuck", "status": "ANCHORING"},
            "a_receipt": verified("receipt", receiptId=H("another root")),
            "a_itemhash": verified("itemhash", itemHashes=[H("someone else")], receiptId=H("someone else")),
            "a_amount": verified("amount", delta="-42.51"),
            "a_word": {"anchorId": "a_word", "status": "SETTLING"},
            "a_noproof": {"anchorId": "a_noproof", "status": "ANCHORED"},
            "a_batch": {"anchorId": "a_batch", "status": "ANCHORED", "receiptId": batch_root, "deltas": [
                {"index": 0, "status": "ANCHORED", "itemHash": H("batch1"), "customerId": "cust", "delta": "-42.50"},
                {"index": 1, "status": "FAILED", "itemHash": H("batch2"), "customerId": "cust", "delta": "-42.50", "error": "no"},
            ]},
            "a_settled": verified("settled"),
            "a_unforeseen": Unforeseen(),
        }
        answers: dict[str, Any] = {anchor: StatusAnswer(anchor, status_from(data.get("status")) if type(data) is dict else None,
                                                        "?", data) for anchor, data in raw.items()}
        for name in ("resend", "resent", "forgotten"):
            answers[f"a_{name}"] = PacSpaceError(404, "NOT_FOUND", "no such anchor", retryable=False)
        answers["a_throttled"] = PacSpaceError(503, "UNAVAILABLE", "later", retryable=True)
        return [settled, *ids.values()], answers

    return ledger.transact_sync(work)


def rows(s: LedgerSession) -> dict[str, Any]:
    """Every row the page may change, without the ids a database hands out (PostgreSQL's
    sequences do not roll back); an audit entry names its discrepancy by kind, subject, status."""

    def table(name: str) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in s._session.execute(text(f"SELECT * FROM {name} ORDER BY id"))]

    discrepancies = {d.pop("id"): d for d in table("discrepancy")}
    audit = []
    for entry in table("audit_entry"):
        entry.pop("id")
        found = discrepancies.get(entry.pop("discrepancy_id"))
        entry["discrepancy"] = (found["kind"], found["subject"], found["status"]) if found else None
        audit.append(entry)
    by_key = lambda row: repr(sorted(row.items()))  # noqa: E731
    return {
        "deltas": table("local_delta"),
        "submissions": table("outbox_submission"),
        "discrepancies": sorted(discrepancies.values(), key=by_key),
        "audit": sorted(audit, key=by_key),
    }


def reconciled(ledger: SqlLedger, page: Callable[..., reconcile.PageResult], delta_ids: list[int], answers: dict[str, Any]) -> tuple[Any, ...]:
    """What `page` leaves, in a transaction rolled back afterwards (as a dry run's)."""

    def work(s: LedgerSession) -> tuple[Any, ...]:
        before = s.count_open_discrepancies()
        result = page(s, delta_ids=delta_ids, answers=answers, now=NOW, stuck_cutoff=STUCK_CUTOFF, run_id=RUN_ID)
        opened = s.count_open_discrepancies() - before
        return (result.fixed, dict(result.found), result.errors, opened), rows(s)

    return ledger.read_sync(work)


def one_by_one(s: LedgerSession, **page: Any) -> reconcile.PageResult:
    return reconcile._reconcile_one_by_one(s, **page)


def test_a_page_together_leaves_the_rows_one_by_one_leaves(ledger: SqlLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    delta_ids, answers = seed(ledger)
    del answers["a_unforeseen"]
    expected = reconciled(ledger, one_by_one, delta_ids, answers)
    redone: list[int] = []
    monkeypatch.setattr(reconcile, "_reconcile_one_by_one", lambda s, delta_ids, **kw: redone.append(1) or one_by_one(s, delta_ids=delta_ids, **kw))

    together = reconciled(ledger, reconcile._apply_page, delta_ids, answers)

    assert redone == []  # the page was done together, not redone
    assert together == expected
    (fixed, found, errors, opened), _ = together
    # every case was met: verified (ok, chain11, chain13, chain12, batch1), failed (failed, batch2), resent, each finding
    assert (fixed, errors) == (8, 0), found
    assert found == {
        "missing_webhook": 5, "upstream_failed": 2, "stuck": 1, "not_found_upstream": 3, "receipt_mismatch": 1,
        "item_hash_mismatch": 1, "amount_mismatch": 1, "chain_broken": 2, "unverifiable": 2,
    }
    assert opened == 12 - 1  # 12 new (chain_broken about h4 and chain13), "ok"'s stuck cleared


def test_an_unforeseen_answer_redoes_the_page_one_by_one_and_skips_only_its_delta(ledger: SqlLedger) -> None:
    delta_ids, answers = seed(ledger)
    expected = reconciled(ledger, one_by_one, delta_ids, answers)

    together = reconciled(ledger, reconcile._apply_page, delta_ids, answers)

    assert together == expected
    (fixed, _, errors, _), after = together
    assert (fixed, errors) == (8, 1)
    unforeseen = next(d for d in after["deltas"] if d["item_hash"] == H("unforeseen"))
    assert unforeseen["status"] == "QUEUED"


def test_a_page_whose_connection_is_gone_fails_instead_of_being_redone_one_by_one(
    ledger: SqlLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Done again delta by delta in a transaction that can no longer commit, the page would
    fail again for each delta: an error after which the connection is gone fails the page."""
    from sqlalchemy.exc import ProgrammingError

    delta_ids, answers = seed(ledger)
    gone = ProgrammingError("UPDATE ...", {}, Exception("server closed the connection"), connection_invalidated=True)

    def connection_gone(*args: Any) -> reconcile.PageResult:
        raise gone

    redone: list[int] = []
    monkeypatch.setattr(reconcile, "_reconcile_together", connection_gone)
    monkeypatch.setattr(reconcile, "_reconcile_one_by_one", lambda *a, **kw: redone.append(1))
    with pytest.raises(StorageUnavailable, match="server closed the connection"):  # the ledger's word for it
        reconciled(ledger, reconcile._apply_page, delta_ids, answers)
    assert redone == []


def test_each_anchor_is_looked_up_once_though_its_deltas_are_pages_apart(ledger: SqlLedger) -> None:
    """A pass keeps an answer only while a later page still has a delta of its anchor."""
    import asyncio

    import httpx

    from reconciler.pacspace import PacSpaceClient, RetryPolicy

    # pages of two: the batch anchor's deltas are in the first and the third page
    layout = [("b1", "a_batch", 0), ("x1", "a_x1", 1), ("x2", "a_x2", 2), ("x3", "a_x3", 3), ("b2", "a_batch", 4)]
    batch_root = merkle_root([H("b1"), H("b2")])
    ledger.transact_sync(lambda s: [
        s.add_delta(delta(name, anchor_id=anchor, emitted_at=OLD + timedelta(seconds=n), receipt_id=batch_root if anchor == "a_batch" else H(name)))
        for name, anchor, n in layout
    ])
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        anchor = request.url.path.rsplit("/", 1)[-1]
        asked.append(anchor)
        if anchor == "a_batch":
            data = {"anchorId": anchor, "status": "ANCHORED", "receiptId": batch_root, "deltas": [
                {"index": 0, "status": "ANCHORED", "itemHash": H("b1"), "customerId": "cust", "delta": "-42.50"},
                {"index": 1, "status": "ANCHORED", "itemHash": H("b2"), "customerId": "cust", "delta": "-42.50"},
            ]}
        else:
            data = {"anchorId": anchor, "status": "ANCHORING"}
        return httpx.Response(200, json={"success": True, "data": data})

    async def go() -> reconcile.PassSummary:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            client = PacSpaceClient(http, "http://pacspace.test", "k", RetryPolicy(attempts=1))
            reconciler = reconcile.Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=3600, page_size=2)
            return await reconciler.run_pass()

    summary = asyncio.run(go())
    assert sorted(a for a in asked if a.startswith("a_")) == ["a_batch", "a_x1", "a_x2", "a_x3"]
    assert summary.looked_up == 4 and summary.checked == 5 and summary.fixed == 2


def _answer(name: str) -> dict[str, Any]:
    data = verified(name)
    return {f"a_{name}": StatusAnswer(f"a_{name}", status_from(data["status"]), "?", data)}


def test_a_page_and_orm_work_in_one_transaction_see_each_others_changes(ledger: SqlLedger) -> None:
    """The writer runs several works in one transaction (a group commit): a page, whose deltas
    are not ORM rows, reads what ORM work before it changed and not yet flushed, and ORM
    work after it reads what the page wrote, not a copy held from before."""
    ids = ledger.transact_sync(lambda s: [s.add_delta(delta(name)).id for name in ("early", "page")])
    early, in_page = ids

    def work(s: LedgerSession) -> tuple[Any, ...]:
        held = s.get_delta(in_page)  # an ORM copy, read before the page
        settled_early = s.get_delta(early)
        assert held is not None and held.status == "QUEUED" and settled_early is not None
        settled_early.status = "VERIFIED"  # as a webhook would have, not flushed yet
        result = reconcile._apply_page(s, delta_ids=ids, answers=_answer("early") | _answer("page"), now=NOW,
                                       stuck_cutoff=STUCK_CUTOFF, run_id=RUN_ID)
        after = s.get_delta(in_page)
        assert after is held  # the same ORM object, read again
        return result.fixed, (after.status, after.verified_by, after.tx_hash), s.get_delta(early).verified_by  # type: ignore[union-attr]

    fixed, page_delta, early_by = ledger.transact_sync(work)

    assert fixed == 1  # "early" was settled before the page: only "page" was fixed
    assert page_delta == ("VERIFIED", "reconciler", "0xtx_page")
    assert early_by is None  # left as the earlier work left it
    stored = ledger.read_sync(lambda s: [(d.status, d.verified_by) for d in map(s.get_delta, ids)])  # type: ignore[union-attr]
    assert stored == [("VERIFIED", None), ("VERIFIED", "reconciler")]


def test_delta_rows_write_only_what_changed_and_refuse_a_row_gone(ledger: SqlLedger) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from storage.delta_row import DeltaRows
    from storage.errors import StorageError

    ids = ledger.transact_sync(lambda s: [s.add_delta(delta(name)).id for name in ("one", "two")])

    def work(s: LedgerSession) -> tuple[int, int]:
        rows = DeltaRows(s._session)
        one, two = rows.by_ids(ids)
        assert rows.by_ids(ids[:1])[0] is one  # one object per delta in a transaction
        one.item_hashes = list(one.item_hashes or [])  # an equal value: no change
        two.status, two.verification_lag_ms = "FAILED", 7
        assert (one.changes(), two.changes()) == ({}, {"status": "FAILED", "verification_lag_ms": 7})
        written = rows.write()
        return written, rows.write()  # nothing is left to write the second time

    assert ledger.transact_sync(work) == (1, 0)
    stored = ledger.read_sync(lambda s: [(d.status, d.verification_lag_ms, d.updated_at) for d in map(s.get_delta, ids)])  # type: ignore[union-attr]
    assert stored == [("QUEUED", None, OLD), ("FAILED", 7, OLD)]

    def gone(s: LedgerSession) -> None:
        rows = DeltaRows(s._session)
        (two,) = rows.by_ids(ids[1:])
        s._session.execute(text("DELETE FROM local_delta WHERE id = :id"), {"id": ids[1]})
        two.status = "VERIFIED"
        rows.write()

    with pytest.raises((StorageError, SQLAlchemyError), match="1 deltas to update, 0 found"):
        ledger.transact_sync(gone)
