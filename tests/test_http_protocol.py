"""pacrecon.http_protocol under the daemon's own uvicorn settings, on loopback: each answer
leaves in one write to the socket, and nothing is held back (streamed chunks, 100-continue,
a closing connection)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pacrecon.http_protocol import OneSendHttpToolsProtocol
from pacrecon.server import server_config
from tests.daemon import free_port

writes: list[bytes] = []  # what reached the real transports, in order


class _CountingTransport:
    """The real uvloop transport, with each write recorded on its way to it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _CountedProtocol(OneSendHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CountingTransport(transport))  # type: ignore[arg-type]


async def _json(_: Request) -> Response:
    return JSONResponse({"status": "recorded"})


async def _echo(request: Request) -> Response:
    return Response(await request.body())


async def _stream(_: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for n in range(3):
            yield f"chunk{n};".encode()
            await asyncio.sleep(0.05)  # each chunk in a turn of its own

    return StreamingResponse(chunks())


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = Starlette(routes=[Route("/json", _json), Route("/echo", _echo, methods=["POST"]), Route("/stream", _stream)])
    config = server_config(app, "127.0.0.1", free_port())
    assert config.http is OneSendHttpToolsProtocol  # what the daemon runs; counted below through a subclass
    config.http, config.lifespan = _CountedProtocol, "off"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield config.port
    server.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=5)
    writes.clear()
    return connection


def _read_response(connection: socket.socket, buffer: bytearray) -> bytes:
    """One whole response (content-length or chunked) off `connection`; the rest stays in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        _receive(connection, buffer)
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    start = len(head) + 4
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers:
        while b"\r\n0\r\n\r\n" not in buffer[start - 2 :]:
            _receive(connection, buffer)
        end = buffer.index(b"\r\n0\r\n\r\n", start - 2) + 7
    else:
        length = int(headers.split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(buffer) < start + length:
            _receive(connection, buffer)
        end = start + length
    response = bytes(buffer[:end])
    del buffer[:end]
    return response


def _receive(connection: socket.socket, buffer: bytearray) -> None:
    chunk = connection.recv(65536)
    assert chunk, f"the server closed the connection with {bytes(buffer)!r} read"
    buffer += chunk


def test_each_answer_is_one_write_on_a_kept_alive_connection(port: int) -> None:
    with _connect(port) as connection:
        buffer = bytearray()
        for _ in range(3):
            connection.sendall(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
            response = _read_response(connection, buffer)
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            assert response.endswith(b'\r\n\r\n{"status":"recorded"}')
    assert len(writes) == 3  # uvicorn alone writes headers and body apart: 6
    assert all(write.startswith(b"HTTP/1.1 200 OK\r\n") and write.endswith(b'{"status":"recorded"}') for write in writes)


def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    bodies = [b"first", b"second" * 100, b"third"]
    with _connect(port) as connection:
        connection.sendall(b"".join(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b) for b in bodies))
        buffer = bytearray()
        answers = [_read_response(connection, buffer) for _ in bodies]
    assert [answer.partition(b"\r\n\r\n")[2] for answer in answers] == bodies


def test_streamed_chunks_are_not_held_back(port: int) -> None:
    with _connect(port) as connection:
        connection.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        response = _read_response(connection, bytearray())
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"chunk2;\r\n0\r\n\r\n")
    # the headers joined with the first chunk; each later chunk, and the end, alone on the
    # loop's next pass (held until the stream's end, they would all be one write)
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\n7\r\nchunk0;\r\n")
    assert writes[1:] == [b"7\r\nchunk1;\r\n", b"7\r\nchunk2;\r\n", b"0\r\n\r\n"]


def test_a_lone_100_continue_is_sent_on_the_loops_next_pass(port: int) -> None:
    with _connect(port) as connection:
        connection.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:  # the client waits for it before sending the body
            _receive(connection, buffer)
        assert bytes(buffer) == b"HTTP/1.1 100 Continue\r\n\r\n"
        buffer.clear()
        connection.sendall(b"hello")
        assert _read_response(connection, buffer).endswith(b"\r\n\r\nhello")


def test_an_answer_before_close_is_sent_whole(port: int) -> None:
    with _connect(port) as connection:
        connection.sendall(b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := connection.recv(65536):  # to the server's close
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b'{"status":"recorded"}')


def test_an_answer_written_and_closed_in_one_step_is_sent(port: int) -> None:
    # uvicorn answers a request it cannot parse with one write and a close, at once
    with _connect(port) as connection:
        connection.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert len(writes) == 1
