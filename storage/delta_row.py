"""`DeltaRow`: a `local_delta` row read and written without the ORM, for the reconciler's pages.

A page of the reconciler reads a few hundred deltas and changes most of them. As ORM
objects, loading them, tracking each attribute set and flushing them was about half of a
page transaction's time (bench/RESULTS.md). A `DeltaRow` holds the same attributes as a
`LocalDelta` (the reconciler's functions take either), remembers the values it was read
with, and `DeltaRows.write` sends what changed as one UPDATE per set of changed columns.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeAlias

from sqlalchemy import and_, bindparam, inspect, or_, select, text, update
from sqlalchemy.orm import Session

from storage.errors import StorageError
from storage.models import LocalDelta

_TABLE = LocalDelta.__table__

# In the `info` of a session whose transaction writes the ledger (`SqlLedger`'s writer) on
# PostgreSQL: its reads of the deltas it may change lock them (FOR NO KEY UPDATE, in id
# order), so that two daemons' transactions about one delta take turns. Without it, each
# reads the row, the later commit overwrites the earlier (a VERIFIED delta set back to
# PROCESSING). NO KEY: an insert that references the delta (a discrepancy) is not held up.
# SQLite needs none: its writer holds the file's write lock from BEGIN IMMEDIATE.
LOCKS_DELTAS = "pacrecon.locks_deltas"


def locks_deltas(session: Session) -> bool:
    """Whether `session`'s reads of deltas it may change are to lock them (`LOCKS_DELTAS`)."""
    return bool(session.info.get(LOCKS_DELTAS))


# (attribute, column) in the table's order: the attribute of column "metadata" is delta_metadata
_FIELDS = tuple((prop.key, prop.columns[0].name) for prop in inspect(LocalDelta).column_attrs)
_ATTRIBUTES = tuple(attribute for attribute, _ in _FIELDS)
_SELECT_ROWS = select(*(_TABLE.c[column] for _, column in _FIELDS))
# id order: the order `LedgerSession.deltas_by_anchor` gives each anchor's, and the order
# rows are locked in (PostgreSQL locks after sorting), so two pages never wait on each other
_BY_IDS = _SELECT_ROWS.where(_TABLE.c.id.in_(bindparam("ids", expanding=True))).order_by(_TABLE.c.id)
_BY_ANCHORS = _SELECT_ROWS.where(_TABLE.c.anchor_id.in_(bindparam("anchors", expanding=True))).order_by(_TABLE.c.id)
_OF_SUBMISSION = _SELECT_ROWS.where(_TABLE.c.submission_id == bindparam("submission_id")).order_by(_TABLE.c.submission_index)
_LOCKED = {statement: statement.with_for_update(key_share=True) for statement in (_BY_IDS, _BY_ANCHORS, _OF_SUBMISSION)}
_SEQUENCE_SLOTS_MAX = 512
# PostgreSQL: a join with the pairs given as two arrays, one index seek per pair
_AT_SEQUENCES_POSTGRES = text(
    "SELECT %s FROM unnest(CAST(:customers AS text[]), CAST(:numbers AS text[])) AS wanted(customer_id, sequence_number)"
    " JOIN local_delta ON local_delta.customer_id = wanted.customer_id AND local_delta.sequence_number = wanted.sequence_number"
    % ", ".join(f"local_delta.{column}" for _, column in _FIELDS)
).columns(*(_TABLE.c[column] for _, column in _FIELDS))


class DeltaRow:
    """One `local_delta` row as plain attributes (those of `LocalDelta`)."""

    __slots__ = _ATTRIBUTES + ("_as_read",)

    id: int | None
    anchor_id: str | None
    item_hash: str | None
    customer_id: str
    amount: Decimal
    reason: str
    reference_id: str | None
    delta_metadata: dict[str, Any] | None
    idempotency_key: str
    source: str
    submission_id: int | None
    submission_index: int | None
    status: str
    status_reason: str | None
    receipt_id: str | None
    items_root: str | None
    item_hashes: list[str] | None
    tx_hash: str | None
    sequence_number: str | None
    previous_proof_hash: str | None
    verification_reference: str | None
    verified_by: str | None
    created_at: datetime
    emitted_at: datetime | None
    verified_at: datetime | None
    failed_at: datetime | None
    updated_at: datetime
    verification_lag_ms: int | None

    def __init__(self, values: Sequence[Any]) -> None:
        for attribute, value in zip(_ATTRIBUTES, values, strict=True):
            setattr(self, attribute, value)
        self._as_read = tuple(values)

    def changes(self) -> dict[str, Any]:
        """The attributes whose value differs from the one read, with their new value.
        A JSON value compares by value: one replaced by an equal one is no change."""
        return {
            attribute: getattr(self, attribute)
            for attribute, before in zip(_ATTRIBUTES, self._as_read)
            if getattr(self, attribute) != before
        }

    def __repr__(self) -> str:
        return f"DeltaRow(id={self.id}, anchor_id={self.anchor_id!r}, status={self.status!r})"


# what the reconciler's functions compare and change: a delta of either kind
AnyDelta: TypeAlias = LocalDelta | DeltaRow


