"""The webhook verifier: one test per way a request can be wrong, and agreement with
the official SDK (`pacspace_sdk.Webhooks`) on thousands of generated cases."""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pacspace_sdk import Webhooks
from pacspace_sdk.errors import WebhookVerificationError

from receiver.signature import SignatureError, parse_timestamp, verify_signature
from reconciler.errors import InvalidEvent
from reconciler.events import parse_json_object
from tests.webhooks import TEST_SECRET, envelope, sign

NOW = 1_800_000_000
SECRETS = [TEST_SECRET]


def verify(raw: bytes, headers: dict[str, str], *, secrets: list[str] = SECRETS, now: float = NOW, tolerance: int = 300) -> int:
    return verify_signature(
        raw,
        headers.get("X-PacSpace-Signature"),
        headers.get("X-PacSpace-Timestamp"),
        secrets=secrets,
        tolerance_seconds=tolerance,
        now=now,
    )


def signed(**kwargs: Any) -> tuple[bytes, dict[str, str]]:
    webhook = sign(envelope(), timestamp=kwargs.pop("timestamp", NOW), **kwargs)
    return webhook.body, dict(webhook.headers)


def test_accepts_a_genuine_webhook() -> None:
    raw, headers = signed()
    assert verify(raw, headers) == NOW


def test_accepts_a_timestamp_in_milliseconds() -> None:
    raw, headers = signed(timestamp=NOW * 1000 + 999)
    assert verify(raw, headers) == NOW


def test_accepts_either_value_after_pacspace_rotates_its_secret() -> None:
    raw, headers = signed(secret="whsec_new", also=TEST_SECRET)
    assert verify(raw, headers) == NOW
    raw, headers = signed(secret=TEST_SECRET, also="whsec_old")
    assert verify(raw, headers) == NOW


def test_accepts_any_of_our_configured_secrets() -> None:
    raw, headers = signed(secret="whsec_second")
    assert verify(raw, headers, secrets=[TEST_SECRET, "whsec_second"]) == NOW


@pytest.mark.parametrize("missing", ["X-PacSpace-Signature", "X-PacSpace-Timestamp"])
def test_refuses_a_missing_header(missing: str) -> None:
    raw, headers = signed()
    del headers[missing]
    with pytest.raises(SignatureError) as caught:
        verify(raw, headers)
    assert caught.value.code == "missing_signature" and missing in caught.value.message


def test_refuses_an_empty_signature_header() -> None:
    raw, headers = signed()
    headers["X-PacSpace-Signature"] = ""
    with pytest.raises(SignatureError, match="missing or empty") as caught:
        verify(raw, headers)
    assert caught.value.code == "missing_signature"


@pytest.mark.parametrize("stamp", ["abc", "12.5", "1e9", "0x10", ""])
def test_refuses_a_timestamp_that_is_no_integer(stamp: str) -> None:
    raw, headers = signed()
    headers["X-PacSpace-Timestamp"] = stamp
    with pytest.raises(SignatureError) as caught:
        verify(raw, headers)
    assert caught.value.code == ("missing_signature" if stamp == "" else "invalid_timestamp")


@pytest.mark.parametrize("offset", [301, -301, 10_000])
def test_refuses_a_timestamp_outside_the_tolerance(offset: int) -> None:
    raw, headers = signed(timestamp=NOW + offset)
    with pytest.raises(SignatureError, match="at most 300 s") as caught:
        verify(raw, headers)
    assert caught.value.code == "stale_timestamp"


@pytest.mark.parametrize("offset", [300, -300, 0])
def test_accepts_a_timestamp_at_the_tolerance(offset: int) -> None:
    raw, headers = signed(timestamp=NOW + offset)
    assert verify(raw, headers) == NOW + offset


def test_refuses_a_wrong_secret() -> None:
    raw, headers = signed(secret="whsec_someone_else")
    with pytest.raises(SignatureError) as caught:
        verify(raw, headers)
    assert caught.value.code == "invalid_signature"


def test_refuses_a_body_changed_after_signing() -> None:
    raw, headers = signed()
    with pytest.raises(SignatureError):
        verify(raw.replace(b"delta.verified", b"delta.failed"), headers)


def test_refuses_a_timestamp_changed_after_signing() -> None:
    raw, headers = signed()
    headers["X-PacSpace-Timestamp"] = str(NOW + 1)
    with pytest.raises(SignatureError):
        verify(raw, headers)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s.upper().replace("V1=", "v1="),  # hex in capitals is another string
        lambda s: s[:-1],
        lambda s: s.replace("v1=", "v0="),
        lambda s: s.replace("v1=", ""),
        lambda s: "v1=",
    ],
)
def test_refuses_a_mangled_signature(mangle: Any) -> None:
    raw, headers = signed()
    headers["X-PacSpace-Signature"] = mangle(headers["X-PacSpace-Signature"])
    with pytest.raises(SignatureError):
        verify(raw, headers)


def test_tolerates_spaces_and_other_schemes_around_a_genuine_value() -> None:
    raw, headers = signed()
    headers["X-PacSpace-Signature"] = f"v0=abc,  {headers['X-PacSpace-Signature']} , v2=zzz"
    assert verify(raw, headers) == NOW


@pytest.mark.parametrize(("value", "seconds"), [("1700000000", 1700000000), ("1700000000123", 1700000000), (" 42 ", 42), ("x", None)])
def test_parse_timestamp(value: str, seconds: int | None) -> None:
    assert parse_timestamp(value) == seconds


