"""One writer thread that commits concurrent work many at a time (group commit).

With durable commits each commit costs an fsync; committing the work of every
waiting caller in one transaction shares it. A caller's future is resolved only
after the commit that holds its work has returned, never before.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from storage.errors import StorageUnavailable


@dataclass
class Job:
    work: Callable[..., Any]
    future: Future[Any] = field(default_factory=Future)


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
        with self._lock:  # no job may slip in behind the stop marker
            if self._closed:
                raise StorageUnavailable("the ledger is closed")
            self._jobs.put(job)
        return job.future

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
                self._commit_batch(batch)
            except BaseException as exc:  # the thread must outlive any one batch
                failure = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(f"writer failed: {exc!r}")
                for job in batch:
                    try:
                        job.future.set_exception(failure)
                    except InvalidStateError:
                        pass  # resolved or cancelled already
            finally:
                self._batch_started = None
            if stop:
                return
