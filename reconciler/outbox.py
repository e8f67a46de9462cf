"""The outbox: a delta is committed locally before anything is sent, then sent, then
PacSpace's answer recorded. Nothing a caller was told is lost, nothing is sent twice
under two keys: every resend uses the submission's one idempotency key and bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError

from reconciler.apply import match_orphans
from reconciler.emit_rules import FieldError, batch_shape_error, delta_errors
from reconciler.errors import PacSpaceError
from reconciler.pacspace import BatchAnswer, EmitAnswer, PacSpaceClient, time_from
from storage import jsonio
from storage.errors import AmountOutOfRange, StorageUnavailable
from storage.ledger import Ledger
from storage.models import LocalDelta, OutboxSubmission
from storage.session import LedgerSession
from storage.types import amount_to_units
from storage.vocabulary import DeltaSource, DeltaStatus, SubmissionStatus

log = structlog.get_logger("pacrecon.outbox")

FORWARDED_FIELDS = ("customerId", "delta", "reason", "referenceId", "metadata")
REFERENCE_MAX = 256
METADATA_MAX_BYTES = 16_384
CLIENT_KEY_MAX = 255
RESEND_BASE_SECONDS = 5.0
RESEND_MAX_SECONDS = 300.0
CADENCE_WAIT_SECONDS = 60.0


class InvalidRequest(Exception):
    """The caller's request breaks PacSpace's rules or the ledger's; nothing was recorded."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


class IdempotencyConflict(Exception):
    """The caller's Idempotency-Key was used before with another request body."""


@dataclass(frozen=True)
class OutboxRequest:
    kind: str  # "single" or "batch"
    items: tuple[dict[str, Any], ...]
    body: bytes  # exactly what is sent upstream, every time
    fingerprint: str
    client_key: str | None
    credit_pool_id: str | None


@dataclass(frozen=True)
class OutboxAnswer:
    status: int  # 200 accepted by PacSpace; 202 recorded, not yet accepted; 4xx refused
    body: bytes


