"""uvicorn's httptools protocol with each response leaving in one send.

uvicorn writes a response's status line and headers, then its body, as two
`transport.write` calls, and uvloop sends each at once: two send() system calls and two
TCP segments per answer, each of which wakes the client. On loopback a send also runs
the peer's receive path in the sender's system call; under webhook load the two sends
were a quarter of the daemon's event-loop time (bench/RESULTS.md). Here a write is held
until the next write on that connection, which sends both as one. A write nothing
follows in the same step (a 100 Continue, a streamed chunk) leaves on the event loop's
next pass, or before the transport closes, whichever comes first: `close()` and the
client's end of stream (after which uvloop closes the transport itself) send what is held.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_JOIN_AT_MOST = 64 * 1024  # past this a join's copy costs more than it saves: both go as one writelines


class _OneSendTransport:
    """A transport that joins each held write with the one that follows it; every other
    call goes to the real transport, after what is held has been sent where order matters."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = data if type(data) is bytes else memoryview(data).tobytes()  # a copy: the caller may reuse its buffer
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
            return
        self._held = None
        if len(held) + len(data) <= _JOIN_AT_MOST:
            self._transport.write(held + data)
        else:
            self._transport.writelines([held, data])

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def flush(self) -> None:
        """Send what is held now."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str) -> Any:  # abort, is_closing, get_extra_info, set_protocol...
        return getattr(self._transport, name)


class OneSendHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneSendTransport(transport))  # type: ignore[arg-type]

    def eof_received(self) -> None:
        # uvicorn's returns None, so uvloop closes the real transport itself, past the wrapper
        self.transport.flush()  # type: ignore[attr-defined]
        super().eof_received()
