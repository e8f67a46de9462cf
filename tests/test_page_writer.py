"""The page writer process (`pacrecon.page_writer`): a pass's pages written by a child
process, on SQLite and PostgreSQL, against the sandbox; and the child's failures, each
met as the pass must meet it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from functools import partial
from operator import methodcaller
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

import pacrecon.page_writer
from pacrecon.app import page_writers
from pacrecon.page_writer import PageWriteFailed, PageWriterGone, PagesOrInProcess, ProcessPages
from pacrecon.settings import Settings
from pacrecon.writer_child import WriterConfig
from reconciler.errors import PacSpaceError
from reconciler.pacspace import PacSpaceClient
from reconciler.pages import LedgerPages
from reconciler.reconcile import PassSummary, Reconciler, _apply_page
from storage.engine import make_engine
from storage.errors import StorageUnavailable
from storage.sql_ledger import SqlLedger
from tests.conftest import migrated_sqlite_url
from tests.daemon import SandboxProcess, alive, free_port, wait_for
from tests import test_reconcile
from tests.test_reconcile import _with_client, imported, open_kinds, statuses, through_outbox

sandbox, upstream = test_reconcile.sandbox, test_reconcile.upstream  # the same fixtures: a sandbox whose webhooks never arrive


def config(url: str, lock_timeout_ms: int = 5_000) -> WriterConfig:
    return WriterConfig(database_url=url, lock_timeout_ms=lock_timeout_ms, log_level="warning", log_format="json", secrets=())


def database_url_of(ledger: SqlLedger) -> str:
    return ledger.engine.url.render_as_string(hide_password=False)


class Recorded(ProcessPages):
    """ProcessPages that keeps every child the composition root starts, and counts the writes."""

    started: list[Recorded] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes = 0
        Recorded.started.append(self)

    async def write(self, work: Any) -> Any:
        self.writes += 1
        return await super().write(work)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[Recorded]:
    """The children `pacrecon.app.page_writers` starts, as they were started."""
    Recorded.started = []
    monkeypatch.setattr(pacrecon.page_writer, "ProcessPages", Recorded)
    return Recorded.started


def writers_of(ledger: SqlLedger, mode: str) -> Any:
    """The composition root's choice for PACRECON_RECONCILE_WRITER=mode on this ledger."""
    return page_writers(Settings(database_url=database_url_of(ledger), reconcile_writer=mode, log_level="warning"), ledger)


def run_pass(ledger: SqlLedger, sandbox: SandboxProcess | SimpleNamespace, pages_for: Any, *, page_size: int = 200,
             dry_run: bool = False) -> PassSummary:
    async def work(client: PacSpaceClient) -> PassSummary:
        reconciler = Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=3600, concurrency=4, page_size=page_size,
                                pages_for=pages_for)
        return await reconciler.run_pass(dry_run=dry_run)

    return asyncio.run(_with_client(sandbox, work))


def test_the_composition_root_chooses_the_pages_writer(ledger: SqlLedger, recorded: list[Recorded]) -> None:
    assert writers_of(ledger, "thread") is None
    auto = writers_of(ledger, "auto")
    assert isinstance(auto(False), LedgerPages) and recorded == []  # less than a page: no child started
    full = auto(True)
    assert isinstance(full, PagesOrInProcess) and len(recorded) == 1
    always = writers_of(ledger, "process")(False)
    assert isinstance(always, Recorded) and len(recorded) == 2
    for writer in (full, always):
        asyncio.run(writer.close())
    assert [child._child.returncode for child in recorded] == [0, 0]


