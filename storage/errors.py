"""Errors the ledger raises. Callers map them; nothing here knows about HTTP."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError


class StorageError(Exception):
    """Base class of every error raised by `storage`."""


class StorageUnavailable(StorageError):
    """The database could not be reached or the transaction could not be committed.

    Nothing of the failed transaction is durable; the caller may retry it.
    """


# The database's trouble, not the data's: a lock wait that timed out, a lost connection,
# a full disk. Work that catches failures so as to skip one bad item lets these through:
# done again item by item, each would fail the same way, after the same wait.
DATABASE_TROUBLE: tuple[type[Exception], ...] = (StorageUnavailable, OperationalError, InterfaceError)


def is_database_trouble(exc: BaseException) -> bool:
    """`DATABASE_TROUBLE`, or any driver error after which the connection is gone (SQLAlchemy
    tells it by `connection_invalidated`, whatever the error's class): nothing more can run
    in that transaction, so nothing may be done again in it."""
    return isinstance(exc, DATABASE_TROUBLE) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


class SchemaNotCurrent(StorageError):
    """The database schema is not at the revision this code needs."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        shown = current or "empty (no migrations applied)"
        super().__init__(
            f"database schema is at revision {shown}, this version needs {head}: "
            "run `pacrecon migrate` first"
        )


class AmountOutOfRange(StorageError, ValueError):
    """An amount the ledger cannot hold exactly."""
