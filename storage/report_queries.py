"""The reconciliation report's reads: aggregates that stay fast on a ledger of millions.

The unfiltered totals, lag percentiles and event counts come from `ledger_rollup`,
which database triggers keep in step with every write (a few hundred rows, whatever
the ledger's size). Filters by customer read `ix_local_delta_customer_status_amount`;
filters by time read the window's rows, so their cost follows the window's size.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, case, func, select, text, union_all
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from storage.models import (
    VERIFIED_LAG_PREDICATE,
    Discrepancy,
    LedgerRollup,
    LedgerRollupJournal,
    LocalDelta,
    ReconciliationRun,
    WebhookEvent,
    WebhookTally,
)
from storage.rollup_sql import HISTOGRAM_EDGES_MS, lag_bucket_bounds
from storage.types import UNITS_PER_ONE, combine_exact_sum, exact_sum_parts, units_to_amount
from storage.vocabulary import DiscrepancyStatus

PERCENTILES = (0.50, 0.95, 0.99)
NOT_EXPECTED = frozenset({"FAILED", "REJECTED"})  # settled without changing the balance


@dataclass(frozen=True)
class ReportFilter:
    """What the report covers: one customer and/or a window of creation (deltas),
    first sighting (discrepancies) or receipt (webhooks) times. None: no limit."""

    customer_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def by_time(self) -> bool:
        return self.since is not None or self.until is not None


@dataclass(frozen=True)
class StatusTotal:
    count: int
    amount: Decimal


@dataclass(frozen=True)
class LagSummary:
    count: int
    percentiles_ms: dict[float, int]  # nearest rank
    max_ms: int | None
    histogram: list[tuple[int | None, int]]  # (upper bound in ms, None for the rest; count)


@dataclass(frozen=True)
class CustomerTotal:
    customer_id: str
    deltas: int
    local_amount: Decimal  # what we expect PacSpace to verify: every delta but FAILED and REJECTED ones
    verified_deltas: int
    verified_amount: Decimal


class ReportQueries:
    def __init__(self, session: Session) -> None:
        self._session = session
        self._dialect = session.get_bind().dialect.name

    def one_snapshot(self) -> None:
        """Make the rest of this read transaction see one snapshot (PostgreSQL's default
        isolation gives each statement its own). Must come before any other statement."""
        if self._dialect != "sqlite":  # SQLite's read transaction is one snapshot already
            self._session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))

    def _delta_filter(self, where: ReportFilter) -> list[ColumnElement[bool]]:
        return _within(where, LocalDelta.__table__.c.customer_id, LocalDelta.__table__.c.created_at)

    # -- deltas -------------------------------------------------------------------

    def _rollup(self, metric: str) -> list[tuple[str, int, int, int]]:
        """(key, count, whole units, 1e-9 units) of one rollup metric, the journal's changes added."""
        parts = union_all(
            *(select(t.key, t.count, t.whole, t.nanos).where(t.metric == metric)  # type: ignore[arg-type]
              for t in (LedgerRollup, LedgerRollupJournal))
        ).subquery()
        statement = select(parts.c.key, func.sum(parts.c.count), func.sum(parts.c.whole), func.sum(parts.c.nanos)).group_by(parts.c.key)
        return [(row[0], int(row[1]), int(row[2]), int(row[3])) for row in self._session.execute(statement)]

    def totals_by_status(self, where: ReportFilter) -> dict[str, StatusTotal]:
        if where.customer_id is None and not where.by_time:
            return {
                key: StatusTotal(count, units_to_amount(whole * UNITS_PER_ONE + nanos))
                for key, count, whole, nanos in self._rollup("delta_status")
                if count
            }
        amount = LocalDelta.__table__.c.amount
        conditions = self._delta_filter(where)
        if self._dialect == "sqlite":
            # a plain SUM of 1e-9 units is exact unless it overflows 64 bits, which SQLite
            # reports instead of wrapping; then the slower split sum is used
            plain = select(LocalDelta.status, func.count(), func.sum(amount.cast(BigInteger)))
            try:
                rows = self._session.execute(plain.where(*conditions).group_by(LocalDelta.status)).all()
                return {r[0]: StatusTotal(int(r[1]), units_to_amount(int(r[2] or 0))) for r in rows}
            except OperationalError as exc:
                if "overflow" not in str(exc):
                    raise
        parts = exact_sum_parts(amount, self._dialect)
        statement = select(LocalDelta.status, func.count(), *parts).where(*conditions).group_by(LocalDelta.status)
        return {
            r[0]: StatusTotal(int(r[1]), combine_exact_sum(list(r[2:]), self._dialect))
            for r in self._session.execute(statement)
        }

    def delta_counts(self) -> dict[str, int]:
        """Deltas per status, from the rollup."""
        return {key: count for key, count, _, _ in self._rollup("delta_status")}

    def lag(self, where: ReportFilter) -> LagSummary:
        lag = LocalDelta.__table__.c.verification_lag_ms
        if where.customer_id is None and not where.by_time:
            return self._lag_from_rollup(lag)
        # a filtered report: the window's lags, sorted here (cost follows the window)
        values = sorted(
            int(v) for v in self._session.scalars(select(lag).where(VERIFIED_LAG_PREDICATE, *self._delta_filter(where)))
        )
        if not values:
            return LagSummary(0, {}, None, [])
        ranks = {p: values[_rank(p, len(values)) - 1] for p in PERCENTILES}
        return LagSummary(len(values), ranks, values[-1], _histogram(sorted(Counter(values).items())))

    def _lag_from_rollup(self, lag: Any) -> LagSummary:
        buckets = sorted((int(key), count) for key, count, _, _ in self._rollup("lag_bucket") if count)
        count = sum(n for _, n in buckets)
        if count == 0:
            return LagSummary(0, {}, None, [])
        top = self._session.execute(select(lag).where(VERIFIED_LAG_PREDICATE).order_by(lag.desc()).limit(1)).scalar()
        if top is None:  # the rollup counted rows a concurrent delete has taken since
            return LagSummary(0, {}, None, [])
        top = int(top)
        bounds = lag_bucket_bounds_after()
        percentiles, seen, ranks = {}, 0, sorted((_rank(p, count), p) for p in PERCENTILES)
        for lower, n in buckets:
            seen += n
            while ranks and ranks[0][0] <= seen:
                # the bucket's upper edge: within 1 % above the exact value, never above the max
                percentiles[ranks.pop(0)[1]] = min(top, bounds.get(lower, lower + 1) - 1)
        return LagSummary(count, percentiles, top, _histogram(buckets))

    def customer_totals(self, where: ReportFilter, after: str | None, limit: int) -> list[CustomerTotal]:
        """A page of customers in id order, local vs verified amounts."""
        amount = LocalDelta.__table__.c.amount
        customers = select(LocalDelta.customer_id).distinct().where(*self._delta_filter(where))
        if after is not None:
            customers = customers.where(LocalDelta.customer_id > after)  # type: ignore[arg-type, operator]
        page = [row for row in self._session.scalars(customers.order_by(LocalDelta.customer_id).limit(limit))]
        if not page:
            return []
        parts = exact_sum_parts(amount, self._dialect)
        statement = (
            select(LocalDelta.customer_id, LocalDelta.status, func.count(), *parts)
            .where(LocalDelta.customer_id.in_(page), *self._delta_filter(where))  # type: ignore[attr-defined]
            .group_by(LocalDelta.customer_id, LocalDelta.status)
        )
        sums: dict[str, dict[str, tuple[int, Decimal]]] = {c: {} for c in page}
        for row in self._session.execute(statement):
            sums[row[0]][row[1]] = (int(row[2]), combine_exact_sum(list(row[3:]), self._dialect))
        result = []
        for customer in page:
            by_status = sums[customer]
            counted = [v for status, v in by_status.items() if status not in NOT_EXPECTED]
            verified = by_status.get("VERIFIED", (0, Decimal(0)))
            result.append(
                CustomerTotal(
                    customer_id=customer,
                    deltas=sum(n for n, _ in counted),
                    local_amount=sum((a for _, a in counted), Decimal(0)),
                    verified_deltas=verified[0],
                    verified_amount=verified[1],
                )
            )
        return result

    # -- discrepancies --------------------------------------------------------------

    def _discrepancy_filter(
        self, where: ReportFilter, kind: str | None = None, status: str | None = DiscrepancyStatus.OPEN.value
    ) -> list[ColumnElement[bool]]:
        table = Discrepancy.__table__.c
        conditions = _within(where, table.customer_id, table.first_seen_at)
        if status is not None:
            conditions.append(table.status == status)
        if kind is not None:
            conditions.append(table.kind == kind)
        return conditions

    def open_by_kind(self, where: ReportFilter) -> dict[str, int]:
        statement = select(Discrepancy.kind, func.count()).where(*self._discrepancy_filter(where)).group_by(Discrepancy.kind)
        return {row[0]: int(row[1]) for row in self._session.execute(statement)}

    def discrepancies(
        self, where: ReportFilter, *, kind: str | None, status: str | None, after_id: int | None, limit: int
    ) -> list[Discrepancy]:
        statement = select(Discrepancy).where(*self._discrepancy_filter(where, kind, status))
        if after_id is not None:
            statement = statement.where(Discrepancy.id > after_id)  # type: ignore[arg-type, operator]
        return list(self._session.scalars(statement.order_by(Discrepancy.id).limit(limit)))  # type: ignore[arg-type]

    def discrepancies_per_day(self, where: ReportFilter, days_since: datetime) -> list[tuple[str, int, int]]:
        """Per day (UTC) since `days_since`: discrepancies first seen, and of those still open."""
        first_seen = Discrepancy.__table__.c.first_seen_at
        day = func.date(first_seen) if self._dialect == "sqlite" else func.to_char(func.timezone("UTC", first_seen), "YYYY-MM-DD")
        still_open = func.count(case((Discrepancy.status == DiscrepancyStatus.OPEN.value, 1)))
        conditions = self._discrepancy_filter(where, status=None) + [Discrepancy.first_seen_at >= days_since]  # type: ignore[operator]
        statement = select(day, func.count(), still_open).where(*conditions).group_by(day).order_by(day)
        return [(str(row[0]), int(row[1]), int(row[2] or 0)) for row in self._session.execute(statement)]

    def all_discrepancies(self, where: ReportFilter, *, status: str | None, page: int = 1000) -> list[Discrepancy]:
        """Every row the filter selects, read page by page in id order."""
        rows: list[Discrepancy] = []
        while True:
            batch = self.discrepancies(where, kind=None, status=status, after_id=rows[-1].id if rows else None, limit=page)
            rows += batch
            if len(batch) < page:
                return rows

    def get_discrepancy(self, discrepancy_id: int) -> Discrepancy | None:
        return self._session.get(Discrepancy, discrepancy_id)

    # -- runs and webhooks ------------------------------------------------------------

    def latest_run(self, dry_run: bool | None = False) -> ReconciliationRun | None:
        statement = select(ReconciliationRun)
        if dry_run is not None:
            statement = statement.where(ReconciliationRun.dry_run == dry_run)  # type: ignore[arg-type]
        return self._session.scalars(statement.order_by(ReconciliationRun.id.desc()).limit(1)).first()  # type: ignore[union-attr]

    def latest_completed_run_finish(self) -> datetime | None:
        statement = select(func.max(ReconciliationRun.finished_at)).where(
            ReconciliationRun.status == "completed", ReconciliationRun.dry_run == False  # noqa: E712
        )
        return self._session.execute(statement).scalar_one()

    def runs(self, before_id: int | None, limit: int) -> list[ReconciliationRun]:
        statement = select(ReconciliationRun)
        if before_id is not None:
            statement = statement.where(ReconciliationRun.id < before_id)  # type: ignore[arg-type, operator]
        return list(self._session.scalars(statement.order_by(ReconciliationRun.id.desc()).limit(limit)))  # type: ignore[union-attr]

    def events_received(self, where: ReportFilter) -> tuple[int, int]:
        """Webhook events recorded, and of those orphans still waiting for their delta."""
        if not where.by_time:
            outcomes = {key: count for key, count, _, _ in self._rollup("event_outcome")}
            return sum(outcomes.values()), outcomes.get("orphan", 0)
        conditions = _within(where, None, WebhookEvent.__table__.c.received_at)
        received = select(func.count()).select_from(WebhookEvent).where(*conditions)
        orphans = select(func.count()).select_from(WebhookEvent).where(text("outcome = 'orphan'"), *conditions)
        return int(self._session.execute(received).scalar_one()), int(self._session.execute(orphans).scalar_one())

    def tallies(self, where: ReportFilter) -> list[tuple[str, str, int]]:
        """(outcome, reason, count) of deliveries that left no event row, in the window's hours."""
        conditions: list[Any] = []
        if where.since is not None:
            conditions.append(WebhookTally.hour >= where.since.replace(minute=0, second=0, microsecond=0))
        if where.until is not None:
            conditions.append(WebhookTally.hour < where.until)
        statement = (
            select(WebhookTally.outcome, WebhookTally.reason, func.sum(WebhookTally.count))
            .where(*conditions)
            .group_by(WebhookTally.outcome, WebhookTally.reason)
        )
        return [(row[0], row[1], int(row[2])) for row in self._session.execute(statement)]