def test_a_pass_through_the_child_fixes_reports_and_resends(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client,
                                                            recorded: list[Recorded]) -> None:
    """Each kind of answer crosses to the child: verified (fixed), and PacSpace's 404 (an
    error object: the delta sent again through the outbox). A dry run first changes nothing."""
    upstream.patch("/_sandbox/faults", json={"drop_webhooks": 1}).raise_for_status()
    verified = imported(ledger, upstream, 5, "cust_child_verified")
    upstream.post("/_sandbox/flush").raise_for_status()
    upstream.patch("/_sandbox/faults", json={"forget_deltas": 1}).raise_for_status()
    forgotten = through_outbox(ledger, sandbox, "cust_child_forgotten")
    upstream.put("/_sandbox/faults", json={}).raise_for_status()
    pages = writers_of(ledger, "process")

    dry = run_pass(ledger, sandbox, pages, dry_run=True, page_size=4)
    assert dry.status == "completed" and dry.checked == 6 and dry.open_after == 1, dry.as_dict()
    assert statuses(ledger, verified + [forgotten]) == ["QUEUED"] * 6 and open_kinds(ledger) == {}

    summary = run_pass(ledger, sandbox, pages, page_size=4)
    assert summary.status == "completed" and summary.errors == 0, summary.as_dict()
    assert summary.checked == 6 and summary.fixed == 6
    assert summary.found == {"missing_webhook": 5, "not_found_upstream": 1}
    assert statuses(ledger, verified) == ["VERIFIED"] * 5 and statuses(ledger, [forgotten]) == ["PENDING"]
    assert open_kinds(ledger) == {"not_found_upstream": 1}
    assert [a.action for a in ledger.read_sync(lambda s: s.audit_entries(forgotten))] == ["resend"]
    # a child a pass (the dry run's read its two pages), each gone since; the real pass wrote two pages
    assert len(recorded) == 2 and [child.writes for child in recorded] == [0, 2]
    assert [child._child.returncode for child in recorded] == [0, 0]


def test_a_pass_of_less_than_a_page_writes_in_process_and_a_longer_one_in_the_child(ledger: SqlLedger, sandbox: SandboxProcess,
                                                                                    upstream: httpx.Client, recorded: list[Recorded]) -> None:
    pages = writers_of(ledger, "auto")
    imported(ledger, upstream, 2, "cust_one_page")
    upstream.post("/_sandbox/flush").raise_for_status()
    assert run_pass(ledger, sandbox, pages, page_size=3).fixed == 2
    assert recorded == []
    ids = imported(ledger, upstream, 4, "cust_two_pages")
    upstream.post("/_sandbox/flush").raise_for_status()
    assert run_pass(ledger, sandbox, pages, page_size=3).fixed == 4
    assert len(recorded) == 1 and recorded[0].writes == 2 and statuses(ledger, ids) == ["VERIFIED"] * 4


class Dying(Recorded):
    """A child killed before it was ready."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        os.kill(self.pid, signal.SIGKILL)


def test_a_pass_whose_child_dies_fails_and_the_next_pass_does_the_work(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client,
                                                                       recorded: list[Recorded], monkeypatch: pytest.MonkeyPatch) -> None:
    """PACRECON_RECONCILE_WRITER=process: the child is the one writer; without it the pass fails."""
    ids = imported(ledger, upstream, 4, "cust_child_dies")
    upstream.post("/_sandbox/flush").raise_for_status()
    monkeypatch.setattr(pacrecon.page_writer, "ProcessPages", Dying)
    summary = run_pass(ledger, sandbox, writers_of(ledger, "process"), page_size=2)
    assert summary.status == "failed" and summary.fixed == 0
    assert "page writer process" in (summary.error_detail or "") and "exit code -9" in (summary.error_detail or "")
    assert statuses(ledger, ids) == ["QUEUED"] * 4
    run = ledger.read_sync(lambda s: s.get_run(summary.run_id or 0))
    assert run is not None and run.status == "failed"

    monkeypatch.setattr(pacrecon.page_writer, "ProcessPages", Recorded)
    again = run_pass(ledger, sandbox, writers_of(ledger, "process"), page_size=2)
    assert again.status == "completed" and again.fixed == 4 and statuses(ledger, ids) == ["VERIFIED"] * 4
    assert len(recorded) == 2 and recorded[1].writes == 2


def test_with_auto_a_child_that_never_gets_ready_leaves_the_pages_to_this_process(
    ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client, recorded: list[Recorded], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PACRECON_RECONCILE_WRITER=auto: the child only makes a pass faster; nothing was sent to
    it, so the pass writes its pages itself, and says so."""
    ids = imported(ledger, upstream, 4, "cust_child_never_ready")
    upstream.post("/_sandbox/flush").raise_for_status()
    monkeypatch.setattr(pacrecon.page_writer, "ProcessPages", Dying)
    with capture_logs() as logged:
        summary = run_pass(ledger, sandbox, writers_of(ledger, "auto"), page_size=2)
    assert summary.status == "completed" and summary.fixed == 4, summary.as_dict()
    assert statuses(ledger, ids) == ["VERIFIED"] * 4
    assert len(recorded) == 1 and recorded[0].writes == 1  # the first page was offered to it, then written here
    assert [line["writes"] for line in logged if line["event"] == "page_writer_not_started"] == ["in-process"]


