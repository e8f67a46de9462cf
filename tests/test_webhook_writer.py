"""The webhook writer process (`pacrecon.webhook_writer`) with real `pacrecon serve`
processes: killed under load it loses nothing acknowledged and comes back by itself;
signals meant for the group do not stop it before the daemon has drained; it never
outlives the daemon. And the in-process writer (PACRECON_WEBHOOK_WRITER=thread) still
records exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from pacrecon.webhook_writer import ProcessRecorder
from pacrecon.writer_child import WriterConfig
from pacrecon.writer_child import frame as _frame
from pacrecon.writer_child import frames as _frames
from reconciler.errors import InvalidEvent
from storage.engine import make_engine
from storage.errors import StorageUnavailable

from tests.conftest import migrated_sqlite_url
from tests.daemon import Daemon, alive, stored_events, wait_for
from tests.webhooks import envelope, sign


def _writer_pids(daemon: Daemon) -> list[int]:
    """The writer processes the daemon said were ready, oldest first."""
    return [int(e["pid"]) for e in daemon.log_events() if e.get("event") == "webhook_writer_ready"]


def _post(daemon: Daemon, body: dict[str, object] | bytes) -> httpx.Response:
    webhook = sign(body)
    return httpx.post(f"{daemon.url}/webhooks/pacspace", content=webhook.body, headers=webhook.headers, timeout=60)


def test_a_killed_writer_process_loses_nothing_acknowledged_and_is_replaced(tmp_path: Path) -> None:
    url = migrated_sqlite_url(tmp_path / "ledger.db")
    daemon = Daemon(url, tmp_path, PACRECON_WEBHOOK_WRITER="process").start()
    try:
        first = _writer_pids(daemon)
        assert len(first) == 1 and alive(first[0])
        answers: list[tuple[str, int, dict[str, object]]] = []
        stop = threading.Event()

        def send(worker: int) -> None:
            n = 0
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    body = envelope(data={"recordId": f"a_{worker}_{n}"})
                    webhook = sign(body)
                    answer = client.post(f"{daemon.url}/webhooks/pacspace", content=webhook.body, headers=webhook.headers)
                    answers.append((str(body["id"]), answer.status_code, answer.json()))
                    n += 1

        senders = [threading.Thread(target=send, args=(w,)) for w in range(8)]
        for sender in senders:
            sender.start()
        try:
            wait_for(lambda: len(answers) >= 200, 30, "200 webhooks answered before the kill")
            os.kill(first[0], signal.SIGKILL)
            readiness: list[int] = []
            wait_for(lambda: readiness.append(httpx.get(f"{daemon.url}/readyz", timeout=5).status_code) or readiness[-1] == 503, 5,
                  "/readyz failing while the writer is gone")
            wait_for(lambda: len(_writer_pids(daemon)) == 2, 30, "a new writer process")
            wait_for(lambda: httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 200, 10, "/readyz back")
            settled = len(answers)
            wait_for(lambda: len(answers) >= settled + 200, 30, "200 more webhooks answered by the new writer")
        finally:
            stop.set()
            for sender in senders:
                sender.join(60)
        refused = [(status, body) for _, status, body in answers if status != 200]
        # a webhook waiting for the killed writer got 503 (PacSpace delivers it again), never a 2xx
        assert all(status == 503 and body["error"]["code"] == "storage_unavailable" for status, body in refused), refused[:3]  # type: ignore[index]
        acknowledged = [event_id for event_id, status, _ in answers if status == 200]
        assert len(acknowledged) >= 400
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                stored = [row[0] for row in connection.execute(text("SELECT event_id FROM webhook_event"))]
        finally:
            engine.dispose()
        assert len(stored) == len(set(stored)) and set(acknowledged) <= set(stored)
        events = daemon.log_events()
        assert any(e.get("event") == "webhook_writer_lost" for e in events)
        assert "Traceback" not in daemon.log_text()
    finally:
        assert daemon.stop() == 0
    assert not any(alive(pid) for pid in _writer_pids(daemon)), "a writer process outlived the daemon"


def test_the_writer_process_ignores_group_signals_and_leaves_with_the_daemon(tmp_path: Path) -> None:
    url = migrated_sqlite_url(tmp_path / "ledger.db")
    daemon = Daemon(url, tmp_path, PACRECON_WEBHOOK_WRITER="process").start()
    [writer] = _writer_pids(daemon)
    # a service manager signals every process of the unit; the daemon drains through its writer first
    os.kill(writer, signal.SIGTERM)
    os.kill(writer, signal.SIGINT)
    time.sleep(0.3)
    assert alive(writer)
    body = envelope(data={"recordId": "a_after_signals"})
    assert _post(daemon, body).json() == {"status": "recorded"}
    assert daemon.stop() == 0
    assert not alive(writer)
    assert stored_events(url, str(body["id"])) == 1
    assert any(e.get("event") == "webhook_writer_exited" and e.get("exit_code") == 0 for e in daemon.log_events())


def test_the_writer_process_does_not_outlive_a_killed_daemon(tmp_path: Path) -> None:
    url = migrated_sqlite_url(tmp_path / "ledger.db")
    daemon = Daemon(url, tmp_path, PACRECON_WEBHOOK_WRITER="process").start()
    [writer] = _writer_pids(daemon)
    body = envelope(data={"recordId": "a_before_kill"})
    assert _post(daemon, body).json() == {"status": "recorded"}
    assert daemon.process is not None
    daemon.process.kill()
    daemon.process.wait(10)
    wait_for(lambda: not alive(writer), 10, "the writer process to leave after the daemon was killed")
    assert stored_events(url, str(body["id"])) == 1


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_either_writer_records_once_and_answers_a_duplicate(tmp_path: Path, writer: str) -> None:
    url = migrated_sqlite_url(tmp_path / "ledger.db")
    daemon = Daemon(url, tmp_path, PACRECON_WEBHOOK_WRITER=writer).start()
    try:
        assert bool(_writer_pids(daemon)) == (writer == "process")
        body = envelope(data={"recordId": "a_once"})
        assert _post(daemon, body).json() == {"status": "recorded"}
        assert _post(daemon, body).json() == {"status": "duplicate"}
        # signed, yet no event: refused with the reason (the writer process parses it, not the daemon)
        for raw, why in ((b"[1, 2]", "must be a JSON object"), (b"\xff{", "not valid UTF-8"), (b'{"id": ', "not JSON")):
            refused = _post(daemon, raw)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["code"] == "invalid_payload"
            assert why in refused.json()["error"]["message"]
        assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 200
        assert _post(daemon, envelope(data={"recordId": "a_after"})).json() == {"status": "recorded"}
    finally:
        assert daemon.stop() == 0
    assert stored_events(url, str(body["id"])) == 1
    logged = [e for e in daemon.log_events() if e.get("event") == "webhook"]
    assert [(e["event_id"], e["event_type"], e["outcome"]) for e in logged[:2]] == [
        (body["id"], body["event"], "orphan"), (body["id"], body["event"], "duplicate")]
    assert [e["reason"] for e in daemon.log_events() if e.get("event") == "webhook_rejected"] == ["invalid_payload"] * 3


# -- the daemon's side of the protocol, against a child played by the test over a real socketpair


def _with_played_child(deadline: float = 30.0) -> tuple[ProcessRecorder, socket.socket]:
    parent_end, child_end = socket.socketpair()
    recorder = ProcessRecorder(WriterConfig("sqlite://", 1000, "info", "json", ()), deadline_seconds=deadline)
    recorder._socket = parent_end  # as spawn() leaves it; the test is the child
    return recorder, child_end


def test_a_child_that_goes_right_after_saying_ready_is_not_taken_for_up() -> None:
    """Not up: readiness fails and no webhook is sent to it. The answer still does not
    depend on the child: 400 for a signed body that is no event (PacSpace would retry a
    503 in vain), 503 for an event, which a retry records."""

    async def go() -> None:
        recorder, child = _with_played_child()
        child.sendall(_frame(("ready", 1)))
        child.close()
        with pytest.raises(StorageUnavailable):
            await recorder.start()
        with pytest.raises(StorageUnavailable):
            recorder.check()
        with pytest.raises(InvalidEvent, match="not JSON"):
            await recorder.record(b'{"id": ', 0, 0.0)
        with pytest.raises(InvalidEvent, match="must be a JSON object"):
            await recorder.record(b"[1, 2]", 0, 0.0)
        with pytest.raises(StorageUnavailable, match="being restarted"):
            await recorder.record(sign(envelope(data={"recordId": "a_later"})).body, 0, 0.0)
        await recorder.close()

    asyncio.run(go())


def test_a_child_gone_before_it_read_its_configuration_is_a_clean_failure() -> None:
    recorder, child = _with_played_child()
    recorder._socket.sendall(b"\x00" * 64)  # type: ignore[union-attr]  # its configuration, never read
    child.close()  # a reset, not an end of file
    with pytest.raises(StorageUnavailable, match="before it was ready"):
        recorder.wait_until_ready()
    recorder.stop_now()


def test_a_child_that_stops_answering_fails_its_webhooks_then_readiness_until_it_answers() -> None:
    async def go() -> None:
        recorder, child = _with_played_child(deadline=0.3)
        child.sendall(_frame(("ready", 1)))
        await recorder.start()
        recorder.check()
        with pytest.raises(StorageUnavailable, match="not committed within"):
            await recorder.record(b"{}", 0, 0.0)
        with pytest.raises(StorageUnavailable, match="has not answered"):
            recorder.check()
        [[(job, body, _, _)]] = _frames(bytearray(child.recv(65536)))
        assert body == b"{}"
        child.sendall(_frame([(job, "stored", ("evt_1", "delta.verified", False, "orphan", "a_1", ()))]))  # it answers at last
        for _ in range(100):
            await asyncio.sleep(0.01)
            with contextlib.suppress(StorageUnavailable):
                recorder.check()
                break
        recorder.check()
        child.close()
        await recorder.close()

    asyncio.run(go())


def test_webhooks_leave_in_frames_of_flush_every_and_each_gets_its_own_answer() -> None:
    """More webhooks in one turn of the event loop than FLUSH_EVERY: the first frames leave
    as soon as FLUSH_EVERY wait, the rest at the end of the turn, in order; answers that
    come back in another grouping and order still reach each its own webhook."""
    from pacrecon.webhook_writer import FLUSH_EVERY

    count = 2 * FLUSH_EVERY + FLUSH_EVERY // 2

    async def go() -> None:
        recorder, child = _with_played_child()
        child.sendall(_frame(("ready", 1)))
        await recorder.start()
        webhooks = [asyncio.create_task(recorder.record(f"body{n}".encode(), n, 0.0)) for n in range(count)]
        frames: list[list[tuple[int, bytes, int, float]]] = []
        buffer = bytearray()
        child.setblocking(False)
        while sum(len(frame) for frame in frames) < count:
            await asyncio.sleep(0.005)
            with contextlib.suppress(BlockingIOError):
                buffer += child.recv(1 << 20)
            frames += _frames(buffer)
        assert [len(frame) for frame in frames] == [FLUSH_EVERY, FLUSH_EVERY, count - 2 * FLUSH_EVERY]
        sent = [job for frame in frames for job in frame]
        assert [body for _, body, _, _ in sent] == [f"body{n}".encode() for n in range(count)]
        # answered backwards, in frames of 7: each webhook still gets the answer to its own job
        answers = [(job, "stored", (body.decode(), "delta.verified", False, "orphan", None, ())) for job, body, _, _ in reversed(sent)]
        child.setblocking(True)
        for start in range(0, count, 7):
            child.sendall(_frame(answers[start : start + 7]))
        stored = await asyncio.wait_for(asyncio.gather(*webhooks), 10)
        assert [s.event_id for s in stored] == [f"body{n}" for n in range(count)]
        child.close()
        await recorder.close()

    asyncio.run(go())