def _histogram(counted: list[tuple[int, int]]) -> list[tuple[int | None, int]]:
    """(lower bound or exact lag in ms, count), in order -> counts below each histogram edge.
    Rollup buckets never straddle an edge: the edges are bucket bounds too."""
    histogram, i = [], 0
    for bound in [*HISTOGRAM_EDGES_MS, None]:
        in_bar = 0
        while i < len(counted) and (bound is None or counted[i][0] < bound):
            in_bar += counted[i][1]
            i += 1
        histogram.append((bound, in_bar))
    return histogram


def _within(where: ReportFilter, customer: Any, moment: Any) -> list[ColumnElement[bool]]:
    """The filter's conditions on a table's customer column (None: it has none) and time column."""
    conditions: list[ColumnElement[bool]] = []
    if customer is not None and where.customer_id is not None:
        conditions.append(customer == where.customer_id)
    if where.since is not None:
        conditions.append(moment >= where.since)
    if where.until is not None:
        conditions.append(moment < where.until)
    return conditions


@functools.cache
def lag_bucket_bounds_after() -> dict[int, int]:
    """Each bucket's lower bound -> the next bucket's."""
    bounds = lag_bucket_bounds()
    return dict(zip(bounds, bounds[1:] + [bounds[-1] * 2]))


def _rank(p: float, n: int) -> int:
    """Nearest-rank percentile: the smallest rank whose share of values is at least p."""
    return max(1, min(n, math.ceil(p * n - 1e-9)))


def count_by(rows: Sequence[tuple[str, str, int]], outcome: str) -> dict[str, int]:
    return {reason: count for o, reason, count in rows if o == outcome}