def parse_request(raw: bytes, kind: str, client_key: str | None = None, credit_pool_id: str | None = None) -> OutboxRequest:
    """Validate a caller's emit request exactly as PacSpace would, plus what our ledger
    needs (at most 9 decimal places; bounded reference and metadata)."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_float=Decimal, parse_constant=Decimal)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequest([FieldError("body", "must be UTF-8 JSON")]) from None
    errors: list[FieldError] = []
    for header, value in (("Idempotency-Key", client_key), ("X-Credit-Pool-Id", credit_pool_id)):
        if value is not None and not (0 < len(value) <= CLIENT_KEY_MAX and value.isascii() and value.isprintable()):
            errors.append(FieldError(header, f"must be 1 to {CLIENT_KEY_MAX} printable ASCII characters"))
    if kind == "batch":
        shape = batch_shape_error(body)
        if shape is not None:
            raise InvalidRequest(errors + [shape])
        items, prefixes = body["deltas"], [f"deltas[{n}]." for n in range(len(body["deltas"]))]
    else:
        items, prefixes = [body], [""]
    for item, prefix in zip(items, prefixes):
        problems = delta_errors(item, prefix)
        errors += problems or _ledger_errors(item, prefix)
    if errors:
        raise InvalidRequest(errors)
    forwarded = [{name: item[name] for name in FORWARDED_FIELDS if item.get(name) is not None} for item in items]
    payload = jsonio.dumps_bytes(forwarded[0] if kind == "single" else {"deltas": forwarded})
    return OutboxRequest(
        kind=kind,
        items=tuple(forwarded),
        body=payload,
        # the same key with another pool is another request
        fingerprint=hashlib.sha256(f"{kind}\n{credit_pool_id or ''}\n".encode() + payload).hexdigest(),
        client_key=client_key,
        credit_pool_id=credit_pool_id,
    )


def _ledger_errors(item: dict[str, Any], prefix: str) -> list[FieldError]:
    errors = []
    for name in ("reason", "referenceId", "metadata"):
        problem = jsonio.storable_text_error(item.get(name))
        if problem:
            errors.append(FieldError(f"{prefix}{name}", problem))
    try:
        amount_to_units(Decimal(item["delta"]))
    except AmountOutOfRange:
        errors.append(FieldError(f"{prefix}delta", "must have at most 9 decimal places"))
    reference = item.get("referenceId")
    if isinstance(reference, str) and len(reference) > REFERENCE_MAX:
        errors.append(FieldError(f"{prefix}referenceId", f"must be at most {REFERENCE_MAX} characters"))
    metadata = item.get("metadata")
    if metadata is not None:
        try:
            size = len(jsonio.dumps_bytes(metadata))
        except ValueError:
            errors.append(FieldError(f"{prefix}metadata", "numbers in it must be finite"))
        else:
            if size > METADATA_MAX_BYTES:
                errors.append(FieldError(f"{prefix}metadata", f"must be at most {METADATA_MAX_BYTES} bytes as JSON"))
    return errors


class Outbox:
    def __init__(
        self,
        ledger: Ledger,
        client: PacSpaceClient,
        *,
        lease_seconds: float = 120.0,
        resend_base_seconds: float = RESEND_BASE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.client = client
        self.lease = timedelta(seconds=lease_seconds)
        self.resend_base_seconds = resend_base_seconds
        self.clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def submit(self, request: OutboxRequest) -> OutboxAnswer:
        """Commit the request's deltas as PENDING, then send them; the answer to give the caller."""
        now = self._now()
        commit = partial(_commit, request=request, now=now, lease_until=now + self.lease)
        try:
            outcome = await self.ledger.transact(commit)
        except IntegrityError:
            # another replica committed the same caller key a moment ago: answer as a repeat
            outcome = await self.ledger.transact(commit)
        if isinstance(outcome, OutboxAnswer):  # the caller's key was seen before
            return outcome
        return await self.send(outcome)

    async def send(self, submission_id: int) -> OutboxAnswer:
        """Send one submission (again) under its own idempotency key and record the outcome."""
        job = await self.ledger.read(partial(_sendable, submission_id=submission_id))
        if isinstance(job, OutboxAnswer):
            return job  # answered already
        kind, key, body, pool, items = job
        try:
            if kind == "single":
                answer: EmitAnswer | BatchAnswer = await self.client.emit(body, idempotency_key=key, credit_pool_id=pool)
            else:
                answer = await self.client.emit_batch(body, idempotency_key=key, credit_pool_id=pool)
                listed = sorted(result.index for result in answer.results)
                if listed != list(range(items)):
                    raise PacSpaceError(200, "INVALID_RESPONSE", f"the batch answer lists items {listed[:10]}, not 0 to {items - 1}", retryable=True)
        except PacSpaceError as error:
            log.warning("emit_failed", submission_id=submission_id, code=error.code, status=error.status, final=error.final)
            if error.final:
                record = partial(_record_rejection, submission_id=submission_id, error=error, now=self._now())
            else:
                record = partial(_record_failure, submission_id=submission_id, error=error, now=self._now(), base=self.resend_base_seconds)
            return await self.ledger.transact(record)
        try:
            result = await self.ledger.transact(partial(_record_answer, submission_id=submission_id, answer=answer, now=self._now()))
        except IntegrityError as exc:  # e.g. the same anchor and item already registered by an import
            error = PacSpaceError(200, "UNRECORDABLE", f"PacSpace's answer cannot be recorded: {type(exc.orig).__name__}", retryable=True)
            return await self.ledger.transact(
                partial(_record_failure, submission_id=submission_id, error=error, now=self._now(), base=self.resend_base_seconds)
            )
        log.info("emitted", submission_id=submission_id, kind=kind)
        return result

    async def resend_due(self, limit: int = 50) -> int:
        """The retry job: send every PENDING submission whose time has come. Returns how many."""
        now = self._now()
        claimed = await self.ledger.transact(lambda s: s.claim_due_submissions(now, now + self.lease, limit))
        for submission_id in claimed:
            try:
                await self.send(submission_id)
            except StorageUnavailable:
                raise  # the ledger is away: the whole job waits for the next run
            except Exception as exc:  # one bad submission must not hold back the others
                log.error("resend_failed", submission_id=submission_id, error=f"{type(exc).__name__}: {exc}"[:500])
                error = PacSpaceError(None, "INTERNAL_ERROR", type(exc).__name__, retryable=True)
                await self.ledger.transact(
                    partial(_record_failure, submission_id=submission_id, error=error, now=self._now(), base=self.resend_base_seconds)
                )
        return len(claimed)


