"""Database engines with the durability the ledger promises, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from storage import jsonio

LOCK_TIMEOUT_MS = 5000


def normalise_url(url: str | URL) -> URL:
    """`postgres://` and `postgresql://` mean psycopg 3, the driver this package ships."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, *, lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> Engine:
    """An engine whose statements give up after `lock_timeout_ms` waiting for a lock
    (SQLite's busy timeout, PostgreSQL's lock_timeout) instead of hanging a request."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, lock_timeout_ms)
    statement_timeout_ms = max(30_000, 2 * lock_timeout_ms)
    options = " ".join(
        (
            f"-c lock_timeout={int(lock_timeout_ms)}",
            f"-c statement_timeout={statement_timeout_ms}",
            "-c synchronous_commit=on",  # an acknowledged commit is on disk, whatever the server's default
        )
    )
    return create_engine(
        parsed,
        json_serializer=jsonio.dumps,
        json_deserializer=jsonio.loads,
        pool_pre_ping=True,  # a connection the server dropped is replaced, not handed out
        pool_size=5,
        max_overflow=5,
        pool_timeout=10,
        connect_args={
            "options": options,
            "connect_timeout": 10,
            # a silent network partition fails the statement in bounded time instead of
            # holding the single writer until the kernel gives up (~15 minutes)
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": statement_timeout_ms,
        },
    )


# For a connection that only the writer uses (it is never handed to a reader): its statement
# journals (each statement's changed pages, kept to undo that statement alone) stay in memory.
# SQLite spills one past 64 KiB to a temporary file, created and deleted in every such
# transaction; a batch of 16 webhooks with random ids changes about 4 pages each (3 of them
# index leaves), so every batch did, with a write per page changed (bench/RESULTS.md, session
# 18). Memory: what one statement changes, reckoned at about 4 MB for the largest batch (256
# events x 4 pages x 4 KiB; not measured). A reader's connection keeps files: a report's sort
# of a large ledger must not grow the process.
SQLITE_WRITER_SETUP = "PRAGMA temp_store=MEMORY"


def _sqlite_engine(url: URL, busy_timeout_ms: int) -> Engine:
    engine = create_engine(
        url,
        json_serializer=jsonio.dumps,  # JSON columns keep exact numbers too
        json_deserializer=jsonio.loads,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN, SAVEPOINT and COMMIT are ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so a commit that returned
        # survives a crash of the process and of the machine.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A writer takes the write lock up front: no deadlock upgrading a read lock later.
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine
