"""A reconciliation pass: every delta that should have been confirmed and was not is
looked up at PacSpace, compared with our record, and fixed or reported.

One pass at a time across replicas (storage.pass_lock); one ledger transaction per
page of stale deltas; each anchor looked up once, under bounded concurrency, with a
shared pause when PacSpace says slow down. A dry run does the same work inside a
transaction that is rolled back, and asks nothing of PacSpace that changes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
import structlog

from reconciler.apply import CLEARED_BY_SETTLING, apply_claim, chain_sequences, match_late_orphans
from reconciler.claims import ClaimedStatus, DeltaClaim, same_hash
from reconciler.errors import PacSpaceError
from reconciler.events import MAX_SEQUENCE
from reconciler.give_way import GiveWay
from reconciler.pacspace import PacSpaceClient, StatusAnswer, amount_from, status_from
from reconciler.pages import LedgerPages, PageWriter
from storage.delta_row import AnyDelta
from storage.errors import StorageUnavailable, is_database_trouble
from storage.models import Discrepancy, ReconciliationRun
from storage.page_session import PageSession
from storage.pass_lock import Held, exclusive
from storage.session import LedgerSession
from storage.sql_ledger import SqlLedger
from storage.vocabulary import UNSETTLED_STATUSES, DeltaStatus, DetectedBy, DiscrepancyKind, RunStatus, SubmissionStatus, VerifiedBy

log = structlog.get_logger("pacrecon.reconcile")

PAGE_SIZE = 200
REQUEUE_ROUNDS = 4  # lookups PacSpace throttled are tried again this often within a pass
THROTTLED = frozenset({429, 503})  # "slow down", as opposed to "not there" (network errors, timeouts)
ORPHAN_PAGE = 1000
FAILED_DELIVERY_PAGES = 10
ACTOR = "reconciler"
Lookup = StatusAnswer | PacSpaceError
Answer = TypeVar("Answer")


class PassStopped(Exception):
    """The pass cannot go on (PacSpace answers no lookup, or the pass lock was lost)."""


@dataclass
class PassSummary:
    dry_run: bool
    run_id: int | None = None
    skipped: str | None = None  # why no pass ran
    status: str = RunStatus.RUNNING.value
    started_at: datetime | None = None
    finished_at: datetime | None = None
    checked: int = 0  # stale deltas examined
    looked_up: int = 0  # anchors asked about
    fixed: int = 0
    found: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    redeliveries: int = 0
    open_after: int | None = None
    error_detail: str | None = None
    yielded_seconds: float = 0.0  # waited for the daemon's webhooks, wall time (logged, not in the run row)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "skipped": self.skipped,
            "status": self.status,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "checked": self.checked,
            "looked_up": self.looked_up,
            "fixed": self.fixed,
            "found": dict(sorted(self.found.items())),
            "errors": self.errors,
            "redeliveries_requested": self.redeliveries,
            "open_discrepancies": self.open_after,
            "error_detail": self.error_detail,
        }


@dataclass
class PageResult:
    checked: int = 0  # the page's deltas
    fixed: int = 0
    found: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    opened: int = 0  # open discrepancies after the page minus before, when counted (what a dry run would leave open)


class Throttle:
    """One pause for every lookup once PacSpace says slow down (429, 503)."""

    def __init__(self, clock: Callable[[], float], sleep: Callable[[float], Any]) -> None:
        self._clock, self._sleep = clock, sleep
        self._until = 0.0
        self._strikes = 0

    async def wait(self) -> None:
        delay = self._until - self._clock()
        if delay > 0:
            await self._sleep(delay)

    def slow_down(self, asked: float | None) -> None:
        self._strikes += 1
        pause = asked if asked is not None else min(30.0, 0.5 * 2 ** (self._strikes - 1))
        self._until = max(self._until, self._clock() + min(pause, 60.0))

    def fine(self) -> None:
        self._strikes = 0


class Reconciler:
    def __init__(
        self,
        ledger: SqlLedger,
        client: PacSpaceClient,
        *,
        stale_after_seconds: float,
        stuck_after_seconds: float,
        concurrency: int = 8,
        page_size: int = PAGE_SIZE,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
        foreground_busy: Callable[[], bool] | None = None,
        yield_share: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        pages_for: Callable[[bool], PageWriter] | None = None,
    ) -> None:
        """`foreground_busy`: whether the daemon's webhooks need the process now (they share its
        event loop, its GIL and its database with the pass); the pass then waits, for at most
        `yield_share` of its time (`reconciler.give_way`). `pages_for(full)`: the writer of a
        pass's pages, chosen at its first page (is it full?); without it, the ledger's own
        writer writes them."""
        self.ledger, self.client = ledger, client
        self.pages_for = pages_for
        self.foreground_busy, self.yield_share, self.monotonic = foreground_busy, yield_share, monotonic
        self.stale_after = timedelta(seconds=stale_after_seconds)
        self.stuck_after = timedelta(seconds=stuck_after_seconds)
        self.concurrency, self.page_size = concurrency, page_size
        self.clock, self.sleep = clock, sleep
        self._stop_requested = False

    def request_stop(self) -> None:
        """Shutdown: the running pass ends after its current page (its run row is finished
        as failed, "stopped"), and no later pass starts work. The next start goes on."""
        self._stop_requested = True

    def _stop_if_asked(self) -> None:
        if self._stop_requested:
            raise PassStopped("stopped: the daemon is shutting down (the next pass goes on)")

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def run_pass(self, dry_run: bool = False, on_started: Callable[[int], None] | None = None) -> PassSummary:
        """One pass; never raises for PacSpace's or the ledger's troubles: they are in the
        summary (status `failed`, `error_detail`) and in the run row. `on_started` is
        given the run id as soon as the run row exists (not for a dry run)."""
        summary = PassSummary(dry_run=dry_run, started_at=self._now())
        with contextlib.ExitStack() as stack:
            try:
                held = await anyio.to_thread.run_sync(stack.enter_context, exclusive(self.ledger.engine, "reconcile"))
            except StorageUnavailable as exc:
                summary.status, summary.error_detail = RunStatus.FAILED.value, str(exc)
                log.warning("reconcile_failed", error=str(exc))
                return summary
            try:
                if not held:
                    summary.skipped = "another reconciliation pass is running"
                    summary.status = "skipped"
                    log.info("reconcile_pass", status=summary.status, skipped=summary.skipped, dry_run=summary.dry_run)
                    return summary
                await self._run(summary, held, on_started)
            finally:
                await anyio.to_thread.run_sync(stack.close)
        return summary

    async def _run(self, summary: PassSummary, held: Held, on_started: Callable[[int], None] | None = None) -> None:
        now = summary.started_at or self._now()
        give_way = GiveWay(self.foreground_busy, self.yield_share, self.sleep, self.monotonic)
        try:
            base_open = await self.ledger.read(lambda s: s.count_open_discrepancies()) if summary.dry_run else 0
            if not summary.dry_run:
                summary.run_id = await self.ledger.transact(
                    lambda s: s.add_run(ReconciliationRun(status=RunStatus.RUNNING.value, started_at=now))
                )
                if on_started is not None:
                    on_started(summary.run_id)
            # first: a delta an orphan webhook settles needs no lookup
            summary.fixed += await self._late_orphans(summary, now)
            opened = await self._stale_deltas(summary, now, held, give_way)
            opened += await self._orphans(summary, now)
            if not summary.dry_run:
                self._stop_if_asked()
                await self._redeliver_failed(summary, give_way)
            summary.status = RunStatus.COMPLETED.value
            if summary.dry_run:
                summary.open_after = base_open + opened  # what would be open, had it not been rolled back
        except (StorageUnavailable, PassStopped) as exc:
            summary.status, summary.error_detail = RunStatus.FAILED.value, str(exc)
            log.warning("reconcile_failed", error=str(exc))
        except Exception as exc:  # a bug or an answer we did not foresee: recorded, not a crash loop
            summary.status, summary.error_detail = RunStatus.FAILED.value, f"internal error: {type(exc).__name__}: {exc}"[:2000]
            log.error("reconcile_failed", error=summary.error_detail)
        except BaseException:  # cancelled (shutdown): the run row must not stay "running"
            summary.status, summary.error_detail = RunStatus.FAILED.value, "interrupted"
            raise
        finally:
            summary.finished_at, summary.yielded_seconds = self._now(), give_way.yielded_seconds
            with contextlib.suppress(StorageUnavailable):
                if not summary.dry_run:
                    summary.open_after = await self.ledger.read(lambda s: s.count_open_discrepancies())
                if summary.run_id is not None:
                    await self.ledger.transact(partial(_finish_run, summary=summary))
            log.info("reconcile_pass", **{k: v for k, v in summary.as_dict().items() if k not in ("started_at", "finished_at")},
                     yielded_seconds=round(summary.yielded_seconds, 2))

    # -- stale deltas -------------------------------------------------------------

    async def _stale_deltas(self, summary: PassSummary, now: datetime, held: Held, give_way: GiveWay) -> int:
        """Every stale delta, a page at a time. A page is written while the next one is read
        and looked up (the lookups wait on PacSpace, the writing on the database: one
        overlaps the other); one page is written at a time, in order."""
        cutoff, stuck_cutoff = now - self.stale_after, now - self.stuck_after
        answers: dict[str, Lookup] = {}
        throttle = Throttle(self.clock, self.sleep)
        after: tuple[datetime, int] | None = None
        opened = 0
        pages: PageWriter | None = None  # chosen at the first page (is it full?)
        writing = _PageWrite(summary)
        try:
            while True:
                self._stop_if_asked()
                if not await anyio.to_thread.run_sync(held.still_held):
                    raise PassStopped("the pass lock was lost (its database connection broke)")
                # a page written meanwhile changes none of these rows: they all come after it
                kept, page = await self.ledger.read(partial(_next_page, answers=list(answers), cutoff=cutoff, after=after, limit=self.page_size))
                # the answers later pages need, no more: the pass's memory follows a page, not the stale count
                answers = {anchor: answers[anchor] for anchor in kept}
                if not page:
                    return opened + await writing.counted()
                if pages is None:
                    # chosen now, so that a child's start overlaps the first page's lookups
                    full = len(page) >= self.page_size
                    pages = self.pages_for(full) if self.pages_for is not None else LedgerPages(self.ledger)
                after = (page[-1][2], page[-1][0])
                anchors = {anchor for _, anchor, _ in page if anchor and anchor not in answers}
                looked_up = await self._look_up(anchors, throttle, summary, give_way)
                failures = [a for a in looked_up.values() if isinstance(a, PacSpaceError) and a.status != 404]
                if looked_up and len(failures) == len(looked_up):
                    raise PassStopped(f"PacSpace answered no lookup: {failures[0].code} {failures[0].message}"[:500])
                summary.errors += len(failures)  # one per anchor PacSpace did not tell us about
                answers.update(looked_up)
                work = partial(
                    _apply_page,
                    delta_ids=[delta_id for delta_id, _, _ in page],
                    answers={anchor: answers[anchor] for _, anchor, _ in page if anchor in answers},  # the page's own: it may cross to a child
                    now=now,
                    stuck_cutoff=stuck_cutoff,
                    run_id=summary.run_id,
                    count_opened=summary.dry_run,  # a pass that commits counts the open ones once, at its end
                )
                opened += await writing.counted()
                await give_way()
                writing.start(pages.read(work) if summary.dry_run else pages.write(work))
        finally:
            try:
                await writing.settled()  # leaving early: the page being written is counted if it was
            finally:  # also when cancelled again meanwhile
                if pages is not None:
                    await pages.close()

    async def _look_up(self, anchors: set[str], throttle: Throttle, summary: PassSummary, give_way: GiveWay) -> dict[str, Lookup]:
        summary.looked_up += len(anchors)
        return await self._ask_each(sorted(anchors), self.client.delta_status, throttle, give_way)

    async def _ask_each(
        self, keys: list[str], ask: Callable[[str], Awaitable[Answer]], throttle: Throttle, give_way: GiveWay
    ) -> dict[str, Answer | PacSpaceError]:
        """`ask` for every key, `concurrency` at a time; what PacSpace throttled is asked
        again (up to REQUEUE_ROUNDS rounds) after the shared pause."""
        results: dict[str, Answer | PacSpaceError] = {}
        slots = asyncio.Semaphore(self.concurrency)
        waiting = keys
        for round_number in range(REQUEUE_ROUNDS):
            throttled: list[str] = []

            async def one(key: str) -> None:
                async with slots:
                    await give_way()
                    await throttle.wait()
                    try:
                        results[key] = await ask(key)
                        throttle.fine()
                    except PacSpaceError as error:
                        results[key] = error
                        if error.status in THROTTLED:
                            throttle.slow_down(error.retry_after)
                            throttled.append(key)

            await asyncio.gather(*(one(key) for key in waiting))
            if not throttled:
                break
            log.info("reconcile_throttled", keys=len(throttled), round=round_number + 1)
            waiting = throttled
        return results

    # -- orphans and failed deliveries ----------------------------------------------------

    async def _late_orphans(self, summary: PassSummary, now: datetime) -> int:
        """Apply the orphan webhooks whose delta has been registered since (the two were
        committed at once, each unseen by the other); how many were applied."""
        applied = await self._in_pages(partial(match_late_orphans, limit=ORPHAN_PAGE, now=now), summary)
        if applied:
            log.info("late_orphans_applied", events=applied, dry_run=summary.dry_run)
        return applied

    async def _orphans(self, summary: PassSummary, now: datetime) -> int:
        """Report every orphan old enough, once (a dry run sees only the first page)."""
        reported = await self._in_pages(partial(_report_orphans, cutoff=now - self.stale_after, now=now, run_id=summary.run_id), summary)
        if reported:
            summary.found[DiscrepancyKind.ORPHAN_WEBHOOK.value] += reported
        return reported

    async def _in_pages(self, work: Callable[[LedgerSession], int], summary: PassSummary) -> int:
        """`work` (one page of orphans, handled; how many) again until a page is short.
        Each page takes its orphans out of the next one's reach, so this ends; a dry run,
        whose pages are rolled back, does the first only."""
        done = 0
        while True:
            self._stop_if_asked()
            page = await (self.ledger.read(work) if summary.dry_run else self.ledger.transact(work))
            done += page
            if page < ORPHAN_PAGE or summary.dry_run:
                return done

    async def _redeliver_failed(self, summary: PassSummary, give_way: GiveWay) -> None:
        """Ask PacSpace to deliver again every webhook it lists as failed."""
        event_ids: list[str] = []
        try:
            for page in range(FAILED_DELIVERY_PAGES):
                listing = await self.client.list_webhooks(status="failed", limit=100, offset=page * 100)
                deliveries = [d for d in listing.get("deliveries", []) if isinstance(d, dict)]
                event_ids += [str(d["eventId"]) for d in deliveries if d.get("eventId")]
                if len(deliveries) < 100:
                    break
        except PacSpaceError as error:
            summary.errors += 1
            log.warning("failed_deliveries_not_listed", code=error.code)
        await self.request_redeliveries(event_ids, summary, give_way)

    async def request_redeliveries(self, event_ids: list[str], summary: PassSummary, give_way: GiveWay | None = None) -> None:
        """POST .../retry for each event, as concurrently as the lookups (up to 1,000 of them
        one after the other were a tenth of a large pass), waiting out 429/503 as they do
        (and for the webhooks, with the pass's `give_way`)."""
        give_way = give_way or GiveWay(None, 0, self.sleep)
        answers = await self._ask_each(list(dict.fromkeys(event_ids)), self.client.retry_webhook, Throttle(self.clock, self.sleep), give_way)
        for event_id, answer in answers.items():
            if isinstance(answer, PacSpaceError):
                summary.errors += 1
                log.warning("redelivery_not_requested", event_id=event_id, code=answer.code)
            else:
                summary.redeliveries += 1

class _PageWrite:
    """The page being written, at most one: started, then waited for and added to the pass."""

    def __init__(self, summary: PassSummary) -> None:
        self._summary = summary
        self._task: asyncio.Future[PageResult] | None = None

    def start(self, write: Awaitable[PageResult]) -> None:
        self._task = asyncio.ensure_future(write)

    async def counted(self) -> int:
        """Wait for the page being written, if any; add its result to the pass's; the
        discrepancies it opened. Shielded: a pass cancelled meanwhile leaves the write
        going (the ledger has it and may commit it anyway), for `settled` to count."""
        task = self._task
        if task is None:
            return 0
        try:
            result = await asyncio.shield(task)
        finally:
            if task.done():  # written, or failed (raised here): nothing more to wait for
                self._task = None
        summary = self._summary
        summary.checked += result.checked
        summary.fixed += result.fixed
        summary.found.update(result.found)
        summary.errors += result.errors
        return result.opened

    async def settled(self) -> None:
        """A pass leaving early: the page still being written is waited for and counted;
        if its write failed, that is logged (the pass fails for its own reason)."""
        try:
            await self.counted()
        except Exception as exc:
            log.warning("reconcile_page_not_written", error=f"{type(exc).__name__}: {exc}"[:500])


def _next_page(
    session: LedgerSession, *, answers: list[str], cutoff: datetime, after: tuple[datetime, int] | None, limit: int
) -> tuple[set[str], list[tuple[Any, ...]]]:
    """The anchors of `answers` a later page still has, and the next page: (id, anchor, emitted_at)."""
    kept = session.unsettled_anchors(answers, cutoff, after) if after is not None else set(answers)
    return kept, [tuple(row) for row in session.unsettled_deltas(cutoff, after, limit)]


# -- the transactions -----------------------------------------------------------------


def claim_from_status(data: dict[str, Any], delta: AnyDelta) -> DeltaClaim | None:
    """PacSpace's status answer as a claim about `delta` (for a batch anchor, about the
    entry of `deltas[]` with our item hash). None when the status word is unknown."""
    status = status_from(data.get("status"))
    entry: dict[str, Any] = data
    hashes = data.get("itemHashes")
    entries = data.get("deltas")
    if isinstance(entries, list):
        listed = [e for e in entries if isinstance(e, dict)]
        entry = next((e for e in listed if same_hash(e.get("itemHash"), delta.item_hash)), None) or next(
            (e for e in listed if delta.submission_index is not None and e.get("index") == delta.submission_index), {}
        )
        status = status_from(entry.get("status")) or status
        if not isinstance(hashes, list):  # the anchor's hashes, as its entries list them
            hashes = [e.get("itemHash") for e in listed]
    if status is None:
        return None
    raw_amount = entry.get("delta")
    amount = amount_from(raw_amount)
    return DeltaClaim(
        status=status,
        anchor_id=_text(data.get("anchorId")),
        customer_id=_text(entry.get("customerId")),
        amount=amount,
        amount_unreadable=str(raw_amount)[:64] if raw_amount is not None and amount is None else None,
        receipt_id=_text(data.get("receiptId")),
        items_root=_text(data.get("itemsRoot")),
        item_hashes=tuple(h for h in hashes if isinstance(h, str)) if isinstance(hashes, list) else None,
        content_hash=_text(entry.get("itemHash")),
        sequence_number=_sequence(entry.get("sequenceNumber")),
        # not in the documented answer; held to the chain like a webhook's when given
        previous_proof_hash=_text(entry.get("previousProofHash")) or _text(_proof(entry).get("previousProofHash")),
        tx_hash=_text(data.get("txHash")),
        error=_text(entry.get("error")),
    )


def _proof(entry: dict[str, Any]) -> dict[str, Any]:
    proof = entry.get("proof")
    return proof if isinstance(proof, dict) else {}


def _text(value: Any) -> str | None:
    return value[:128] if isinstance(value, str) and value else None


def _sequence(value: Any) -> str | None:
    """A sequence number as webhooks give it (`reconciler.events`): one longer than the column
    holds is no sequence number of ours (cut short it would name another; stored whole,
    PostgreSQL refuses the row)."""
    text = _text(value)
    return text if text is not None and len(text) <= MAX_SEQUENCE else None


def _state(delta: AnyDelta) -> dict[str, Any]:
    return {"status": delta.status, "anchor_id": delta.anchor_id, "receipt_id": delta.receipt_id, "verified_by": delta.verified_by}


def _apply_page(
    session: LedgerSession,
    *,
    delta_ids: list[int],
    answers: dict[str, Lookup],
    now: datetime,
    stuck_cutoff: datetime,
    run_id: int | None,
    count_opened: bool = False,
) -> PageResult:
    """Reconcile a page of deltas, all together in one savepoint; if that raises, the page
    is rolled back and done again delta by delta, each in its own savepoint, so that an
    answer we did not foresee skips one delta, not the page. `count_opened`: count the
    open discrepancies before and after (two reads of every open one: a dry run only)."""
    open_before = session.count_open_discrepancies() if count_opened else 0
    try:
        with session.savepoint():
            result = _reconcile_together(PageSession(session, delta_ids), delta_ids, answers, now, stuck_cutoff, run_id)
    except Exception as exc:  # NotReadAhead, or an answer we did not foresee
        if is_database_trouble(exc):
            raise  # the database's, not the answers': done again delta by delta it fails again, each after a lock wait
        log.warning("reconcile_page_redone", deltas=len(delta_ids), error=f"{type(exc).__name__}: {exc}"[:500])
        result = _reconcile_one_by_one(session, delta_ids, answers, now, stuck_cutoff, run_id)
    result.checked = len(delta_ids)
    if count_opened:
        result.opened = session.count_open_discrepancies() - open_before
    return result


def _reconcile_together(
    page: PageSession, delta_ids: list[int], answers: dict[str, Lookup], now: datetime, stuck_cutoff: datetime, run_id: int | None
) -> PageResult:
    result = PageResult()
    claims: dict[int, DeltaClaim | None] = {}
    sequences: list[tuple[str, str]] = []
    for delta in page.deltas:
        answer = answers.get(delta.anchor_id or "")
        if isinstance(answer, StatusAnswer) and delta.id is not None:
            claim = claims[delta.id] = claim_from_status(answer.raw, delta)
            sequences += [(delta.customer_id, sequence) for sequence in chain_sequences(claim)] if claim else []
    # not_found_upstream is among the cleared kinds: its sightings decide a resend
    page.read_ahead(sequences, [kind.value for kind in CLEARED_BY_SETTLING], [f"delta:{delta_id}" for delta_id in delta_ids])
    for delta_id in delta_ids:
        _reconcile_delta(page, delta_id, answers, now, stuck_cutoff, run_id, result, claims.get(delta_id))
    page.write()
    return result


def _reconcile_one_by_one(
    session: LedgerSession, delta_ids: list[int], answers: dict[str, Lookup], now: datetime, stuck_cutoff: datetime, run_id: int | None
) -> PageResult:
    result = PageResult()
    session.load_deltas(delta_ids)  # again: the rolled-back savepoint expired what it had changed
    for delta_id in delta_ids:
        try:
            with session.savepoint():
                _reconcile_delta(session, delta_id, answers, now, stuck_cutoff, run_id, result)
        except Exception as exc:  # an answer we did not foresee: this delta is skipped, not the pass
            if is_database_trouble(exc):
                raise
            result.errors += 1
            log.error("reconcile_delta_failed", delta_id=delta_id, error=f"{type(exc).__name__}: {exc}"[:500])
    return result


def _reconcile_delta(
    session: LedgerSession,
    delta_id: int,
    answers: dict[str, Lookup],
    now: datetime,
    stuck_cutoff: datetime,
    run_id: int | None,
    result: PageResult,
    claim: DeltaClaim | None = None,
) -> None:
    """`claim`: PacSpace's answer for the delta as a claim, when the caller made it already."""
    delta = session.get_delta(delta_id)
    if delta is None or delta.status not in UNSETTLED_STATUSES:
        return  # a webhook settled it since the page was read
    answer = answers.get(delta.anchor_id or "")
    if answer is None:
        return
    if isinstance(answer, PacSpaceError):
        if answer.status == 404:
            _not_found(session, delta, answer, now, run_id, result)
        return  # other lookup errors are counted once per anchor by the pass
    claim = claim or claim_from_status(answer.raw, delta)
    if claim is None:
        _open(session, delta, DiscrepancyKind.UNVERIFIABLE, now, run_id, result,
              {"field": "status", "theirs": answer.status_word[:64], "detail": "PacSpace answered a status we do not know"})
        return
    if claim.status is ClaimedStatus.VERIFIED and not _proves_our_item(delta, claim):
        _open(session, delta, DiscrepancyKind.UNVERIFIABLE, now, run_id, result,
              {"field": "itemHashes", "ours": delta.item_hash, "detail": "PacSpace says verified but names no item hash to check ours against"})
        return
    before = _state(delta)
    findings = apply_claim(session, delta, claim, now, event_id=None, by=VerifiedBy.RECONCILER, run_id=run_id)
    result.found.update({f.kind.value for f in findings})  # gaps, not findings: one per kind and delta
    if delta.status == DeltaStatus.VERIFIED.value and before["status"] != DeltaStatus.VERIFIED.value:
        fixed_id = session.record_fixed(
            _finding(delta, DiscrepancyKind.MISSING_WEBHOOK, run_id, {"detail": "PacSpace verified it; we never got the webhook"}),
            f"fixed by reconciliation run {run_id}: proofs checked, marked VERIFIED",
            now,
        )
        _audit(session, "mark_verified", delta, before, run_id, now, fixed_id)
        result.fixed += 1
        result.found[DiscrepancyKind.MISSING_WEBHOOK.value] += 1
    elif delta.status == DeltaStatus.FAILED.value and before["status"] != DeltaStatus.FAILED.value:
        discrepancy_id = _open(session, delta, DiscrepancyKind.UPSTREAM_FAILED, now, run_id, result,
                               {"field": "status", "ours": before["status"], "theirs": "FAILED", "detail": claim.error or "PacSpace failed the delta"})
        _audit(session, "mark_failed", delta, before, run_id, now, discrepancy_id)
        result.fixed += 1
    elif claim.status in (ClaimedStatus.QUEUED, ClaimedStatus.PROCESSING) and delta.emitted_at and delta.emitted_at < stuck_cutoff:
        _open(session, delta, DiscrepancyKind.STUCK, now, run_id, result,
              {"field": "status", "ours": delta.status, "theirs": claim.status.value, "detail": f"still pending since {delta.emitted_at.isoformat()}"})


def _proves_our_item(delta: AnyDelta, claim: DeltaClaim) -> bool:
    """A verification is only taken from PacSpace when it names item hashes ours can be
    checked against (compare() then checks that ours is among them)."""
    return delta.item_hash is not None and bool(claim.content_hash or claim.item_hashes)


def _not_found(session: LedgerSession, delta: AnyDelta, error: PacSpaceError, now: datetime, run_id: int | None, result: PageResult) -> None:
    discrepancy_id = _open(session, delta, DiscrepancyKind.NOT_FOUND_UPSTREAM, now, run_id, result,
                           {"field": "anchorId", "ours": delta.anchor_id, "detail": f"PacSpace answers {error.status} {error.code} for it"})
    submission = session.get_submission(delta.submission_id) if delta.submission_id else None
    if submission is None:
        return  # imported: we do not hold the body to send again
    sightings = session.occurrences(discrepancy_id)
    if sightings > 1:
        return  # sent again once already; more resends could record it twice once PacSpace forgets the key
    siblings = session.deltas_of_submission(submission.id or 0)
    if any(DeltaStatus(s.status).is_terminal for s in siblings):
        return  # part of the submission is settled: sending all of it again is a person's call
    before = _state(delta)
    if submission.status == SubmissionStatus.SENT.value:
        # send the original bytes again under the original key; the outbox records the answer
        submission.status, submission.next_attempt_at = SubmissionStatus.PENDING.value, now
    for sibling in siblings:
        if sibling.status in UNSETTLED_STATUSES:
            sibling.status, sibling.updated_at = DeltaStatus.PENDING.value, now
    _audit(session, "resend", delta, before, run_id, now, discrepancy_id)
    result.fixed += 1


def _report_orphans(session: LedgerSession, *, cutoff: datetime, now: datetime, run_id: int | None) -> int:
    events = session.unreported_orphans(cutoff, limit=ORPHAN_PAGE)
    for event in events:
        session.open_discrepancy(
            Discrepancy(
                kind=DiscrepancyKind.ORPHAN_WEBHOOK.value,
                subject=f"event:{event.event_id}",
                anchor_id=event.anchor_id,
                event_id=event.event_id,
                run_id=run_id,
                detected_by=DetectedBy.RECONCILER.value,
                evidence={"field": "anchorId", "theirs": event.anchor_id, "detail": "a verified webhook for a delta we have no record of"},
            ),
            now,
        )
    return len(events)


def _finding(delta: AnyDelta, kind: DiscrepancyKind, run_id: int | None, evidence: dict[str, Any]) -> dict[str, Any]:
    """A discrepancy about `delta`, as column values (cheaper than a model, thousands a pass)."""
    return {
        "kind": kind.value,
        "subject": f"delta:{delta.id}",
        "delta_id": delta.id,
        "anchor_id": delta.anchor_id,
        "customer_id": delta.customer_id,
        "run_id": run_id,
        "detected_by": DetectedBy.RECONCILER.value,
        "evidence": evidence,
    }


def _open(session: LedgerSession, delta: AnyDelta, kind: DiscrepancyKind, now: datetime, run_id: int | None,
          result: PageResult, evidence: dict[str, Any]) -> int:
    result.found[kind.value] += 1
    return session.open_discrepancy(_finding(delta, kind, run_id, evidence), now)


def _audit(session: LedgerSession, action: str, delta: AnyDelta, before: dict[str, Any], run_id: int | None,
           now: datetime, discrepancy_id: int | None) -> None:
    session.add_audit({"at": now, "actor": ACTOR, "action": action, "run_id": run_id, "delta_id": delta.id,
                       "discrepancy_id": discrepancy_id, "before": before, "after": _state(delta)})


def _finish_run(session: LedgerSession, *, summary: PassSummary) -> None:
    run = session.get_run(summary.run_id or 0)
    if run is None:
        return
    run.status, run.finished_at = summary.status, summary.finished_at
    run.checked, run.fixed, run.errors = summary.checked, summary.fixed, summary.errors
    run.found = dict(sorted(summary.found.items()))
    run.error_detail = summary.error_detail