def test_a_pass_that_ends_before_its_first_page_is_written_lets_its_child_go_cleanly(ledger: SqlLedger, upstream: httpx.Client,
                                                                                    recorded: list[Recorded]) -> None:
    """PacSpace unreachable: the pass stops before it writes a page; the child it started
    (its "ready" never read) leaves with exit code 0, not a traceback."""
    imported(ledger, upstream, 3, "cust_pacspace_away")
    unreachable = SimpleNamespace(url=f"http://127.0.0.1:{free_port()}")
    summary = run_pass(ledger, unreachable, writers_of(ledger, "process"), page_size=2)
    assert summary.status == "failed" and summary.fixed == 0, summary.as_dict()
    assert len(recorded) == 1 and recorded[0].writes == 0 and recorded[0]._child.returncode == 0


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return migrated_sqlite_url(tmp_path / "pages.db")


def _refuse_to_load() -> None:
    raise ValueError("this work cannot be read here")


class Unreadable:
    """A work that pickles, and fails to unpickle in the child."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ())


@pytest.mark.parametrize(("work", "told"), [
    (methodcaller("no_such_method"), "AttributeError: .*no_such_method"),
    (Unreadable(), "could not be read: ValueError: this work cannot be read here"),
], ids=["raises", "unreadable"])
def test_a_work_that_fails_in_the_child_is_told_and_the_child_goes_on(sqlite_url: str, work: Any, told: str) -> None:
    async def scenario() -> None:
        pages = ProcessPages(config(sqlite_url), deadline_seconds=30)
        try:
            with pytest.raises(PageWriteFailed, match=told):
                await pages.write(work)
            assert await pages.read(methodcaller("count_open_discrepancies")) == 0
        finally:
            assert await asyncio.to_thread(pages.close_sync) == 0

    asyncio.run(scenario())


def _locked(url: str) -> Any:
    """The ledger's write lock held by another connection, as another writer would."""
    connection = make_engine(url).raw_connection()
    connection.driver_connection.isolation_level = None  # type: ignore[union-attr]
    connection.cursor().execute("BEGIN IMMEDIATE")
    return connection


def test_the_databases_trouble_is_storage_unavailable(sqlite_url: str) -> None:
    lock = _locked(sqlite_url)

    async def scenario() -> None:
        pages = ProcessPages(config(sqlite_url, lock_timeout_ms=200), deadline_seconds=30)
        try:
            empty_page = partial(_apply_page, delta_ids=[], answers={}, now=None, stuck_cutoff=None, run_id=None)
            with pytest.raises(StorageUnavailable, match="locked") as raised:
                await pages.write(empty_page)
            assert not isinstance(raised.value, PageWriterGone)
            lock.rollback()
            assert (await pages.write(empty_page)).checked == 0  # the lock gone, the same child writes
        finally:
            pages.close_sync()

    try:
        asyncio.run(scenario())
    finally:
        lock.close()


