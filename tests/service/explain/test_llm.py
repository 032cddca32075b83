"""The circuit breaker, the call time limit, and the settings helpers of the explanation stage."""

from __future__ import annotations

import asyncio
from typing import Any

from service.explain.explainer import channel_budget_seconds, parse_banned_words
from service.explain.llm import CircuitBreaker, ExplanationAccounting, call_within
from tests.service.explain.builders import run, settings


def breaker_at(now: list[float], *, threshold: int = 3) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=threshold, cooldown_seconds=30, clock=lambda: now[0])


def test_breaker_opens_after_consecutive_failures_only() -> None:
    """A success resets the count; the threshold-th consecutive failure opens it."""
    now = [0.0]
    breaker = breaker_at(now)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert (breaker.state, breaker.allow_call()) == ("closed", True)
    breaker.record_failure()
    assert (breaker.state, breaker.allow_call(), breaker.times_opened) == ("open", False, 1)


def test_half_open_lets_one_probe_through_and_its_failure_reopens() -> None:
    """After the cool-down one call may go; while it runs others wait; a failure reopens."""
    now = [0.0]
    breaker = breaker_at(now, threshold=1)
    breaker.record_failure()
    now[0] = 29.9
    assert breaker.allow_call() is False
    now[0] = 30.0
    half_open: str = breaker.state
    assert half_open == "half_open"
    assert [breaker.allow_call(), breaker.allow_call()] == [True, False]
    breaker.record_failure()
    reopened: str = breaker.state
    assert reopened == "open"
    now[0] = 60.0
    assert breaker.allow_call() is True
    breaker.record_success()
    assert breaker.state == "closed"


def test_cancelled_probe_frees_the_slot() -> None:
    """A probe that ended without a verdict lets the next call probe."""
    now = [0.0]
    breaker = breaker_at(now, threshold=1)
    breaker.record_failure()
    now[0] = 30.0
    assert breaker.allow_call() is True
    breaker.release_probe()
    assert breaker.allow_call() is True


def test_retry_after_holds_the_breaker_open_that_long() -> None:
    """One 429 with retry-after 120 s opens the breaker for 120 s, past the cool-down."""
    now = [0.0]
    breaker = breaker_at(now)
    breaker.record_failure(hold_off_seconds=120)
    now[0] = 119.0
    states: list[str] = [breaker.state]
    now[0] = 120.0
    states.append(breaker.state)
    assert states == ["open", "half_open"]


def test_cost_per_thousand_recommendations() -> None:
    """Cost is tokens x price per MTok, spread over every explained item."""
    accounting = ExplanationAccounting(price_input_per_mtok=1.0, price_output_per_mtok=5.0)
    accounting.tokens_in, accounting.tokens_out = 400_000, 20_000
    for source in ["llm"] * 100 + ["template"] * 300:
        accounting.record_served(source)
    assert accounting.cost_usd == 0.5
    assert accounting.cost_usd_per_1000_recommendations == 1.25


def test_channel_budgets_default_to_the_design() -> None:
    """Cart and PDP 25 ms, POS 15 ms, contact center 1.5 s."""
    config = settings()
    budgets = {
        channel: channel_budget_seconds(config, channel)
        for channel in ("cart", "pdp", "pos", "contact_center")
    }
    assert budgets == {"cart": 0.025, "pdp": 0.025, "pos": 0.015, "contact_center": 1.5}


def test_banned_words_parse_from_a_comma_separated_setting() -> None:
    """Blanks and empty entries are ignored."""
    assert parse_banned_words(" guaranteed, risk-free ,,cure ") == (
        "guaranteed",
        "risk-free",
        "cure",
    )


def test_call_within_returns_at_the_deadline_even_if_the_call_will_not_stop() -> None:
    """A call that ignores its cancellation is abandoned at the timeout, not waited for; it
    stays tracked until it finally ends."""

    async def scenario() -> tuple[bool, int, int]:
        release = asyncio.Event()

        async def stubborn() -> str:
            while True:
                try:
                    await release.wait()
                    return "late"
                except asyncio.CancelledError:
                    continue  # a call whose cancellation stalls

        abandoned: set[asyncio.Future[Any]] = set()
        try:
            await call_within(stubborn(), timeout_s=0.01, abandoned=abandoned)
            timed_out = False
        except TimeoutError:
            timed_out = True
        still_running = len(abandoned)
        release.set()
        while abandoned:
            await asyncio.sleep(0)
        return timed_out, still_running, len(abandoned)

    assert run(scenario()) == (True, 1, 0)


def test_call_within_passes_results_and_errors_through() -> None:
    """In time, the call's result or exception is the caller's."""

    async def fails() -> str:
        raise ValueError("from the call")

    async def answers() -> str:
        return "text"

    async def scenario() -> tuple[str, str]:
        abandoned: set[asyncio.Future[Any]] = set()
        result = await call_within(answers(), timeout_s=1.0, abandoned=abandoned)
        try:
            await call_within(fails(), timeout_s=1.0, abandoned=abandoned)
        except ValueError as exc:
            return result, str(exc)
        return result, "no error"

    assert run(scenario()) == ("text", "from the call")
