"""At most one reconciliation pass at a time, across processes and replicas.

PostgreSQL: a session-level advisory lock on a connection of its own, held for the
pass. SQLite (one host): an exclusive OS file lock beside the database file. Both
are released by the operating system or the server if the holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from storage.errors import StorageUnavailable


def _key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"pacrecon:{name}".encode()).digest()[:8], "big", signed=True)


class Held:
    """Whether the lock is ours; `still_held()` checks it has not been lost since."""

    def __init__(self, held: bool, check: Callable[[], bool] = lambda: True) -> None:
        self._held, self._check = held, check

    def __bool__(self) -> bool:
        return self._held

    def still_held(self) -> bool:
        return self._held and self._check()


@contextlib.contextmanager
def exclusive(engine: Engine, name: str) -> Iterator[Held]:
    """Hold the lock `name` for the block when no one else does (a false `Held` otherwise)."""
    if engine.dialect.name == "postgresql":
        with _advisory(engine, name) as held:
            yield held
    else:
        with _file_lock(engine, name) as held:
            yield Held(held)


@contextlib.contextmanager
def _advisory(engine: Engine, name: str) -> Iterator[Held]:
    try:
        connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    except SQLAlchemyError as exc:
        raise StorageUnavailable(f"cannot take the {name} lock: {exc.__class__.__name__}") from exc

    def alive() -> bool:  # the lock lives as long as this connection's session
        try:
            connection.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    try:
        held = bool(connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _key(name)}).scalar())
        try:
            yield Held(held, alive)
        finally:
            if held:
                try:
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _key(name)})
                except SQLAlchemyError:
                    connection.invalidate()  # never pool a session that may still hold the lock
    finally:
        connection.close()


@contextlib.contextmanager
def _file_lock(engine: Engine, name: str) -> Iterator[bool]:
    database = engine.url.database
    if not database or database == ":memory:":
        yield True  # a private in-memory database: no one else can see it
        return
    descriptor = os.open(f"{database}.{name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
