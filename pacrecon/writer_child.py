"""What the daemon's two writer processes share (`pacrecon.webhook_writer` for webhooks,
`pacrecon.page_writer` for a reconciliation pass's pages): their configuration, their wire
format, how the daemon starts one and waits for its end, and how one starts up.

Wire format, over a socketpair: frames of a 4-byte big-endian length and a pickle. A pickle
only ever crosses between the daemon and a child it started itself.

This module is imported before the app (`pacrecon serve` spawns the webhook writer first,
so that its imports overlap the daemon's): it and what it imports at the top stay light.
"""

from __future__ import annotations

import gc
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.errors import StorageUnavailable

if TYPE_CHECKING:
    from pacrecon.settings import Settings
    from storage.sql_ledger import SqlLedger

HEADER = struct.Struct(">I")
START_SECONDS = 30.0  # from spawning a child to its "ready" (it imports, opens the database)
STOP_SECONDS = 30.0  # for a child to finish what it holds and exit, once told to


@dataclass(frozen=True)
class WriterConfig:
    database_url: str
    lock_timeout_ms: int
    log_level: str
    log_format: str | None
    secrets: tuple[str, ...]  # for the child's log scrubber, as the daemon's

    @classmethod
    def of(cls, settings: Settings) -> WriterConfig:
        """What a writer process needs of the settings."""
        return cls(
            database_url=settings.database_url,
            lock_timeout_ms=settings.lock_timeout_ms,
            log_level=settings.log_level,
            log_format=settings.log_format,
            secrets=tuple(settings.secret_values()),
        )

    def __repr__(self) -> str:  # never the URL (it may hold a password) or the secrets
        return f"WriterConfig(log_level={self.log_level!r})"


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def frames(buffer: bytearray) -> list[Any]:
    """The whole frames at the start of `buffer`, unpickled; they are cut off it."""
    messages, offset = [], 0
    while len(buffer) - offset >= HEADER.size:
        (size,) = HEADER.unpack_from(buffer, offset)
        end = offset + HEADER.size + size
        if len(buffer) < end:
            break
        messages.append(pickle.loads(bytes(buffer[offset + HEADER.size : end])))
        offset = end
    del buffer[:offset]
    return messages


def read_frame(connection: socket.socket, timeout: float | None = None) -> Any:
    """The next frame of a blocking socket, within `timeout` seconds in all (None: no limit).
    EOFError when the other end closed; TimeoutError when the time ran out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    header = _read_exactly(connection, HEADER.size, deadline)
    (size,) = HEADER.unpack(header)
    return pickle.loads(_read_exactly(connection, size, deadline))


def _read_exactly(connection: socket.socket, size: int, deadline: float | None) -> bytes:
    chunks, missing = [], size
    try:
        while missing:
            if deadline is not None:
                connection.settimeout(max(deadline - time.monotonic(), 0.0) or 1e-6)
            chunk = connection.recv(min(missing, 1 << 20))
            if not chunk:
                raise EOFError("the other end closed the connection")
            chunks.append(chunk)
            missing -= len(chunk)
    finally:
        if deadline is not None:
            connection.settimeout(None)
    return b"".join(chunks)


def spawn(module: str, what: str, config: WriterConfig) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """`python -m module FD` started with one end of a new socketpair and handed `config`
    (its first frame); the child and the daemon's end. StorageUnavailable if it cannot be."""
    parent_end, child_end = socket.socketpair()
    try:
        # a session of its own: a terminal's Ctrl-C for the daemon's group never reaches it,
        # not even before it has set its signals aside (a service manager's SIGTERM to the
        # whole unit still can: it ignores that once started)
        child = subprocess.Popen(
            [sys.executable, "-m", module, str(child_end.fileno())],
            pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL, start_new_session=True,
        )
    except OSError as exc:
        parent_end.close()
        raise StorageUnavailable(f"the {what} could not be started: {exc.strerror or exc}") from None
    finally:
        child_end.close()
    try:
        parent_end.sendall(frame(config))  # small: the socket's buffer holds it
    except OSError as exc:
        parent_end.close()
        child.kill()  # reaped at once: the caller may be the event loop
        child.wait()
        raise StorageUnavailable(f"the {what} could not be started: {exc.strerror or exc}") from None
    return child, parent_end


def wait_or_kill(child: subprocess.Popen[bytes], timeout: float) -> int:
    """The child's exit status, waited for `timeout` seconds, then killed."""
    try:
        return child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


# -- the child's side --------------------------------------------------------------------


def ignore_stop_signals() -> None:
    """A child's first step (its imports take a while): a service manager or a terminal
    signals the whole group, and the daemon finishes what it has in hand through the child
    before it closes its end."""
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, signal.SIG_IGN)


def open_ledger(config: WriterConfig) -> SqlLedger:
    """The child's logging, as the daemon's, and its own ledger."""
    from pacrecon.logs import configure_logging
    from storage.sql_ledger import SqlLedger

    configure_logging(config.log_level, config.log_format, list(config.secrets))
    ledger = SqlLedger.from_url(config.database_url, lock_timeout_ms=config.lock_timeout_ms)
    gc.freeze()  # what start-up made lives as long as the process: the collector need not walk it again
    return ledger
