"""Thousands of random header/body combinations against a real daemon over loopback
(not the ASGI app in-process: it is fast enough, and this is what PacSpace talks to).

Never a 5xx; never an accepted forgery: a 2xx only for a request that carries a v1 MAC
of its own timestamp and body under the configured secret, with a fresh timestamp.
The oracle computes that MAC itself; it does not call receiver.signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import migrated_sqlite_url
from tests.daemon import Daemon
from tests.webhooks import TEST_SECRET

TOLERANCE = 300
EXAMPLES = 2500
SEEN: Counter[int] = Counter()  # status codes answered, checked when the module ends
HEADER_TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)
HEADER_BYTES = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F))  # obs-text too


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("fuzz")
    running = Daemon(migrated_sqlite_url(work / "fuzz.db"), work).start()
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log_text()


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.url, timeout=20) as opened:
        yield opened
    # the run exercised both sides: genuine requests were accepted, forgeries refused
    assert sum(n for status, n in SEEN.items() if 200 <= status < 300) >= 100, SEEN
    assert SEEN[401] >= 500, SEEN


def mac(secret: str, stamp: bytes, body: bytes) -> bytes:
    return b"v1=" + hmac.new(secret.encode(), stamp + b"." + body, hashlib.sha256).hexdigest().encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
envelopes = st.fixed_dictionaries(
    {"event": st.sampled_from(["delta.verified", "delta.failed", "record.committed", "x"]) | st.text(max_size=20)},
    optional={
        "id": st.text(max_size=40) | st.integers(),
        "data": st.dictionaries(st.sampled_from(["recordId", "receiptId", "delta", "sequenceNumber", "itemHashes", "proof", "customerId"]), json_values, max_size=5) | json_values,
        "tenantId": json_values,
        "createdAt": st.text(max_size=30),
        "timestamp": json_values,
    },
).map(lambda d: json.dumps(d).encode())
bodies = st.one_of(envelopes, st.binary(max_size=1500), json_values.map(lambda v: json.dumps(v).encode()))

# the timestamp header: its text, given now in seconds
stamps = st.one_of(
    st.integers(-2 * TOLERANCE, 2 * TOLERANCE).map(lambda off: lambda now: str(now + off).encode()),
    st.integers(-2 * TOLERANCE, 2 * TOLERANCE).map(lambda off: lambda now: str((now + off) * 1000).encode()),
    st.just(lambda now: str(now).encode()),
    HEADER_TEXT.map(lambda t: lambda now: t.encode()),
    st.integers().map(lambda n: lambda now: str(n).encode()),
)
SIGNATURE_MODES = [
    "valid", "missing", "other_secret", "other_body", "other_stamp", "random", "junk_then_valid",
    "valid_then_junk", "truncated", "upper_case", "wrong_scheme", "two_valid_secrets_one_wrong",
]


def signature_for(mode: str, stamp: bytes, body: bytes, junk: bytes) -> bytes | None:
    genuine = mac(TEST_SECRET, stamp, body)
    return {
        "valid": genuine,
        "missing": None,
        "other_secret": mac("whsec_attacker", stamp, body),
        "other_body": mac(TEST_SECRET, stamp, body + b" "),
        "other_stamp": mac(TEST_SECRET, stamp + b"1", body),
        "random": junk,
        "junk_then_valid": junk + b"," + genuine,
        "valid_then_junk": genuine + b"," + junk,
        "truncated": genuine[:-1],
        "upper_case": genuine.upper(),
        "wrong_scheme": b"v2=" + genuine[3:],
        "two_valid_secrets_one_wrong": mac("whsec_old", stamp, body) + b"," + mac("whsec_older", stamp, body),
    }[mode]


def carries_a_genuine_mac(headers: dict[str, Any], body: bytes, now: int) -> bool:
    """The oracle: a fresh timestamp and, among the signature values, the MAC of that
    timestamp and this body under the secret."""
    stamp, signature = headers.get("X-PacSpace-Timestamp"), headers.get("X-PacSpace-Signature")
    if stamp is None or signature is None:
        return False
    try:
        number = int(stamp)
    except ValueError:
        return False
    seconds = number // 1000 if abs(number) >= 10**12 else number
    if abs(now - seconds) > TOLERANCE + 2:  # the daemon's clock reads a moment later
        return False
    return mac(TEST_SECRET, stamp, body) in [part.strip() for part in signature.split(b",")]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    body=bodies,
    stamp=st.none() | stamps,
    mode=st.sampled_from(SIGNATURE_MODES),
    junk=HEADER_BYTES,
    content_type=st.sampled_from([None, b"application/json", b"text/plain", b"application/json; charset=latin-1"]) | HEADER_BYTES,
    extra=st.dictionaries(st.sampled_from(["X-Event-ID", "X-Forwarded-For", "Content-Encoding", "Accept", "X-PacSpace-Signature-V2"]), HEADER_BYTES, max_size=3),
)
def test_random_requests_never_get_a_5xx_or_an_accepted_forgery(
    client: httpx.Client, body: bytes, stamp: Any, mode: str, junk: bytes, content_type: bytes | None, extra: dict[str, bytes]
) -> None:
    now = int(time.time())
    headers: dict[str, Any] = dict(extra)
    if content_type is not None:
        headers["Content-Type"] = content_type
    stamp_text = stamp(now) if stamp is not None else None
    if stamp_text is not None:
        headers["X-PacSpace-Timestamp"] = stamp_text
    signature = signature_for(mode, stamp_text or b"", body, junk)
    if signature is not None:
        headers["X-PacSpace-Signature"] = signature
    response = client.post("/webhooks/pacspace", content=body, headers=headers)
    SEEN[response.status_code] += 1
    assert response.status_code < 500, (response.status_code, response.text)
    if 200 <= response.status_code < 300:
        assert carries_a_genuine_mac(headers, body, now), ("accepted a forgery", headers, body[:200])
