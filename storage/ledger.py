"""The ledger interface. `SqlLedger` (storage.sql_ledger) implements it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from storage.session import LedgerSession

T = TypeVar("T")
Work = Callable[[LedgerSession], T]


class Ledger(Protocol):
    async def transact(self, work: Work[T]) -> T:
        """Run `work` in a transaction and commit it durably; return what `work` returned.

        When this returns, the commit has reached stable storage. If `work` raises,
        none of its writes are kept and its exception is raised here. Raises
        `StorageUnavailable` when the database cannot be reached, a lock or a
        statement times out, or the commit fails; then nothing of `work` is durable.

        `work` should return plain data, not rows: other callers' work shares the
        transaction, and a row may be expired by their rollback or detached after it.
        """
        ...

    def transact_sync(self, work: Work[T]) -> T:
        """`transact` for synchronous callers (the command line, migrations, tests)."""
        ...

    async def read(self, work: Work[T]) -> T:
        """Run `work` in a transaction that is rolled back; raises `StorageUnavailable`."""
        ...

    def read_sync(self, work: Work[T]) -> T:
        """`read` for synchronous callers."""
        ...

    def check_schema(self) -> str:
        """Return the schema revision; raise `SchemaNotCurrent` unless it is the head,
        `StorageUnavailable` when the database cannot be reached."""
        ...

    def close(self) -> None:
        """Commit what was submitted, then release every connection."""
        ...