def test_a_child_that_does_not_answer_in_time_is_stopped(sqlite_url: str) -> None:
    lock = _locked(sqlite_url)

    async def scenario() -> None:
        pages = ProcessPages(config(sqlite_url, lock_timeout_ms=20_000), deadline_seconds=1)
        empty_page = partial(_apply_page, delta_ids=[], answers={}, now=None, stuck_cutoff=None, run_id=None)
        assert await pages.read(methodcaller("count_open_discrepancies")) == 0
        started = time.monotonic()
        with pytest.raises(PageWriterGone, match="did not answer within 1 s"):
            await pages.write(empty_page)  # waits for the lock far longer than the deadline
        assert time.monotonic() - started < 10
        assert pages._child.returncode == -signal.SIGKILL
        with pytest.raises(PageWriterGone):  # and stays gone
            await pages.read(methodcaller("count_open_discrepancies"))
        pages.close_sync()

    try:
        asyncio.run(scenario())
    finally:
        lock.close()


PARENT = """
import asyncio, sys
from datetime import UTC, datetime
from operator import methodcaller
from pacrecon.page_writer import ProcessPages
from pacrecon.writer_child import WriterConfig
pages = ProcessPages(WriterConfig(sys.argv[1], 30000, "warning", "json", ()), deadline_seconds=60)
asyncio.run(pages.read(methodcaller("count_open_discrepancies")))
print(pages.pid, flush=True)
if sys.argv[2] == "idle":
    sys.stdin.read()
else:
    finding = {"kind": "orphan_webhook", "subject": "event:evt_of_the_parent", "event_id": "evt_of_the_parent",
               "detected_by": "reconciler", "evidence": {}}
    print(asyncio.run(pages.write(methodcaller("open_discrepancy", finding, datetime.now(UTC)))), flush=True)
    pages.close_sync()
"""


def _parent(url: str, then: str) -> tuple[subprocess.Popen[str], int]:
    """A process with a page writer child, ready; then "idle", or "page": one page written. It and its child's pid."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, url, then], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return parent, int(parent.stdout.readline())  # type: ignore[union-attr]


def test_the_child_goes_when_its_parent_dies(sqlite_url: str) -> None:
    parent, child = _parent(sqlite_url, "idle")
    try:
        assert alive(child)
        parent.kill()
        parent.wait()
        wait_for(lambda: not alive(child), 10, "the child to leave after its parent died")
    finally:
        parent.kill()


def _open_discrepancies(url: str) -> int:
    ledger = SqlLedger.from_url(url)
    try:
        return ledger.read_sync(methodcaller("count_open_discrepancies"))
    finally:
        ledger.close()


@pytest.mark.parametrize("parent_dies", [False, True])
def test_a_page_is_committed_only_while_its_parent_waits_for_it(sqlite_url: str, parent_dies: bool) -> None:
    """The page's work waits for the write lock; meanwhile its parent dies (its pass lock
    goes with it): once the lock is free the child rolls the page back instead of committing
    it. Without the parent's death the same page commits (the control)."""
    lock = _locked(sqlite_url)
    parent, child = _parent(sqlite_url, "page")
    try:
        time.sleep(1.0)  # the page sent, its transaction waiting for the lock
        if parent_dies:
            parent.kill()
            parent.wait()
            time.sleep(0.5)
            assert alive(child)  # it holds the page (a child with nothing in hand leaves at once on EOF)
        lock.rollback()
        if parent_dies:
            wait_for(lambda: not alive(child), 20, "the child to leave once it rolled its page back")
            assert _open_discrepancies(sqlite_url) == 0
        else:
            assert int(parent.stdout.readline()) > 0 and parent.wait(20) == 0  # type: ignore[union-attr]
            assert _open_discrepancies(sqlite_url) == 1
    finally:
        parent.kill()
        lock.close()


