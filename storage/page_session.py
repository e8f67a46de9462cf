"""`PageSession`: one page of the reconciler written in a few statements instead of a few per delta."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, update

from storage.delta_row import DeltaRow, DeltaRows
from storage.models import AuditEntry, Discrepancy
from storage.session import LedgerSession, discrepancy_row, fixed_row
from storage.vocabulary import DiscrepancyStatus

_AUDIT_COLUMNS = tuple(c.name for c in AuditEntry.__table__.columns if c.name != "id")
_DISCREPANCY = Discrepancy.__table__
_RESOLVE = (
    update(_DISCREPANCY)
    .where(_DISCREPANCY.c.id == bindparam("row_id"))
    .values(status=DiscrepancyStatus.RESOLVED.value, resolved_at=bindparam("at"), resolution_note=bindparam("note"))
)


class NotReadAhead(Exception):
    """The page needs something `PageSession.read_ahead` did not read: redo it the exact way."""


class PageSession(LedgerSession):
    """A `LedgerSession` over a page of deltas (in the same transaction) that answers as
    one would, delta after delta, while it holds its writes back and sends them all in
    `write()`: a few statements a page instead of a few a delta. The deltas it gives
    are `DeltaRow`s, not ORM rows, one object per delta; their changes are written in
    `write()` too.

    Reads it serves from what it read ahead instead of a query each: `get_delta` (the
    page's deltas), `delta_by_sequence`, and the open discrepancies `resolve_open` and
    `occurrences` need. Asked for anything it did not read ahead, or for an order of
    writes it cannot keep (resolving a finding opened in the same page), it raises
    `NotReadAhead` and writes nothing; the caller then rolls the page back and runs it
    on a `LedgerSession`.

    The ids `open_discrepancy` and `record_fixed` return are placeholders (negative)
    that only this session's `occurrences` and `add_audit` take; `write()` turns them
    into the rows' ids.
    """

    def __init__(self, session: LedgerSession, delta_ids: Sequence[int] = (), *, anchor_ids: Sequence[str] = ()) -> None:
        """The page of the deltas `delta_ids`, or of every delta of `anchor_ids` (in id order)."""
        super().__init__(session._session)
        self._delta_rows = DeltaRows(self._session)
        self.deltas = self._delta_rows.by_ids(delta_ids) if delta_ids else self._delta_rows.by_anchors(anchor_ids)
        # a delta asked for and not found (deleted) is no read the page is missing
        self._page_ids = frozenset(delta_ids) if delta_ids else frozenset(delta.id for delta in self.deltas if delta.id is not None)
        self._of_customer: dict[str, list[DeltaRow]] = {}
        for delta in self.deltas:
            self._of_customer.setdefault(delta.customer_id, []).append(delta)
        self._by_sequence: dict[tuple[str, str], list[DeltaRow]] = {}
        self._open: dict[tuple[str, str], Discrepancy | None] = {}  # read ahead: (kind, subject) -> the open row
        self._rows: list[dict[str, Any]] = []  # discrepancy rows to write, in the order they were opened
        self._row_of: dict[tuple[str, str, str], int] = {}  # (kind, subject, status) -> index in _rows
        self._resolves: list[dict[str, Any]] = []
        self._audits: list[dict[str, Any]] = []

    def read_ahead(self, sequences: Iterable[tuple[str, str]], kinds: Sequence[str], subjects: Sequence[str]) -> None:
        """Read, in two queries, the deltas at `sequences` ((customer id, sequence number))
        and the open discrepancies of `kinds` about `subjects`."""
        keys = set(sequences)
        self._by_sequence = {key: [] for key in keys}
        for delta in self._delta_rows.at_sequences(keys):
            self._by_sequence[(delta.customer_id, delta.sequence_number or "")].append(delta)
        self._open = {(kind, subject): None for kind in kinds for subject in subjects}
        if kinds and subjects:
            self._open.update({(row.kind, row.subject): row for row in self.open_discrepancies_about(kinds, subjects)})

    # -- reads served from the read-ahead ------------------------------------------

    def get_delta(self, delta_id: int) -> DeltaRow | None:  # type: ignore[override]
        if delta_id not in self._page_ids:
            raise NotReadAhead(f"get_delta({delta_id})")
        return self._delta_rows.get(delta_id)

    def delta_by_sequence(self, customer_id: str, sequence_number: str) -> DeltaRow | None:  # type: ignore[override]
        if (customer_id, sequence_number) not in self._by_sequence:
            raise NotReadAhead(f"delta_by_sequence({customer_id!r}, {sequence_number!r})")
        # as stored before the page, plus the page's deltas that took that number since
        found = self._by_sequence[(customer_id, sequence_number)] + [
            d for d in self._of_customer.get(customer_id, ()) if d.sequence_number == sequence_number
        ]
        return min(found, key=lambda d: d.id or 0, default=None)

    def occurrences(self, discrepancy_id: int) -> int:
        if discrepancy_id >= 0:
            return super().occurrences(discrepancy_id)
        row = self._rows[-discrepancy_id - 1]
        key = (row["kind"], row["subject"])
        if key not in self._open:
            raise NotReadAhead(f"occurrences of {key}")
        before = self._open[key]
        return (before.occurrences if before is not None else 0) + int(row["occurrences"])

    def deltas_of_submission(self, submission_id: int) -> list[DeltaRow]:  # type: ignore[override]
        return self._delta_rows.of_submission(submission_id)  # rare (a resend): a query, but the page's objects

    def _orm_deltas(self, *args: Any, **kwargs: Any) -> Any:
        # an ORM copy of a delta this page holds as a DeltaRow would be read stale and written twice
        raise NotReadAhead("deltas as ORM rows, in a page whose deltas are DeltaRows")

    load_deltas = deltas_by_anchor = deltas_by_item_hash = deltas_by_receipt = list_deltas = add_delta = _orm_deltas  # type: ignore[assignment]

    # -- writes held back until write() ----------------------------------------------

    def open_discrepancy(self, finding: Discrepancy | dict[str, Any], now: datetime) -> int:
        row = discrepancy_row(finding, now)
        index = self._row_of.get((row["kind"], row["subject"], row["status"]))
        if index is None:
            return self._add_row(row)
        # seen again in this page: one row for both, as two upserts one after the other leave it
        held = self._rows[index]
        held.update(occurrences=held["occurrences"] + 1, last_seen_at=now, evidence=row["evidence"])
        for name in ("event_id", "run_id"):
            held[name] = row[name] if row[name] is not None else held[name]
        return -index - 1

    def record_fixed(self, finding: Discrepancy | dict[str, Any], note: str, now: datetime) -> int:
        row = fixed_row(finding, note, now)
        if (row["kind"], row["subject"], row["status"]) in self._row_of:
            raise NotReadAhead(f"a second fixed {row['kind']} about {row['subject']} in one page")
        return self._add_row(row)

    def _add_row(self, row: dict[str, Any]) -> int:
        self._row_of[(row["kind"], row["subject"], row["status"])] = len(self._rows)
        self._rows.append(row)
        return -len(self._rows)

    def resolve_open(self, kind: str | Sequence[str], subject: str, note: str, now: datetime) -> list[int]:
        resolved = []
        for one in [kind] if isinstance(kind, str) else kind:
            if (one, subject) not in self._open or (one, subject, DiscrepancyStatus.OPEN.value) in self._row_of:
                raise NotReadAhead(f"resolve_open({one!r}, {subject!r})")
            row = self._open[(one, subject)]
            if row is not None:
                self._open[(one, subject)] = None
                self._resolves.append({"row_id": row.id, "at": now, "note": note[:2000]})
                resolved.append(int(row.id or 0))
        return sorted(resolved)

    def add_audit(self, entry: AuditEntry | dict[str, Any]) -> None:
        self._audits.append({name: entry.get(name) if isinstance(entry, dict) else getattr(entry, name) for name in _AUDIT_COLUMNS})

    def write(self) -> None:
        """Send what the page held back: resolutions, then discrepancies (one multi-row
        upsert, in the order they were found), then audit entries, then the deltas'
        changes, then whatever ORM row changed (a submission to send again)."""
        if self._resolves:
            self._session.execute(_RESOLVE, self._resolves)
        ids: list[int] = []
        if self._rows:
            returned = self.open_discrepancies_together(self._rows)
            ids = [returned[(row["kind"], row["subject"], row["status"])] for row in self._rows]
        if self._audits:
            for row in self._audits:
                if row["discrepancy_id"] is not None and row["discrepancy_id"] < 0:
                    row["discrepancy_id"] = ids[-row["discrepancy_id"] - 1]
            # an executemany (one prepared statement, pipelined): as arrays it measured no faster
            self._session.execute(insert(AuditEntry.__table__), self._audits)
        self._delta_rows.write()
        self._session.flush()
        self._rows, self._row_of, self._resolves, self._audits = [], {}, [], []
