"""Background generation: a bounded, de-duplicated job queue drained by a few workers.

A request that cannot wait for the LLM submits the job and moves on; a worker generates the
text later and caches it, so the next request for the same pair finds it. ``submit`` never
blocks and never raises: it says what became of the job.

- bounded: at most ``max_size`` jobs wait; past that a submission is dropped (``full``), since
  a backlog of explanations nobody waits for is worth less than memory and API spend;
- de-duplicated: a key already waiting or running is not queued twice (``duplicate``);
- backing off: a key whose job failed is not queued again for ``retry_backoff_seconds``
  (``backing_off``), so a pair the model keeps getting wrong does not cost a call per request;
- ``concurrency`` workers, each running one job at a time: the limit on calls in flight.

Started and stopped with the app: ``start()`` inside the running loop, ``aclose()`` on the
way out (jobs still waiting are dropped: they are only a cache warm-up).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Final, Generic, Literal, TypeVar

import structlog

__all__ = ["GenerationQueue", "SubmitOutcome"]

log = structlog.get_logger(__name__)

JobT = TypeVar("JobT")
SubmitOutcome = Literal["queued", "duplicate", "full", "backing_off", "closed"]

# Failed keys remembered for back-off, per waiting slot: bounded memory, long enough memory.
_BACKOFF_KEYS_PER_SLOT: Final = 4
_SHUTDOWN_GRACE_S: Final = 2.0


class GenerationQueue(Generic[JobT]):
    """Jobs keyed for de-duplication. ``handler(job)`` returns True (done), False (failed:
    the key backs off) or None (not attempted, e.g. the breaker is open: no back-off)."""

    def __init__(
        self,
        handler: Callable[[JobT], Awaitable[bool | None]],
        *,
        max_size: int,
        concurrency: int,
        retry_backoff_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1 or concurrency < 1:
            raise ValueError("max_size and concurrency must be at least 1")
        self._handler = handler
        self._jobs: asyncio.Queue[tuple[Hashable, JobT]] = asyncio.Queue(maxsize=max_size)
        self._concurrency = concurrency
        self._retry_backoff_seconds = retry_backoff_seconds
        self._clock = clock
        self._active_keys: set[Hashable] = set()  # waiting or running
        self._failed_until: OrderedDict[Hashable, float] = OrderedDict()
        self._max_failed_keys = max_size * _BACKOFF_KEYS_PER_SLOT
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    @property
    def capacity(self) -> int:
        """Jobs that may wait at once (``max_size``)."""
        return self._jobs.maxsize

    @property
    def running(self) -> bool:
        return bool(self._workers)

    def submit(self, key: Hashable, job: JobT) -> SubmitOutcome:
        """Queue ``job`` unless closed, full, a duplicate, or its key is backing off."""
        if self._closed:
            return "closed"
        if key in self._active_keys:
            return "duplicate"
        retry_at = self._failed_until.get(key)
        if retry_at is not None:
            if self._clock() < retry_at:
                return "backing_off"
            del self._failed_until[key]
        try:
            self._jobs.put_nowait((key, job))
        except asyncio.QueueFull:
            return "full"
        self._active_keys.add(key)
        return "queued"

    def start(self) -> None:
        """Start the workers in the running event loop (idempotent)."""
        if self._closed:
            raise RuntimeError("the queue is closed")
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._work(), name=f"explain-worker-{number}")
                for number in range(self._concurrency)
            ]

    async def join(self) -> None:
        """Wait until every job submitted so far has run (tests, benchmarks, cache warming)."""
        await self._jobs.join()

    async def aclose(self) -> None:
        """Stop the workers (a running job is cancelled) and drop the jobs still waiting.

        Waits at most ``_SHUTDOWN_GRACE_S`` for the workers: a job whose cancellation
        stalls must not hold the app's shutdown."""
        self._closed = True
        for worker in self._workers:
            worker.cancel()
        if self._workers:
            _, stalled = await asyncio.wait(self._workers, timeout=_SHUTDOWN_GRACE_S)
            if stalled:
                log.warning("explanation_workers_still_stopping", count=len(stalled))
        self._workers = []
        while not self._jobs.empty():
            self._jobs.get_nowait()
            self._jobs.task_done()
        self._active_keys.clear()

    async def _work(self) -> None:
        while True:
            key, job = await self._jobs.get()
            succeeded: bool | None = False
            try:
                succeeded = await self._handler(job)
            except Exception:  # a worker must outlive any one job; the handler logs its own
                log.exception("explanation_job_failed")
            finally:
                self._active_keys.discard(key)
                self._jobs.task_done()
            if succeeded is False:
                self._remember_failure(key)

    def _remember_failure(self, key: Hashable) -> None:
        self._failed_until[key] = self._clock() + self._retry_backoff_seconds
        self._failed_until.move_to_end(key)
        while len(self._failed_until) > self._max_failed_keys:
            self._failed_until.popitem(last=False)
