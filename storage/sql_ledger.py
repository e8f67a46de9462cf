"""`SqlLedger`: the ledger on SQLite or PostgreSQL, through SQLAlchemy."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from storage.batch import Outcome
from storage.delta_row import LOCKS_DELTAS
from storage.engine import SQLITE_WRITER_SETUP, make_engine
from storage.errors import SchemaNotCurrent, StorageUnavailable
from storage.group_commit import GroupCommitWriter, Job, commit_jobs, resolve_all, wait_within
from storage.ledger import Work
from storage.session import LedgerSession

log = structlog.get_logger("pacrecon.ledger")
T = TypeVar("T")
MAX_BATCH = 256
WRITE_DEADLINE_SECONDS = 30.0


class SqlLedger:
    """See `storage.ledger.Ledger`. Writes go through one group-commit writer thread;
    reads run on their own pooled connections and never wait for it."""

    def __init__(
        self, engine: Engine, *, max_batch: int = MAX_BATCH, write_deadline_seconds: float = WRITE_DEADLINE_SECONDS
    ) -> None:
        self.engine = engine
        # past this a caller is answered StorageUnavailable (never a success): a database
        # that stops answering without closing the connection must not hold requests forever
        self.write_deadline_seconds = write_deadline_seconds
        self._writer_engine = engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write_sessions = sessionmaker(
            self._writer_engine, expire_on_commit=False, info={LOCKS_DELTAS: engine.dialect.name == "postgresql"}
        )
        # On SQLite each thread that commits (the writer thread, or commit_here's caller)
        # keeps its connection between batches: taking one from the pool and giving it back
        # was 14 % of a batch of one's instructions (bench/RESULTS.md), and a file does not drop
        # connections. PostgreSQL takes one per batch: the pool's pre-ping replaces a
        # connection the server dropped, where a kept one would fail the next batch.
        self._kept = threading.local() if engine.dialect.name == "sqlite" else None
        self._kept_connections: list[Connection] = []
        self._kept_lock = threading.Lock()
        self._read_sessions = sessionmaker(engine, expire_on_commit=False)
        self._writer = GroupCommitWriter(self._commit_batch, max_batch=max_batch)

    @classmethod
    def from_url(cls, url: str, *, write_deadline_seconds: float = WRITE_DEADLINE_SECONDS, **engine_options: Any) -> SqlLedger:
        return cls(make_engine(url, **engine_options), write_deadline_seconds=write_deadline_seconds)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def transact(self, work: Work[T]) -> T:
        # an asyncio future the writer resolves on this loop (one wake-up per batch): a
        # concurrent Future wrapped, shielded and timed per request cost a fifth of the
        # event loop's time under load. Giving up waiting does not cancel the work: it may
        # still commit later, unacknowledged, and a retry finds it.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        self._writer.submit_waiter(work, loop, waiter)
        return await wait_within(waiter, self.write_deadline_seconds, self._late)  # type: ignore[no-any-return]

    def commit_here(self, works: Sequence[Work[Any]]) -> list[tuple[BaseException | None, Any]]:
        """`works` committed as one batch of the writer, in the calling thread, now: for a
        process whose one task is these writes (no hand-off to the writer thread and back,
        and no future to hand over). Each work's (failure, result), one of them None."""
        jobs = [Job(work, here=True) for work in works]
        commit_jobs(self._commit_batch, jobs)
        return [job.outcome or (StorageUnavailable("the writer told this work nothing"), None) for job in jobs]

    def transact_sync(self, work: Work[T]) -> T:
        try:
            return self._writer.submit(work).result(self.write_deadline_seconds)
        except FutureTimeout:
            raise self._late() from None

    def _late(self) -> StorageUnavailable:
        # the work may still commit later; it was not acknowledged, so a retry finds it
        return StorageUnavailable(f"the ledger did not commit within {self.write_deadline_seconds:g} s")

    async def read(self, work: Work[T]) -> T:
        return await anyio.to_thread.run_sync(self.read_sync, work)

    def read_sync(self, work: Work[T]) -> T:
        try:
            with self._read_sessions() as session:
                return work(LedgerSession(session))
        except SQLAlchemyError as exc:
            raise StorageUnavailable(f"database read failed: {_describe(exc)}") from exc

    def check_schema(self) -> str:
        if self._writer.busy_for() > self.write_deadline_seconds:
            raise StorageUnavailable(f"the ledger's writer has been stuck for {self._writer.busy_for():.0f} s")
        # imported here: alembic is ~6 MB and 60 ms of imports that the webhook writer
        # process, which never checks the schema (its daemon does), need not load
        from storage.schema import current_revision, head_revision

        head = head_revision()
        try:
            current = current_revision(self.engine)
        except SQLAlchemyError as exc:
            raise StorageUnavailable(f"database unreachable: {_describe(exc)}") from exc
        if current != head:
            raise SchemaNotCurrent(current, head)
        return current

    def close(self) -> None:
        self._writer.close()
        with self._kept_lock:
            for connection in self._kept_connections:
                _discard(connection)
            self._kept_connections.clear()
        self.engine.dispose()

    def _write_session(self) -> Session:
        """A session for one batch: on the thread's kept connection (SQLite), or on one from the pool."""
        if self._kept is None:
            return self._write_sessions()
        connection: Connection | None = getattr(self._kept, "connection", None)
        if connection is None or connection.closed:
            connection = self._kept.connection = self._writer_engine.connect()
            # on the driver's connection: through SQLAlchemy it would begin a transaction
            connection.connection.driver_connection.execute(SQLITE_WRITER_SETUP)  # type: ignore[union-attr]
            with self._kept_lock:
                self._kept_connections.append(connection)
        return self._write_sessions(bind=connection)

    def _drop_kept_connection(self) -> None:
        """After a failed commit the next batch starts on a new connection, as from the pool."""
        connection: Connection | None = getattr(self._kept, "connection", None) if self._kept is not None else None
        if connection is not None:
            self._kept.connection = None  # type: ignore[union-attr]
            with self._kept_lock:
                if connection in self._kept_connections:  # close() may have closed it already
                    self._kept_connections.remove(connection)
            _discard(connection)

    def _commit_batch(self, batch: list[Job]) -> None:
        jobs = [job for job in batch if job.start()]  # cancelled: nothing to do
        runs = _runs(jobs)
        if len(runs) == 1 and _batchable(jobs[0].work):
            # the common case under webhook load: all of one batchable type, one job alone
            # included (below the peak most batches are small). No savepoint around it (a
            # SAVEPOINT and a RELEASE per batch): if it is refused, the whole transaction is
            # undone and the jobs run again in a new one, each alone
            if not self._commit(jobs, partial(_run_whole, jobs)):
                self._commit(jobs, lambda session, ledger_session: [_run_in_savepoint(session, ledger_session, job.work) for job in jobs])
            return
        self._commit(jobs, lambda session, ledger_session: [o for run in runs for o in _run_group(session, ledger_session, run)])

    def _commit(self, jobs: list[Job], run: Callable[[Session, LedgerSession], list[Outcome]]) -> bool:
        """`run` in one transaction; every caller told its outcome after the commit, or the
        failure if there was none. False, with nothing committed and no one told, when
        `run` refused the batch as a whole."""
        try:
            with self._write_session() as session, session.begin():
                # BEGIN (IMMEDIATE on SQLite) now, not at the first statement of a work: a
                # database that stays locked fails the batch once here, instead of being
                # taken for a refused batch whose jobs then each wait out the lock again
                session.connection()
                outcomes = run(session, LedgerSession(session))
        except _BatchRefused:
            return False
        except SQLAlchemyError as exc:
            self._drop_kept_connection()
            failure = StorageUnavailable(f"commit failed: {_describe(exc)}")
            resolve_all((job, failure, None) for job in jobs)
            return True
        resolve_all((job, error, result) for job, (error, result) in zip(jobs, outcomes, strict=True))  # only now: committed
        return True


