"""Sustained webhook load on a daemon from a few threads, every answer kept."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx

from tests.webhooks import envelope, sign


@dataclass(frozen=True)
class Answer:
    event_id: str
    body: bytes
    sent_at: float  # time.monotonic() just before the request was sent
    status: int | None  # None: no answer (the connection failed or broke)
    answered_at: float  # time.monotonic() when the answer (or the failure) came


class WebhookLoad:
    """`threads` senders posting fresh, validly signed events to `url` until `stop()`.

    With `until_gone` a sender ends at its first transport error (the daemon was killed);
    otherwise it keeps going (the daemon answers errors but stays up).
    """

    def __init__(self, url: str, *, threads: int = 4, until_gone: bool = False, anchor: str = "a_load") -> None:
        self.url, self.until_gone, self.anchor = url, until_gone, anchor
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(threads)]

    def __enter__(self) -> WebhookLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _send(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                body = envelope(data={"recordId": self.anchor})
                webhook = sign(body)
                sent_at = time.monotonic()
                try:
                    status: int | None = client.post(f"{self.url}/webhooks/pacspace", content=webhook.body, headers=webhook.headers).status_code
                except httpx.TransportError:
                    status = None
                self.answers.append(Answer(body["id"], webhook.body, sent_at, status, time.monotonic()))  # list.append is atomic
                if status is None:
                    if self.until_gone:
                        return
                    time.sleep(0.05)

    def acknowledged(self) -> set[str]:
        return {a.event_id for a in self.answers if a.status is not None and 200 <= a.status < 300}