class DeltaRows:
    """The deltas one transaction read as `DeltaRow`s, one object per id, and their changes."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._by_id: dict[int, DeltaRow] = {}
        self._locks = locks_deltas(session)

    def by_ids(self, delta_ids: Sequence[int]) -> list[DeltaRow]:
        """These deltas, in id order; locked in a writing session (`LOCKS_DELTAS`), as are
        those of `by_anchors` and `of_submission`."""
        return self._read(self._locked(_BY_IDS), {"ids": list(delta_ids)}) if delta_ids else []

    def by_anchors(self, anchor_ids: Sequence[str]) -> list[DeltaRow]:
        """Every delta of any of `anchor_ids`, in id order."""
        return self._read(self._locked(_BY_ANCHORS), {"anchors": list(anchor_ids)}) if anchor_ids else []

    def of_submission(self, submission_id: int) -> list[DeltaRow]:
        """As `LedgerSession.deltas_of_submission`."""
        return self._read(self._locked(_OF_SUBMISSION), {"submission_id": submission_id})

    def _locked(self, statement: Any) -> Any:
        return _LOCKED[statement] if self._locks else statement

    def at_sequences(self, keys: Iterable[tuple[str, str]]) -> list[DeltaRow]:
        """Every delta whose (customer id, sequence number) is one of `keys`, each key one
        seek in `ix_local_delta_customer_sequence`: on SQLite one query per 512 keys, on
        PostgreSQL one query."""
        keys = sorted(set(keys))
        if not keys:
            return []
        if self._session.get_bind().dialect.name == "postgresql":  # a fixed text: psycopg converts a long one again each call
            return self._read(_AT_SEQUENCES_POSTGRES, {"customers": [c for c, _ in keys], "numbers": [n for _, n in keys]})
        found: list[DeltaRow] = []
        for start in range(0, len(keys), _SEQUENCE_SLOTS_MAX):
            chunk = keys[start : start + _SEQUENCE_SLOTS_MAX]
            slots = 1 << (len(chunk) - 1).bit_length()
            chunk += chunk[-1:] * (slots - len(chunk))  # a repeated key finds nothing more
            values = {f"c{n}": customer for n, (customer, _) in enumerate(chunk)} | {f"s{n}": number for n, (_, number) in enumerate(chunk)}
            found += self._read(_at_sequences_statement(slots), values)
        return found

    def _read(self, statement: Any, values: dict[str, Any]) -> list[DeltaRow]:
        """The rows `statement` finds, in its order; a row read already is the same object,
        with the changes made to it since."""
        # (Session.execute autoflushes before a Core statement too: ORM changes made earlier are read)
        found = []
        for values_read in self._session.execute(statement, values):
            row = self._by_id.get(values_read[0])
            if row is None:
                row = self._by_id[values_read[0]] = DeltaRow(tuple(values_read))
            found.append(row)
        return found

    def get(self, delta_id: int) -> DeltaRow | None:
        """A row read already, without a query."""
        return self._by_id.get(delta_id)

    def write(self) -> int:
        """Send every change: one executemany UPDATE per set of changed columns. Returns
        how many rows changed. An ORM copy of a changed row held by the same session is
        expired, so that later work in the transaction reads it again."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in self._by_id.values():
            changes = row.changes()
            if changes:
                groups.setdefault(tuple(changes), []).append({f"v_{k}": v for k, v in changes.items()} | {"row_id": row.id})
        written = 0
        for attributes, parameters in groups.items():
            result = self._session.execute(_update_statement(attributes), parameters)
            if self._session.get_bind().dialect.supports_sane_multi_rowcount and result.rowcount != len(parameters):  # type: ignore[attr-defined]
                raise StorageError(f"{len(parameters)} deltas to update, {result.rowcount} found")  # type: ignore[attr-defined]
            written += len(parameters)
        self._expire_orm_copies(int(p["row_id"]) for group in groups.values() for p in group)
        for row in self._by_id.values():
            row._as_read = tuple(getattr(row, attribute) for attribute in _ATTRIBUTES)
        return written

    def _expire_orm_copies(self, delta_ids: Iterable[int]) -> None:
        identity_map, mapper = self._session.identity_map, inspect(LocalDelta)
        for delta_id in delta_ids:
            held = identity_map.get(mapper.identity_key_from_primary_key([delta_id]))
            if held is not None:
                self._session.expire(held)


@functools.cache
def _at_sequences_statement(slots: int) -> Any:
    """Deltas at any of `slots` (customer id, sequence number) pairs, bound as c0, s0, c1, …:
    an OR of one index seek each (a row-value IN is a full scan on SQLite). Built for
    powers of two only, so that a few statements are compiled once and cached."""
    return _SELECT_ROWS.where(
        or_(*(and_(_TABLE.c.customer_id == bindparam(f"c{n}"), _TABLE.c.sequence_number == bindparam(f"s{n}")) for n in range(slots)))
    )


@functools.cache
def _update_statement(attributes: tuple[str, ...]) -> Any:
    columns = dict(_FIELDS)
    return (
        update(_TABLE)
        .where(_TABLE.c.id == bindparam("row_id"))
        .values({columns[attribute]: bindparam(f"v_{attribute}") for attribute in attributes})
    )
