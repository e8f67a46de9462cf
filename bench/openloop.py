"""A fixed-rate, open-loop HTTP load generator for bench/ingest.py (run as its own process).

Request i is due at start + i/rate whether or not earlier answers came back, so a slow
server cannot slow the offered load down (no coordinated omission): each latency is
measured from the moment the request was *due*, not from when it was finally written.
It speaks just enough HTTP/1.1 over keep-alive connections for pacrecon's answers
(a status line, headers with Content-Length, a short body).

Usage: python bench/openloop.py HOST PORT BODIES_FILE RATE SECONDS  -> one JSON line on stdout
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

MAX_CONNECTIONS = 256  # beyond this a request waits for a free connection (and its latency shows it)
IDLE_SECONDS = 3.0  # uvicorn closes a keep-alive connection idle for 5 s: never reuse one that old


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)  # how late the generator itself started a request
    ok2xx: int = 0
    recorded: int = 0
    other: int = 0
    errors: int = 0


def read_requests(path: str, host: str, count: int) -> list[bytes]:
    requests = []
    with open(path, "rb") as lines:
        for line, _ in zip(lines, range(count)):
            stamp, signature, body = line.rstrip(b"\n").split(b"\t", 2)
            requests.append(
                b"POST /webhooks/pacspace HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                b"Content-Type: application/json\r\nX-PacSpace-Timestamp: " + stamp + b"\r\n"
                b"X-PacSpace-Signature: " + signature + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
    if len(requests) < count:
        raise SystemExit(f"{path} has {len(requests)} requests; {count} are needed")
    return requests


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.opened = 0
        self.freed = asyncio.Condition()

    async def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with self.freed:
            while not self.idle and self.opened >= MAX_CONNECTIONS:
                await self.freed.wait()
            while self.idle:
                reader, writer, since = self.idle.pop()
                if time.perf_counter() - since < IDLE_SECONDS:
                    return reader, writer
                writer.close()  # the server may be closing it right now
                self.opened -= 1
            self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    async def give(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        async with self.freed:
            if connection is None:
                self.opened -= 1
            else:
                self.idle.append((*connection, time.perf_counter()))
            self.freed.notify()


async def one(pool: Pool, request: bytes, due: float, tally: Tally) -> None:
    tally.lags.append(time.perf_counter() - due)
    connection = None
    try:
        connection = await pool.take()
        reader, writer = connection
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
    except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
        tally.errors += 1
        if connection is not None:
            connection[1].close()
        await pool.give(None)
        return
    tally.latencies.append(time.perf_counter() - due)
    if 200 <= status < 300:
        tally.ok2xx += 1
        tally.recorded += b'"recorded"' in body
    else:
        tally.other += 1
    await pool.give(connection)


async def drive(host: str, port: int, requests: list[bytes], rate: float) -> Tally:
    pool, tally, tasks = Pool(host, port), Tally(), []
    start = time.perf_counter() + 0.05
    for i, request in enumerate(requests):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(pool, request, due, tally)))
    await asyncio.gather(*tasks)  # drain: every request sent gets its answer counted
    for _, writer, _ in pool.idle:
        writer.close()
    return tally


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def main() -> None:
    host, port, path, rate, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
    requests = read_requests(path, host, int(rate * seconds))
    try:
        import uvloop  # installed with uvicorn[standard]; a faster loop keeps the generator out of the way

        uvloop.install()
    except ImportError:
        pass
    began = time.perf_counter()
    tally = asyncio.run(drive(host, port, requests, rate))
    elapsed = time.perf_counter() - began
    ms = lambda v: round(v * 1000, 2)  # noqa: E731
    print(
        json.dumps(
            {
                "offered_rate": rate,
                "sent": len(requests),
                "elapsed_s": round(elapsed, 2),
                "ok2xx": tally.ok2xx,
                "recorded": tally.recorded,
                "other": tally.other,
                "errors": tally.errors,
                "p50_ms": ms(percentile(tally.latencies, 50)),
                "p90_ms": ms(percentile(tally.latencies, 90)),
                "p99_ms": ms(percentile(tally.latencies, 99)),
                "max_ms": ms(max(tally.latencies, default=float("nan"))),
                "generator_lag_p99_ms": ms(percentile(tally.lags, 99)),
                "generator_lag_max_ms": ms(max(tally.lags, default=float("nan"))),
            }
        )
    )


if __name__ == "__main__":
    main()
