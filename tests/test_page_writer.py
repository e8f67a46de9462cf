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
from functools import partial
from operator import methodcaller
from pathlib import Path
from typing import Any

import httpx
import pytest

from pacrecon.page_writer import PageWriteFailed, PageWriterGone, ProcessPages
from pacrecon.webhook_writer import WriterConfig
from reconciler.errors import PacSpaceError
from reconciler.pacspace import PacSpaceClient
from reconciler.pages import PageWriter
from reconciler.reconcile import PassSummary, Reconciler, _apply_page
from storage.engine import make_engine
from storage.errors import StorageUnavailable
from storage.ledger import Work
from storage.sql_ledger import SqlLedger
from tests.conftest import migrated_sqlite_url
from tests.daemon import SandboxProcess
from tests import test_reconcile
from tests.test_reconcile import _with_client, imported, open_kinds, statuses, through_outbox

sandbox, upstream = test_reconcile.sandbox, test_reconcile.upstream  # the same fixtures: a sandbox whose webhooks never arrive


def config(url: str, lock_timeout_ms: int = 5_000) -> WriterConfig:
    return WriterConfig(database_url=url, lock_timeout_ms=lock_timeout_ms, log_level="warning", log_format="json", secrets=())


class Recorded:
    """The writers a pass started, and what each was given."""

    def __init__(self, make: Any) -> None:
        self.make, self.writers, self.writes = make, [], 0

    def __call__(self) -> PageWriter:
        writer = self.make()
        self.writers.append(writer)
        owner = self
        inner_write = writer.write

        async def write(work: Work[Any]) -> Any:
            owner.writes += 1
            return await inner_write(work)

        writer.write = write
        return writer  # type: ignore[no-any-return]


def run_pass(ledger: SqlLedger, sandbox: SandboxProcess, pages: Recorded | None, *, always: bool = True, page_size: int = 200,
             dry_run: bool = False) -> PassSummary:
    async def work(client: PacSpaceClient) -> PassSummary:
        reconciler = Reconciler(ledger, client, stale_after_seconds=0, stuck_after_seconds=3600, concurrency=4, page_size=page_size,
                                page_process=pages, page_process_always=always)
        return await reconciler.run_pass(dry_run=dry_run)

    return asyncio.run(_with_client(sandbox, work))


def database_url_of(ledger: SqlLedger) -> str:
    return ledger.engine.url.render_as_string(hide_password=False)


def test_a_pass_through_the_child_fixes_reports_and_resends(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    """Each kind of answer crosses to the child: verified (fixed), and PacSpace's 404 (an
    error object: the delta sent again through the outbox). A dry run first changes nothing."""
    upstream.patch("/_sandbox/faults", json={"drop_webhooks": 1}).raise_for_status()
    verified = imported(ledger, upstream, 5, "cust_child_verified")
    upstream.post("/_sandbox/flush").raise_for_status()
    upstream.patch("/_sandbox/faults", json={"forget_deltas": 1}).raise_for_status()
    forgotten = through_outbox(ledger, sandbox, "cust_child_forgotten")
    upstream.put("/_sandbox/faults", json={}).raise_for_status()
    pages = Recorded(partial(ProcessPages, config(database_url_of(ledger)), deadline_seconds=30))

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
    # two pages a pass, each written by that pass's own child, which has gone since
    assert len(pages.writers) == 2 and pages.writes == 2
    assert [w._child.returncode for w in pages.writers] == [0, 0]  # type: ignore[attr-defined]


def test_a_pass_of_less_than_a_page_writes_in_process_and_a_longer_one_in_the_child(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    pages = Recorded(partial(ProcessPages, config(database_url_of(ledger)), deadline_seconds=30))
    imported(ledger, upstream, 2, "cust_one_page")
    upstream.post("/_sandbox/flush").raise_for_status()
    assert run_pass(ledger, sandbox, pages, always=False, page_size=3).fixed == 2
    assert pages.writers == []
    ids = imported(ledger, upstream, 4, "cust_two_pages")
    upstream.post("/_sandbox/flush").raise_for_status()
    assert run_pass(ledger, sandbox, pages, always=False, page_size=3).fixed == 4
    assert len(pages.writers) == 1 and pages.writes == 2 and statuses(ledger, ids) == ["VERIFIED"] * 4


def test_a_pass_whose_child_dies_fails_and_the_next_pass_does_the_work(ledger: SqlLedger, sandbox: SandboxProcess, upstream: httpx.Client) -> None:
    ids = imported(ledger, upstream, 4, "cust_child_dies")
    upstream.post("/_sandbox/flush").raise_for_status()

    def dying() -> ProcessPages:
        writer = ProcessPages(config(database_url_of(ledger)), deadline_seconds=30)
        os.kill(writer.pid, signal.SIGKILL)
        return writer

    summary = run_pass(ledger, sandbox, Recorded(dying), page_size=2)
    assert summary.status == "failed" and summary.fixed == 0
    assert "page writer process" in (summary.error_detail or "") and "exit code -9" in (summary.error_detail or "")
    assert statuses(ledger, ids) == ["QUEUED"] * 4
    run = ledger.read_sync(lambda s: s.get_run(summary.run_id or 0))
    assert run is not None and run.status == "failed"

    again = run_pass(ledger, sandbox, Recorded(partial(ProcessPages, config(database_url_of(ledger)), deadline_seconds=30)), page_size=2)
    assert again.status == "completed" and again.fixed == 4 and statuses(ledger, ids) == ["VERIFIED"] * 4


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return migrated_sqlite_url(tmp_path / "pages.db")


def test_a_work_that_raises_is_told_and_the_child_goes_on(sqlite_url: str) -> None:
    async def scenario() -> None:
        pages = ProcessPages(config(sqlite_url), deadline_seconds=30)
        try:
            with pytest.raises(PageWriteFailed, match="AttributeError: .*no_such_method"):
                await pages.write(methodcaller("no_such_method"))
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


CHILD_OF_A_PARENT = """
import asyncio, sys
from operator import methodcaller
from pacrecon.page_writer import ProcessPages
from pacrecon.webhook_writer import WriterConfig
pages = ProcessPages(WriterConfig(sys.argv[1], 5000, "warning", "json", ()), deadline_seconds=30)
asyncio.run(pages.read(methodcaller("count_open_discrepancies")))
print(pages.pid, flush=True)
sys.stdin.read()
"""


def test_the_child_goes_when_its_parent_dies(sqlite_url: str) -> None:
    parent = subprocess.Popen([sys.executable, "-c", CHILD_OF_A_PARENT, sqlite_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan is reaped by init; this test's child is not ours)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_pacspace_error_crosses_to_the_child_whole() -> None:
    import pickle

    error = PacSpaceError(404, "NOT_FOUND", "no such anchor", retryable=False, retry_after=2.5, customer_id="cust_1")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is PacSpaceError and str(copy) == str(error) and vars(copy) == vars(error)

