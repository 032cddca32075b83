"""The background generation queue: bounded, de-duplicated, backing off failed keys."""

from __future__ import annotations

import asyncio

from service.explain.queue import GenerationQueue, SubmitOutcome
from tests.service.explain.builders import run


def test_duplicates_are_refused_while_waiting_and_full_queue_drops() -> None:
    """A key already queued is a duplicate; past max_size a new key is dropped."""

    async def scenario() -> tuple[list[SubmitOutcome], list[str]]:
        done: list[str] = []

        async def handler(job: str) -> bool:
            done.append(job)
            return True

        queue: GenerationQueue[str] = GenerationQueue(
            handler, max_size=2, concurrency=1, retry_backoff_seconds=60
        )
        outcomes = [queue.submit(k, k) for k in ("a", "a", "b", "c")]
        queue.start()
        await queue.join()
        await queue.aclose()
        return outcomes, done

    outcomes, done = run(scenario())
    assert outcomes == ["queued", "duplicate", "queued", "full"]
    assert done == ["a", "b"]


def test_a_failed_key_backs_off_and_an_unattempted_one_does_not() -> None:
    """False from the handler holds its key back for the back-off; None (not attempted) and
    success leave it free to queue again."""
    now = [0.0]

    async def scenario() -> list[SubmitOutcome]:
        results = {"fails": False, "skipped": None, "works": True}

        async def handler(job: str) -> bool | None:
            return results[job]

        queue: GenerationQueue[str] = GenerationQueue(
            handler, max_size=10, concurrency=2, retry_backoff_seconds=60, clock=lambda: now[0]
        )
        queue.start()
        for job in results:
            queue.submit(job, job)
        await queue.join()
        again = [queue.submit(job, job) for job in results]
        await queue.join()
        now[0] = 60.0
        again.append(queue.submit("fails", "fails"))
        await queue.join()
        await queue.aclose()
        return again

    assert run(scenario()) == ["backing_off", "queued", "queued", "queued"]


def test_concurrency_limits_jobs_in_flight_and_a_crashing_job_spares_the_worker() -> None:
    """No more than ``concurrency`` jobs run at once; an exception fails only its job."""

    async def scenario() -> tuple[int, list[str]]:
        running, most, finished = 0, 0, []
        release = asyncio.Event()

        async def handler(job: str) -> bool:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                if job == "boom":
                    raise RuntimeError("a bug in one job")
                await release.wait()
                finished.append(job)
                return True
            finally:
                running -= 1

        queue: GenerationQueue[str] = GenerationQueue(
            handler, max_size=10, concurrency=2, retry_backoff_seconds=60
        )
        queue.start()
        for job in ("boom", "a", "b", "c", "d"):
            queue.submit(job, job)
        await asyncio.sleep(0)  # let the workers pick up jobs; they block on the event
        release.set()
        await queue.join()
        await queue.aclose()
        return most, finished

    most, finished = run(scenario())
    assert most == 2
    assert sorted(finished) == ["a", "b", "c", "d"]


def test_close_drops_waiting_jobs_and_refuses_new_ones() -> None:
    """After aclose nothing runs and submit says closed."""

    async def scenario() -> tuple[list[str], str]:
        done: list[str] = []

        async def handler(job: str) -> bool:
            done.append(job)
            return True

        queue: GenerationQueue[str] = GenerationQueue(
            handler, max_size=10, concurrency=1, retry_backoff_seconds=60
        )
        queue.submit("never", "never")
        await queue.aclose()
        await queue.join()  # returns: dropped jobs count as done
        return done, queue.submit("late", "late")

    assert run(scenario()) == ([], "closed")
