"""JSON with exact numbers: Decimals written as they are and read back as Decimals.

The standard library writes no Decimal, and reads fractions as binary floats; money
must pass through neither. Used for the ledger's JSON columns and our HTTP answers.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

_string = json.JSONEncoder(ensure_ascii=False).encode


def dumps(value: Any) -> str:
    return "".join(_write(value))


def dumps_bytes(value: Any) -> bytes:
    return dumps(value).encode("utf-8")


def loads(text: str | bytes) -> Any:
    return json.loads(text, parse_float=Decimal)


def _write(value: Any) -> Any:
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
        if not value.is_finite():
            raise ValueError(f"{value} has no JSON form")
        yield format(value, "f") if value.as_tuple().exponent <= 0 else str(int(value))
    elif isinstance(value, float):
        yield repr(value)
    elif isinstance(value, datetime):
        yield _string(value.isoformat().replace("+00:00", "Z"))
    elif isinstance(value, dict):
        yield "{"
        for n, (key, item) in enumerate(value.items()):
            yield ("," if n else "") + _string(str(key)) + ":"
            yield from _write(item)
        yield "}"
    elif isinstance(value, (list, tuple)):
        yield "["
        for n, item in enumerate(value):
            if n:
                yield ","
            yield from _write(item)
        yield "]"
    else:
        raise TypeError(f"a {type(value).__name__} has no JSON form")
