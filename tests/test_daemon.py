"""End to end: the real `pacrecon serve` under uvicorn on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from storage.engine import make_engine
from tests.conftest import BACKENDS, migrated_sqlite_url
from tests.daemon import Daemon, clean_environment, pacrecon, stored_events
from tests.webhooks import TEST_SECRET, envelope, sign

API_KEY = "sk_live_do_not_log_this_key_42"
ADMIN = "admin_token_do_not_log_41"


@pytest.fixture(scope="module", params=BACKENDS)
def daemon_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return migrated_sqlite_url(tmp_path_factory.mktemp("daemon") / "ledger.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="module")
def daemon(daemon_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(
        daemon_database,
        tmp_path_factory.mktemp("work"),
        PACRECON_PACSPACE_API_KEY=API_KEY,
        PACRECON_ADMIN_TOKEN=ADMIN,
        PACRECON_LOCK_TIMEOUT_MS="300",
    ).start()
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log_text()


def post(daemon: Daemon, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{daemon.url}/webhooks/pacspace", content=body, headers=headers, timeout=10)


def test_a_genuine_webhook_is_recorded_once(daemon: Daemon, daemon_database: str) -> None:
    body = envelope(data={"recordId": "a_e2e_1", "delta": -42.5})
    webhook = sign(body)
    first = post(daemon, webhook.body, webhook.headers)
    assert (first.status_code, first.json()) == (200, {"status": "recorded"})
    again = sign(webhook.body)  # PacSpace re-signs a redelivery with a new timestamp
    second = post(daemon, again.body, again.headers)
    assert (second.status_code, second.json()) == (200, {"status": "duplicate"})
    assert stored_events(daemon_database, body["id"]) == 1


def test_a_webhook_signed_in_milliseconds_and_during_rotation(daemon: Daemon) -> None:
    webhook = sign(envelope(), secret="whsec_next", also=TEST_SECRET, milliseconds=True)
    assert post(daemon, webhook.body, webhook.headers).json() == {"status": "recorded"}


def test_an_event_type_we_do_not_act_on_is_ignored(daemon: Daemon, daemon_database: str) -> None:
    body = envelope("record.committed", {"receiptId": "0x1"})
    webhook = sign(body)
    assert post(daemon, webhook.body, webhook.headers).json() == {"status": "ignored"}
    assert stored_events(daemon_database, body["id"]) == 1


@pytest.mark.parametrize(
    ("break_it", "code"),
    [
        (lambda h: h.pop("X-PacSpace-Signature"), "missing_signature"),
        (lambda h: h.pop("X-PacSpace-Timestamp"), "missing_signature"),
        (lambda h: h.update({"X-PacSpace-Timestamp": "yesterday"}), "invalid_timestamp"),
        (lambda h: h.update({"X-PacSpace-Timestamp": str(int(time.time()) - 301)}), "stale_timestamp"),
        # +310, not +301: a future stamp gets fresher as the clock ticks, and on a busy machine
        # a second or two may pass between setting it and the daemon's check
        (lambda h: h.update({"X-PacSpace-Timestamp": str(int(time.time()) + 310)}), "stale_timestamp"),
        (lambda h: h.update({"X-PacSpace-Signature": "v1=" + "0" * 64}), "invalid_signature"),
    ],
)
def test_refusals_are_401_with_a_code(daemon: Daemon, daemon_database: str, break_it, code: str) -> None:
    body = envelope()
    webhook = sign(body)
    headers = dict(webhook.headers)
    break_it(headers)
    response = post(daemon, webhook.body, headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert stored_events(daemon_database, body["id"]) == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id":"evt_surrogate_\\ud800","event":"delta.verified","data":{"recordId":"a_odd"}}',
        b'{"id":"evt_nul_\\u0000","event":"delta.verified\\u0000","data":{"recordId":"a\\u0000"}}',
        b'{"id":"evt_huge_exponent","event":"delta.verified","data":{"recordId":"a_odd","delta":1.0e1000000000000000000}}',
        b'{"event":"delta.verified","data":{"recordId":"a_odd","sequenceNumber":"' + b"9" * 5000 + b'"}}',
        b'{"event":"delta.verified","data":{"recordId":"a_odd","sequenceNumber":"' + b"9" * 65 + b'"}}',
        b'{"event":"delta.verified","data":{"recordId":"a_odd","verificationReference":"' + b"v" * 300 + b'"}}',
        b'{"event":"delta.failed","data":{"recordId":"a_odd","error":"' + b"e" * 5000 + b'\\u0000"}}',
        b'{"id":' + b"7" * 300 + b',"event":"x"}',
    ],
)
def test_odd_but_genuine_events_are_recorded_never_5xx(daemon: Daemon, raw: bytes) -> None:
    raw = raw.replace(b"evt_", f"evt_{time.time_ns()}_".encode()) if b'"id":"evt_' in raw else raw.replace(b'"data"', f'"nonce":{time.time_ns()},"data"'.encode())
    webhook = sign(raw)
    response = post(daemon, webhook.body, webhook.headers)
    assert (response.status_code, response.json()) == (200, {"status": response.json()["status"]})
    assert response.json()["status"] in ("recorded", "ignored")


def test_a_signature_by_another_secret_is_refused(daemon: Daemon) -> None:
    webhook = sign(envelope(), secret="whsec_attacker")
    assert post(daemon, webhook.body, webhook.headers).json()["error"]["code"] == "invalid_signature"


@pytest.mark.parametrize("body", [b"[1,2,3]", b"not json", b"", b'"a string"', b"\xff\xfe"])
def test_a_genuine_body_that_is_no_json_object_is_400(daemon: Daemon, body: bytes) -> None:
    webhook = sign(body)
    response = post(daemon, webhook.body, webhook.headers)
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_payload")


def _raw_exchange(daemon: Daemon, head: bytes, body_part: bytes) -> bytes:
    """Send raw bytes; return the whole response (headers and Content-Length body), or
    what arrived before the server closed the connection."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as connection:
        connection.sendall(head + body_part)
        answer = b""
        while True:
            try:
                chunk = connection.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return answer
            if not chunk:
                return answer
            answer += chunk
            headers, separator, body = answer.partition(b"\r\n\r\n")
            if separator:
                length = next(
                    (int(line.split(b":", 1)[1]) for line in headers.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                    0,
                )
                if len(body) >= length:
                    return answer


def test_a_declared_oversized_body_is_refused_before_it_is_sent(daemon: Daemon) -> None:
    head = (
        b"POST /webhooks/pacspace HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000000\r\n\r\n"
    )
    started = time.monotonic()
    answer = _raw_exchange(daemon, head, b"{")  # 1 byte of the announced 50 MB
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer
    assert time.monotonic() - started < 5


def test_a_streamed_oversized_body_is_cut_off(daemon: Daemon) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(2000):  # up to 128 MB if nobody stopped reading
            yield b"x" * 65536

    response = httpx.post(f"{daemon.url}/webhooks/pacspace", content=chunks(), timeout=20)
    assert (response.status_code, response.json()["error"]["code"]) == (413, "payload_too_large")


def test_the_same_event_arriving_at_once_is_recorded_once(daemon: Daemon, daemon_database: str) -> None:
    body = envelope(data={"recordId": "a_race"})
    webhook = sign(body)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(
                *(client.post(f"{daemon.url}/webhooks/pacspace", content=webhook.body, headers=webhook.headers) for _ in range(25))
            )

    answers = sorted(r.json()["status"] for r in asyncio.run(burst()))
    assert answers == ["duplicate"] * 24 + ["recorded"]
    assert stored_events(daemon_database, body["id"]) == 1


def test_health_and_readiness(daemon: Daemon) -> None:
    assert httpx.get(f"{daemon.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{daemon.url}/readyz").json()
    assert ready["status"] == "ready" and ready["schema_revision"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/webhooks/pacspace", 405), ("PUT", "/webhooks/pacspace", 405), ("GET", "/nothing-here", 404), ("POST", "/readyz", 405)],
)
def test_other_requests_get_json_errors(daemon: Daemon, method: str, path: str, status: int) -> None:
    response = httpx.request(method, f"{daemon.url}{path}")
    assert response.status_code == status and "code" in response.json()["error"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /webhooks/pacspace HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /webhooks/pacspace HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /webhooks/pacspace HTTP/1.1\r\nHost: x\r\nX-PacSpace-Signature: " + b"v1=" * 20000 + b"\r\n\r\n",
        b"POST /webhooks/pacspace HTTP/1.1\r\nHost: x\r\nX-PacSpace-Signature: v1=\xff\xfe\r\n"
        b"X-PacSpace-Timestamp: \xe9\r\nContent-Length: 2\r\n\r\n{}",
        b"\x00\x01\x02 garbage \r\n\r\n",
        b"POST /webhooks/pacspace?x=%ff%00 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_hostile_requests_get_a_4xx_and_never_a_500(daemon: Daemon, request_bytes: bytes) -> None:
    answer = _raw_exchange(daemon, request_bytes, b"")
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    assert answer == b"" or (status is not None and 400 <= status < 500), answer[:200]


def _hold_write_lock(database_url: str, seconds: float) -> threading.Thread:
    """Another client holding the ledger's write lock for `seconds`."""
    ready = threading.Event()

    def hold() -> None:
        if database_url.startswith("sqlite"):
            connection = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
            connection.execute("BEGIN EXCLUSIVE")
            ready.set()
            time.sleep(seconds)
            connection.execute("ROLLBACK")
            connection.close()
        else:
            engine = make_engine(database_url)
            with engine.begin() as connection:
                connection.execute(text("LOCK TABLE webhook_event IN ACCESS EXCLUSIVE MODE"))
                ready.set()
                time.sleep(seconds)
            engine.dispose()

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait(10)
    return thread


def test_storage_unavailable_is_503_and_never_acknowledged(daemon: Daemon, daemon_database: str) -> None:
    body = envelope(data={"recordId": "a_locked"})
    webhook = sign(body)
    holder = _hold_write_lock(daemon_database, 2.0)
    try:
        response = post(daemon, webhook.body, webhook.headers)
    finally:
        holder.join()
    assert (response.status_code, response.json()["error"]["code"]) == (503, "storage_unavailable")
    assert stored_events(daemon_database, body["id"]) == 0
    # the lock is gone: PacSpace's retry is recorded, no restart needed
    retry = sign(webhook.body)
    assert post(daemon, retry.body, retry.headers).json() == {"status": "recorded"}
    assert stored_events(daemon_database, body["id"]) == 1


def test_every_webhook_is_logged_with_its_ids_and_no_secret_ever(daemon: Daemon) -> None:
    body = envelope(data={"recordId": "a_logged"})
    webhook = sign(body)
    post(daemon, webhook.body, webhook.headers)
    forged = sign(envelope(), secret="whsec_attacker")
    post(daemon, forged.body, forged.headers)
    time.sleep(0.2)
    events = daemon.log_events()  # every line is JSON
    line = next(e for e in events if e.get("event") == "webhook" and e.get("event_id") == body["id"])
    assert (line["event_type"], line["anchor_id"], line["outcome"]) == ("delta.verified", "a_logged", "orphan")
    assert any(e.get("event") == "webhook_rejected" and e.get("reason") == "invalid_signature" for e in events)
    log = daemon.log_text()
    for secret in (TEST_SECRET, API_KEY, ADMIN, webhook.headers["X-PacSpace-Signature"][3:], forged.headers["X-PacSpace-Signature"][3:]):
        assert secret not in log


# -- lifecycle: each test runs a daemon of its own ---------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return migrated_sqlite_url(tmp_path / "own.db")


def test_sigterm_finishes_the_request_in_flight_then_exits_0(sqlite_url: str, tmp_path: Path) -> None:
    daemon = Daemon(sqlite_url, tmp_path, PACRECON_LOCK_TIMEOUT_MS="10000").start()
    body = envelope(data={"recordId": "a_inflight"})
    webhook = sign(body)
    holder = _hold_write_lock(sqlite_url, 1.5)  # the request will wait on the lock
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(post(daemon, webhook.body, webhook.headers)))
    sender.start()
    time.sleep(0.5)
    assert daemon.process is not None
    daemon.process.send_signal(15)  # SIGTERM while the request waits
    sender.join(20)
    holder.join()
    assert daemon.stop() == 0
    assert answers and answers[0].json() == {"status": "recorded"}
    assert stored_events(sqlite_url, body["id"]) == 1


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_serve_refuses_a_schema_behind_head(tmp_path: Path, writer: str) -> None:
    env = clean_environment(
        PACRECON_DATABASE_URL=f"sqlite:///{tmp_path / 'empty.db'}", PACRECON_WEBHOOK_SECRETS=TEST_SECRET, PACRECON_WEBHOOK_WRITER=writer
    )
    started = time.monotonic()
    result = pacrecon(["serve"], env, tmp_path)  # returns once nothing holds its output open: no writer process left
    assert time.monotonic() - started < 20
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "run `pacrecon migrate`" in result.stderr
    migrated = pacrecon(["migrate"], env, tmp_path)
    assert migrated.returncode == 0 and "schema at revision" in migrated.stdout


def test_readiness_fails_when_the_schema_falls_behind(sqlite_url: str, tmp_path: Path) -> None:
    from alembic import command

    from storage.schema import alembic_config

    daemon = Daemon(sqlite_url, tmp_path).start()
    try:
        engine = make_engine(sqlite_url)
        command.downgrade(alembic_config(engine), "base")
        engine.dispose()
        response = httpx.get(f"{daemon.url}/readyz")
        assert (response.status_code, response.json()["error"]["code"]) == (503, "schema_not_current")
        assert httpx.get(f"{daemon.url}/healthz").status_code == 200
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({}, "PACRECON_WEBHOOK_SECRETS"),
        ({"PACRECON_WEBHOOK_SECRETS": TEST_SECRET, "PACRECON_PORT": "eighty"}, "PACRECON_PORT"),
        ({"PACRECON_WEBHOOK_SECRETS": TEST_SECRET, "PACRECON_PORT": "70000"}, "PACRECON_PORT"),
        ({"PACRECON_WEBHOOK_SECRETS": TEST_SECRET, "PACRECON_WEBHOOK_TOLERANCE_SECONDS": "-1"}, "PACRECON_WEBHOOK_TOLERANCE_SECONDS"),
        ({"PACRECON_WEBHOOK_SECRETS": "a,,b"}, "PACRECON_WEBHOOK_SECRETS"),
        ({"PACRECON_WEBHOOK_SECRETS": TEST_SECRET, "PACRECON_DATABASE_URL": "mysql://x/y"}, "PACRECON_DATABASE_URL"),
        ({"PACRECON_WEBHOOK_SECRETS": TEST_SECRET, "PACRECON_DATABASE_URL": "not a url"}, "PACRECON_DATABASE_URL"),
        ({"PACRECON_WEBHOOK_SECRETS": TEST_SECRET, "PACRECON_LOG_FORMAT": "xml"}, "PACRECON_LOG_FORMAT"),
        ({"PACRECON_WEBHOOK_SECRETS": TEST_SECRET, "PACRECON_PACSPACE_BASE_URL": "ftp://x"}, "PACRECON_PACSPACE_BASE_URL"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(tmp_path: Path, settings: dict[str, str], variable: str) -> None:
    result = pacrecon(["serve"], clean_environment(**settings), tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in result.stderr


def test_a_secret_in_bad_configuration_is_not_echoed(tmp_path: Path) -> None:
    result = pacrecon(["serve"], clean_environment(PACRECON_WEBHOOK_SECRETS="whsec_x,,whsec_hidden_value"), tmp_path)
    assert result.returncode == 2 and "whsec_hidden_value" not in result.stderr
    result = pacrecon(
        ["serve"],
        clean_environment(PACRECON_WEBHOOK_SECRETS="whsec_x", PACRECON_DATABASE_URL="mysql://app:hunter2-db-password@db/ledger"),
        tmp_path,
    )
    assert result.returncode == 2 and "PACRECON_DATABASE_URL" in result.stderr and "hunter2" not in result.stderr


def test_configuration_from_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"PACRECON_DATABASE_URL=sqlite:///{tmp_path / 'fromenv.db'}\n")
    result = pacrecon(["migrate"], clean_environment(), tmp_path)
    assert result.returncode == 0 and (tmp_path / "fromenv.db").exists()
