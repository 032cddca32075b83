"""The LLM client wrapper: a hard time limit per call, a circuit breaker, and the accounting.

Every call is ``AsyncAnthropic(max_retries=0).messages.create`` bounded by the time the
caller has left: the SDK's own timeout measures inactivity on the socket, not total time, and
it retries by default, so neither can hold a deadline.

The bound is ``call_within`` rather than a bare ``asyncio.wait_for``: on Python 3.11,
``wait_for`` cancels the call on timeout and then *waits for the call to finish unwinding*.
An SDK call whose cancellation stalls (seen here under load: two cancelled calls never
finished, and the worker awaiting them held shutdown for good) would hold a request past its
deadline, or the app's shutdown forever. ``call_within`` returns at the deadline whatever the
call does; the call is cancelled and left to finish on its own, tracked until it does.

Failures are classified, never raised raw::

    LlmCallError(kind)
      no_time        the caller had no time left: no call was made
      breaker_open   the breaker is open: no call was made
      timeout        no answer within the time given (the request is cancelled)
      rate_limited   429 (a ``retry-after`` header holds the breaker open that long)
      overloaded     529
      server_error   any other 5xx
      client_error   4xx other than 429: a bad key, model or request; fails every time
      connection     the connection could not be made or broke
      malformed      an answer without a text block, or a body that is not a Message

The breaker opens after ``failure_threshold`` consecutive failures (any kind above but
``no_time`` and ``breaker_open``), stays open ``cooldown_seconds``, then lets exactly one
probe through (half-open): its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

import anthropic
import structlog

from service.explain.prompts import Prompt
from service.settings import Settings

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "ExplanationAccounting",
    "LlmCallError",
    "LlmClient",
    "build_anthropic_client",
    "call_within",
]

log = structlog.get_logger(__name__)

BreakerState = Literal["closed", "open", "half_open"]

# A retry-after beyond this is treated as this: the breaker probes again and learns anew.
_MAX_HOLD_OFF_S: Final = 300.0
_HTTP_TOO_MANY_REQUESTS: Final = 429
_HTTP_OVERLOADED: Final = 529
_HTTP_SERVER_ERRORS: Final = 500
# How long shutdown waits for cancelled calls to unwind and for the HTTP client to close.
_SHUTDOWN_GRACE_S: Final = 2.0

T = TypeVar("T")


class LlmCallError(Exception):
    """An LLM call that gave no text; ``kind`` is one of the module doc's failure kinds."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


class CircuitBreaker:
    """Consecutive-failure breaker; ``clock`` is handed in so tests step time, not sleep."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        cooldown_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._failure_threshold = failure_threshold
        self._cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._consecutive_failures = 0
        self._open_until: float | None = None  # None: closed
        self._probe_in_flight = False
        self.times_opened = 0

    @property
    def state(self) -> BreakerState:
        if self._open_until is None:
            return "closed"
        if self._probe_in_flight or self._clock() >= self._open_until:
            return "half_open"
        return "open"

    def allow_call(self) -> bool:
        """Whether a call may go out now; in half-open state, True for one probe only."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        if self._open_until is not None:
            log.info("llm_breaker_closed")
        self._consecutive_failures = 0
        self._open_until = None
        self._probe_in_flight = False

    def record_failure(self, *, hold_off_seconds: float | None = None) -> None:
        """A failed call; ``hold_off_seconds`` (a 429's retry-after) opens the breaker at once."""
        self._consecutive_failures += 1
        probe_failed = self._probe_in_flight
        self._probe_in_flight = False
        hold_off = min(hold_off_seconds, _MAX_HOLD_OFF_S) if hold_off_seconds else 0.0
        if probe_failed or hold_off or self._consecutive_failures >= self._failure_threshold:
            self._open(max(self._cooldown_seconds, hold_off))

    def release_probe(self) -> None:
        """A call that ended without a verdict (cancelled): let another probe go."""
        self._probe_in_flight = False

    def _open(self, seconds: float) -> None:
        was_open = self._open_until is not None
        self._open_until = self._clock() + seconds
        if not was_open:
            self.times_opened += 1
        log.warning(
            "llm_breaker_open",
            seconds=seconds,
            consecutive_failures=self._consecutive_failures,
        )