# -- the transactions (each runs inside one ledger transaction) ----------------------


def _commit(session: LedgerSession, *, request: OutboxRequest, now: datetime, lease_until: datetime) -> int | OutboxAnswer:
    if request.client_key is not None:
        seen = session.submission_by_client_key(request.client_key)
        if seen is not None:
            if seen.fingerprint != request.fingerprint:
                return _error_answer(409, "idempotency_conflict", "this Idempotency-Key was used with another request body")
            if seen.answer is not None:
                return OutboxAnswer(seen.answer_status or 200, seen.answer)
            return _pending_answer(seen, session.deltas_of_submission(seen.id or 0), "the first request with this key is still being sent")
    key = f"pacrecon-{uuid.uuid4().hex}"
    submission = session.add_submission(
        OutboxSubmission(
            kind=request.kind,
            idempotency_key=key,
            client_key=request.client_key,
            fingerprint=request.fingerprint,
            request_body=request.body,
            credit_pool_id=request.credit_pool_id,
            status=SubmissionStatus.PENDING.value,
            next_attempt_at=lease_until,  # the request that made it sends it; the job waits for the lease
            created_at=now,
        )
    )
    for index, item in enumerate(request.items):
        session.add_delta(
            LocalDelta(
                customer_id=item["customerId"],
                amount=Decimal(item["delta"]),
                reason=item["reason"],
                reference_id=item.get("referenceId"),
                delta_metadata=item.get("metadata"),
                idempotency_key=key if request.kind == "single" else f"{key}:{index}",
                source=DeltaSource.OUTBOX.value,
                status=DeltaStatus.PENDING.value,
                submission_id=submission.id,
                submission_index=index,
                created_at=now,
                updated_at=now,
            )
        )
    return int(submission.id or 0)


def _sendable(session: LedgerSession, *, submission_id: int) -> tuple[str, str, bytes, str | None, int] | OutboxAnswer:
    submission = session.get_submission(submission_id)
    if submission is None:
        raise LookupError(f"no outbox submission {submission_id}")
    if submission.status != SubmissionStatus.PENDING.value:
        return OutboxAnswer(submission.answer_status or 200, submission.answer or b"{}")
    items = len(session.deltas_of_submission(submission_id))
    return submission.kind, submission.idempotency_key, submission.request_body, submission.credit_pool_id, items


def _record_answer(session: LedgerSession, *, submission_id: int, answer: EmitAnswer | BatchAnswer, now: datetime) -> OutboxAnswer:
    submission = session.get_submission(submission_id, for_update=True)
    assert submission is not None
    if submission.status != SubmissionStatus.PENDING.value:  # another sender recorded it first
        return OutboxAnswer(submission.answer_status or 200, submission.answer or b"{}")
    deltas = session.deltas_of_submission(submission_id)
    if isinstance(answer, EmitAnswer):
        (delta,) = deltas
        _accept(delta, answer.anchor_id, answer.item_hashes[0] if len(answer.item_hashes) == 1 else None,
                answer.receipt_id or answer.items_root, answer.items_root or answer.receipt_id, list(answer.item_hashes),
                time_from(answer.received_at) or now, now)
        body: dict[str, Any] = {**answer.raw, "id": delta.id}
    else:
        body = _apply_batch_answer(deltas, answer, now)
    submission.status = SubmissionStatus.SENT.value
    submission.sent_at = now
    submission.attempts += 1
    submission.last_error = None
    submission.answer_status, submission.answer = 200, jsonio.dumps_bytes(body)
    match_orphans(session, [d for d in deltas if d.anchor_id], now)
    return OutboxAnswer(200, submission.answer)


