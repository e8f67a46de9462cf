"""Security at the daemon's edge: the API routes want their exact bearer token, and a
captured webhook replayed once its timestamp is outside the tolerance is refused.
(That no secret reaches a log is checked for every process of the suite: tests/daemon.py
and the session fixture in tests/conftest.py.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import migrated_sqlite_url
from tests.daemon import Daemon, stored_events
from tests.webhooks import envelope, sign

TOKEN = "api_token_security_do_not_log_5e1"
TOLERANCE = 2
ROUTES = [
    ("POST", "/v1/deltas"),
    ("POST", "/v1/deltas/batch"),
    ("POST", "/v1/deltas/import"),
    ("GET", "/v1/deltas"),
    ("GET", "/v1/deltas/a_some_anchor"),
]


@pytest.fixture(scope="module")
def ledger_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return migrated_sqlite_url(tmp_path_factory.mktemp("security") / "ledger.db")


@pytest.fixture(scope="module")
def daemon(ledger_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(
        ledger_url, tmp_path_factory.mktemp("work"),
        PACRECON_API_TOKEN=TOKEN, PACRECON_WEBHOOK_TOLERANCE_SECONDS=str(TOLERANCE),
    ).start()
    yield running
    assert running.stop() == 0


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong",
        f"Bearer {TOKEN[:-1]}",  # a prefix
        f"Bearer {TOKEN}x",  # a longer token
        f"Bearer {TOKEN.upper()}",
        f"Basic {TOKEN}",
        TOKEN,  # no scheme
        f"Bearer{TOKEN}",
        f"Token {TOKEN}",
    ],
)
@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_api_routes_refuse_a_missing_or_wrong_token(daemon: Daemon, method: str, path: str, authorization: str | None) -> None:
    headers = {"Content-Type": "application/json"} | ({"Authorization": authorization} if authorization is not None else {})
    response = httpx.request(method, f"{daemon.url}{path}", headers=headers, content=b"{}" if method == "POST" else None, timeout=10)
    assert (response.status_code, response.json()["error"]["code"]) == (401, "unauthorized")


def test_the_token_in_the_query_string_is_not_a_token(daemon: Daemon) -> None:
    response = httpx.get(f"{daemon.url}/v1/deltas", params={"token": TOKEN, "access_token": TOKEN}, timeout=10)
    assert response.status_code == 401


def test_the_right_token_is_let_through(daemon: Daemon) -> None:
    for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 9110); the token is not
        response = httpx.get(f"{daemon.url}/v1/deltas", headers={"Authorization": f"{scheme} {TOKEN}"}, timeout=10)
        assert response.status_code == 200, response.text


def test_a_replayed_webhook_is_refused_once_outside_the_tolerance(daemon: Daemon, ledger_url: str) -> None:
    delivered = envelope(data={"recordId": "a_replayed"})
    captured = sign(delivered)  # an attacker records this request off the wire...
    never_delivered = sign(envelope(data={"recordId": "a_held_back"}))  # ...and this one, which PacSpace's attempt lost
    url = f"{daemon.url}/webhooks/pacspace"
    assert httpx.post(url, content=captured.body, headers=captured.headers).json() == {"status": "recorded"}
    # within the tolerance an identical replay is a duplicate: acknowledged, changes nothing
    assert httpx.post(url, content=captured.body, headers=captured.headers).json() == {"status": "duplicate"}
    time.sleep(TOLERANCE + 1.5)
    for replay in (captured, never_delivered):
        response = httpx.post(url, content=replay.body, headers=replay.headers)
        assert (response.status_code, response.json()["error"]["code"]) == (401, "stale_timestamp")
    assert stored_events(ledger_url, delivered["id"]) == 1
    held_back_id = json.loads(never_delivered.body)["id"]
    assert stored_events(ledger_url, held_back_id) == 0
    # a timestamp moved forward to look fresh breaks the signature
    forged = dict(never_delivered.headers, **{"X-PacSpace-Timestamp": str(int(time.time()))})
    response = httpx.post(url, content=never_delivered.body, headers=forged)
    assert (response.status_code, response.json()["error"]["code"]) == (401, "invalid_signature")