# -- the official SDK as an independent oracle ---------------------------------


def test_the_builders_webhooks_pass_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    for kwargs in ({}, {"milliseconds": True}, {"also": "whsec_previous"}):
        webhook = sign(envelope(data={"recordId": "a_1", "delta": -42.5}), **kwargs)
        parsed = Webhooks(TEST_SECRET).verify_from_headers(webhook.headers, webhook.body.decode())
        assert parsed["event"] == "delta.verified"


def _sdk_accepts(secrets: list[str], headers: dict[str, str], body: str, tolerance: int) -> bool:
    for secret in secrets:
        try:
            Webhooks(secret).verify_from_headers(headers, body, tolerance=tolerance)
        except (WebhookVerificationError, TypeError, ValueError, RecursionError):
            continue  # TypeError: its compare_digest refuses non-ASCII text
        return True
    return False


def _we_accept(secrets: list[str], headers: dict[str, str], body: str, tolerance: int, now: float) -> bool:
    raw = body.encode("utf-8")
    try:
        verify(raw, headers, secrets=secrets, now=now, tolerance=tolerance)
        parse_json_object(raw)
    except (SignatureError, InvalidEvent):
        return False
    return True


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_secret = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24), st.just(TEST_SECRET))
_json_body = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


# numbers and escapes that JSON allows but Decimal, UTF-8 or a database may not
_ODD_LITERALS = [
    "1.0e1000000000000000000",
    "-1e-999999999999999999999",
    "1" * 5000,
    "NaN",
    "-Infinity",
    '"\\ud800"',
    '"\\u0000"',
    "1E400",
]


def _pick(draw: st.DrawFn, weighted: list[tuple[int, st.SearchStrategy[Any]]]) -> Any:
    """Draw from one of `weighted` strategies, each chosen in proportion to its weight."""
    roll = draw(st.integers(0, sum(w for w, _ in weighted) - 1))
    for weight, strategy in weighted:
        if roll < weight:
            return draw(strategy)
        roll -= weight
    raise AssertionError("unreachable")


@st.composite
def _cases(draw: st.DrawFn) -> tuple[list[str], dict[str, str], str, int, float]:
    """Mostly genuine webhooks, then one thing at a time made wrong (or odd but valid)."""
    now = draw(st.integers(1_000_000_000, 4_000_000_000)) + draw(st.sampled_from([0.0, 0.25, 0.999]))
    tolerance = draw(st.sampled_from([0, 1, 5, 300, 3600]))
    ours = draw(st.lists(_secret, min_size=1, max_size=3, unique=True))
    signer = draw(st.one_of(st.sampled_from(ours), _secret)) if draw(st.integers(0, 9)) == 0 else draw(st.sampled_from(ours))
    body = _pick(
        draw,
        [
            (6, st.dictionaries(_text, _json_body, max_size=4).map(json.dumps)),
            (1, st.sampled_from(_ODD_LITERALS).map(lambda literal: '{"id": "evt_1", "delta": %s}' % literal)),
            (2, _json_body.map(json.dumps)),
            (1, _text),
            (1, st.just("")),
        ],
    )
    offset = _pick(draw, [(7, st.integers(-tolerance, tolerance)), (2, st.integers(-tolerance - 2, tolerance + 2)), (1, st.integers(-10**7, 10**7))])
    seconds = int(now) + offset
    stamp = _pick(
        draw,
        [
            (12, st.just(str(seconds))),
            (3, st.integers(0, 999).map(lambda ms: str(seconds * 1000 + ms))),
            (1, st.just(f" {seconds} ")),
            (1, st.just(f"+{seconds}")),
            (1, st.just(f"{seconds:_}")),
            (2, _text),
        ],
    )
    good = "v1=" + hmac.new(signer.encode(), f"{stamp}.{body}".encode(), "sha256").hexdigest()
    other = "v1=" + hmac.new(b"whsec_other", f"{stamp}.{body}".encode(), "sha256").hexdigest()
    signature = _pick(
        draw,
        [
            (10, st.just(good)),
            (2, st.just(f"{other},{good}")),
            (2, st.just(f"{good},{other}")),
            (1, st.just(f" {good} ")),
            (1, st.just(good.upper())),
            (1, st.just(good[:-2])),
            (1, _text.map(lambda junk: f"{junk},{good}")),
            (1, _text.map(lambda junk: f"{good},{junk}")),
            (1, _text.map(lambda junk: f"v1=\u00e9{junk},{good}")),  # a non-ASCII value first
            (1, _text.map(lambda junk: f"{good},v1=\u00e9{junk}")),
            (1, _text),
        ],
    )
    headers: dict[str, str] = {}
    if draw(st.integers(0, 19)) > 0:  # now and then a header is missing altogether
        headers["X-PacSpace-Signature"] = signature
    if draw(st.integers(0, 19)) > 0:
        headers["X-PacSpace-Timestamp"] = stamp
    return ours, headers, body, tolerance, now


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_agrees_with_the_sdk_on_every_generated_case(case: tuple[list[str], dict[str, str], str, int, float]) -> None:
    secrets, headers, body, tolerance, now = case
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", lambda: now)  # the SDK reads time.time(); ours is given `now`
        expected = _sdk_accepts(secrets, headers, body, tolerance)
    event(f"sdk {'accepts' if expected else 'rejects'}")
    assert _we_accept(secrets, headers, body, tolerance, now) == expected
