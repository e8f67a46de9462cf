"""The webhook hot path's two statements, run on the transaction's own DB-API cursor.

Under load the ledger's writer commits a batch of webhooks every few milliseconds, and
SQLAlchemy's statement machinery (compile cache, execution context, result objects) cost
more CPU than the database did: a few hundred microseconds per statement on a slow core,
against tens on the driver's cursor (bench/RESULTS.md). Here the SQL text is built once
per dialect and row count, and values go through the columns' own bind processors, so a
row is stored exactly as the ORM would store it (tests/test_driver_sql.py compares).

Only for statements whose rows the ORM does not hold: nothing here touches the session's
identity map. The cursor belongs to the session's connection, so the statements are part
of its transaction (and of any savepoint around them).

On PostgreSQL each statement binds one array per column (`unnest`), not one parameter
per value: psycopg converts and caches a statement's text only up to 50 parameters, and
converting a multi-row VALUES list again for every batch cost 13-25 µs a row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import String, Table, TypeDecorator
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeEngine
from sqlalchemy.orm import Session

from storage.models import LocalDelta, WebhookEvent

EVENT_COLUMNS = tuple(c.name for c in WebhookEvent.__table__.columns if c.name != "id")
_ANCHOR = LocalDelta.__table__.c.anchor_id.name
CHUNK = 256  # rows per statement: 2,560 parameters, far below either database's limit
_BY_DIALECT: dict[str, DriverStatements] = {}


class DriverStatements:
    """SQL text and bind processors for one dialect (sqlite: `?`, psycopg: `%s`)."""

    def __init__(self, dialect: Dialect) -> None:
        self._arrays = dialect.name == "postgresql"
        self._mark = "?" if dialect.name == "sqlite" else "%s"
        table = WebhookEvent.__table__
        self._processors: list[Callable[[Any], Any] | None] = [
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in EVENT_COLUMNS
        ]
        if self._arrays:  # the statements' text never changes: psycopg caches its conversion
            rows = rows_from_arrays_sql(table, EVENT_COLUMNS, lambda _: "%s")
            self._insert_arrays_sql = (
                f"INSERT INTO {WebhookEvent.__tablename__} ({', '.join(EVENT_COLUMNS)}) {rows}"
                " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
            )
            self._anchors_array_sql = f"SELECT DISTINCT {_ANCHOR} FROM {LocalDelta.__tablename__} WHERE {_ANCHOR} = ANY(%s::text[])"

    @functools.lru_cache(maxsize=512)  # noqa: B019  (one instance per dialect, kept for the process)
    def _insert_events_sql(self, rows: int) -> str:
        row = "(" + ", ".join([self._mark] * len(EVENT_COLUMNS)) + ")"
        return (
            f"INSERT INTO {WebhookEvent.__tablename__} ({', '.join(EVENT_COLUMNS)}) VALUES "
            + ", ".join([row] * rows)
            + " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
        )

    @functools.lru_cache(maxsize=512)  # noqa: B019
    def _anchors_sql(self, count: int) -> str:
        marks = ", ".join([self._mark] * count)
        return f"SELECT DISTINCT {_ANCHOR} FROM {LocalDelta.__tablename__} WHERE {_ANCHOR} IN ({marks})"

    def insert_events(self, session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
        """INSERT … ON CONFLICT (event_id) DO NOTHING RETURNING event_id, all rows in one
        statement: the event ids inserted (a repeated id inserts once, the first copy)."""
        if self._arrays:  # rows in their order, so the first copy is the one inserted
            columns: list[list[Any]] = [[row[name] for row in rows] for name in EVENT_COLUMNS]
            for index, process in enumerate(self._processors):
                if process is not None:
                    columns[index] = [process(value) for value in columns[index]]
            return {event_id for (event_id,) in _run(session, self._insert_arrays_sql, columns)}
        inserted: set[str] = set()
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            values: list[Any] = []
            for row in chunk:
                for name, process in zip(EVENT_COLUMNS, self._processors, strict=True):
                    values.append(row[name] if process is None else process(row[name]))
            inserted.update(event_id for (event_id,) in _run(session, self._insert_events_sql(len(chunk)), values))
        return inserted

    def anchors_with_deltas(self, session: Session, anchor_ids: Sequence[str]) -> set[str]:
        if self._arrays:
            return {anchor for (anchor,) in _run(session, self._anchors_array_sql, [list(anchor_ids)])}
        found: set[str] = set()
        for start in range(0, len(anchor_ids), CHUNK):
            chunk = list(anchor_ids[start : start + CHUNK])
            found.update(anchor for (anchor,) in _run(session, self._anchors_sql(len(chunk)), chunk))
        return found


def rows_from_arrays_sql(table: Table, columns: Sequence[str], placeholder: Callable[[str], str]) -> str:
    """PostgreSQL: SELECT the rows of `columns` bound as one array per column (the column
    named by `placeholder(name)`), in the arrays' order: a fixed text for any number of rows.
    Strings are cast to `text[]`: an explicit cast to VARCHAR(n) would cut a longer value
    short, where storing it in the column refuses it, as an INSERT of the value does."""
    dialect = postgresql.dialect()
    arrays = ", ".join(f"CAST({placeholder(name)} AS {_element_type(table.c[name].type, dialect)}[])" for name in columns)
    named = ", ".join(columns)
    return f"SELECT {named} FROM unnest({arrays}) WITH ORDINALITY AS given({named}, position) ORDER BY position"


def _element_type(column_type: TypeEngine[Any], dialect: Dialect) -> str:
    base = column_type.impl_instance if isinstance(column_type, TypeDecorator) else column_type
    return "text" if isinstance(base, String) else column_type.compile(dialect)


def _run(session: Session, sql: str, values: list[Any]) -> list[tuple[Any, ...]]:
    session.flush()  # anything the ORM still holds goes first, as before any statement of its own
    connection = session.connection()
    cursor = connection.connection.cursor()
    try:
        cursor.execute(sql, values)
        return cursor.fetchall()
    except connection.dialect.loaded_dbapi.Error as exc:
        raise _as_sqlalchemy_error(connection, cursor, sql, exc) from exc
    finally:
        cursor.close()


def _as_sqlalchemy_error(connection: Connection, cursor: Any, sql: str, exc: Exception) -> DBAPIError:
    """The driver's error as SQLAlchemy would have raised it had it run the statement
    (OperationalError for a lock timeout or a deadlock, `connection_invalidated` when the
    connection is gone, and then invalidated so that the pool does not hand it out again):
    what the writer and `storage.errors.is_database_trouble` tell the database's trouble by."""
    dialect = connection.dialect
    gone = dialect.is_disconnect(exc, connection.connection.dbapi_connection, cursor)
    if gone:
        connection.invalidate(exc)
    return DBAPIError.instance(
        sql, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True, connection_invalidated=gone, dialect=dialect
    )


def statements_for(dialect: Dialect) -> DriverStatements:
    """One per dialect name (what the text and the processors depend on), for the process."""
    statements = _BY_DIALECT.get(dialect.name)
    if statements is None:
        statements = _BY_DIALECT[dialect.name] = DriverStatements(dialect)
    return statements
