"""The sandbox's HTTP surface: PacSpace's API paths, envelopes and errors, plus `/_sandbox/` control."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from reconciler.emit_rules import FieldError, batch_shape_error, delta_errors
from reconciler.proofs import canonical_json, merkle_root
from storage import jsonio
from sandbox.delivery import DeliveryTarget, Dispatcher
from sandbox.faults import FaultError, Faults
from sandbox.state import SHAPES, VOCABULARIES, Idempotent, SandboxState, iso

API = "/api/v1"


@dataclass(frozen=True)
class SandboxConfig:
    api_key: str = "sk_sandbox_local"
    webhook_url: str | None = None
    webhook_secrets: tuple[str, ...] = ()
    seed: int | None = None
    verify_delay: float = 2.0
    faults: Faults = field(default_factory=Faults)
    vocabulary: str = "status"
    webhook_shape: str = "sdk"
    max_attempts: int = 5
    retry_backoff: float = 1.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after, self.extra = status, code, message, retry_after, extra


def to_json(value: Any) -> bytes:
    return jsonio.dumps_bytes(value)  # amounts exactly, as Decimals


def answer(data: Any, status: int = 200) -> Response:
    return Response(to_json({"success": True, "data": data}), status, media_type="application/json")


def error_answer(exc: ApiError) -> Response:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message, **exc.extra}
    headers = {}
    if exc.retry_after is not None:
        error["retryAfterSeconds"] = exc.retry_after
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return Response(to_json({"success": False, "error": error}), exc.status, headers, media_type="application/json")


def parse_body(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_float=Decimal, parse_constant=Decimal)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "VALIDATION_ERROR", "the body is not valid JSON") from None


class Sandbox:
    """One sandbox: its state, its delivery of webhooks, and its request handlers."""

    def __init__(self, config: SandboxConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.state = SandboxState(
            seed=config.seed,
            clock=clock,
            faults=config.faults,
            verify_delay=config.verify_delay,
            vocabulary=config.vocabulary,
            webhook_shape=config.webhook_shape,
        )
        self.target = DeliveryTarget(
            config.webhook_url, config.webhook_secrets, config.max_attempts, config.retry_backoff
        )
        self.dispatcher: Dispatcher | None = None

    # -- the app ----------------------------------------------------------------

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            async with httpx.AsyncClient() as client:
                self.dispatcher = Dispatcher(self.state, self.target, client)
                loop = asyncio.create_task(self.dispatcher.run())
                try:
                    yield
                finally:
                    loop.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await loop

        api = [
            Route(f"{API}/balance/delta", self._api(self.emit, emits=True), methods=["POST"]),
            Route(f"{API}/balance/delta/batch", self._api(self.emit_batch, emits=True), methods=["POST"]),
            Route(f"{API}/balance/delta/{{anchor_id}}", self._api(self.delta_status), methods=["GET"]),
            Route(f"{API}/balance/webhooks", self._api(self.list_webhooks), methods=["GET"]),
            Route(f"{API}/balance/webhooks/{{event_id}}/retry", self._api(self.retry_webhook), methods=["POST"]),
            Route(f"{API}/balance/gaps/{{customer_id}}", self._api(self.gaps), methods=["GET"]),
            Route(f"{API}/verify/{{receipt_id}}", self._api(self.verify, public=True), methods=["GET"]),
        ]
        control = [
            Route("/_sandbox/state", self._control(self.control_state), methods=["GET"]),
            Route("/_sandbox/deliveries", self._control(self.control_deliveries), methods=["GET"]),
            Route("/_sandbox/flush", self._control(self.control_flush), methods=["POST"]),
            Route("/_sandbox/faults", self._control(self.control_faults), methods=["GET", "PUT", "PATCH"]),
            Route("/_sandbox/config", self._control(self.control_config), methods=["GET", "PATCH"]),
        ]
        return Starlette(routes=api + control, lifespan=lifespan)

    def _api(self, handler: Callable[..., Any], *, emits: bool = False, public: bool = False) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                if not public and request.headers.get("x-api-key") != self.config.api_key:
                    raise ApiError(401, "INVALID_API_KEY", "the X-Api-Key header is missing or not a valid API key")
                self._chaos(emits)
                return await handler(request)
            except ApiError as exc:
                return error_answer(exc)

        return endpoint

    def _control(self, handler: Callable[..., Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except (ApiError, FaultError) as exc:
                return error_answer(exc if isinstance(exc, ApiError) else ApiError(400, "INVALID_FAULT", str(exc)))

        return endpoint

    def _chaos(self, emits: bool) -> None:
        """The faults that answer a request before it is processed (and so are never replayed)."""
        faults = self.state.faults
        if self.state.roll(faults.unavailable):
            raise ApiError(503, "SERVICE_UNAVAILABLE", "the service is unavailable (sandbox fault)", faults.retry_after)
        if self.state.roll(faults.rate_limit):
            raise ApiError(429, "RATE_LIMITED", "too many requests (sandbox fault)", faults.retry_after)
        if emits and self.state.roll(faults.cadence_limit):
            raise ApiError(429, "CADENCE_LIMIT", "this customer's cadence limit is reached (sandbox fault)")
        if emits and self.state.roll(faults.insufficient_credits):
            raise ApiError(402, "INSUFFICIENT_CREDITS", "the tenant has no credits left (sandbox fault)")
        if emits and self.state.roll(faults.contract_not_deployed):
            raise ApiError(412, "CONTRACT_NOT_DEPLOYED", "no contract is deployed for this tenant (sandbox fault)")

    async def _maybe_slow(self) -> None:
        if self.state.roll(self.state.faults.slow):
            await asyncio.sleep(self.state.faults.slow_seconds)

    # -- emitting, with idempotency ------------------------------------------------

    async def _idempotent(self, request: Request, produce: Callable[[Any], Response]) -> Response:
        body = parse_body(await request.body())
        key = request.headers.get("idempotency-key")
        if not key:
            await self._maybe_slow()
            return produce(body)
        fingerprint = hashlib.sha256(request.url.path.encode() + b"\n" + canonical_json_safe(body)).digest()
        slot = (request.url.path, key)
        known = self.state.idempotency.get(slot)
        if known is not None:
            if known.fingerprint != fingerprint:
                raise ApiError(409, "IDEMPOTENCY_CONFLICT", "this Idempotency-Key was used with another request body")
            if known.status_code is None:
                raise ApiError(202, "IDEMPOTENCY_PENDING", "a request with this Idempotency-Key is still processing", 1.0)
            return Response(known.body, known.status_code, media_type="application/json")
        record = Idempotent(fingerprint)
        self.state.idempotency[slot] = record
        try:
            await self._maybe_slow()  # the window in which a repeat gets 202
            response = produce(body)
        except ApiError as exc:
            response = error_answer(exc)
        except BaseException:
            del self.state.idempotency[slot]
            raise
        record.status_code, record.body = response.status_code, bytes(response.body)
        return response

    async def emit(self, request: Request) -> Response:
        def produce(body: Any) -> Response:
            errors = delta_errors(body)
            if errors:
                raise ApiError(400, "VALIDATION_ERROR", "; ".join(map(str, errors)), details=[e.__dict__ for e in errors])
            anchor = self.state.accept([body])
            item = anchor.items[0]
            return answer(
                {
                    "anchorId": anchor.anchor_id,
                    "customerId": item.customer_id,
                    "delta": item.delta,
                    "status": "QUEUED",
                    "receiptId": anchor.receipt_id,
                    "itemsRoot": anchor.receipt_id,
                    "itemHashes": anchor.item_hashes,
                    "estimatedVerifiedDeltas": 1,
                    "receivedAt": iso(anchor.received_at),
                    "message": "Delta queued for verification. Store receiptId for later proof generation.",
                }
            )

        return await self._idempotent(request, produce)

    async def emit_batch(self, request: Request) -> Response:
        def produce(body: Any) -> Response:
            shape = batch_shape_error(body)
            if shape is not None:
                raise ApiError(400, "VALIDATION_ERROR", str(shape), details=[shape.__dict__])
            requests = body["deltas"]
            errors = [delta_errors(item, f"deltas[{n}].") for n, item in enumerate(requests)]
            for problems in errors:
                if not problems and self.state.roll(self.state.faults.reject_batch_items):
                    problems.append(FieldError("item", "rejected by PacSpace (sandbox fault reject_batch_items)"))
            valid = [item for item, problems in zip(requests, errors) if not problems]
            anchor = self.state.accept(valid) if valid else None
            items = iter(anchor.items if anchor else [])
            results = []
            for index, (item, problems) in enumerate(zip(requests, errors)):
                if problems:
                    results.append(
                        {
                            "index": index,
                            "customerId": item.get("customerId") if isinstance(item, dict) else None,
                            "delta": item.get("delta") if isinstance(item, dict) else None,
                            "status": "FAILED",
                            "error": {
                                "code": "ITEM_REJECTED" if problems[0].field == "item" else "VALIDATION_ERROR",
                                "message": "; ".join(map(str, problems)),
                            },
                        }
                    )
                    continue
                accepted = next(items)
                assert anchor is not None
                results.append(
                    {
                        "index": index,
                        "customerId": accepted.customer_id,
                        "delta": accepted.delta,
                        "anchorId": anchor.anchor_id,
                        "itemHash": accepted.item_hash,
                        "receiptId": anchor.receipt_id,
                        "status": "QUEUED",
                    }
                )
            customers = len({item["customerId"] for item in valid})
            return answer(
                {
                    "totalQueued": len(valid),
                    "totalFailed": len(requests) - len(valid),
                    "results": results,
                    "_efficiency": {
                        "uniqueCustomers": customers,
                        "totalDeltas": len(valid),
                        "estimatedSlots": customers,
                        "message": f"{len(valid)} delta(s) packed into {customers} verified operation(s)",
                    },
                }
            )

        return await self._idempotent(request, produce)

    # -- reading -----------------------------------------------------------------

    async def delta_status(self, request: Request) -> Response:
        await self._maybe_slow()
        anchor = self.state.lookup(request.path_params["anchor_id"])
        if anchor is None:
            raise ApiError(404, "NOT_FOUND", f"no delta or anchor {request.path_params['anchor_id'][:80]!r}")
        return answer(self.state.status_view(anchor))

    async def list_webhooks(self, request: Request) -> Response:
        status = request.query_params.get("status")
        if status is not None and status.lower() not in ("pending", "delivered", "failed"):
            raise ApiError(400, "VALIDATION_ERROR", "status: one of pending, delivered, failed")
        limit = _int_param(request, "limit", 50, 1, 500)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        chosen = [d for d in self.state.deliveries if d.copy_of is None and (status is None or d.status == status.lower())]
        page = chosen[offset : offset + limit]
        return answer({"deliveries": [d.view() for d in page], "total": len(chosen), "limit": limit, "offset": offset})

    async def retry_webhook(self, request: Request) -> Response:
        event_id = request.path_params["event_id"]
        if self.dispatcher is None or not self.dispatcher.retry(event_id):
            raise ApiError(404, "NOT_FOUND", f"no webhook event {event_id[:80]!r}")
        return answer({"eventId": event_id, "status": "pending"})

    async def gaps(self, request: Request) -> Response:
        first = _int_param(request, "fromSequence", 1, 0, 10**12)
        last = _int_param(request, "toSequence", None, 0, 10**12)
        limit = _int_param(request, "limit", 100, 1, 1000)
        return answer(self.state.gaps(request.path_params["customer_id"], first, last, limit))

    async def verify(self, request: Request) -> Response:
        source = request.query_params.get("source", "both")
        if source not in ("db", "chain", "both"):
            raise ApiError(400, "VALIDATION_ERROR", "source: one of db, chain, both")
        receipt_id = request.path_params["receipt_id"]
        anchor = self.state.by_receipt.get(receipt_id)
        if anchor is None or anchor.forgotten:
            raise ApiError(404, "NOT_FOUND", f"no receipt {receipt_id[:80]!r}")
        recomputed = merkle_root(anchor.item_hashes)
        anchored = anchor.status == "VERIFIED"
        data: dict[str, Any] = {"receiptId": receipt_id, "source": source}
        if source in ("db", "both"):
            data["db"] = {"found": True, "itemsRoot": recomputed, "itemCount": len(anchor.items), "itemHashes": anchor.item_hashes}
        if source in ("chain", "both"):
            data["chain"] = {"found": anchored, "txHash": anchor.tx_hash}
        data["verified"] = recomputed == receipt_id and (anchored or source == "db")
        return answer(data)

    # -- control -------------------------------------------------------------------

    async def control_state(self, _: Request) -> Response:
        return answer(
            {
                **self.state.counts(),
                "faults": self.state.faults.as_dict(),
                "config": self._config_view(),
            }
        )

    async def control_deliveries(self, request: Request) -> Response:
        status = request.query_params.get("status")
        return answer([d.view() for d in self.state.deliveries if status is None or d.status == status])

    async def control_flush(self, _: Request) -> Response:
        assert self.dispatcher is not None
        await self.dispatcher.flush()
        return answer(self.state.counts())

    async def control_faults(self, request: Request) -> Response:
        if request.method != "GET":
            changes = parse_body(await request.body())
            if not isinstance(changes, dict):
                raise ApiError(400, "INVALID_FAULT", "send a JSON object of fault names and values")
            base = Faults() if request.method == "PUT" else self.state.faults
            self.state.faults = base.merged(changes)
        return answer(self.state.faults.as_dict())

    async def control_config(self, request: Request) -> Response:
        if request.method == "PATCH":
            changes = parse_body(await request.body())
            if not isinstance(changes, dict):
                raise ApiError(400, "VALIDATION_ERROR", "send a JSON object")
            self._configure(changes)
        return answer(self._config_view())

    def _configure(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            if name == "webhook_url" and (value is None or isinstance(value, str)):
                self.target.url = value
            elif name == "webhook_secrets" and isinstance(value, list) and 1 <= len(value) <= 2 and all(isinstance(v, str) and v for v in value):
                self.target.secrets = tuple(value)
            elif name == "vocabulary" and value in VOCABULARIES:
                self.state.vocabulary = value
            elif name == "webhook_shape" and value in SHAPES:
                self.state.webhook_shape = value
            elif name == "verify_delay" and isinstance(value, (int, Decimal)) and 0 <= value <= 3600:
                self.state.verify_delay = float(value)
            else:
                raise ApiError(400, "VALIDATION_ERROR", f"{name}: not a setting, or not a valid value for it")

    def _config_view(self) -> dict[str, Any]:
        return {
            "webhook_url": self.target.url,
            "webhook_secrets": len(self.target.secrets),  # how many, never which
            "vocabulary": self.state.vocabulary,
            "webhook_shape": self.state.webhook_shape,
            "verify_delay": self.state.verify_delay,
            "seed": self.state.seed,
        }


def canonical_json_safe(body: Any) -> bytes:
    try:
        return canonical_json(body)
    except ValueError:
        return repr(body).encode()


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> Any:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ApiError(400, "VALIDATION_ERROR", f"{name}: a whole number from {low} to {high}")
    return int(raw)


def create_sandbox_app(config: SandboxConfig, clock: Callable[[], float] = time.time) -> tuple[Starlette, Sandbox]:
    sandbox = Sandbox(config, clock)
    return sandbox.app(), sandbox

