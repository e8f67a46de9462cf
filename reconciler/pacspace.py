"""`PacSpaceClient`: the PacSpace Balance API over one pooled async httpx client.

Retries with exponential backoff and jitter on the retryable answers (408, 429
except CADENCE_LIMIT, 500, 502, 503, 504, 202 IDEMPOTENCY_PENDING, network
errors and timeouts), honouring `Retry-After` / `retryAfterSeconds`. Amounts are
parsed as `Decimal`. The API key is sent as a header and never logged.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

import httpx

from reconciler.claims import ClaimedStatus
from reconciler.errors import PacSpaceError

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 10.0  # longest wait inside one call; a longer ask is left to the caller's schedule
RETRY_AFTER_CEILING = 3600.0

STATUS_WORDS = {
    "QUEUED": ClaimedStatus.QUEUED,
    "PROCESSING": ClaimedStatus.PROCESSING,
    "ANCHORING": ClaimedStatus.PROCESSING,
    "VERIFIED": ClaimedStatus.VERIFIED,
    "ANCHORED": ClaimedStatus.VERIFIED,
    "FAILED": ClaimedStatus.FAILED,
}


def status_from(word: Any) -> ClaimedStatus | None:
    """Either vocabulary to ours (ANCHORING ≡ PROCESSING, ANCHORED ≡ VERIFIED); None if unknown."""
    return STATUS_WORDS.get(word.upper()) if isinstance(word, str) else None


def time_from(value: Any) -> datetime | None:
    """PacSpace's ISO 8601 times (`2026-02-11T10:30:00.000Z`) as aware UTC datetimes."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def amount_from(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        amount = Decimal(value) if isinstance(value, (int, str, Decimal)) else None
    except InvalidOperation:
        return None
    return amount if amount is not None and amount.is_finite() else None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # in all, the first included
    base_seconds: float = 0.5
    max_seconds: float = 10.0

    def delay(self, attempt: int, asked: float | None, rng: random.Random) -> float:
        """Seconds before attempt `attempt + 1`: PacSpace's Retry-After when it gave one,
        else exponential backoff with full jitter."""
        if asked is not None:
            return min(max(asked, 0.0), MAX_RETRY_AFTER)
        return rng.uniform(0, min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class EmitAnswer:
    anchor_id: str
    customer_id: str | None
    delta: Decimal | None
    status: str
    receipt_id: str | None
    items_root: str | None
    item_hashes: tuple[str, ...]
    received_at: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class BatchItemAnswer:
    index: int
    customer_id: str | None
    delta: Decimal | None
    status: str
    anchor_id: str | None = None
    item_hash: str | None = None
    receipt_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def failed(self) -> bool:
        return self.status.upper() == "FAILED" or self.anchor_id is None


@dataclass(frozen=True)
class BatchAnswer:
    total_queued: int
    total_failed: int
    results: tuple[BatchItemAnswer, ...]
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class StatusAnswer:
    anchor_id: str
    status: ClaimedStatus | None
    status_word: str
    raw: dict[str, Any] = field(repr=False)


class PacSpaceClient:
    """One per process; `client` is the pooled httpx client the lifespan owns."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], Any] = asyncio.sleep,
        rng: random.Random | None = None,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        self._client = client
        self._observe = observe or (lambda endpoint, outcome: None)  # (endpoint name, HTTP status or error code)
        self._base = base_url.rstrip("/")
        self._headers = {"X-Api-Key": api_key, "Accept": "application/json"}
        self._retry = retry
        self._sleep = sleep
        self._rng = rng or random.Random()

    def with_retry(self, retry: RetryPolicy) -> PacSpaceClient:
        """The same client (same pool, same key) with another retry policy."""
        return PacSpaceClient(self._client, self._base, self._headers["X-Api-Key"], retry, self._sleep, self._rng, self._observe)

    # -- the endpoints ----------------------------------------------------------

    async def emit(self, body: bytes, *, idempotency_key: str, credit_pool_id: str | None = None) -> EmitAnswer:
        """Send one delta request, exactly these bytes, under `idempotency_key`."""
        data = await self._call("emit", "POST", "/api/v1/balance/delta", body=body, idempotency_key=idempotency_key, credit_pool_id=credit_pool_id)
        return _emit_answer(data)

    async def emit_batch(self, body: bytes, *, idempotency_key: str, credit_pool_id: str | None = None) -> BatchAnswer:
        data = await self._call("emit_batch", "POST", "/api/v1/balance/delta/batch", body=body, idempotency_key=idempotency_key, credit_pool_id=credit_pool_id)
        raw_results = data.get("results") if isinstance(data.get("results"), list) else []
        results = tuple(_batch_item(item) for item in raw_results if isinstance(item, dict))
        return BatchAnswer(_count(data.get("totalQueued")), _count(data.get("totalFailed")), results, data)

    async def delta_status(self, anchor_id: str) -> StatusAnswer:
        data = await self._call("delta_status", "GET", f"/api/v1/balance/delta/{_segment(anchor_id)}")
        word = str(data.get("status", ""))
        return StatusAnswer(str(data.get("anchorId", anchor_id)), status_from(word), word, data)

    async def list_webhooks(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params = {"limit": str(limit), "offset": str(offset), **({"status": status} if status else {})}
        return await self._call("list_webhooks", "GET", "/api/v1/balance/webhooks", params=params)

    async def retry_webhook(self, event_id: str) -> dict[str, Any]:
        return await self._call("retry_webhook", "POST", f"/api/v1/balance/webhooks/{_segment(event_id)}/retry")

    async def gaps(self, customer_id: str, from_sequence: int | None = None, to_sequence: int | None = None, limit: int | None = None) -> dict[str, Any]:
        params = {
            name: str(value)
            for name, value in (("fromSequence", from_sequence), ("toSequence", to_sequence), ("limit", limit))
            if value is not None
        }
        return await self._call("gaps", "GET", f"/api/v1/balance/gaps/{_segment(customer_id)}", params=params)

    async def verify_receipt(self, receipt_id: str, source: str = "both") -> dict[str, Any]:
        return await self._call("verify_receipt", "GET", f"/api/v1/verify/{_segment(receipt_id)}", params={"source": source}, public=True)

    # -- the one request loop ---------------------------------------------------

    async def _call(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        credit_pool_id: str | None = None,
        public: bool = False,
    ) -> dict[str, Any]:
        headers = {} if public else dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if credit_pool_id:
            headers["X-Credit-Pool-Id"] = credit_pool_id
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._client.request(method, self._base + path, content=body, params=params, headers=headers)
                self._observe(endpoint, str(response.status_code))
                payload = _json(response)  # parsed once, for the error and the data
                error = _error_of(response, payload)
            except httpx.TimeoutException as exc:
                self._observe(endpoint, "timeout")
                error = PacSpaceError(None, "TIMEOUT", f"{type(exc).__name__} after the client timeout", retryable=True)
            except httpx.TransportError as exc:
                self._observe(endpoint, "network_error")
                error = PacSpaceError(None, "NETWORK_ERROR", type(exc).__name__, retryable=True)
            else:
                if error is None:
                    return _data_of(response, payload)
            if not error.retryable or attempt >= self._retry.attempts:
                raise error
            await self._sleep(self._retry.delay(attempt, error.retry_after, self._rng))


def _segment(value: str) -> str:
    return quote(value, safe="")


def _json(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content, parse_float=Decimal)
    except (ValueError, RecursionError):
        return None


def _data_of(response: httpx.Response, payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise PacSpaceError(response.status_code, "INVALID_RESPONSE", "the answer is not a JSON object", retryable=True)
    data = payload.get("data", payload) if payload.get("success", True) is not False else payload
    if not isinstance(data, dict):
        raise PacSpaceError(response.status_code, "INVALID_RESPONSE", "the answer's data is not an object", retryable=True)
    return data


def _error_of(response: httpx.Response, payload: Any) -> PacSpaceError | None:
    body = payload if isinstance(payload, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body  # older answers: top level
    code = str(error.get("code") or "")
    status = response.status_code
    if 200 <= status < 300 and not (status == 202 and code == "IDEMPOTENCY_PENDING") and body.get("success", True) is not False:
        return None
    message = str(error.get("message") or response.reason_phrase or "")[:500]
    retry_after = _retry_after(response, error)
    if status == 202:
        return PacSpaceError(202, code or "IDEMPOTENCY_PENDING", message, retryable=True, retry_after=retry_after or 1.0)
    cadence = code == "CADENCE_LIMIT"
    return PacSpaceError(
        status,
        code or f"HTTP_{status}",
        message,
        retryable=status in RETRYABLE_STATUSES and not cadence,
        retry_after=retry_after,
        customer_id=error.get("customerId") if isinstance(error.get("customerId"), str) else None,
    )


def _retry_after(response: httpx.Response, error: dict[str, Any]) -> float | None:
    for value in (error.get("retryAfterSeconds"), response.headers.get("retry-after")):
        try:
            seconds = float(value) if value is not None and not isinstance(value, bool) else None
        except (TypeError, ValueError):
            continue  # an HTTP date: fall back to our own backoff
        if seconds is not None and math.isfinite(seconds):
            return min(max(seconds, 0.0), RETRY_AFTER_CEILING)
    return None


def _emit_answer(data: dict[str, Any]) -> EmitAnswer:
    anchor_id = data.get("anchorId") or data.get("recordId")
    if not isinstance(anchor_id, str) or not anchor_id:
        raise PacSpaceError(200, "INVALID_RESPONSE", "the emit answer has no anchorId", retryable=True)
    hashes = data.get("itemHashes")
    return EmitAnswer(
        anchor_id=anchor_id,
        customer_id=data.get("customerId") if isinstance(data.get("customerId"), str) else None,
        delta=amount_from(data.get("delta")),
        status=str(data.get("status", "QUEUED")),
        receipt_id=_str(data.get("receiptId")),
        items_root=_str(data.get("itemsRoot")),
        item_hashes=tuple(h for h in hashes if isinstance(h, str)) if isinstance(hashes, list) else (),
        received_at=_str(data.get("receivedAt")),
        raw=data,
    )


def _batch_item(item: dict[str, Any]) -> BatchItemAnswer:
    error = item.get("error")
    code = message = None
    if isinstance(error, dict):
        code, message = _str(error.get("code")), _str(error.get("message"))
    elif isinstance(error, str):
        message = error
    index = item.get("index")
    return BatchItemAnswer(
        index=int(index) if isinstance(index, (int, Decimal)) and not isinstance(index, bool) else -1,
        customer_id=_str(item.get("customerId")),
        delta=amount_from(item.get("delta")),
        status=str(item.get("status", "")),
        anchor_id=_str(item.get("anchorId")),
        item_hash=_str(item.get("itemHash")),
        receipt_id=_str(item.get("receiptId")),
        error_code=code,
        error_message=message,
    )


def _count(value: Any) -> int:
    return int(value) if isinstance(value, (int, Decimal)) and not isinstance(value, bool) and 0 <= value < 10**6 else 0


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