def _apply_batch_answer(deltas: list[LocalDelta], answer: BatchAnswer, now: datetime) -> dict[str, Any]:
    by_index = {d.submission_index: d for d in deltas}
    hashes: dict[str, list[str]] = {}
    for result in answer.results:
        if not result.failed and result.anchor_id and result.item_hash:
            hashes.setdefault(result.anchor_id, []).append(result.item_hash)
    raw_results = [r for r in answer.raw.get("results", []) if isinstance(r, dict)]
    for result, raw in zip(answer.results, raw_results):
        delta = by_index.get(result.index)
        if delta is None:
            continue
        raw["id"] = delta.id
        if result.failed:
            _reject(delta, f"{result.error_code or 'FAILED'}: {result.error_message or 'refused by PacSpace'}", now)
        else:
            _accept(delta, result.anchor_id, result.item_hash, result.receipt_id, result.receipt_id,
                    hashes.get(result.anchor_id or "", []), now, now)
    return {**answer.raw, "results": raw_results}


def _accept(delta: LocalDelta, anchor_id: str | None, item_hash: str | None, receipt_id: str | None,
            items_root: str | None, item_hashes: list[str], emitted_at: datetime, now: datetime) -> None:
    if DeltaStatus(delta.status).is_terminal:
        return  # settled already (a resend's answer must not move it back)
    delta.anchor_id, delta.item_hash = anchor_id, item_hash
    delta.receipt_id, delta.items_root, delta.item_hashes = receipt_id, items_root, item_hashes
    delta.status, delta.emitted_at, delta.updated_at = DeltaStatus.QUEUED.value, emitted_at, now


def _reject(delta: LocalDelta, reason: str, now: datetime) -> None:
    if DeltaStatus(delta.status).is_terminal:
        return
    delta.status, delta.status_reason, delta.updated_at = DeltaStatus.REJECTED.value, reason[:2000], now


def _record_rejection(session: LedgerSession, *, submission_id: int, error: PacSpaceError, now: datetime) -> OutboxAnswer:
    submission = session.get_submission(submission_id, for_update=True)
    assert submission is not None
    if submission.status != SubmissionStatus.PENDING.value:
        return OutboxAnswer(submission.answer_status or 200, submission.answer or b"{}")
    deltas = session.deltas_of_submission(submission_id)
    for delta in deltas:
        _reject(delta, f"{error.code}: {error.message}", now)
    status = error.status if error.status is not None and 400 <= error.status < 500 else 502
    answer = _error_answer(
        status,
        "upstream_rejected",
        f"PacSpace refused the request: {error.code}: {error.message}",
        upstream={"status": error.status, "code": error.code, "message": error.message},
        ids=[d.id for d in deltas],
    )
    submission.status, submission.attempts, submission.last_error = SubmissionStatus.REJECTED.value, submission.attempts + 1, str(error)[:2000]
    submission.answer_status, submission.answer = answer.status, answer.body
    return answer


def _record_failure(
    session: LedgerSession, *, submission_id: int, error: PacSpaceError, now: datetime, base: float
) -> OutboxAnswer:
    submission = session.get_submission(submission_id, for_update=True)
    assert submission is not None
    deltas = session.deltas_of_submission(submission_id)
    if submission.status != SubmissionStatus.PENDING.value:
        return OutboxAnswer(submission.answer_status or 200, submission.answer or b"{}")
    submission.attempts += 1
    submission.last_error = str(error)[:2000]
    if error.code == "CADENCE_LIMIT":  # per customer: never straight back
        wait = max(CADENCE_WAIT_SECONDS, error.retry_after or 0)
    else:
        wait = max(min(RESEND_MAX_SECONDS, base * 2 ** (submission.attempts - 1)), error.retry_after or 0)
    submission.next_attempt_at = now + timedelta(seconds=wait)
    return _pending_answer(submission, deltas, f"PacSpace did not accept it yet ({error.code}); it is sent again with the same idempotency key")


def _pending_answer(submission: OutboxSubmission, deltas: list[LocalDelta], why: str) -> OutboxAnswer:
    body: dict[str, Any] = {"status": DeltaStatus.PENDING.value, "message": f"recorded locally; {why}"}
    if submission.kind == "single" and deltas:
        body["id"] = deltas[0].id
    else:
        body["ids"] = [d.id for d in deltas]
    return OutboxAnswer(202, jsonio.dumps_bytes(body))


def _error_answer(status: int, code: str, message: str, **extra: Any) -> OutboxAnswer:
    return OutboxAnswer(status, jsonio.dumps_bytes({"error": {"code": code, "message": message, **extra}}))