def _discard(connection: Connection) -> None:
    """A writer's kept connection closed for good, never given back to the pool: it carries
    SQLITE_WRITER_SETUP, which a reader's connection must not."""
    with contextlib.suppress(SQLAlchemyError):
        connection.invalidate()
        connection.close()


class _BatchRefused(Exception):
    """`run_batch` raised: its writes are undone and its jobs run again, each alone."""


def _run_whole(jobs: list[Job], session: Session, ledger_session: LedgerSession) -> list[Outcome]:
    """The jobs' `run_batch`; `_BatchRefused` if it raised (the caller undoes its writes),
    unless the transaction itself is gone (then that error, for the whole batch)."""
    works = [job.work for job in jobs]
    try:
        isolated = partial(_run_isolated, session, ledger_session)
        return type(works[0]).run_batch(ledger_session, works, isolated)  # type: ignore[attr-defined, no-any-return]
    except DBAPIError as exc:
        if exc.connection_invalidated or not session.in_transaction():
            raise
        log.warning("batch_refused", jobs=len(works), error=_describe(exc))
    except Exception as exc:
        log.warning("batch_refused", jobs=len(works), error=repr(exc)[:300])
    raise _BatchRefused


def _runs(jobs: list[Job]) -> list[list[Job]]:
    """Consecutive jobs of one batchable type together; any other job alone. The order is kept."""
    runs: list[list[Job]] = []
    for job in jobs:
        kind = type(job.work)
        if runs and _batchable(job.work) and type(runs[-1][0].work) is kind:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


