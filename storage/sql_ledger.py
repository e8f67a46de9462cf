"""`SqlLedger`: the ledger on SQLite or PostgreSQL, through SQLAlchemy."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.orm import sessionmaker

from storage.engine import make_engine
from storage.errors import SchemaNotCurrent, StorageUnavailable
from storage.group_commit import GroupCommitWriter, Job
from storage.ledger import Work
from storage.schema import current_revision, head_revision
from storage.session import LedgerSession

T = TypeVar("T")
MAX_BATCH = 256


class SqlLedger:
    """See `storage.ledger.Ledger`. Writes go through one group-commit writer thread;
    reads run on their own pooled connections and never wait for it."""

    def __init__(self, engine: Engine, *, max_batch: int = MAX_BATCH) -> None:
        self.engine = engine
        writer_engine = engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write_sessions = sessionmaker(writer_engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(engine, expire_on_commit=False)
        self._writer = GroupCommitWriter(self._commit_batch, max_batch=max_batch)

    @classmethod
    def from_url(cls, url: str, **engine_options: Any) -> SqlLedger:
        return cls(make_engine(url, **engine_options))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def transact(self, work: Work[T]) -> T:
        return await asyncio.wrap_future(self._writer.submit(work))

    def transact_sync(self, work: Work[T]) -> T:
        return self._writer.submit(work).result()

    async def read(self, work: Work[T]) -> T:
        return await anyio.to_thread.run_sync(self.read_sync, work)

    def read_sync(self, work: Work[T]) -> T:
        try:
            with self._read_sessions() as session:
                return work(LedgerSession(session))
        except SQLAlchemyError as exc:
            raise StorageUnavailable(f"database read failed: {_describe(exc)}") from exc

    def check_schema(self) -> str:
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
        self.engine.dispose()

    def _commit_batch(self, batch: list[Job]) -> None:
        done: list[tuple[Job, BaseException | None, Any]] = []
        try:
            with self._write_sessions() as session, session.begin():
                ledger_session = LedgerSession(session)
                for job in batch:
                    if not job.future.set_running_or_notify_cancel():
                        continue
                    try:
                        with session.begin_nested():  # one job's failure undoes only its own writes
                            result = job.work(ledger_session)
                    except IntegrityError as exc:
                        done.append((job, exc, None))
                    except DBAPIError:
                        raise  # the connection or the transaction is gone: nothing commits
                    except StatementError as exc:  # raised by a column type before any SQL ran
                        done.append((job, exc.orig if isinstance(exc.orig, Exception) else exc, None))
                    except Exception as exc:
                        done.append((job, exc, None))
                    else:
                        done.append((job, None, result))
        except SQLAlchemyError as exc:
            failure = StorageUnavailable(f"commit failed: {_describe(exc)}")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(failure)
            return
        for job, error, result in done:
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)


def _describe(exc: BaseException) -> str:
    """The driver's own one-line message, without SQL text or parameters."""
    original = getattr(exc, "orig", None) or exc
    return str(original).strip().splitlines()[0] if str(original).strip() else type(original).__name__
