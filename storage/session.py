"""`LedgerSession`: what work inside one ledger transaction may read and write."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, Column, Integer, Row, String, Table, bindparam, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, make_transient_to_detached

from storage.delta_row import locks_deltas
from storage.models import (
    ORPHAN_PREDICATE,
    RECEIPT_ONLY_ORPHAN_PREDICATE,
    UNANCHORED_ORPHAN_PREDICATE,
    UNSETTLED_PREDICATE,
    AuditEntry,
    Discrepancy,
    LocalDelta,
    OutboxSubmission,
    ReconciliationRun,
    WebhookEvent,
    WebhookTally,
)
from storage import jsonio
from storage.driver_sql import EVENT_COLUMNS, rows_from_arrays_sql, statements_for
from storage.report_queries import ReportQueries
from storage.rollup_sql import POSTGRES_FOLD
from storage.types import UtcDateTime, combine_exact_sum, exact_sum_parts
from storage.vocabulary import DiscrepancyStatus, EventOutcome, SubmissionStatus

_EVENTS = WebhookEvent.__table__
# written out, not bound: SQLite uses the partial index of open discrepancies only then
_OPEN_SQL = text(f"status = '{DiscrepancyStatus.OPEN.value}'")

@functools.cache
def _insert_event_statement(dialect: str) -> Any:
    """INSERT … ON CONFLICT (event_id) DO NOTHING RETURNING id, built once per dialect (many
    events at once go through `storage.driver_sql`)."""
    table = WebhookEvent.__table__
    return (
        (sqlite_insert if dialect == "sqlite" else postgresql_insert)(table)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(table.c.id)
    )


_DISCREPANCY_COLUMNS = tuple(c.name for c in Discrepancy.__table__.columns if c.name != "id")


@functools.cache
def _open_discrepancies_statement(dialect: str) -> Any:
    """INSERT a discrepancy; when one of its kind and subject is open, count its sightings
    on that row instead and keep the newest evidence (the partial unique index decides).
    Built once per dialect; executed with a row, or a list of rows (multi-row INSERTs)."""
    return _upsert_discrepancies((sqlite_insert if dialect == "sqlite" else postgresql_insert)(Discrepancy.__table__))


@functools.cache
def _open_discrepancies_from_arrays() -> Any:
    """The same upsert on PostgreSQL for many rows, bound as one array per column."""
    table = Discrepancy.__table__
    return _upsert_discrepancies(postgresql_insert(table).from_select(list(_DISCREPANCY_COLUMNS), _rows_from_arrays(table, _DISCREPANCY_COLUMNS)))


def _rows_from_arrays(table: Table, columns: Sequence[str]) -> Any:
    """PostgreSQL: the rows bound as one array per column (`_as_arrays`), in order, to INSERT
    many with a fixed text. psycopg converts a statement of more than 50 parameters again
    on every call: a multi-row VALUES of a page's findings took a tenth of a pass's CPU."""
    return text(rows_from_arrays_sql(table, columns, lambda name: f":{name}")).columns(*(table.c[name] for name in columns))


def _as_arrays(rows: Sequence[dict[str, Any]], table: Table, columns: Sequence[str], session: Session) -> dict[str, list[Any]]:
    """`rows` as one list per column for `_rows_from_arrays`, each value as the column's own
    type binds it (the timestamps' processor refuses a naive one); JSON as the text the
    engine's serializer writes (a json column keeps the text as given)."""
    dialect = session.get_bind().dialect
    arrays: dict[str, list[Any]] = {}
    for name in columns:
        values = [row[name] for row in rows]
        if isinstance(table.c[name].type, JSON):
            arrays[name] = [jsonio.dumps(value) for value in values]
        else:
            process = _bind_processor(table.c[name], dialect)
            arrays[name] = values if process is None else [process(value) for value in values]
    return arrays


@functools.cache
def _bind_processor(column: Column[Any], dialect: Any) -> Any:
    return column.type.dialect_impl(dialect).bind_processor(dialect)


def _upsert_discrepancies(statement: Any) -> Any:
    table = Discrepancy.__table__
    return statement.on_conflict_do_update(
        index_elements=[table.c.kind, table.c.subject],
        index_where=_OPEN_SQL,
        set_={
            "occurrences": table.c.occurrences + statement.excluded.occurrences,
            "last_seen_at": statement.excluded.last_seen_at,
            "evidence": statement.excluded.evidence,
            "event_id": func.coalesce(statement.excluded.event_id, table.c.event_id),
            "run_id": func.coalesce(statement.excluded.run_id, table.c.run_id),
        },
    ).returning(table.c.id, table.c.kind, table.c.subject, table.c.status)


def discrepancy_row(finding: Discrepancy | dict[str, Any], now: datetime) -> dict[str, Any]:
    """`finding` (a model, or its column values: cheaper to make) as a new open
    discrepancy row, first seen `now` (what `open_discrepancy` inserts)."""
    values = finding.get if isinstance(finding, dict) else functools.partial(getattr, finding)
    row = {name: values(name) for name in _DISCREPANCY_COLUMNS}
    row.update(status=DiscrepancyStatus.OPEN.value, occurrences=1, first_seen_at=now, last_seen_at=now)
    return row


def fixed_row(finding: Discrepancy | dict[str, Any], note: str, now: datetime) -> dict[str, Any]:
    """`finding` as a gap found and fixed at `now`: a row born resolved (what `record_fixed` inserts)."""
    return discrepancy_row(finding, now) | {"status": DiscrepancyStatus.RESOLVED.value, "resolved_at": now, "resolution_note": note[:2000]}


# built once: every webhook looks its deltas up, and a reused statement keeps its cache key
_DELTAS_BY = {
    "ids": select(LocalDelta).where(LocalDelta.id.in_(bindparam("value", expanding=True))).order_by(LocalDelta.id),  # type: ignore[union-attr]
    "anchor_id": select(LocalDelta).where(LocalDelta.anchor_id == bindparam("value")).order_by(LocalDelta.id),
    "item_hash": select(LocalDelta).where(LocalDelta.item_hash == bindparam("value")).order_by(LocalDelta.id),
    "receipt_id": select(LocalDelta).where(LocalDelta.receipt_id == bindparam("value")).order_by(LocalDelta.id),
    "submission_id": select(LocalDelta).where(LocalDelta.submission_id == bindparam("value")).order_by(LocalDelta.submission_index),  # type: ignore[arg-type]
}
# the same, locking what they read (`storage.delta_row.LOCKS_DELTAS`); an object the session
# holds already is read again: it may have changed since it was read, before the lock
_DELTAS_LOCKED_BY = {
    key: statement.with_for_update(key_share=True).execution_options(populate_existing=True) for key, statement in _DELTAS_BY.items()
}


class LedgerSession:
    """Repository over one open transaction. It never commits: the ledger does.

    Methods return table rows attached to the transaction; changes made to them
    are written when the ledger commits the work.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        dialect = session.get_bind().dialect
        self._dialect = dialect.name
        self._driver = statements_for(dialect)  # the webhook hot path's statements
        self._deltas_by = _DELTAS_LOCKED_BY if locks_deltas(session) else _DELTAS_BY

    @property
    def dialect(self) -> str:
        return self._dialect

    def report(self) -> ReportQueries:
        """The report's reads, in this transaction."""
        return ReportQueries(self._session)

    def _insert(self, model: type[Any]) -> Any:
        return (sqlite_insert if self._dialect == "sqlite" else postgresql_insert)(model)

    # -- webhook events -------------------------------------------------------

    def insert_event(self, event: WebhookEvent) -> WebhookEvent | None:
        """Insert `event` unless its event id is known: the stored row, or None for a duplicate.

        Safe against a concurrent insert of the same id in another transaction or
        process: the unique constraint decides, and the loser gets None.
        """
        values = {name: getattr(event, name) for name in EVENT_COLUMNS}
        # one prebuilt Core statement with bound values: building an ORM insert per event
        # (and its cache key) was the writer thread's largest cost under load (bench/RESULTS.md)
        statement = _insert_event_statement(self._dialect)
        inserted_id = self._session.execute(statement, values).scalar_one_or_none()
        if inserted_id is None:
            return None
        # every column but the id was just written from `event`: attach it as the stored row
        # instead of reading the row back
        event.id = inserted_id
        make_transient_to_detached(event)
        self._session.add(event)
        return event

    def insert_events(self, rows: list[dict[str, Any]]) -> set[str]:
        """Insert many events at once (each a dict of every `webhook_event` column but `id`),
        skipping any whose event id is known; returns the event ids that were inserted.

        Same guarantee as `insert_event`: the unique constraint decides. Two rows with one
        event id in `rows` insert one of them, and its id is returned once.
        """
        if not rows:
            return set()
        return self._driver.insert_events(self._session, rows)

    def anchors_with_deltas(self, anchor_ids: set[str]) -> set[str]:
        """Which of `anchor_ids` at least one local delta has (one query for all of them)."""
        if not anchor_ids:
            return set()
        return self._driver.anchors_with_deltas(self._session, sorted(anchor_ids))

    def get_event(self, event_id: str) -> WebhookEvent | None:
        return self._session.scalars(select(WebhookEvent).where(WebhookEvent.event_id == event_id)).first()

    def orphan_events_for(self, delta: LocalDelta) -> list[WebhookEvent]:
        """Orphan events this delta may match, oldest first: those naming its anchor id, those
        naming no anchor but its item hash, and those naming neither but its receipt id. An
        orphan is matched by the first key it names of the three (reconciler.apply.matching_deltas):
        one naming another anchor does not match this delta, whatever its hash or receipt."""
        found: dict[int, WebhookEvent] = {}
        # one index-backed query per key: an OR across three partial indexes is a scan
        for column, value, orphans in (
            (WebhookEvent.anchor_id, delta.anchor_id, ORPHAN_PREDICATE),
            (WebhookEvent.item_hash, delta.item_hash, UNANCHORED_ORPHAN_PREDICATE),
            (WebhookEvent.receipt_id, delta.receipt_id, RECEIPT_ONLY_ORPHAN_PREDICATE),
        ):
            if value:
                statement = select(WebhookEvent).where(orphans, column == value)
                found.update((event.id, event) for event in self._session.scalars(statement) if event.id is not None)
        return [found[key] for key in sorted(found)]

    # -- local deltas ---------------------------------------------------------

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """Undo only what the block wrote if it raises; the transaction goes on."""
        with self._session.begin_nested():
            yield

    def flush(self) -> None:
        """Write pending changes inside the transaction, so queries see them."""
        self._session.flush()

    def add_delta(self, delta: LocalDelta) -> LocalDelta:
        self._session.add(delta)
        self._session.flush()
        return delta

    def get_delta(self, delta_id: int) -> LocalDelta | None:
        return self._session.get(LocalDelta, delta_id)

    def load_deltas(self, delta_ids: Sequence[int]) -> list[LocalDelta]:
        """Read these deltas in one query; `get_delta` then finds them in the transaction
        without asking the database again (a page of the reconciler: 200 queries saved)."""
        return self._deltas_where("ids", list(delta_ids))

    def deltas_by_anchor(self, anchor_id: str) -> list[LocalDelta]:
        return self._deltas_where("anchor_id", anchor_id)

    def deltas_by_item_hash(self, item_hash: str) -> list[LocalDelta]:
        return self._deltas_where("item_hash", item_hash)

    def deltas_by_receipt(self, receipt_id: str) -> list[LocalDelta]:
        return self._deltas_where("receipt_id", receipt_id)

    def _deltas_where(self, key: str, value: Any) -> list[LocalDelta]:
        """The deltas of `_DELTAS_BY[key]`, in id order (submission index for a submission's),
        locked in a session that writes (`storage.delta_row.LOCKS_DELTAS`)."""
        return list(self._session.scalars(self._deltas_by[key], {"value": value}))

    def delta_by_sequence(self, customer_id: str, sequence_number: str) -> LocalDelta | None:
        # the lowest id when several share it, as the page path takes it (storage.page_session)
        statement = select(LocalDelta).where(
            LocalDelta.customer_id == customer_id, LocalDelta.sequence_number == sequence_number
        ).order_by(LocalDelta.id)
        return self._session.scalars(statement.limit(1)).first()

    def unsettled_deltas(self, emitted_before: datetime, after: tuple[datetime, int] | None, limit: int) -> list[Row[Any]]:
        """One page of QUEUED/PROCESSING deltas emitted before `emitted_before`, oldest
        first, after the keyset `(emitted_at, id)` of the previous page's last row, as
        rows of (id, anchor_id, emitted_at): what a page needs to be read again and looked up.

        Served by the partial index `ix_local_delta_unsettled`: its cost follows the
        number of unsettled deltas, not the size of the ledger. Written as SQL so that
        SQLite can be told the index (`INDEXED BY`; SQLAlchemy renders no SQLite hints):
        without statistics its planner would take `(status, id)` and sort every page.
        """
        hint = " INDEXED BY ix_local_delta_unsettled" if self._dialect == "sqlite" else ""
        keyset = " AND (emitted_at, id) > (:after_at, :after_id)" if after is not None else ""
        statement = text(
            f"SELECT id, anchor_id, emitted_at FROM local_delta{hint} WHERE {UNSETTLED_PREDICATE.text}"
            f" AND emitted_at < :before{keyset} ORDER BY emitted_at, id LIMIT :limit"
        ).bindparams(bindparam("before", type_=UtcDateTime()), bindparam("limit", type_=Integer()))
        statement = statement.columns(id=Integer(), anchor_id=String(), emitted_at=UtcDateTime())
        values: dict[str, Any] = {"before": emitted_before, "limit": limit}
        if after is not None:
            statement = statement.bindparams(bindparam("after_at", type_=UtcDateTime()), bindparam("after_id", type_=Integer()))
            values.update(after_at=after[0], after_id=after[1])
        return list(self._session.execute(statement, values))

    def unsettled_anchors(self, anchors: Sequence[str], emitted_before: datetime, after: tuple[datetime, int]) -> set[str]:
        """Which of `anchors` a later page of `unsettled_deltas` (after the keyset `after`)
        would meet again: one seek per anchor in `ux_local_delta_anchor_item` (SQLite is
        told it: without statistics it would read every unsettled row)."""
        if not anchors:
            return set()
        hint = " INDEXED BY ux_local_delta_anchor_item" if self._dialect == "sqlite" else ""
        statement = text(
            f"SELECT DISTINCT anchor_id FROM local_delta{hint} WHERE anchor_id IN :anchors AND {UNSETTLED_PREDICATE.text}"
            " AND emitted_at < :before AND (emitted_at, id) > (:after_at, :after_id)"
        ).bindparams(
            bindparam("anchors", list(anchors), expanding=True),
            bindparam("before", emitted_before, type_=UtcDateTime()),
            bindparam("after_at", after[0], type_=UtcDateTime()),
            bindparam("after_id", after[1], type_=Integer()),
        )
        return set(self._session.scalars(statement))

    def totals_by_status(self) -> dict[str, tuple[int, Decimal]]:
        """Per status: how many deltas, and the exact sum of their amounts."""
        parts = exact_sum_parts(LocalDelta.__table__.c.amount, self._dialect)
        statement = select(LocalDelta.status, func.count(), *parts).group_by(LocalDelta.status)
        return {
            row[0]: (int(row[1]), combine_exact_sum(list(row[2:]), self._dialect))
            for row in self._session.execute(statement)
        }

    def list_deltas(
        self, *, customer_id: str | None, status: str | None, after_id: int | None, limit: int
    ) -> list[LocalDelta]:
        """A page of deltas by id, optionally of one customer and/or status (keyset on id)."""
        statement = select(LocalDelta)
        if customer_id is not None:
            statement = statement.where(LocalDelta.customer_id == customer_id)
        if status is not None:
            statement = statement.where(LocalDelta.status == status)
        if after_id is not None:
            statement = statement.where(LocalDelta.id > after_id)  # type: ignore[operator]
        return list(self._session.scalars(statement.order_by(LocalDelta.id).limit(limit)))  # type: ignore[arg-type]

    # -- the outbox -------------------------------------------------------------

    def add_submission(self, submission: OutboxSubmission) -> OutboxSubmission:
        self._session.add(submission)
        self._session.flush()
        return submission

    def get_submission(self, submission_id: int, for_update: bool = False) -> OutboxSubmission | None:
        """`for_update`: lock the row (PostgreSQL) so two replicas record one answer, not two."""
        return self._session.get(OutboxSubmission, submission_id, with_for_update=for_update or None)

    def submission_by_client_key(self, client_key: str) -> OutboxSubmission | None:
        statement = select(OutboxSubmission).where(OutboxSubmission.client_key == client_key)
        return self._session.scalars(statement).first()

    def deltas_of_submission(self, submission_id: int) -> list[LocalDelta]:
        return self._deltas_where("submission_id", submission_id)

    def claim_due_submissions(self, now: datetime, lease_until: datetime, limit: int) -> list[int]:
        """Ids of PENDING submissions due by `now`, each leased until `lease_until` so no
        other sender (another replica, the request that created it) takes it meanwhile."""
        due = select(OutboxSubmission.id).where(
            OutboxSubmission.status == SubmissionStatus.PENDING.value,
            OutboxSubmission.next_attempt_at <= now,  # type: ignore[operator]
        )
        claimed = []
        for submission_id in self._session.scalars(due.order_by(OutboxSubmission.next_attempt_at).limit(limit)):  # type: ignore[arg-type]
            result = self._session.execute(
                update(OutboxSubmission)
                .where(OutboxSubmission.id == submission_id, OutboxSubmission.next_attempt_at <= now)  # type: ignore[operator]
                .values(next_attempt_at=lease_until)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(submission_id)
        return claimed

    # -- discrepancies --------------------------------------------------------

    def open_discrepancy(self, finding: Discrepancy | dict[str, Any], now: datetime) -> int:
        """Open `finding` (a model, or its column values), or, when one of its kind and
        subject is open already, count one more sighting and keep the newest evidence.
        Returns the open row's id.

        Idempotent under concurrency: the partial unique index on open rows decides.
        """
        return int(self._session.execute(_open_discrepancies_statement(self._dialect), discrepancy_row(finding, now)).scalar_one())

    def open_discrepancies_together(self, rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], int]:
        """Insert many `discrepancy_row`s in one statement, in order: an open one whose kind and
        subject is open already counts its `occurrences` as more sightings of that row, as
        `open_discrepancy` does one by one (no two open rows here may share kind and subject).
        Returns each row's id by (kind, subject, status)."""
        if self._dialect == "postgresql":
            arrays = _as_arrays(rows, Discrepancy.__table__, _DISCREPANCY_COLUMNS, self._session)
            returned = self._session.execute(_open_discrepancies_from_arrays(), arrays)
        else:
            returned = self._session.execute(_open_discrepancies_statement(self._dialect), rows)
        return {(row.kind, row.subject, row.status): row.id for row in returned}

    def occurrences(self, discrepancy_id: int) -> int:
        """How often the discrepancy `discrepancy_id` has been seen."""
        statement = select(Discrepancy.occurrences).where(Discrepancy.id == discrepancy_id)
        return int(self._session.execute(statement).scalar_one())

    def open_discrepancies(self, subject: str | None = None) -> list[Discrepancy]:
        statement = select(Discrepancy).where(Discrepancy.status == DiscrepancyStatus.OPEN.value)
        if subject is not None:
            statement = statement.where(Discrepancy.subject == subject)
        # the upsert in open_discrepancy bypasses the identity map: never hand out a stale row
        statement = statement.order_by(Discrepancy.id).execution_options(populate_existing=True)
        return list(self._session.scalars(statement))

    def open_discrepancies_about(self, kinds: Sequence[str], subjects: Sequence[str]) -> list[Discrepancy]:
        """The open discrepancies of any of `kinds` about any of `subjects`, in one query
        on the partial unique index (kind, subject) of open rows: SQLite is told it
        (`INDEXED BY`), as without statistics it would read every open row of the kinds."""
        hint = " INDEXED BY ux_discrepancy_open_subject" if self._dialect == "sqlite" else ""
        statement = text(
            f"SELECT * FROM discrepancy{hint} WHERE {_OPEN_SQL.text} AND kind IN :kinds AND subject IN :subjects ORDER BY id"
        ).bindparams(bindparam("kinds", list(kinds), expanding=True), bindparam("subjects", list(subjects), expanding=True))
        query = select(Discrepancy).from_statement(statement)
        # the upsert in open_discrepancy bypasses the identity map: never hand out a stale row
        query = query.execution_options(populate_existing=True)
        return list(self._session.scalars(query))

    def record_fixed(self, finding: Discrepancy | dict[str, Any], note: str, now: datetime) -> int:
        """Record a gap that was found and fixed in the same breath (e.g. a missing webhook
        whose proofs checked out): a discrepancy row born resolved."""
        row = Discrepancy(**fixed_row(finding, note, now))
        self._session.add(row)
        self._session.flush()
        return int(row.id or 0)

    def resolve_open(self, kind: str | Sequence[str], subject: str, note: str, now: datetime) -> list[int]:
        """Resolve the open discrepancy of `kind` (or of each of several kinds) about `subject`,
        if there is one.

        One query for all the kinds, on the partial unique index (kind, subject) of open rows:
        a settling delta clears three kinds, and the reconciler settles thousands per pass.
        """
        kinds = [kind] if isinstance(kind, str) else list(kind)
        resolved = []
        for row in self.open_discrepancies_about(kinds, [subject]):
            row.status, row.resolved_at, row.resolution_note = DiscrepancyStatus.RESOLVED.value, now, note[:2000]
            resolved.append(int(row.id or 0))
        return resolved

    def count_open_discrepancies(self) -> int:
        statement = select(func.count()).select_from(Discrepancy).where(Discrepancy.status == DiscrepancyStatus.OPEN.value)
        return int(self._session.execute(statement).scalar_one())

    # -- reconciliation runs and the audit trail ---------------------------------------

    def add_run(self, run: ReconciliationRun) -> int:
        self._session.add(run)
        self._session.flush()
        return int(run.id or 0)

    def get_run(self, run_id: int) -> ReconciliationRun | None:
        return self._session.get(ReconciliationRun, run_id)

    def add_audit(self, entry: AuditEntry | dict[str, Any]) -> None:
        """`entry`: the model, or its column values."""
        self._session.add(AuditEntry(**entry) if isinstance(entry, dict) else entry)

    def audit_entries(self, delta_id: int | None = None) -> list[AuditEntry]:
        statement = select(AuditEntry)
        if delta_id is not None:
            statement = statement.where(AuditEntry.delta_id == delta_id)
        return list(self._session.scalars(statement.order_by(AuditEntry.id)))

    def orphans_with_a_delta(self, limit: int) -> list[WebhookEvent]:
        """Orphan events whose anchor a delta of ours has by now: recorded while that delta
        was being registered, neither transaction saw the other's row (two processes or
        replicas on PostgreSQL). Read through the orphans' partial index, one seek each in
        the deltas' anchor index: the cost follows the orphans, not the events."""
        has_delta = select(LocalDelta.id).where(LocalDelta.anchor_id == WebhookEvent.anchor_id).exists()
        statement = select(WebhookEvent).where(ORPHAN_PREDICATE, WebhookEvent.anchor_id.is_not(None), has_delta)  # type: ignore[union-attr]
        return list(self._session.scalars(statement.order_by(WebhookEvent.anchor_id).limit(limit)))  # type: ignore[arg-type]

    def unreported_orphans(self, cutoff: datetime, limit: int) -> list[WebhookEvent]:
        """Orphan events received before `cutoff` with no open `orphan_webhook` discrepancy yet."""
        reported = (
            select(Discrepancy.id)
            .where(
                Discrepancy.kind == "orphan_webhook",
                Discrepancy.status == DiscrepancyStatus.OPEN.value,
                Discrepancy.subject == literal("event:") + WebhookEvent.event_id,
            )
            .exists()
        )
        statement = select(WebhookEvent).where(ORPHAN_PREDICATE, WebhookEvent.received_at < cutoff, ~reported)  # type: ignore[operator]
        return list(self._session.scalars(statement.order_by(WebhookEvent.received_at).limit(limit)))  # type: ignore[arg-type]

    # -- events, counted -------------------------------------------------------

    def count_events(self, outcome: EventOutcome | None = None) -> int:
        statement = select(func.count()).select_from(WebhookEvent)
        if outcome is not None:
            statement = statement.where(WebhookEvent.outcome == outcome.value)
        return int(self._session.execute(statement).scalar_one())

    def add_webhook_tallies(self, hour: datetime, counts: dict[tuple[str, str], int]) -> None:
        """Add `counts` ((outcome, reason) -> n) to the hour's tallies."""
        table = WebhookTally.__table__
        for (outcome, reason), count in sorted(counts.items()):
            statement = self._insert(WebhookTally).values(hour=hour, outcome=outcome, reason=reason[:64], count=count)
            statement = statement.on_conflict_do_update(
                index_elements=[table.c.hour, table.c.outcome, table.c.reason],
                set_={"count": table.c.count + statement.excluded.count},
            )
            self._session.execute(statement)

    def resolve_discrepancy(self, discrepancy_id: int, note: str, now: datetime) -> Discrepancy | None:
        """Mark one open discrepancy resolved by a person; None when it is not open."""
        row = self._session.get(Discrepancy, discrepancy_id, populate_existing=True)
        if row is None or row.status != DiscrepancyStatus.OPEN.value:
            return None
        row.status, row.resolved_at, row.resolution_note = DiscrepancyStatus.RESOLVED.value, now, note[:2000]
        return row

    def fold_rollup(self) -> None:
        """PostgreSQL: move the rollup journal into the rollup (SQLite keeps no journal)."""
        if self._dialect != "sqlite":
            self._session.execute(text(POSTGRES_FOLD))
