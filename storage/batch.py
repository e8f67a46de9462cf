"""Work the writer may run together with its neighbours in the queue (see SqlLedger).

Most work is a function of one `LedgerSession`, run in a savepoint of its own. Work
of a type that also has `run_batch` is handed over in runs of consecutive jobs of
that type, so that it can do per batch what would otherwise be done per job (one
multi-row INSERT instead of N, one lookup instead of N). The result must be what
running the jobs one after another, each in its own savepoint, would have given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from storage.session import LedgerSession

# (the job's error, or None; its result)
Outcome = tuple[BaseException | None, Any]
# runs works one after another as if each had a savepoint of its own (one failing undoes
# only itself): what `run_batch` uses for the jobs it cannot batch. They share one
# savepoint until one fails; then that is rolled back and each runs again in its own,
# so a work must do nothing but write to the ledger. Raises only when the transaction
# itself is gone.
Isolated = Callable[[Sequence[Callable[[LedgerSession], Any]]], list[Outcome]]


@runtime_checkable
class BatchableWork(Protocol):
    def __call__(self, session: LedgerSession) -> Any:
        """The work alone (what the ledger runs when batching fails or is not possible)."""
        ...

    @classmethod
    def run_batch(cls, session: LedgerSession, works: Sequence[Any], isolated: Isolated) -> list[Outcome]:
        """One outcome per work, in order. It may raise: then the ledger undoes all it
        wrote and runs each work alone, in a savepoint of its own."""
        ...
