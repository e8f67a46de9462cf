"""kill -9 of the daemon under sustained webhook load, round after round, on one ledger:
every event that got a 2xx is in the ledger after the restart, and only once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from storage.engine import make_engine
from tests.conftest import BACKENDS, empty_postgres, migrated_sqlite_url
from tests.daemon import Daemon
from tests.load import WebhookLoad
from tests.webhooks import sign

ROUNDS = 3


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return migrated_sqlite_url(tmp_path / "kill9.db")
    url = request.getfixturevalue("postgres_url")
    empty_postgres(url)
    return url


def stored_ids(url: str) -> list[str]:
    engine = make_engine(url)
    with engine.connect() as connection:
        ids = [row[0] for row in connection.execute(text("SELECT event_id FROM webhook_event"))]
    engine.dispose()
    return ids


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_every_acknowledged_event_survives_kill_9_round_after_round(ledger_url: str, tmp_path: Path, writer: str) -> None:
    acknowledged: set[str] = set()
    bodies: dict[str, bytes] = {}
    unanswered: set[str] = set()  # sent, but the daemon died before it answered
    for round_ in range(ROUNDS):
        # the restart recovers the ledger the kill left behind (and a writer process the kill orphaned leaves)
        daemon = Daemon(ledger_url, tmp_path, PACRECON_WEBHOOK_WRITER=writer).start()
        with WebhookLoad(daemon.url, threads=4, until_gone=True) as load:
            time.sleep(1.5)
            assert daemon.process is not None
            daemon.process.kill()  # SIGKILL mid-load: no shutdown, no flush
            daemon.process.wait()
        round_acks = load.acknowledged()
        assert len(round_acks) > 20, f"round {round_}: too little load to mean anything ({len(round_acks)})"
        assert not {a.status for a in load.answers} - {200, None}, "nothing but 2xx or no answer is expected"
        acknowledged |= round_acks
        bodies.update({a.event_id: a.body for a in load.answers})
        unanswered |= {a.event_id for a in load.answers if a.status is None}
        stored = stored_ids(ledger_url)
        assert len(stored) == len(set(stored))  # exactly once
        lost = acknowledged - set(stored)
        assert not lost, f"round {round_}: {len(lost)} acknowledged events lost, e.g. {sorted(lost)[:3]}"

    # PacSpace redelivers what got no answer: each is recorded now or was already, never twice
    daemon = Daemon(ledger_url, tmp_path).start()
    try:
        with httpx.Client(timeout=10) as client:
            for event_id in sorted(unanswered)[:50]:
                again = sign(bodies[event_id])
                answer = client.post(f"{daemon.url}/webhooks/pacspace", content=again.body, headers=again.headers)
                assert answer.status_code == 200 and answer.json()["status"] in ("recorded", "duplicate"), event_id
            for event_id in sorted(acknowledged)[:50]:  # an acknowledged event is known: a duplicate
                again = sign(bodies[event_id])
                answer = client.post(f"{daemon.url}/webhooks/pacspace", content=again.body, headers=again.headers)
                assert answer.json() == {"status": "duplicate"}, event_id
    finally:
        assert daemon.stop() == 0
    stored = stored_ids(ledger_url)
    assert len(stored) == len(set(stored)) and acknowledged <= set(stored)
