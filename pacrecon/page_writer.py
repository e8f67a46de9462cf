"""The page writer process: a reconciliation pass of a full page or more (200 stale deltas)
hands its page transactions to a child process with a ledger of its own
(`reconciler.pages.PageWriter`).

Why a process: a pass is bound by its one core of Python. Its status lookups (httpx) and
its page transactions (SQLAlchemy and the comparison, in the ledger's writer thread) took
turns at one GIL. In a child the transactions run beside the lookups, on the other core:
a pass over 10,000 stale deltas took 21-28 % less time, and less CPU in all
(bench/RESULTS.md, session 10). The cost: a second interpreter (~60 MB) while the pass
runs, and its start (~1 s of CPU), which a pass of less than a page does not pay (it writes
in-process: `Reconciler.page_process`).

Protocol, over a socketpair, `multiprocessing.connection` messages (a length and a pickle;
they only ever cross between these two processes), one request at a time:
  parent -> child: a `WriterConfig` once, then ("write" | "read", work)
  child -> parent: ("ready", pid) once, then per work ("done", its result), ("unavailable",
  why) for the database's trouble, or ("failed", why) for anything else.
The child ignores SIGTERM and SIGINT and has a session of its own (a stopping daemon ends
its pass after the page in hand, which the child must finish); it exits when the parent
closes its end, or dies. A child that does not answer within the deadline is killed: the
page it held is rolled back with its connection, or was committed, and the next pass sees
which.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread

from pacrecon.webhook_writer import START_SECONDS, STOP_SECONDS, WriterConfig
from storage.errors import DATABASE_TROUBLE, StorageUnavailable

if TYPE_CHECKING:
    from storage.ledger import Work
    from storage.sql_ledger import SqlLedger

T = TypeVar("T")


class PageWriterGone(StorageUnavailable):
    """The page writer process stopped answering: the page in hand may not be written."""


class ProcessPages:
    """`reconciler.pages.PageWriter` through a child process, started at once."""

    def __init__(self, config: WriterConfig, *, deadline_seconds: float, start_seconds: float = START_SECONDS) -> None:
        self._deadline, self._start_seconds = deadline_seconds, start_seconds
        self._lock = threading.Lock()  # one request at a time (a pass writes one page at a time anyway)
        self._ready = False
        self._broken: PageWriterGone | None = None
        parent_end, child_end = socket.socketpair()
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "pacrecon.page_writer", str(child_end.fileno())],
                pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as exc:
            parent_end.close()
            raise StorageUnavailable(f"the page writer process could not be started: {exc.strerror or exc}") from None
        finally:
            child_end.close()
        self._connection = Connection(parent_end.detach())
        self._connection.send(config)  # small: the socket's buffer holds it

    @property
    def pid(self) -> int:
        return self._child.pid

    async def write(self, work: Work[T]) -> T:
        return await anyio.to_thread.run_sync(self._ask, "write", work)

    async def read(self, work: Work[T]) -> T:
        return await anyio.to_thread.run_sync(self._ask, "read", work)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self.close_sync)

    def close_sync(self) -> int | None:
        """The child told to go (its end of the socket closes), waited for, killed after
        STOP_SECONDS; its exit code."""
        with self._lock:
            self._connection.close()
        try:
            return self._child.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._child.kill()
            return self._child.wait()

    def _ask(self, kind: str, work: Work[T]) -> T:
        with self._lock:
            if self._broken is not None:
                raise self._broken
            try:
                if not self._ready:  # the child's start overlapped the pass's first lookups
                    self._answer(self._start_seconds, "start")
                    self._ready = True
                self._connection.send((kind, work))
                outcome, detail = self._answer(self._deadline, "answer")
            except (OSError, EOFError) as exc:
                raise self._gone(f"its connection broke ({type(exc).__name__})") from None
        if outcome == "done":
            return detail  # type: ignore[no-any-return]
        if outcome == "unavailable":
            raise StorageUnavailable(detail)
        raise PageWriteFailed(detail)

    def _answer(self, seconds: float, what: str) -> tuple[str, Any]:
        if not self._connection.poll(seconds):
            self._child.kill()
            raise self._gone(f"it did not {what} within {seconds:g} s and was stopped")
        return self._connection.recv()  # type: ignore[no-any-return]

    def _gone(self, why: str) -> PageWriterGone:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._child.wait(1.0)  # a child that died has its exit code by now
        code = self._child.returncode
        self._broken = PageWriterGone(
            f"the page writer process (pid {self._child.pid}, exit code {code}) went: {why}; "
            "the page in hand may not be written (the next pass looks again)"
        )
        return self._broken


class PageWriteFailed(Exception):
    """A page's work raised in the child something other than the database's trouble
    (what it raised, as text: the exception itself stays there)."""


def main(descriptor: int) -> int:
    for stop_signal in (signal.SIGTERM, signal.SIGINT):  # first: the imports below take a while
        signal.signal(stop_signal, signal.SIG_IGN)
    connection = Connection(descriptor)
    try:
        config: WriterConfig = connection.recv()
    except EOFError:
        return 0  # the parent went before it sent the configuration
    # imported here: the parent's side needs none of it
    import reconciler.reconcile  # noqa: F401  (what the works are made of: imported before "ready")
    from pacrecon.logs import configure_logging
    from storage.sql_ledger import SqlLedger

    configure_logging(config.log_level, config.log_format, list(config.secrets))
    ledger = SqlLedger.from_url(config.database_url, lock_timeout_ms=config.lock_timeout_ms)
    gc.freeze()  # what start-up made lives as long as the process: the collector need not walk it again
    try:
        connection.send(("ready", os.getpid()))
        while True:
            try:
                message = connection.recv_bytes()
            except EOFError:
                return 0  # the parent is done, or gone
            connection.send(_outcome(ledger, message))
    finally:
        ledger.close()


def _outcome(ledger: SqlLedger, message: bytes) -> tuple[str, Any]:
    try:
        kind, work = pickle.loads(message)
        if kind == "read":
            return "done", ledger.read_sync(work)
        [(error, result)] = ledger.commit_here([work])
        if error is not None:
            raise error
        return "done", result
    except DATABASE_TROUBLE as exc:
        return "unavailable", f"{exc}"[:2000]
    except Exception as exc:
        return "failed", f"{type(exc).__name__}: {exc}"[:2000]


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
