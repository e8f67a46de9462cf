"""One writer thread that commits concurrent work many at a time (group commit).

With durable commits each commit costs an fsync; committing the work of every
waiting caller in one transaction shares it. A caller's future is resolved only
after the commit that holds its work has returned, never before.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from storage.errors import StorageUnavailable


class Job:
    """One caller's work, and how to tell the caller: a `Future` (synchronous callers), an
    asyncio future resolved on its own event loop, or (`here`: the caller commits the batch
    in its own thread and reads the outcome after) just `outcome` (`resolve_all`)."""

    __slots__ = ("work", "future", "loop", "waiter", "outcome")

    def __init__(
        self,
        work: Callable[..., Any],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        waiter: asyncio.Future[Any] | None = None,
        here: bool = False,
    ) -> None:
        self.work, self.loop, self.waiter = work, loop, waiter
        # a concurrent Future (with its Condition and lock) only for a caller that blocks on it
        self.future: Future[Any] | None = Future() if waiter is None and not here else None
        self.outcome: tuple[BaseException | None, Any] | None = None  # (error, result), for `here`

    def start(self) -> bool:
        """False when the caller cancelled before the work began: then it is skipped."""
        return self.future.set_running_or_notify_cancel() if self.future is not None else True


def resolve_all(outcomes: Iterable[tuple[Job, BaseException | None, Any]]) -> None:
    """Tell each caller its outcome (call only after the commit returned). Callers on an
    event loop are told in one wake-up of that loop per batch, not one per job."""
    on_loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], BaseException | None, Any]]] = {}
    for job, error, result in outcomes:
        if job.loop is not None and job.waiter is not None:
            on_loops.setdefault(job.loop, []).append((job.waiter, error, result))
        elif job.future is not None:
            _settle(job.future, error, result)
        elif job.outcome is None:  # the first outcome stays, as a future's does
            job.outcome = (error, result)
    for loop, items in on_loops.items():
        try:
            loop.call_soon_threadsafe(_settle_waiters, items)
        except RuntimeError:
            pass  # the loop is closed: no one waits any more


async def wait_within(waiter: asyncio.Future[Any], seconds: float, late: Callable[[], BaseException]) -> Any:
    """`await waiter`, or `late()` raised once `seconds` have passed. Giving up waiting does
    not cancel the work behind it: it may still commit later, unacknowledged."""
    timer = asyncio.get_running_loop().call_later(seconds, _expire, waiter, late)  # no closure per call: the webhook path
    try:
        return await waiter
    finally:
        timer.cancel()


def _expire(waiter: asyncio.Future[Any], late: Callable[[], BaseException]) -> None:
    if not waiter.done():
        waiter.set_exception(late())


def _settle_waiters(items: list[tuple[asyncio.Future[Any], BaseException | None, Any]]) -> None:
    for waiter, error, result in items:
        if not waiter.done():  # cancelled, or timed out meanwhile
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)


def _settle(future: Future[Any], error: BaseException | None, result: Any) -> None:
    """Resolve `future` unless it is already resolved or was cancelled meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def commit_jobs(commit_batch: Callable[[list[Job]], None], batch: list[Job]) -> None:
    """`commit_batch(batch)`; whatever it raises, every job it left unresolved is told."""
    try:
        commit_batch(batch)
    except BaseException as exc:  # the caller (a writer thread) must outlive any one batch
        failure = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(f"writer failed: {exc!r}")
        resolve_all((job, failure, None) for job in batch)  # a resolved one stays as it was


class GroupCommitWriter:
    def __init__(self, commit_batch: Callable[[list[Job]], None], *, max_batch: int) -> None:
        self._commit_batch = commit_batch
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._batch_started: float | None = None  # monotonic time the current batch began
        self._thread = threading.Thread(target=self._loop, name="ledger-writer", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[..., Any]) -> Future[Any]:
        job = Job(work)
        self._put(job)
        assert job.future is not None
        return job.future

    def submit_waiter(self, work: Callable[..., Any], loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Any]) -> None:
        """Submit `work`; `waiter` (of `loop`) gets its outcome after the commit."""
        self._put(Job(work, loop=loop, waiter=waiter))

    def _put(self, job: Job) -> None:
        with self._lock:  # no job may slip in behind the stop marker
            if self._closed:
                raise StorageUnavailable("the ledger is closed")
            self._jobs.put(job)

    def busy_for(self) -> float:
        """Seconds the batch being committed has taken so far (0 when idle)."""
        started = self._batch_started
        return 0.0 if started is None else time.monotonic() - started

    def close(self, timeout: float = 30.0) -> None:
        """Let the jobs already submitted commit, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < self._max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._batch_started = time.monotonic()
            try:
                commit_jobs(self._commit_batch, batch)
            finally:
                self._batch_started = None
            if stop:
                return
