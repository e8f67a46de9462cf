"""JSON with exact numbers: Decimals written as they are and read back as Decimals.

The standard library writes no Decimal, and reads fractions as binary floats; money
must pass through neither. Used for the ledger's JSON columns, our HTTP answers, the
sandbox's, and (in canonical form) the proof hashes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import datetime
from decimal import Context, Decimal
from typing import Any

_string = json.JSONEncoder(ensure_ascii=False).encode


def dumps(value: Any, *, canonical: bool = False) -> str:
    """`value` as JSON. `canonical`: keys sorted at every level, numbers in plain decimal
    without trailing zeros (-42.50 is -42.5), and floats refused (they are not exact)."""
    return "".join(_write(value, canonical))


def dumps_bytes(value: Any, *, canonical: bool = False) -> bytes:
    return dumps(value, canonical=canonical).encode("utf-8")


def loads(text: str | bytes) -> Any:
    """Fractions as Decimal; NaN and Infinity, which JSON does not have, refused (ValueError)."""
    return json.loads(text, parse_float=Decimal, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def storable_text_error(value: Any) -> str | None:
    """Why a string (or any string inside a JSON value) cannot be stored on both databases:
    PostgreSQL refuses NUL, and UTF-8 has no lone surrogates. None when it can."""
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain NUL characters"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "must not contain unpaired surrogates"
        return None
    if isinstance(value, Mapping):
        return next((e for e in map(storable_text_error, [*value.keys(), *value.values()]) if e), None)
    if isinstance(value, (list, tuple)):
        return next((e for e in map(storable_text_error, value) if e), None)
    return None


def _write(value: Any, canonical: bool) -> Iterator[str]:
    if value is None:
        yield "null"
    elif value is True:
        yield "true"
    elif value is False:
        yield "false"
    elif isinstance(value, str):
        yield _string(value)
    elif isinstance(value, int):
        yield str(value)
    elif isinstance(value, Decimal):
        yield _decimal(value, canonical)
    elif isinstance(value, float):
        if canonical:
            raise ValueError("a float has no canonical form (it is not exact): use Decimal")
        yield repr(value)
    elif isinstance(value, datetime) and not canonical:
        yield _string(value.isoformat().replace("+00:00", "Z"))
    elif isinstance(value, Mapping):
        if canonical and not all(isinstance(key, str) for key in value):
            raise ValueError("object keys must be strings")
        keys = sorted(value) if canonical else list(value)
        yield "{"
        for n, key in enumerate(keys):
            yield ("," if n else "") + _string(str(key)) + ":"
            yield from _write(value[key], canonical)
        yield "}"
    elif isinstance(value, (list, tuple)):
        yield "["
        for n, item in enumerate(value):
            if n:
                yield ","
            yield from _write(item, canonical)
        yield "]"
    else:
        raise TypeError(f"a {type(value).__name__} has no JSON form")


def _decimal(number: Decimal, canonical: bool) -> str:
    if not number.is_finite():
        raise ValueError(f"{number} has no JSON form")
    if canonical:
        if number.is_zero():
            return "0"
        # normalise under a context as wide as the number: the default 28 digits would round
        number = number.normalize(Context(prec=len(number.as_tuple().digits)))
    return format(number, "f")
