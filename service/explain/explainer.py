"""The explanation stage: cached LLM text, else LLM text now if the budget allows, else the
template now with LLM generation queued. It describes; it never changes what is shown.

Per item of a request (all items at once)::

    in-process cache hit (still valid for today's facts) ----------------------> "cache"
    the deadline leaves >= llm_min_budget (contact center):
        shared (Redis) cache hit ----------------------------------------------> "cache"
        else one LLM call for all the misses, each text validated -------------> "llm"
        timeout, API error, breaker open, invalid text --> template now -------> "template"
                                                           + generation queued
    a tight channel (cart, PDP and POS budgets are far below any LLM call):
        miss --------------------------------------------> template now -------> "template"
                                                           + generation queued

A tight channel does no I/O here at all: not even a Redis read, since on a busy event loop
any await can cost more than its whole budget. The background worker reads Redis first (text
another replica already paid for) and calls the LLM only on a miss there.

Queued text lands in the cache, so a later request for the same (anchor, item, kind,
channel, locale) pair gets it with source ``cache``: the source names where this response's
text came from, and ``llm`` is kept for text written within the request itself.

Nothing here raises to the caller: every failure ends in a template, and is counted.
Prompts carry product facts and reason codes only (``service.explain.prompts``).

Built by ``build_explainer(settings, ...)``: an ``LlmExplainer`` when an API key (or an
``anthropic`` client) is given, else a ``TemplateExplainer``, said once in the log. Both are
started and stopped with the app: ``await explainer.start()`` / ``await explainer.aclose()``.
With a shared (Redis) cache, ``start()`` also preloads the in-process tier from it in the
background, so that text already paid for (``upsell explain warm``, other replicas) reaches
the tight channels from the first request on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from enum import Enum
from typing import Any, Final, Protocol

import anthropic
import structlog

from rules.policy import Channel
from service.explain.base import Explainer, Explanation, ExplanationRequest
from service.explain.cache import (
    AnyRedis,
    CacheKey,
    ExplanationCache,
    MemoryExplanationCache,
    RedisExplanationCache,
)
from service.explain.llm import (
    CircuitBreaker,
    ExplanationAccounting,
    LlmCallError,
    LlmClient,
    build_anthropic_client,
    call_within,
)
from service.explain.prompts import (
    PROMPT_VERSION,
    build_batch_prompt,
    build_prompt,
    parse_batch_reply,
    parse_reply,
    reply_token_limit,
)
from service.explain.queue import GenerationQueue
from service.explain.templates import template_for, template_locale
from service.explain.validation import NameIndex, Problem, Verdict, validate_explanation
from service.settings import Settings

__all__ = [
    "LlmExplainer",
    "ManagedExplainer",
    "TemplateExplainer",
    "build_explainer",
    "channel_budget_seconds",
    "parse_banned_words",
]

log = structlog.get_logger(__name__)

# Time kept back from the deadline after a cache read or an LLM call, for the templates of
# the items that missed and for returning: templates cost microseconds, 2 ms is ample.
_RESERVE_S: Final = 0.002
# How long shutdown waits for cache writes (each bounded by the cache's own timeout).
_SHUTDOWN_GRACE_S: Final = 2.0
# LLM "failures" in which no call went out: they say nothing about the pair.
_NOT_ATTEMPTED_KINDS: Final = frozenset({"breaker_open", "no_time"})
# A Redis read gets at least this long even when llm_min_budget_ms is set to 0 and the
# deadline has passed, so that a configuration cannot turn every read into a timeout.
_MIN_CACHE_READ_S: Final = 0.001


class NotAttempted(Enum):
    """What ``_generate`` returns when no call went out (breaker open, no time left)."""

    NOT_ATTEMPTED = "not_attempted"


def channel_budget_seconds(settings: Settings, channel: Channel) -> float:
    """The configured server-side budget of ``channel`` (explanation included), in seconds."""
    budget_ms = {
        "cart": settings.deadline_cart_ms,
        "pdp": settings.deadline_pdp_ms,
        "pos": settings.deadline_pos_ms,
        "contact_center": settings.deadline_contact_center_ms,
    }[channel]
    return budget_ms / 1000


def parse_banned_words(value: str) -> tuple[str, ...]:
    """``UPSELL_EXPLAIN_BANNED_WORDS`` (comma-separated) as a tuple of non-empty phrases."""
    return tuple(word.strip() for word in value.split(",") if word.strip())


class ManagedExplainer(Explainer, Protocol):
    """An ``Explainer`` with the lifecycle and counters the runtime needs."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def stats(self) -> dict[str, object]: ...


