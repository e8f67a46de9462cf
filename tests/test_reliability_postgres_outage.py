"""PostgreSQL stopped under webhook load (a private cluster: the shared server is never
stopped): the receiver answers 503 and never 2xx, /readyz fails, and both recover
when the database returns, without restarting the daemon."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from storage.engine import make_engine
from storage.schema import upgrade_to_head
from tests.daemon import Daemon
from tests.load import WebhookLoad
from tests.private_postgres import PrivateCluster
from tests.webhooks import sign


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    running = PrivateCluster()
    try:
        running.start()
        yield running
    finally:
        running.destroy()


def _stored(url: str) -> set[str]:
    engine = make_engine(url)
    with engine.connect() as connection:
        ids = {row[0] for row in connection.execute(text("SELECT event_id FROM webhook_event"))}
    engine.dispose()
    return ids


def _wait_for(condition, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_postgres_stopped_under_load_is_503_then_recovers_without_a_restart(cluster: PrivateCluster, tmp_path: Path, writer: str) -> None:
    engine = make_engine(cluster.url)
    upgrade_to_head(engine)
    engine.dispose()
    daemon = Daemon(cluster.url, tmp_path, PACRECON_LOCK_TIMEOUT_MS="1000", PACRECON_WEBHOOK_WRITER=writer).start()
    assert daemon.process is not None
    pid = daemon.process.pid
    try:
        with WebhookLoad(daemon.url, threads=3) as load:
            time.sleep(1.0)
            cluster.stop("fast")  # returns once the server is down
            down_at = time.monotonic()
            time.sleep(1.5)
            outage_ready = httpx.get(f"{daemon.url}/readyz", timeout=15)
            health = httpx.get(f"{daemon.url}/healthz", timeout=5)
            restart_at = time.monotonic()
            cluster.start()
            _wait_for(lambda: httpx.get(f"{daemon.url}/readyz", timeout=15).status_code == 200, 30, "/readyz back to 200")
            _wait_for(lambda: any(a.status == 200 and a.sent_at > restart_at for a in load.answers), 30, "a webhook acknowledged again")
            time.sleep(0.5)
        assert daemon.process.poll() is None and daemon.process.pid == pid  # the same process throughout
    finally:
        assert daemon.stop() == 0

    assert (outage_ready.status_code, outage_ready.json()["error"]["code"]) == (503, "storage_unavailable")
    assert health.status_code == 200  # the process itself is fine
    during = [a for a in load.answers if a.sent_at >= down_at and a.answered_at <= restart_at]
    assert len(during) >= 5, "the load kept coming during the outage"
    assert {a.status for a in during} == {503}, sorted({a.status for a in during}, key=str)
    assert {a.status for a in load.answers} <= {200, 503}

    # every acknowledged event is stored; each refused one is taken on PacSpace's retry
    cluster_ids = _stored(cluster.url)
    assert load.acknowledged() <= cluster_ids
    refused = [a for a in load.answers if a.status == 503]
    daemon = Daemon(cluster.url, tmp_path).start()
    try:
        with httpx.Client(timeout=10) as client:
            for answer in refused[:20]:
                again = sign(answer.body)
                retry = client.post(f"{daemon.url}/webhooks/pacspace", content=again.body, headers=again.headers)
                assert retry.status_code == 200 and retry.json()["status"] in ("recorded", "duplicate")
    finally:
        assert daemon.stop() == 0
    assert {a.event_id for a in refused[:20]} <= _stored(cluster.url)
