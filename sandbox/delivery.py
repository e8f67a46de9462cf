"""Delivering webhooks: signed, retried with exponential backoff and jitter, listed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from sandbox.signing import signature_headers
from sandbox.state import Delivery, SandboxState

WRONG_SECRET = "whsec_sandbox_fault_wrong_secret"
CONCURRENT_DELIVERIES = 16


@dataclass
class DeliveryTarget:
    url: str | None
    secrets: Sequence[str]
    max_attempts: int = 5
    backoff_seconds: float = 1.0
    timeout_seconds: float = 5.0


class Dispatcher:
    def __init__(self, state: SandboxState, target: DeliveryTarget, client: httpx.AsyncClient) -> None:
        self.state = state
        self.target = target
        self.client = client
        self._in_flight: set[int] = set()
        self._slots = asyncio.Semaphore(CONCURRENT_DELIVERIES)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, tick: float = 0.05) -> None:
        """Advance the lifecycle and send what is due, until cancelled."""
        while True:
            self.state.advance()
            self.send_due()
            await asyncio.sleep(tick)

    def send_due(self) -> list[asyncio.Task[None]]:
        now = self.state.clock()
        started = []
        for delivery in self.state.deliveries:
            if delivery.status != "pending" or id(delivery) in self._in_flight:
                continue
            if delivery.next_attempt_at <= now:
                self._in_flight.add(id(delivery))
                task = asyncio.create_task(self._attempt(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                started.append(task)
        return started

    async def flush(self) -> None:
        """Settle every queued anchor now and send the deliveries that are due, waiting for
        them; late and retried deliveries keep their schedule."""
        self.state.advance(flush=True)
        await asyncio.gather(*self.send_due(), *list(self._tasks))

    def retry(self, event_id: str) -> bool:
        """Send an event again now, as a new round of attempts (the retry endpoint)."""
        found = False
        for delivery in self.state.deliveries:
            if delivery.event_id == event_id and delivery.copy_of is None:
                delivery.status, delivery.attempts = "pending", 0
                delivery.next_attempt_at = self.state.clock()
                found = True
        return found

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            async with self._slots:
                await self._send(delivery)
        finally:
            self._in_flight.discard(id(delivery))

    async def _send(self, delivery: Delivery) -> None:
        secrets = [WRONG_SECRET] if self.state.roll(self.state.faults.bad_signature) else list(self.target.secrets)
        code: int | None = None
        error: str | None = None
        if not self.target.url:
            error = "no webhook URL configured"
        elif not secrets:
            error = "no webhook secret configured"
        else:
            headers = signature_headers(delivery.body, secrets, int(self.state.clock()))
            try:
                response = await self.client.post(
                    self.target.url, content=delivery.body, headers=headers, timeout=self.target.timeout_seconds
                )
                code = response.status_code
                error = None if 200 <= code < 300 else f"HTTP {code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
        now = self.state.clock()
        delivery.attempts += 1
        delivery.last_attempt_at, delivery.last_status_code, delivery.last_error = now, code, error
        if error is None:
            delivery.status = "delivered"
        elif delivery.attempts >= self.target.max_attempts:
            delivery.status = "failed"
        else:
            backoff = self.target.backoff_seconds * 2 ** (delivery.attempts - 1)
            delivery.next_attempt_at = now + backoff * (1 + 0.25 * self.state.rng.random())
