"""uvicorn's httptools protocol with each response leaving in one send.

uvicorn writes a response's status line and headers, then its body, as two
`transport.write` calls, and uvloop sends each at once: two send() system calls and two
TCP segments per answer, each of which wakes the client. On loopback a send also runs
the peer's receive path in the sender's system call, so under webhook load the two sends
were a quarter of the daemon's event-loop time (bench/RESULTS.md). Here the first write
of a turn of the event loop is held; the next write on that connection sends both as
one, and a write nothing follows leaves at the end of the turn. Nothing is held past the
turn that wrote it, and `close()` sends what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _OneSendTransport:
    """A transport that joins each held write with the one that follows it; every other
    call goes to the real transport, after what is held has been sent where order matters."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held + data)
            return
        self._held = bytes(data)  # a copy: the caller may reuse a buffer once write returns
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def _flush(self) -> None:
        self._flush_scheduled = False
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str) -> Any:  # abort, is_closing, get_extra_info, set_protocol...
        return getattr(self._transport, name)


class OneSendHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneSendTransport(transport))  # type: ignore[arg-type]
