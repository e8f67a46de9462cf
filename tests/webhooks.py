"""A builder for validly signed PacSpace webhooks; each test breaks one thing.

It signs by the published scheme with its own few lines, independent of
`receiver.signature`, and its output is checked against the official SDK.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

TEST_SECRET = "whsec_test_0123456789abcdef"
_ids = itertools.count(1)


@dataclass(frozen=True)
class SignedWebhook:
    body: bytes
    headers: dict[str, str]


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)  # only for building; tests that need exact text pass bytes
    raise TypeError(type(value))


def new_event_id() -> str:
    return f"evt_test_{time.time_ns()}_{next(_ids)}"


def envelope(event: str = "delta.verified", data: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": new_event_id(),
        "event": event,
        "tenantId": "ten_test",
        "createdAt": "2026-11-27T10:00:00.000Z",
        "data": data if data is not None else {},
    }
    body.update(fields)
    return body


def sign(
    body: bytes | dict[str, Any],
    *,
    secret: str = TEST_SECRET,
    also: str | None = None,
    timestamp: int | str | None = None,
    milliseconds: bool = False,
) -> SignedWebhook:
    """Sign `body` as PacSpace does; `also` adds a second value (secret rotation)."""
    raw = body if isinstance(body, bytes) else json.dumps(body, default=_default).encode()
    if timestamp is None:
        timestamp = int(time.time() * 1000) if milliseconds else int(time.time())
    stamp = str(timestamp)
    values = [_v1(secret, stamp, raw)] + ([_v1(also, stamp, raw)] if also else [])
    return SignedWebhook(
        raw,
        {
            "X-PacSpace-Signature": ",".join(values),
            "X-PacSpace-Timestamp": stamp,
            "Content-Type": "application/json",
        },
    )


def _v1(secret: str, stamp: str, raw: bytes) -> str:
    return "v1=" + hmac.new(secret.encode(), stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
