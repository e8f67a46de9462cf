"""The page writer process: a reconciliation pass of a full page or more (200 stale deltas)
hands its page transactions to a child process with a ledger of its own
(`reconciler.pages.PageWriter`).

Why a process: a pass is bound by its one core of Python. Its status lookups (httpx) and
its page transactions (SQLAlchemy and the comparison, in the ledger's writer thread) took
turns at one GIL. In a child the transactions run beside the lookups, on the other core
(bench/RESULTS.md, "Reconciliation"). The cost: a second interpreter while the pass runs,
and its start (about a second of CPU), which a pass of less than a page does not pay (it
writes in-process: `pacrecon.app.page_writers`).

Protocol, over a socketpair, `pacrecon.writer_child`'s frames, one request at a time:
  parent -> child: a `WriterConfig` once, then ("write" | "read", work)
  child -> parent: ("ready", pid) once, then per work ("done", its result), ("unavailable",
  why) for the database's trouble, or ("failed", why) for anything else.
The child ignores SIGTERM and SIGINT and has a session of its own (a stopping daemon ends
its pass after the page in hand, which the child must finish); it exits when the parent
closes its end, or dies. Just before a page's commit the child checks that the parent still
waits for it (the end of its socket, between the page's work and its COMMIT) and rolls the
page back if the parent has gone (its pass lock went with it); a parent dying during the
COMMIT itself is not seen. A child that does not answer
within the deadline is killed: the page it held is rolled back with its connection, or was
committed, and the next pass sees which.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
import structlog

from pacrecon.writer_child import (
    START_SECONDS,
    STOP_SECONDS,
    WriterConfig,
    frame,
    ignore_stop_signals,
    open_ledger,
    read_frame,
    spawn,
    wait_or_kill,
)
from storage.errors import StorageUnavailable, is_database_trouble

if TYPE_CHECKING:
    from reconciler.pages import PageWriter
    from storage.ledger import Work
    from storage.session import LedgerSession
    from storage.sql_ledger import SqlLedger

T = TypeVar("T")
log = structlog.get_logger("pacrecon.page_writer")


class PageWriterGone(StorageUnavailable):
    """The page writer process stopped answering: the page in hand may not be written."""


class PageWriterNotStarted(PageWriterGone):
    """The page writer process never got ready: nothing was sent to it."""


class PageWriteFailed(Exception):
    """A page's work raised in the child something other than the database's trouble
    (what it raised, as text: the exception itself stays there)."""


class ProcessPages:
    """`reconciler.pages.PageWriter` through a child process, started at once (its start
    overlaps the pass's first lookups)."""

    def __init__(self, config: WriterConfig, *, deadline_seconds: float, start_seconds: float = START_SECONDS) -> None:
        self._deadline, self._start_seconds = deadline_seconds, start_seconds
        self._lock = threading.Lock()  # one request at a time (a pass writes one page at a time anyway)
        self._ready = False
        self._broken: str | None = None  # why the child is gone, once it is
        self._closed = False
        self._child, self._socket = spawn("pacrecon.page_writer", "page writer process", config)

    @property
    def pid(self) -> int:
        return self._child.pid

    async def write(self, work: Work[T]) -> T:
        return await anyio.to_thread.run_sync(self._ask, "write", work)

    async def read(self, work: Work[T]) -> T:
        return await anyio.to_thread.run_sync(self._ask, "read", work)

    async def close(self) -> None:
        """The child told to go and reaped, also when the pass is cancelled meanwhile."""
        self._end()
        await asyncio.shield(asyncio.to_thread(self._reap))

    def close_sync(self) -> int:
        self._end()
        return self._reap()

    def _end(self) -> None:
        """The child reads EOF, at once: no lock, so a request still in flight (a pass leaving
        without waiting for its page) fails now, and the child rolls that page back. Only
        shut down here: the descriptor is closed under the lock (`_reap`), never while a
        worker thread may still use its number."""
        if not self._closed:
            self._closed = True
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the child has gone already

    def _reap(self) -> int:
        with self._lock:  # the request in flight, if any, has failed by now (shut down)
            self._socket.close()
        code = wait_or_kill(self._child, STOP_SECONDS)
        if code != 0:
            log.warning("page_writer_exited", pid=self._child.pid, exit_code=code)
        return code

    def _ask(self, kind: str, work: Work[T]) -> T:
        with self._lock:
            if self._broken is not None:
                raise PageWriterGone(self._broken)
            if self._closed:
                raise PageWriterGone("the page writer process was closed")
            if not self._ready:
                self._answer(self._start_seconds, "get ready", PageWriterNotStarted)
                self._ready = True
            try:
                self._socket.sendall(frame((kind, work)))
            except OSError as exc:
                raise self._gone(f"its connection broke ({type(exc).__name__})", PageWriterGone) from None
            outcome, detail = self._answer(self._deadline, "answer", PageWriterGone)
        if outcome == "done":
            return detail  # type: ignore[no-any-return]
        if outcome == "unavailable":
            raise StorageUnavailable(detail)
        raise PageWriteFailed(detail)

    def _answer(self, seconds: float, what: str, gone: type[PageWriterGone]) -> tuple[str, Any]:
        try:
            return read_frame(self._socket, seconds)  # type: ignore[no-any-return]
        except TimeoutError:
            self._child.kill()
            raise self._gone(f"it did not {what} within {seconds:g} s and was stopped", gone) from None
        except (OSError, EOFError) as exc:
            raise self._gone(f"its connection broke ({type(exc).__name__})", gone) from None

    def _gone(self, why: str, gone: type[PageWriterGone]) -> PageWriterGone:
        if self._closed:  # closed meanwhile: the pass has left, and its page is to be written nowhere
            gone = PageWriterGone
        try:
            code: int | None = self._child.wait(1.0)  # a child that died has its exit code by now
        except subprocess.TimeoutExpired:
            code = None
        self._broken = (
            f"the page writer process (pid {self._child.pid}, exit code {code}) went: {why}; "
            "the page in hand may not be written (the next pass looks again)"
        )
        return gone(self._broken)


class PagesOrInProcess:
    """`PACRECON_RECONCILE_WRITER=auto`: the child's pages, or, when the child could not be
    started or never got ready (nothing was sent to it), the ledger's own writer's. The
    child only makes a pass faster: its absence must not fail passes."""

    def __init__(self, start: Callable[[], ProcessPages], in_process: PageWriter) -> None:
        self._in_process = in_process
        self._closing = False
        self._pages: PageWriter
        try:
            self._pages = start()
        except StorageUnavailable as exc:
            self._pages = self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> PageWriter:
        log.warning("page_writer_not_started", error=f"{exc}"[:500], writes="in-process")
        return self._in_process

    async def write(self, work: Work[T]) -> T:
        return await self._through("write", work)

    async def read(self, work: Work[T]) -> T:
        return await self._through("read", work)

    async def _through(self, kind: str, work: Work[T]) -> T:
        try:
            return await getattr(self._pages, kind)(work)  # type: ignore[no-any-return]
        except PageWriterNotStarted as exc:
            if self._closing:  # the pass has left: its page is written nowhere
                raise
            await self._pages.close()
            self._pages = self._fall_back(exc)
            return await getattr(self._pages, kind)(work)  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._closing = True
        await self._pages.close()


# -- the child's side --------------------------------------------------------------------


class ParentGone(Exception):
    """The parent closed its end (it went, or gave up on this page) before the commit."""


def main(descriptor: int) -> int:
    ignore_stop_signals()  # first: the imports below take a while
    connection = socket.socket(fileno=descriptor)
    try:
        config: WriterConfig = read_frame(connection)
    except (EOFError, OSError):
        return 0  # the parent went before it sent the configuration
    # imported here: the parent's side needs none of it (and what the works are made of,
    # imported before "ready")
    import reconciler.reconcile  # noqa: F401

    ledger = open_ledger(config)
    try:
        connection.sendall(frame(("ready", os.getpid())))
        while True:
            try:
                kind, work = read_frame(connection)
            except EOFError:
                return 0  # the parent is done, or gone
            except (pickle.UnpicklingError, AttributeError, ImportError, TypeError, ValueError) as exc:
                # read whole, so the stream is still in step: this request fails, the child goes on
                connection.sendall(frame(("failed", f"the work could not be read: {type(exc).__name__}: {exc}"[:2000])))
                continue
            connection.sendall(frame(_outcome(ledger, connection, kind, work)))
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the parent is gone: nothing this child did was waited for
    finally:
        ledger.close()


def _outcome(ledger: SqlLedger, connection: socket.socket, kind: str, work: Work[Any]) -> tuple[str, Any]:
    try:
        if kind == "read":
            return "done", ledger.read_sync(work)
        [(error, result)] = ledger.commit_here([_while_parent_waits(work, connection)])
        if error is not None:
            raise error
        return "done", result
    except Exception as exc:  # noqa: BLE001  (told to the parent, which fails the pass with it)
        if is_database_trouble(exc):
            return "unavailable", f"{exc}"[:2000]
        return "failed", f"{type(exc).__name__}: {exc}"[:2000]


def _while_parent_waits(work: Work[T], connection: socket.socket) -> Work[T]:
    """`work`, then a look at the socket: raises ParentGone (the page is rolled back) when
    the parent has closed its end. The parent sends nothing while it waits for an answer,
    so anything to read is its end closing."""

    def guarded(session: LedgerSession) -> T:
        result = work(session)
        try:
            ended = connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            ended = False
        except OSError:  # ECONNRESET
            ended = True
        if ended:
            raise ParentGone("the parent closed its end before the commit: the page is rolled back")
        return result

    return guarded


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
