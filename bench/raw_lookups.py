"""The baseline: the same status lookups a pass makes, from a bare httpx loop.

Run as its own process (like the pass), so neither has the other's heap or loop:
    python bench/raw_lookups.py BASE_URL API_KEY ANCHORS_FILE CONCURRENCY
prints {"lookups": n, "seconds": s}. The client is configured as the daemon's
(pacrecon.app.open_pacspace): same pool limits; nothing else is done with an answer
than reading its body and checking its status.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx


async def look_up_all(base_url: str, api_key: str, anchors: list[str], concurrency: int) -> float:
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=base_url, headers={"X-Api-Key": api_key}, limits=limits, timeout=10) as http:

        async def one(anchor: str) -> None:
            async with slots:
                response = await http.get(f"/api/v1/balance/delta/{anchor}")
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one(anchor) for anchor in anchors))
        return time.perf_counter() - started


def main() -> None:
    base_url, api_key, anchors_file, concurrency = sys.argv[1:5]
    anchors = Path(anchors_file).read_text().split()
    seconds = asyncio.run(look_up_all(base_url, api_key, anchors, int(concurrency)))
    print(json.dumps({"lookups": len(anchors), "seconds": seconds}))


if __name__ == "__main__":
    main()