@dataclass
class ExplanationAccounting:
    """Counters of the explanation stage, read by ``snapshot()`` (and a metrics endpoint)."""

    price_input_per_mtok: float
    price_output_per_mtok: float
    served: Counter[str] = field(default_factory=Counter)  # by source: llm, cache, template
    llm_calls: int = 0  # calls that went out (foreground and background)
    timeouts: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by failure kind, timeouts apart
    skipped_breaker_open: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # LLM text refused, by Problem
    queue: Counter[str] = field(default_factory=Counter)  # background submissions by outcome
    tokens_in: int = 0
    tokens_out: int = 0

    def record_served(self, source: str) -> None:
        self.served[source] += 1

    @property
    def cost_usd(self) -> float:
        """Estimated spend so far, from the token counts and the configured prices."""
        return (
            self.tokens_in * self.price_input_per_mtok
            + self.tokens_out * self.price_output_per_mtok
        ) / 1_000_000

    @property
    def cost_usd_per_1000_recommendations(self) -> float:
        """Spend (background generation included) per 1,000 explained items."""
        explained = sum(self.served.values())
        return self.cost_usd * 1_000 / explained if explained else 0.0

    def snapshot(self, breaker: CircuitBreaker | None = None) -> dict[str, object]:
        return {
            "served": dict(self.served),
            "llm_calls": self.llm_calls,
            "timeouts": self.timeouts,
            "errors": dict(self.errors),
            "skipped_breaker_open": self.skipped_breaker_open,
            "rejected": dict(self.rejected),
            "queue": dict(self.queue),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": round(self.cost_usd, 6),
            "cost_usd_per_1000_recommendations": round(self.cost_usd_per_1000_recommendations, 6),
            "breaker_state": breaker.state if breaker else "none",
            "breaker_times_opened": breaker.times_opened if breaker else 0,
        }


class LlmClient:
    """Messages API calls, each bounded in time, guarded by the breaker and counted.

    The ``AsyncAnthropic`` client is handed in (tests point one at a local server); a copy
    with ``max_retries=0`` is used whatever the original's setting. The copy shares the
    original's connection pool, which stays the caller's to close unless ``owns_client``.
    """

    def __init__(
        self,
        client: anthropic.AsyncAnthropic,
        *,
        model: str,
        breaker: CircuitBreaker,
        accounting: ExplanationAccounting,
        owns_client: bool = False,
    ) -> None:
        self._client = client.with_options(max_retries=0)
        self._original_client = client
        self._owns_client = owns_client
        self._model = model
        self.breaker = breaker
        self._accounting = accounting
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def complete(self, prompt: Prompt, *, timeout_s: float, max_tokens: int) -> str:
        """The reply's text, within ``timeout_s`` seconds, or ``LlmCallError``."""
        if timeout_s <= 0:
            raise LlmCallError("no_time", "no time left for a call")
        if not self.breaker.allow_call():
            self._accounting.skipped_breaker_open += 1
            raise LlmCallError("breaker_open", "no call made")
        self._accounting.llm_calls += 1
        try:
            message = await call_within(
                self._client.messages.create(
                    model=self._model,
                    max_tokens=max_tokens,
                    system=prompt.system,
                    messages=[{"role": "user", "content": prompt.user}],
                ),
                timeout_s=timeout_s,
                abandoned=self._abandoned,
            )
        except TimeoutError:
            self._accounting.timeouts += 1
            self.breaker.record_failure()
            raise LlmCallError("timeout", f"no answer within {timeout_s:.3f} s") from None
        except anthropic.APIStatusError as exc:
            kind = _status_kind(exc.status_code)
            hold_off = _retry_after_seconds(exc) if kind == "rate_limited" else None
            self._fail(kind, hold_off_seconds=hold_off)
            raise LlmCallError(kind, f"HTTP {exc.status_code}") from None
        except anthropic.APIConnectionError as exc:
            self._fail("connection")
            raise LlmCallError("connection", type(exc).__name__) from None
        except (anthropic.APIError, ValueError) as exc:  # a body that is not JSON, or not a Message
            self._fail("malformed")
            raise LlmCallError("malformed", type(exc).__name__) from None
        except asyncio.CancelledError:
            self.breaker.release_probe()
            raise
        self._count_usage(message)
        text = _text_of(message)
        if text is None:
            self._fail("malformed")
            raise LlmCallError("malformed", "no text block in the answer")
        self.breaker.record_success()
        return text

    async def aclose(self) -> None:
        """Let abandoned calls finish unwinding (briefly), then close the HTTP client if this
        wrapper built it (``owns_client``)."""
        if self._abandoned:
            await asyncio.wait(set(self._abandoned), timeout=_SHUTDOWN_GRACE_S)
            if self._abandoned:
                log.warning("llm_calls_still_unwinding", count=len(self._abandoned))
        if self._owns_client:
            await call_within(
                self._original_client.close(),
                timeout_s=_SHUTDOWN_GRACE_S,
                abandoned=self._abandoned,
            )

    def _fail(self, kind: str, *, hold_off_seconds: float | None = None) -> None:
        self._accounting.errors[kind] += 1
        self.breaker.record_failure(hold_off_seconds=hold_off_seconds)

    def _count_usage(self, message: object) -> None:
        usage = getattr(message, "usage", None)
        input_tokens = getattr(usage, "input_tokens", None)
        output_tokens = getattr(usage, "output_tokens", None)
        self._accounting.tokens_in += input_tokens if isinstance(input_tokens, int) else 0
        self._accounting.tokens_out += output_tokens if isinstance(output_tokens, int) else 0


