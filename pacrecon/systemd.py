"""systemd's notification protocol (sd_notify), with the standard library: one datagram
per state to the socket `NOTIFY_SOCKET` names. Outside systemd (no NOTIFY_SOCKET) the
notifier is None and nothing is sent."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("pacrecon.systemd")


class SystemdNotifier:
    def __init__(self, address: str, watchdog_seconds: float | None) -> None:
        # "@name" is a socket in the abstract namespace, spelled with a leading NUL
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_seconds = watchdog_seconds
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address.startswith(("/", "@")):
            return None
        return cls(address, _watchdog_seconds(env))

    def notify(self, state: str) -> None:
        """Never raises: systemd gone away must not stop the daemon (its watchdog decides)."""
        try:
            self._socket.sendto(state.encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once, not at every watchdog ping
                log.warning("systemd_notify_failed", error=exc.strerror or type(exc).__name__)
            self._failed = True

    def close(self) -> None:
        self._socket.close()


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """How often to ping: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises; None
    when the watchdog is off or meant for another process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2 / 1_000_000
