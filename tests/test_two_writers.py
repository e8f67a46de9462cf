"""Two daemons on one PostgreSQL database change the same delta at the same moment: the
later transaction reads the delta as the earlier one left it, never a copy from before
it, so that no change is lost (a delta VERIFIED by one daemon's webhook set back to
PROCESSING by the other's reconciler page, which had read it QUEUED).

Each case holds one daemon's transaction open after it read the delta, as a slow
transaction would, while the other records a webhook about the same delta."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from sqlalchemy import text

from reconciler.apply import CLEARED_BY_SETTLING, RecordEvent, apply_claim, record_event
from reconciler.claims import ClaimedStatus, DeltaClaim
from reconciler.events import parse_event
from storage.engine import make_engine
from storage.page_session import PageSession
from storage.session import LedgerSession
from storage.sql_ledger import SqlLedger
from storage.vocabulary import VerifiedBy
from tests.conftest import empty_postgres
from tests.test_apply import LATER, local, register, verified
from tests.webhooks import envelope

pytestmark = pytest.mark.postgres

PROCESSING = DeltaClaim(status=ClaimedStatus.PROCESSING, anchor_id="a_1")  # a status lookup's answer
FAILED = envelope("delta.failed", {"recordId": "a_1", "error": "anchoring failed"})


def _raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def reconciler_page(s: LedgerSession, hold: Callable[[], None]) -> None:
    page = PageSession(s, [1])
    page.read_ahead([], [kind.value for kind in CLEARED_BY_SETTLING], ["delta:1"])
    apply_claim(page, page.deltas[0], PROCESSING, LATER, event_id=None, by=VerifiedBy.RECONCILER)
    hold()
    page.write()


def reconciler_one_by_one(s: LedgerSession, hold: Callable[[], None]) -> None:
    (delta,) = s.load_deltas([1])
    apply_claim(s, delta, PROCESSING, LATER, event_id=None, by=VerifiedBy.RECONCILER)
    hold()


def webhook_page(s: LedgerSession, hold: Callable[[], None]) -> None:
    claim = parse_event(_raw(FAILED)).claim
    assert claim is not None
    page = PageSession(s, anchor_ids=["a_1"])
    page.read_ahead([], [kind.value for kind in CLEARED_BY_SETTLING], ["delta:1"])
    apply_claim(page, page.deltas[0], claim, LATER, event_id=None, by=VerifiedBy.WEBHOOK)
    hold()
    page.write()


def webhook_alone(s: LedgerSession, hold: Callable[[], None]) -> None:
    raw = _raw(FAILED)
    record_event(s, parse_event(raw), raw_body=raw, signature_timestamp=int(LATER.timestamp()), now=LATER)
    hold()


@pytest.fixture
def daemons(postgres_url: str) -> Iterator[tuple[SqlLedger, SqlLedger]]:
    empty_postgres(postgres_url)
    pair = (SqlLedger.from_url(postgres_url), SqlLedger.from_url(postgres_url))
    register(pair[0], local(1))
    yield pair
    for ledger in pair:
        ledger.close()


def _waiting_for_a_lock(url: str) -> bool:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            return bool(connection.execute(text(query)).scalar())
    finally:
        engine.dispose()


def _started_and_waiting(thread: threading.Thread, url: str) -> bool:
    """Start `thread`; whether it is still running once some transaction waits for a lock
    (or after 3 s, below the ledger's 5 s lock timeout)."""
    thread.start()
    deadline = time.monotonic() + 3
    while thread.is_alive() and not _waiting_for_a_lock(url) and time.monotonic() < deadline:
        time.sleep(0.02)
    return thread.is_alive()


@pytest.mark.parametrize(
    ("first", "expected_status", "expected_outcome"),
    [
        # PROCESSING then VERIFIED: the webhook verifies the delta
        (reconciler_page, "VERIFIED", "applied"),
        (reconciler_one_by_one, "VERIFIED", "applied"),
        # FAILED then VERIFIED: a conflict, the delta stays FAILED
        (webhook_page, "FAILED", "discrepancy"),
        (webhook_alone, "FAILED", "discrepancy"),
    ],
)
def test_a_delta_changed_by_another_daemon_in_flight_is_read_after_its_commit(
    daemons: tuple[SqlLedger, SqlLedger],
    postgres_url: str,
    first: Callable[[LedgerSession, Callable[[], None]], None],
    expected_status: str,
    expected_outcome: str,
) -> None:
    one, other = daemons
    read, release = threading.Event(), threading.Event()

    def hold() -> None:
        read.set()
        assert release.wait(20)

    holder = threading.Thread(target=lambda: one.transact_sync(lambda s: first(s, hold)))
    holder.start()
    assert read.wait(10)
    # a reading transaction (a dry run's page) neither locks nor waits
    assert other.read_sync(lambda s: [d.status for d in PageSession(s, [1]).deltas]) == ["QUEUED"]

    answers: list[Any] = []
    body = verified(1)
    raw = _raw(body)
    webhook = threading.Thread(target=lambda: answers.append(other.transact_sync(RecordEvent(parse_event(raw), raw, int(LATER.timestamp()), LATER))))
    waited = _started_and_waiting(webhook, postgres_url)
    release.set()
    holder.join(10)
    webhook.join(10)

    delta = other.read_sync(lambda s: s.get_delta(1))
    assert delta is not None and delta.status == expected_status
    assert [a.outcome.value for a in answers] == [expected_outcome]
    assert waited, "the webhook's transaction did not wait for the first one's"
    # what the later transaction did follows from the earlier one's: nothing of a state neither left
    assert (delta.verified_at is not None) == (expected_status == "VERIFIED")
    assert (delta.failed_at is not None) == (expected_status == "FAILED")


def test_one_event_recorded_alone_by_one_daemon_and_in_a_page_by_the_other_waits_not_deadlocks(
    daemons: tuple[SqlLedger, SqlLedger], postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both take the delta before the event's row: the daemon recording the event alone
    waits for the page's commit, then finds the event recorded. (Taking them in the other
    order, each waited for the other until PostgreSQL broke the deadlock after a second.)"""
    read, release = threading.Event(), threading.Event()
    read_ahead = PageSession.read_ahead

    def read_then_hold(self: PageSession, *args: Any) -> None:
        read_ahead(self, *args)
        read.set()
        assert release.wait(20)

    monkeypatch.setattr(PageSession, "read_ahead", read_then_hold)  # only the page's path reads ahead
    one, other = daemons
    raw = _raw(verified(1))
    answers: dict[str, Any] = {}

    def answer(name: str, run: Callable[[], Any]) -> None:
        try:
            answers[name] = run()
        except Exception as exc:  # noqa: BLE001  (told by the assertions below)
            answers[name] = exc

    def in_a_page() -> None:
        answer("page", lambda: one.transact_sync(RecordEvent(parse_event(raw), raw, int(LATER.timestamp()), LATER)))

    def alone() -> None:
        record = partial(record_event, event=parse_event(raw), raw_body=raw, signature_timestamp=int(LATER.timestamp()), now=LATER)
        answer("alone", lambda: other.transact_sync(record))

    page = threading.Thread(target=in_a_page)
    page.start()
    assert read.wait(10)  # the page holds the delta, and has not written the event's row
    lone = threading.Thread(target=alone)
    waited = _started_and_waiting(lone, postgres_url)
    release.set()
    page.join(10)
    lone.join(10)

    assert waited, "recording the event alone did not wait for the page"
    assert not any(isinstance(a, Exception) for a in answers.values()), answers
    assert answers["page"].outcome is not None and answers["page"].outcome.value == "applied"
    assert answers["alone"].duplicate
    assert one.read_sync(lambda s: s.count_events()) == 1
    delta = one.read_sync(lambda s: s.get_delta(1))
    assert delta is not None and delta.status == "VERIFIED"