class TemplateExplainer:
    """Templates only: the explainer when no API key is set. Fast and deterministic."""

    def __init__(self, *, accounting: ExplanationAccounting | None = None) -> None:
        self.accounting = accounting or ExplanationAccounting(
            price_input_per_mtok=0.0, price_output_per_mtok=0.0
        )

    async def explain(
        self, requests: Sequence[ExplanationRequest], *, deadline: float
    ) -> list[Explanation]:
        """One template explanation per request, in order."""
        self.accounting.served["template"] += len(requests)
        return [Explanation(template_for(request), "template") for request in requests]

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def stats(self) -> dict[str, object]:
        return self.accounting.snapshot() | {
            "llm_enabled": False,
            "queue_waiting": 0,
            "queue_capacity": 0,
            "cache": "none",
            "cache_preload": "none",
            "cache_preloaded": 0,
        }


class LlmExplainer:
    """Cached or fresh LLM text within the deadline, else the template (see the module doc).

    ``catalog_names`` returns the current catalog's product names, so that LLM text naming
    another product is refused; it should return the same object while the catalog is
    unchanged (e.g. the mirrored catalog's ``names`` tuple): a new object means a new
    catalog, and its index is built once, off the event loop.
    """

    def __init__(
        self,
        *,
        llm: LlmClient,
        cache: ExplanationCache,
        accounting: ExplanationAccounting,
        max_chars: int,
        banned_words: Sequence[str],
        min_llm_budget_s: float,
        background_timeout_s: float,
        queue_size: int,
        concurrency: int,
        retry_backoff_seconds: float,
        catalog_names: Callable[[], Collection[str]] | None = None,
        queue_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._llm = llm
        self._cache = cache
        self.accounting = accounting
        self._max_chars = max_chars
        self._banned_words = tuple(banned_words)
        self._min_llm_budget_s = min_llm_budget_s
        self._background_timeout_s = background_timeout_s
        self._catalog_names = catalog_names
        self._indexed_names: Collection[str] | None = None
        self._name_index_task: asyncio.Future[NameIndex] | None = None
        self._cache_writes: set[asyncio.Task[None]] = set()
        self._abandoned_reads: set[asyncio.Future[Any]] = set()
        self._preload_task: asyncio.Task[None] | None = None
        self._preloaded: int | None = None  # entries copied from the shared tier, once done
        self._queue: GenerationQueue[tuple[ExplanationRequest, CacheKey]] = GenerationQueue(
            self._generate_in_background,
            max_size=queue_size,
            concurrency=concurrency,
            retry_backoff_seconds=retry_backoff_seconds,
            clock=queue_clock,
        )

    @property
    def breaker(self) -> CircuitBreaker:
        return self._llm.breaker

    async def start(self) -> None:
        """Start the background workers and, with a shared cache, the preload (inside the
        app's event loop); returns at once."""
        self._queue.start()
        if self._cache.shared and self._preload_task is None:
            self._preload_task = asyncio.create_task(self._preload(), name="explain-preload")

    async def preloaded(self) -> int:
        """Wait for the preload started by ``start()``; the entries it copied (0: none)."""
        if self._preload_task is not None:
            await asyncio.shield(self._preload_task)
        return self._preloaded or 0

    async def aclose(self) -> None:
        """Stop the workers, finish cache writes in flight, close what this explainer owns."""
        if self._preload_task is not None and not self._preload_task.done():
            self._preload_task.cancel()
        await self._queue.aclose()
        pending = self._cache_writes | self._abandoned_reads
        if pending:  # each is bounded by the cache's own operation timeout
            await asyncio.wait(pending, timeout=_SHUTDOWN_GRACE_S)
        if self._name_index_task is not None:
            self._name_index_task.cancel()
        await self._cache.aclose()
        await self._llm.aclose()

    async def drain(self) -> None:
        """Wait until queued generation and cache writes are done (tests, benchmarks, warm)."""
        await self._queue.join()
        while self._cache_writes:
            await asyncio.gather(*self._cache_writes, return_exceptions=True)

    async def warm(self, requests: Sequence[ExplanationRequest]) -> dict[str, int]:
        """Generate text for every request not cached yet and wait for it: the engine of
        ``upsell explain warm``. Submitted a queue's worth at a time, so that none is refused
        as ``full``; the shared tier is checked by the worker before any call, so text another
        process wrote is reused, not paid for twice.

        Returns counts: ``cached`` (valid text was there already), ``generated`` (text is
        cached now), ``failed`` (queued, but no valid text came: the LLM failed or its text
        was refused), and any other submission outcome (``breaker_open``, ``backing_off``,
        ``duplicate``) by name.
        """
        await self.preloaded()  # so that text already in Redis counts as cached
        keys = [_cache_key(request) for request in requests]
        outcomes: dict[str, int] = {"cached": 0, "generated": 0, "failed": 0}
        round_size = self._queue.capacity
        for start in range(0, len(requests), round_size):
            queued: list[tuple[ExplanationRequest, CacheKey]] = []
            for request, key in zip(
                requests[start : start + round_size], keys[start : start + round_size], strict=True
            ):
                if self._cached(self._cache.peek(key), request) is not None:
                    outcomes["cached"] += 1
                    continue
                outcome = self._queue_generation(request, key)
                if outcome == "queued":
                    queued.append((request, key))
                else:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
            await self.drain()
            for request, key in queued:
                done = self._cached(self._cache.peek(key), request) is not None
                outcomes["generated" if done else "failed"] += 1
        return outcomes

    def stats(self) -> dict[str, object]:
        preload = (
            "none"
            if self._preload_task is None
            else "done"
            if self._preload_task.done()
            else "running"
        )
        return self.accounting.snapshot(self.breaker) | {
            "llm_enabled": True,
            "queue_waiting": self._queue.waiting,
            "queue_capacity": self._queue.capacity,
            "cache": "redis" if self._cache.shared else "in-process",
            "cache_preload": preload,
            "cache_preloaded": self._preloaded or 0,
        }

    async def explain(
        self, requests: Sequence[ExplanationRequest], *, deadline: float
    ) -> list[Explanation]:
        """One explanation per request, in order, by ``deadline`` (``time.monotonic()``)."""
        if not requests:
            return []
        keys = [_cache_key(request) for request in requests]
        results: list[Explanation | None] = [
            self._cached(text, request)
            for text, request in zip((self._cache.peek(key) for key in keys), requests, strict=True)
        ]
        misses = [index for index, result in enumerate(results) if result is None]

        # Only a budget that fits an LLM call is spent on I/O: a tight channel is served from
        # the in-process tier or the template without suspending once (on a busy event loop
        # any await can cost milliseconds), and its misses are left to the background worker.
        if misses and self._fits_llm_call(deadline) and self._cache.shared:
            fetched = await self._fetch_shared([keys[i] for i in misses], deadline=deadline)
            for index, text in zip(misses, fetched, strict=True):
                results[index] = self._cached(text, requests[index])
            misses = [index for index in misses if results[index] is None]
        if misses and self._fits_llm_call(deadline):
            try:
                texts = await self._generate_many(
                    [requests[index] for index in misses],
                    [keys[index] for index in misses],
                    deadline=deadline - _RESERVE_S,
                )
            except Exception:  # a bug on this path must not fail the response: templates
                self.accounting.errors["unexpected"] += 1
                log.exception("llm_explanation_crashed")
                texts = [None] * len(misses)
            for index, generated in zip(misses, texts, strict=True):
                if isinstance(generated, str):
                    results[index] = Explanation(generated, "llm")

        explanations: list[Explanation] = []
        for index, found in enumerate(results):
            explanation = found or Explanation(template_for(requests[index]), "template")
            if found is None:
                self._queue_generation(requests[index], keys[index])
            self.accounting.record_served(explanation.source)
            explanations.append(explanation)
        return explanations

    def _fits_llm_call(self, deadline: float) -> bool:
        return deadline - time.monotonic() - _RESERVE_S >= self._min_llm_budget_s

    def _cached(self, text: str | None, request: ExplanationRequest) -> Explanation | None:
        """Cached text if it still passes: banned words or a price may have changed since."""
        if text is None:
            return None
        verdict = self._check(text, request, names=None)
        if verdict.problem is not None:
            self.accounting.rejected[f"cached_{verdict.problem.value}"] += 1
            return None
        return Explanation(text, "cache")

    async def _fetch_shared(self, keys: list[CacheKey], *, deadline: float) -> list[str | None]:
        budget = max(deadline - time.monotonic() - _RESERVE_S, _MIN_CACHE_READ_S)
        try:
            return await call_within(
                self._cache.fetch_many(keys), timeout_s=budget, abandoned=self._abandoned_reads
            )
        except TimeoutError:
            self.accounting.errors["cache_timeout"] += 1
            return [None] * len(keys)

    async def _generate(
        self, request: ExplanationRequest, key: CacheKey, *, deadline: float
    ) -> str | NotAttempted | None:
        """Validated LLM text for ``request`` by ``deadline`` (and cached), None when the
        call failed or its text was refused, NOT_ATTEMPTED when no call could be made."""
        (text,) = await self._generate_many([request], [key], deadline=deadline)
        return text

    async def _generate_many(
        self, requests: Sequence[ExplanationRequest], keys: Sequence[CacheKey], *, deadline: float
    ) -> list[str | NotAttempted | None]:
        """As ``_generate``, for the misses of one request, in one call (see
        ``service.explain.prompts`` on why one call and not one per item)."""
        count = len(requests)
        prompt = (
            build_prompt(requests[0], max_chars=self._max_chars)
            if count == 1
            else build_batch_prompt(requests, max_chars=self._max_chars)
        )
        try:
            raw = await self._llm.complete(
                prompt,
                timeout_s=deadline - time.monotonic(),
                max_tokens=reply_token_limit(self._max_chars, sentences=count),
            )
        except LlmCallError as exc:
            if exc.kind in _NOT_ATTEMPTED_KINDS:
                return [NotAttempted.NOT_ATTEMPTED] * count
            log.info("llm_explanation_failed", kind=exc.kind, detail=exc.detail, items=count)
            return [None] * count
        texts = [parse_reply(raw)] if count == 1 else parse_batch_reply(raw, count)
        try:
            names = await asyncio.wait_for(
                self._forbidden_names(), timeout=max(deadline - time.monotonic(), 0.001)
            )
        except TimeoutError:  # a new catalog still being indexed: not checkable in time
            self.accounting.errors["name_index_not_ready"] += 1
            return [None] * count
        return [
            self._accept(text, request, key, names=names)
            for text, request, key in zip(texts, requests, keys, strict=True)
        ]

    def _accept(
        self,
        text: str | None,
        request: ExplanationRequest,
        key: CacheKey,
        *,
        names: NameIndex | None,
    ) -> str | None:
        """``text`` if it passes every check (then cached), else None (refusal counted)."""
        if text is None:
            self._reject(request, Verdict(Problem.MALFORMED))
            return None
        verdict = self._check(text, request, names=names)
        if not verdict.ok:
            self._reject(request, verdict)
            return None
        self._write_to_cache(key, text)
        return text

    def _check(self, text: str, request: ExplanationRequest, *, names: NameIndex | None) -> Verdict:
        return validate_explanation(
            text,
            request,
            max_chars=self._max_chars,
            banned_words=self._banned_words,
            forbidden_names=names if names is not None else (),
        )

    def _reject(self, request: ExplanationRequest, verdict: Verdict) -> None:
        problem = verdict.problem or Problem.MALFORMED
        self.accounting.rejected[problem.value] += 1
        log.info(
            "llm_explanation_rejected",
            problem=problem.value,
            detail=verdict.detail,
            item_sku=request.item_sku,
            anchor_sku=request.anchor_sku,
        )

    def _queue_generation(self, request: ExplanationRequest, key: CacheKey) -> str:
        if self.breaker.state == "open":  # the workers could only fail: try again later
            outcome = "breaker_open"
        else:
            outcome = self._queue.submit(key, (request, key))
        self.accounting.queue[outcome] += 1
        return outcome

    async def _generate_in_background(
        self, job: tuple[ExplanationRequest, CacheKey]
    ) -> bool | None:
        """Text for a pair a request could not wait for: from the shared cache if another
        replica has it (no call), else from the LLM; either way cached for the next request."""
        request, key = job
        if self._cache.shared:
            (shared_text,) = await self._cache.fetch_many([key])
            if self._cached(shared_text, request) is not None:
                self.accounting.queue["filled_from_shared_cache"] += 1
                return True
        deadline = time.monotonic() + self._background_timeout_s
        text = await self._generate(request, key, deadline=deadline)
        if isinstance(text, NotAttempted):
            return None  # the breaker said no: not the pair's fault, no back-off
        return text is not None

    async def _preload(self) -> None:
        started = time.monotonic()
        self._preloaded = await self._cache.preload(PROMPT_VERSION)
        log.info(
            "explanation_cache_preloaded",
            entries=self._preloaded,
            seconds=round(time.monotonic() - started, 3),
            prompt_version=PROMPT_VERSION,
        )

    def _write_to_cache(self, key: CacheKey, text: str) -> None:
        # The in-process tier at once, so that the pair's job is done when its key is freed;
        # the shared write is not awaited: a Redis write must not spend the caller's budget.
        self._cache.keep(key, text)
        self._spawn(self._cache.put(key, text))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._cache_writes.add(task)
        task.add_done_callback(self._cache_writes.discard)

    async def _forbidden_names(self) -> NameIndex | None:
        if self._catalog_names is None:
            return None
        names = self._catalog_names()
        if names is not self._indexed_names or self._name_index_task is None:
            self._indexed_names = names
            # A task of its own: a caller that gives up waiting does not cancel the build.
            self._name_index_task = asyncio.ensure_future(asyncio.to_thread(NameIndex, names))
        return await asyncio.shield(self._name_index_task)


def _cache_key(request: ExplanationRequest) -> CacheKey:
    return CacheKey(
        anchor_sku=request.anchor_sku,
        item_sku=request.item_sku,
        kind=request.kind,
        channel=request.channel,
        locale=template_locale(request.locale),
        prompt_version=PROMPT_VERSION,
    )


def build_explainer(
    settings: Settings,
    *,
    redis_client: AnyRedis | None = None,
    anthropic_client: anthropic.AsyncAnthropic | None = None,
    catalog_names: Callable[[], Collection[str]] | None = None,
) -> ManagedExplainer:
    """The explainer the settings ask for; call ``await explainer.start()`` before use.

    ``anthropic_client`` (tests hand in one pointed at a local server) wins over the key in
    settings and stays the caller's to close; a client built from settings is closed by
    ``aclose()``. ``redis_client`` backs the cache (keys under ``settings.redis_prefix``), else
    the cache is in process. With neither a client nor a key: templates only, logged here once.
    """
    owns_client = anthropic_client is None
    client = anthropic_client or build_anthropic_client(settings)
    if client is None:
        log.info(
            "llm_explanations_disabled",
            reason="UPSELL_ANTHROPIC_API_KEY is not set: explanations are templates only",
        )
        return TemplateExplainer()
    accounting = ExplanationAccounting(
        price_input_per_mtok=settings.llm_price_input_per_mtok,
        price_output_per_mtok=settings.llm_price_output_per_mtok,
    )
    breaker = CircuitBreaker(
        failure_threshold=settings.llm_breaker_failures,
        cooldown_seconds=settings.llm_breaker_cooldown_seconds,
    )
    local = MemoryExplanationCache(
        max_entries=settings.explain_cache_max_entries,
        ttl_seconds=settings.explain_cache_ttl_seconds,
    )
    cache: ExplanationCache = (
        RedisExplanationCache(
            redis_client,
            prefix=settings.redis_prefix,
            ttl_seconds=settings.explain_cache_ttl_seconds,
            local=local,
        )
        if redis_client is not None
        else local
    )
    log.info(
        "llm_explanations_enabled",
        model=settings.llm_model,
        cache="redis" if redis_client is not None else "in-process",
        prompt_version=PROMPT_VERSION,
    )
    return LlmExplainer(
        llm=LlmClient(
            client,
            model=settings.llm_model,
            breaker=breaker,
            accounting=accounting,
            owns_client=owns_client,
        ),
        cache=cache,
        accounting=accounting,
        max_chars=settings.explain_max_chars,
        banned_words=parse_banned_words(settings.explain_banned_words),
        min_llm_budget_s=settings.llm_min_budget_ms / 1000,
        background_timeout_s=settings.explain_background_timeout_ms / 1000,
        queue_size=settings.explain_queue_size,
        concurrency=settings.explain_concurrency,
        retry_backoff_seconds=settings.explain_retry_backoff_seconds,
        catalog_names=catalog_names,
    )