def _batchable(work: object) -> bool:
    # a plain attribute test: isinstance() against a runtime Protocol costs microseconds per job
    return callable(getattr(type(work), "run_batch", None))


def _run_group(session: Session, ledger_session: LedgerSession, run: list[Job]) -> list[Outcome]:
    work = run[0].work
    if not _batchable(work):
        return [_run_in_savepoint(session, ledger_session, work)]
    try:
        with session.begin_nested():  # a refused batch leaves nothing behind
            return _run_whole(run, session, ledger_session)
    except _BatchRefused:
        pass
    # the batch as a whole was refused: each job alone, so that a bad one fails only itself
    return [_run_in_savepoint(session, ledger_session, job.work) for job in run]


def _run_isolated(session: Session, ledger_session: LedgerSession, works: Sequence[Work[Any]]) -> list[Outcome]:
    """See `storage.batch.Isolated`: one savepoint for all while none fails (a SAVEPOINT
    and a RELEASE per job were a fifth of the writer's time), else one each."""
    if len(works) > 1:
        try:
            with session.begin_nested():
                return [(None, work(ledger_session)) for work in works]
        except DBAPIError as exc:
            if exc.connection_invalidated or not session.in_transaction():
                raise
        except Exception:
            pass  # one of them failed: find which, without the others' writes at stake
    return [_run_in_savepoint(session, ledger_session, work) for work in works]


def _run_in_savepoint(session: Session, ledger_session: LedgerSession, work: Work[Any]) -> Outcome:
    """Run one job in a savepoint: its failure undoes its own writes and no one else's.

    Raises only when the transaction itself is gone (the connection broke), so that
    the whole batch fails and nothing of it is acknowledged.
    """
    try:
        with session.begin_nested():
            return None, work(ledger_session)
    except DBAPIError as exc:
        if exc.connection_invalidated or not session.in_transaction():
            raise
        if isinstance(exc, OperationalError):  # lock or statement timeout: worth a retry
            return StorageUnavailable(f"database busy: {_describe(exc)}"), None
        return exc, None  # the job's own statement was refused (a constraint, a bad value)
    except StatementError as exc:  # raised by a column type before any SQL ran
        return (exc.orig if isinstance(exc.orig, Exception) else exc), None
    except Exception as exc:
        return exc, None


def _describe(exc: BaseException) -> str:
    """The driver's own one-line message, without SQL text or parameters."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__
