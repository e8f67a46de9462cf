"""Column types that keep money exact and time in UTC on SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Context, Decimal
from typing import Any

from sqlalchemy import BigInteger, DateTime, Numeric, func
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from storage.errors import AmountOutOfRange

AMOUNT_SCALE = 9  # decimal places the ledger keeps exactly
# |amount| at most PacSpace's own limit; 1e9 in 1e-9 units still fits a signed 64-bit integer
AMOUNT_LIMIT = Decimal(1_000_000_000)
UNITS_PER_ONE = 10**AMOUNT_SCALE


def amount_to_units(amount: Decimal) -> int:
    """Exact integer count of 10**-9 units; raises if `amount` has more precision or size."""
    if not isinstance(amount, Decimal) or not amount.is_finite():
        raise AmountOutOfRange(f"amount {amount!r} is not a finite Decimal")
    if abs(amount) > AMOUNT_LIMIT:
        raise AmountOutOfRange(f"amount {amount} is out of range: |amount| must be at most {AMOUNT_LIMIT}")
    exact = Context(prec=len(amount.as_tuple().digits) + AMOUNT_SCALE + 2)  # the default 28 digits would round
    units = amount.scaleb(AMOUNT_SCALE, context=exact)
    if units != units.to_integral_value(context=exact):
        raise AmountOutOfRange(f"amount {amount} has more than {AMOUNT_SCALE} decimal places")
    return int(units)


def canonical_amount(amount: Decimal) -> Decimal:
    """The same value without trailing zeros or an exponent: -42.50 -> -42.5, 1E+4 -> 10000."""
    if amount.is_zero():
        return Decimal(0)
    exact = Context(prec=len(amount.as_tuple().digits) + 40)  # never round, whatever the size
    normal = amount.normalize(exact)
    return normal.quantize(Decimal(1), context=exact) if normal.as_tuple().exponent > 0 else normal  # type: ignore[operator]


def units_to_amount(units: int) -> Decimal:
    return canonical_amount(Decimal(units).scaleb(-AMOUNT_SCALE))


class ExactAmount(TypeDecorator[Decimal]):
    """A money amount, exact to 9 decimal places.

    PostgreSQL keeps it as NUMERIC(19, 9). SQLite has no exact decimal type (its
    NUMERIC affinity stores floats), so there it is an INTEGER of 10**-9 units.
    Values come back as normalised `Decimal` on both (`Decimal("-42.5")`).
    """

    impl = Numeric(19, AMOUNT_SCALE)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(19, AMOUNT_SCALE, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        units = amount_to_units(value)
        return units if dialect.name == "sqlite" else units_to_amount(units)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return units_to_amount(int(value))
        return canonical_amount(Decimal(value))


def exact_sum_parts(column: ColumnElement[Decimal], dialect_name: str) -> list[ColumnElement[Any]]:
    """SQL expressions whose values `combine_exact_sum` turns into the exact sum of `column`.

    On SQLite a plain SUM of 10**-9 units overflows 64 bits past ~9.2e9 in total, so
    the units are summed as whole and fractional parts, each far from overflow.
    """
    if dialect_name == "sqlite":
        units = column.cast(BigInteger)  # the stored INTEGER, past the type decorator
        # SQLite's own integer `/` truncates and `%` keeps the dividend's sign: q*d + r == units
        whole = units.op("/", return_type=BigInteger)(UNITS_PER_ONE)
        fraction = units.op("%", return_type=BigInteger)(UNITS_PER_ONE)
        return [func.coalesce(func.sum(whole), 0), func.coalesce(func.sum(fraction), 0)]
    return [func.coalesce(func.sum(column), 0)]


def combine_exact_sum(parts: list[Any], dialect_name: str) -> Decimal:
    if dialect_name == "sqlite":
        whole, fraction = (int(p) for p in parts)
        return units_to_amount(whole * UNITS_PER_ONE + fraction)
    return canonical_amount(Decimal(parts[0]))


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on both databases (SQLite would drop the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        # SQLite's DATETIME text, made in one step: process_bind_param's naive datetime, then
        # SQLAlchemy's formatting of it, cost 2.7 us a value; this 1.5 us (each webhook row
        # binds several). The same text: "2026-11-27 21:55:30.704814" (tests/test_storage.py)
        return _sqlite_datetime_text

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is UTC:
        return value
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: the ledger stores aware UTC times only")
    return value.astimezone(UTC)


def _sqlite_datetime_text(value: datetime | None) -> str | None:
    return None if value is None else _as_utc(value).replace(tzinfo=None).isoformat(" ", "microseconds")
