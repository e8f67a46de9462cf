"""The webhook writer process: the daemon's event loop hands each verified webhook to a
child process that records it with a ledger of its own (group commit, as in-process).

Why a process: under webhook load the one GIL was the limit. The ledger's writer thread
needed about half the event loop's CPU per webhook again (bench/RESULTS.md), and each of
its turns at the GIL waited for the loop's, so every commit cycle, and with it every
answer, took longer. Here the HTTP side and the SQL side each have a core's worth of
Python. The cost: a second interpreter with the ledger's code (66-84 MB measured,
bench/RESULTS.md) and a slower start. It is the default (PACRECON_WEBHOOK_WRITER=process);
`thread` keeps one process.

Protocol, over a socketpair, `pacrecon.writer_child`'s frames (the body travels as bytes
inside them). After the first message each way, a frame is a list: whatever one side
writes at once, pickled once.
  parent -> child: a `WriterConfig` once, then lists of (job, raw body, signature timestamp,
  received at)
  child -> parent: ("ready", pid) once, then lists of (job, "stored", `Stored` fields) once
  the commit that holds them returned, (job, "invalid", why) for a body that is no event we
  can read, or (job, "unavailable", why) when it could not be recorded.
The daemon verifies each webhook's signature; the child parses the body (the daemon's
event loop does not while a child is up: its CPU is the ingest's limit, bench/RESULTS.md).

Failures: when the child is gone (its end of the socket closes), every webhook waiting
for it is answered StorageUnavailable (503: PacSpace delivers again, and an event the
child had committed is then a duplicate), and a new child is started. Until it is up,
a new webhook is answered 503 too, unless its body is no event: that is refused 400, as
the child would (the daemon parses a body on this path only). The child ignores
SIGTERM and SIGINT (a service manager or a terminal signals the whole group, and the
daemon drains its webhooks through the child first); it exits when the daemon closes
its end, or dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog

from pacrecon.writer_child import (
    START_SECONDS,
    STOP_SECONDS,
    WriterConfig,
    frame,
    frames,
    ignore_stop_signals,
    open_ledger,
    read_frame,
    spawn,
    wait_or_kill,
)
from receiver.stored import Stored
from reconciler.errors import InvalidEvent
from storage.errors import StorageUnavailable
from storage.group_commit import wait_within
from storage.vocabulary import EventOutcome

if TYPE_CHECKING:
    from pacrecon.settings import Settings
    from reconciler.events import PacSpaceEvent

log = structlog.get_logger("pacrecon.webhook_writer")

RESTART_FIRST_SECONDS, RESTART_MAX_SECONDS = 0.5, 30.0
# frames go to the child at the end of each turn of the event loop, or as soon as this many
# wait: the child starts committing the first of a burst while the loop still reads the
# rest (measured: 16 gave 1.13-1.16x the peak of once a turn, 8 and 32 less; bench/RESULTS.md)
FLUSH_EVERY = 16


# -- the daemon's side -----------------------------------------------------------------


def spawn_writer(settings: Settings, deadline_seconds: float) -> ProcessRecorder:
    """The writer process for `settings`, spawned now. `pacrecon serve` calls this before
    it imports the app, so that the child's start (its imports) overlaps the daemon's:
    this module and what it imports are light for that reason."""
    recorder = ProcessRecorder(WriterConfig.of(settings), deadline_seconds=deadline_seconds)
    recorder.spawn()
    return recorder


class ProcessRecorder:
    """`receiver.recorder.Recorder` through the writer process. `spawn()` early (the
    child's imports run beside the daemon's own), `start()` in the app's lifespan."""

    def __init__(self, config: WriterConfig, *, deadline_seconds: float) -> None:
        self._config = config
        # past this a webhook is answered 503 (never 2xx): a child that stops answering
        # without dying must not hold requests forever; it may still commit, unacknowledged
        self._deadline = deadline_seconds
        self._child: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None  # the daemon's end, until the loop owns it
        self._transport: asyncio.Transport | None = None
        self._ready: asyncio.Future[int] | None = None
        self._ready_pid: int | None = None  # "ready" read before the event loop took the socket
        self._pending: dict[int, asyncio.Future[Stored]] = {}
        # sent and not answered yet, with when (loop time), oldest first; kept past a
        # webhook's deadline, until the child answers or goes: how readiness sees it stuck
        self._unanswered: dict[int, float] = {}
        self._next_job = 0
        self._out: list[tuple[Any, ...]] = []  # jobs written at the end of this turn of the loop, as one frame
        self._flush_scheduled = False
        self._up = False
        self._closing = False
        self._restarter: asyncio.Task[None] | None = None

    def spawn(self) -> None:
        """Start a child and hand it its configuration; StorageUnavailable if it cannot be."""
        self._child = None  # the one before was reaped; a failed start leaves none to reap again
        self._child, self._socket = spawn("pacrecon.webhook_writer", "webhook writer process", self._config)

    def wait_until_ready(self) -> None:
        """Block until the spawned child says it is ready (before the event loop runs);
        StorageUnavailable if it does not get there."""
        assert self._socket is not None
        try:
            message = read_frame(self._socket, START_SECONDS)  # nothing else comes before a job is sent
        except TimeoutError:
            raise StorageUnavailable(f"the webhook writer process was not ready within {START_SECONDS:g} s") from None
        except (EOFError, OSError):  # ECONNRESET: it died before it read its configuration
            raise StorageUnavailable("the webhook writer process exited before it was ready") from None
        self._ready_pid = int(message[1])

    async def start(self) -> None:
        """Hand the child's socket to the event loop, once it is ready (waited for here
        unless `wait_until_ready` did); StorageUnavailable if it does not get there."""
        assert self._socket is not None
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        if self._ready_pid is not None:
            self._ready.set_result(self._ready_pid)
        connection, self._socket = self._socket, None
        connection.setblocking(False)
        transport, _ = await loop.create_unix_connection(partial(_Replies, self), sock=connection)
        self._transport = transport
        try:
            pid = await asyncio.wait_for(asyncio.shield(self._ready), START_SECONDS)
        except TimeoutError:
            transport.close()
            raise StorageUnavailable(f"the webhook writer process was not ready within {START_SECONDS:g} s") from None
        finally:
            self._ready_pid = None
        if self._transport is not transport or transport.is_closing():
            # it said ready, then went (`_lost` has run meanwhile): not up, whatever it said
            raise StorageUnavailable("the webhook writer process stopped right after it was ready")
        self._up = True
        log.info("webhook_writer_ready", pid=pid)

    def stop_now(self) -> None:
        """Before the event loop runs (the daemon does not start after all): the child goes."""
        if self._socket is not None:
            self._socket.close()
        if self._child is not None:
            wait_or_kill(self._child, STOP_SECONDS)

    async def record(self, raw_body: bytes, signature_timestamp: int, received_at: float) -> Stored:
        if not self._up:
            # the answer must not depend on the child being up: a body that is no event is
            # refused 400 now as it would be by the child (parsed here only on this path;
            # imported here, as the child does, to keep this module light for the early spawn)
            from reconciler.events import parse_event

            parse_event(raw_body)
            raise StorageUnavailable("the webhook writer process is not running (it is being restarted)")
        job = self._next_job = self._next_job + 1
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Stored] = loop.create_future()
        self._pending[job] = waiter
        self._unanswered[job] = loop.time()
        self._out.append((job, raw_body, signature_timestamp, received_at))
        if len(self._out) >= FLUSH_EVERY:
            self._write_out()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            return await wait_within(waiter, self._deadline, self._late)  # type: ignore[no-any-return]
        finally:
            del self._pending[job]

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        out, self._out = self._out, []
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(out))
        # else: nothing waits, or the child is gone and `_lost` answers every waiting webhook

    def _late(self) -> StorageUnavailable:
        return StorageUnavailable(f"the webhook was not committed within {self._deadline:g} s")

    def check(self) -> None:
        if not self._up:
            raise StorageUnavailable("the webhook writer process is not running")
        if self._unanswered:
            waited = asyncio.get_running_loop().time() - next(iter(self._unanswered.values()))
            if waited > self._deadline:
                raise StorageUnavailable(f"the webhook writer process has not answered for {waited:.0f} s")

    def _replies(self, message: tuple[Any, ...] | list[tuple[Any, ...]]) -> None:
        if isinstance(message, tuple):  # ("ready", pid): the only message that is no list
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(int(message[1]))
            return
        for reply in message:
            self._reply(*reply)

    def _reply(self, job: int, kind: str, payload: Any) -> None:
        self._unanswered.pop(job, None)
        waiter = self._pending.get(job)
        if waiter is None or waiter.done():  # timed out meanwhile
            return
        if kind == "stored":
            event_id, event_type, duplicate, outcome, anchor_id, kinds = payload
            waiter.set_result(Stored(event_id, event_type, duplicate, EventOutcome(outcome) if outcome else None, anchor_id, tuple(kinds)))
        elif kind == "invalid":
            waiter.set_exception(InvalidEvent(payload))
        else:
            waiter.set_exception(StorageUnavailable(payload))

    def _lost(self) -> None:
        self._up, self._transport = False, None
        self._unanswered.clear()
        failure = StorageUnavailable("the webhook writer process stopped")
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(failure)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(StorageUnavailable("the webhook writer process stopped before it was ready"))
        if not self._closing and self._restarter is None:
            log.error("webhook_writer_lost", pid=self._child.pid if self._child else None)
            self._restarter = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        delay = RESTART_FIRST_SECONDS
        try:
            while not self._closing:
                await self._reap(timeout=5.0)
                await asyncio.sleep(delay)
                try:
                    self.spawn()
                    await self.start()
                    return
                except Exception as exc:  # whatever it was, the next attempt comes
                    log.error("webhook_writer_restart_failed", error=f"{type(exc).__name__}: {exc}"[:500], retry_in_seconds=delay)
                    delay = min(delay * 2, RESTART_MAX_SECONDS)
        finally:
            self._restarter = None

    async def _reap(self, timeout: float) -> int | None:
        """Wait for the child to exit (killed after `timeout`); its exit status."""
        child = self._child
        if child is None:
            return None
        code = await asyncio.to_thread(wait_or_kill, child, timeout)
        log.info("webhook_writer_exited", pid=child.pid, exit_code=code)
        return code

    async def close(self) -> None:
        """Let the child commit what it holds and exit (killed after STOP_SECONDS)."""
        self._closing = True
        if self._restarter is not None:
            self._restarter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarter
        if self._transport is not None:
            self._transport.close()  # what is buffered is written first; then the child reads EOF
        if self._socket is not None:
            self._socket.close()
        await self._reap(timeout=STOP_SECONDS)