def test_a_close_while_a_page_is_in_the_child_fails_that_write_at_once_and_rolls_it_back(sqlite_url: str) -> None:
    """A pass that leaves without waiting for its page (cancelled twice): the write fails at
    once, the child rolls the page back once it could have committed it, and is reaped."""
    lock = _locked(sqlite_url)

    async def scenario() -> None:
        pages = ProcessPages(config(sqlite_url, lock_timeout_ms=30_000), deadline_seconds=60)
        assert await pages.read(methodcaller("count_open_discrepancies")) == 0
        finding = {"kind": "orphan_webhook", "subject": "event:evt_closed", "event_id": "evt_closed", "detected_by": "reconciler",
                   "evidence": {}}
        write = asyncio.ensure_future(pages.write(methodcaller("open_discrepancy", finding, datetime.now(UTC))))
        await asyncio.sleep(1.0)  # the page sent, waiting for the lock in the child
        closing = asyncio.ensure_future(pages.close())
        started = time.monotonic()
        with pytest.raises(PageWriterGone, match="connection broke"):
            await write
        assert time.monotonic() - started < 5
        assert not closing.done()  # the child still holds the page, waiting for the lock
        lock.rollback()
        await asyncio.wait_for(closing, 30)
        assert pages._child.returncode == 0

    try:
        asyncio.run(scenario())
    finally:
        lock.close()
    assert _open_discrepancies(sqlite_url) == 0


@pytest.mark.parametrize(("mode", "page_in_child"), [("process", True), ("auto", False)],
                         ids=["page-in-the-child", "auto-child-not-yet-ready"])
def test_a_pass_cancelled_twice_while_its_page_is_in_the_child_closes_and_reaps_it(ledger: SqlLedger, sandbox: SandboxProcess,
                                                                                   upstream: httpx.Client, recorded: list[Recorded],
                                                                                   mode: str, page_in_child: bool) -> None:
    """The daemon stopping hard: the pass cancelled while its page is with the child, then
    again while it waits for that page. The child is still told to go and is reaped, and
    the page, which no one waits for any more, is written nowhere: not committed by the
    child, nor (auto, the child not yet ready) by this process instead."""
    if ledger.engine.dialect.name != "sqlite":
        pytest.skip("the page is held back by SQLite's write lock")
    ids = imported(ledger, upstream, 4, "cust_cancelled_twice")
    upstream.post("/_sandbox/flush").raise_for_status()
    locks: list[Any] = []

    async def scenario(client: PacSpaceClient) -> None:
        reconciler = Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=3600, concurrency=4, page_size=4,
                                pages_for=writers_of(ledger, mode))
        task = asyncio.ensure_future(reconciler.run_pass())
        while not recorded:  # the child is started at the first page; it gets ready in about a second
            await asyncio.sleep(0.005)
        locks.append(_locked(database_url_of(ledger)))  # before the page reaches it
        while not recorded[0].writes:
            await asyncio.sleep(0.01)
        # the page in the child (ready, then waiting for the lock), or still waiting for it to be ready
        if page_in_child:  # about a second, more on a busy host: waited for, not guessed
            deadline = time.monotonic() + 15
            while not recorded[0]._ready and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # the page sent to it
        else:
            await asyncio.sleep(0.05)
        assert recorded[0]._ready is page_in_child
        task.cancel()
        await asyncio.sleep(0.2)  # the pass now waits for its page
        task.cancel()
        await asyncio.sleep(0.2)
        locks[0].rollback()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(_with_client(sandbox, scenario))
    finally:
        for lock in locks:
            lock.close()
    assert recorded[0]._child.returncode == 0
    assert statuses(ledger, ids) == ["QUEUED"] * 4


def test_a_pacspace_error_crosses_to_the_child_whole() -> None:
    import pickle

    error = PacSpaceError(404, "NOT_FOUND", "no such anchor", retryable=False, retry_after=2.5, customer_id="cust_1")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is PacSpaceError and str(copy) == str(error) and vars(copy) == vars(error)

