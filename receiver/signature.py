"""PacSpace webhook signatures, verified over the raw body before anything parses it.

A pure function: the clock and the secrets are passed in. The scheme (UPSTREAM.md):
header `X-PacSpace-Signature: v1=<hex HMAC-SHA256>` (two comma-separated values for
24 hours after a rotation), keyed with the webhook secret's UTF-8 bytes, over
`"{X-PacSpace-Timestamp}.{raw body}"`; the timestamp is Unix seconds, or
milliseconds when it is 10**12 or more, and must be within the tolerance of now.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

SIGNATURE_HEADER = "X-PacSpace-Signature"
TIMESTAMP_HEADER = "X-PacSpace-Timestamp"
MILLISECONDS_FROM = 10**12
_SHOWN = 40  # at most this much of a bad header is echoed back


class SignatureError(Exception):
    """The request is not a genuine, fresh PacSpace webhook.

    `code` is one of `missing_signature`, `invalid_timestamp`, `stale_timestamp`,
    `invalid_signature`; the message says which header was wrong and what was expected.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_timestamp(value: str) -> int | None:
    """Seconds since the epoch from the header value, or None when it is no integer."""
    try:
        number = int(value)
    except ValueError:
        return None
    return number // 1000 if abs(number) >= MILLISECONDS_FROM else number


def verify_signature(
    raw_body: bytes,
    signature: str | None,
    timestamp: str | None,
    *,
    secrets: Sequence[str],
    tolerance_seconds: int,
    now: float,
) -> int:
    """Check one webhook; return its signature timestamp in seconds, or raise `SignatureError`.

    Every secret in `secrets` is accepted (so our side can rotate too); the
    signature header may carry several `v1=` values, and one match suffices.
    Comparisons are constant time.
    """
    if not signature:
        raise SignatureError("missing_signature", f"the {SIGNATURE_HEADER} header is missing or empty")
    if not timestamp:
        raise SignatureError("missing_signature", f"the {TIMESTAMP_HEADER} header is missing or empty")
    seconds = parse_timestamp(timestamp)
    if seconds is None:
        raise SignatureError(
            "invalid_timestamp",
            f"{TIMESTAMP_HEADER} {timestamp[:_SHOWN]!r} is not a Unix time in seconds or milliseconds",
        )
    age = abs(int(now) - seconds)
    if age > tolerance_seconds:
        raise SignatureError(
            "stale_timestamp",
            f"{TIMESTAMP_HEADER} is {age} s away from our clock; at most {tolerance_seconds} s is accepted",
        )
    signed = timestamp.encode("utf-8") + b"." + raw_body
    # hmac.digest: OpenSSL's one-shot HMAC, a third cheaper than hmac.new(...).hexdigest()
    expected = [b"v1=" + hmac.digest(secret.encode("utf-8"), signed, "sha256").hex().encode("ascii") for secret in secrets]
    for part in signature.split(","):
        candidate = part.strip()
        if not candidate.startswith("v1="):
            continue  # another scheme's value: not ours to judge
        if not candidate.isascii():
            break  # a malformed value ends the header (as the official SDK's check does)
        if any(hmac.compare_digest(value, candidate.encode("ascii")) for value in expected):
            return seconds
    raise SignatureError(
        "invalid_signature",
        f"no v1 signature in {SIGNATURE_HEADER} matches the body under a configured webhook secret",
    )