class _Replies(asyncio.Protocol):
    def __init__(self, owner: ProcessRecorder) -> None:
        self._owner = owner
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for message in frames(self._buffer):
            self._owner._replies(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost()


# -- the child -----------------------------------------------------------------------


def _batches(connection: socket.socket) -> Iterator[list[Any]]:
    """The messages the daemon sent, as many at a time as have arrived: waits for the
    first, takes the rest without waiting. Ends when the daemon closes its end or dies
    (a frame it left half-sent was never acknowledged to anyone: dropped)."""
    buffer = bytearray()
    while True:
        chunk = connection.recv(1 << 20)
        if not chunk:
            return
        buffer += chunk
        closed = False
        while True:
            try:
                chunk = connection.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not chunk:
                closed = True
                break
            buffer += chunk
        messages = frames(buffer)
        if messages:
            yield messages
        if closed:
            return


def _reply(job: int, event: PacSpaceEvent, outcome: tuple[BaseException | None, Any]) -> tuple[Any, ...]:
    error, result = outcome
    try:
        if error is not None:
            raise error
        stored = Stored.of(event, result)
    except StorageUnavailable as exc:
        return (job, "unavailable", str(exc))
    except Exception as exc:  # a bug: answered 503, logged here, never a 2xx
        log.error("webhook_not_recorded", job=job, error=f"{type(exc).__name__}: {exc}"[:500])
        return (job, "unavailable", f"recording failed: {type(exc).__name__}")
    outcome = stored.outcome.value if stored.outcome else None
    return (job, "stored", (stored.event_id, stored.event_type, stored.duplicate, outcome, stored.anchor_id, stored.finding_kinds))


def main(descriptor: int) -> int:
    """One thread does it all, in a loop: take every webhook that has arrived, commit them
    as one batch (group commit: one fsync), answer them in one write. While it commits,
    the next batch gathers in the socket. No thread hands work to another here, so no
    turn at the GIL is ever waited for."""
    ignore_stop_signals()  # first: the imports below take a while
    # imported here: the daemon's side needs none of it
    from reconciler.apply import RecordEvent
    from reconciler.events import parse_event
    from storage.sql_ledger import MAX_BATCH

    connection = socket.socket(fileno=descriptor)
    batches = _batches(connection)
    first = next(batches, None)
    if first is None:
        return 0  # the daemon went before it sent the configuration
    config: WriterConfig = first[0]  # nothing else comes before "ready" is sent
    ledger = open_ledger(config)
    try:
        connection.sendall(frame(("ready", os.getpid())))
        for messages in batches:
            out: list[tuple[Any, ...]] = []
            jobs: list[int] = []
            works: list[RecordEvent] = []
            for job, raw_body, signature_timestamp, received_at in (sent for message in messages for sent in message):
                try:
                    event = parse_event(raw_body)
                except InvalidEvent as exc:  # answered 400 by the daemon; nothing to record
                    out.append((job, "invalid", str(exc)))
                    continue
                except Exception as exc:  # a bug: this webhook answered 503 and logged, the others go on
                    log.error("webhook_not_recorded", job=job, error=f"{type(exc).__name__}: {exc}"[:500])
                    out.append((job, "unavailable", f"recording failed: {type(exc).__name__}"))
                    continue
                jobs.append(job)
                works.append(RecordEvent(event, raw_body, signature_timestamp, datetime.fromtimestamp(received_at, UTC)))
            for start in range(0, len(works), MAX_BATCH):
                outcomes = ledger.commit_here(works[start : start + MAX_BATCH])
                batch = zip(jobs[start : start + MAX_BATCH], works[start : start + MAX_BATCH], outcomes, strict=True)
                out += [_reply(job, work.event, outcome) for job, work, outcome in batch]
                connection.sendall(frame(out))  # each committed batch answered at once
                out = []
            if out:
                connection.sendall(frame(out))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon is gone: nothing was acknowledged to anyone
    finally:
        ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