async def call_within(
    awaitable: Awaitable[T], *, timeout_s: float, abandoned: set[asyncio.Future[Any]]
) -> T:
    """``awaitable``'s result within ``timeout_s`` seconds, else ``TimeoutError`` at once.

    On timeout (or when the caller is cancelled) the awaitable is cancelled but not waited
    for: it goes into ``abandoned`` until it has finished unwinding, so that it is neither
    garbage-collected mid-flight nor reported as a never-retrieved exception.
    """
    call = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({call}, timeout=timeout_s)
    except asyncio.CancelledError:
        _abandon(call, abandoned)
        raise
    if not done:
        _abandon(call, abandoned)
        raise TimeoutError
    return call.result()


def _abandon(call: asyncio.Future[Any], abandoned: set[asyncio.Future[Any]]) -> None:
    call.cancel()
    abandoned.add(call)

    def forget(finished: asyncio.Future[Any]) -> None:
        abandoned.discard(finished)
        if not finished.cancelled():
            finished.exception()  # retrieved: its outcome no longer matters to anyone

    call.add_done_callback(forget)


def build_anthropic_client(settings: Settings) -> anthropic.AsyncAnthropic | None:
    """A client from settings, or None when no API key is set (templates only).

    The key is always passed explicitly, so the SDK never goes looking for credentials in the
    environment or on disk. Its own timeout is only a backstop (the background budget): the
    real limit is ``call_within`` around each call.
    """
    if settings.anthropic_api_key is None:
        return None
    return anthropic.AsyncAnthropic(
        api_key=settings.anthropic_api_key.get_secret_value(),
        base_url=settings.anthropic_base_url,
        max_retries=0,
        timeout=settings.explain_background_timeout_ms / 1000,
    )


def _status_kind(status_code: int) -> str:
    if status_code == _HTTP_TOO_MANY_REQUESTS:
        return "rate_limited"
    if status_code == _HTTP_OVERLOADED:
        return "overloaded"
    if status_code >= _HTTP_SERVER_ERRORS:
        return "server_error"
    return "client_error"


def _retry_after_seconds(exc: anthropic.APIStatusError) -> float | None:
    header = exc.response.headers.get("retry-after")
    try:
        seconds = float(header) if header is not None else None
    except ValueError:  # an HTTP date: rare from this API, and the cool-down covers it
        return None
    return seconds if seconds is not None and seconds > 0 else None


def _text_of(message: object) -> str | None:
    """The text blocks of an answer, joined; None when it has none (or is not a Message).

    Read defensively: the SDK builds the Message without validating it, so a malformed body
    can lack ``content`` or hold blocks of other types.
    """
    content = getattr(message, "content", None)
    if not isinstance(content, list):
        return None
    texts = [
        block.text
        for block in content
        if getattr(block, "type", None) == "text" and isinstance(getattr(block, "text", None), str)
    ]
    return "".join(texts) if texts else None
