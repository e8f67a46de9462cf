"""Where a reconciliation pass writes its pages: the `PageWriter` interface, and
`LedgerPages`, the ledger's own writer thread. `pacrecon.page_writer.ProcessPages`
writes them in a child process instead (a pass of more than a page, by default)."""

from __future__ import annotations

from typing import Protocol, TypeVar

from storage.ledger import Ledger, Work

T = TypeVar("T")


class PageWriter(Protocol):
    """One pass's pages, written one at a time, in the order given."""

    async def write(self, work: Work[T]) -> T:
        """`work` committed (as `Ledger.transact`); what it returned. Raises
        `StorageUnavailable` when it was not committed for the database's sake or the
        writer's (then nothing of it is durable, or, if the writer went mid-commit, the
        next pass finds what was)."""
        ...

    async def read(self, work: Work[T]) -> T:
        """`work` run and rolled back (a dry run's page), as `Ledger.read`."""
        ...

    async def close(self) -> None:
        """The pass wrote its last page: release what the writer holds."""
        ...


class LedgerPages:
    """The pages through the ledger's own writer (in this process)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def write(self, work: Work[T]) -> T:
        return await self._ledger.transact(work)

    async def read(self, work: Work[T]) -> T:
        return await self._ledger.read(work)

    async def close(self) -> None:
        return None
