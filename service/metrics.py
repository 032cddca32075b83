"""Prometheus metrics of one app (``GET /metrics``).

Each app has its own registry (tests build many apps in one process). With several uvicorn
workers, set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before they start (``upsell
serve --workers N`` makes one when it is unset): each worker writes its samples there and a
scrape of any worker adds them all up (prometheus_client's multiprocess mode). Gauges then
report the largest value any live worker set.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable
from typing import Final, Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE_LATEST", "Labelled", "Metrics"]

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# Channel budgets are 15-25 ms (contact center 1.5 s): resolution where they are.
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0,
    1.5, 2.5, 5.0,
)  # fmt: skip
_REDIS_BUCKETS: Final = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


_Metric = TypeVar("_Metric", Counter, Histogram, Gauge)


class Labelled(Generic[_Metric]):
    """``metric.labels(*values)`` looked up once per label set, then from a dict.

    prometheus_client's ``labels()`` takes a lock and builds its key on every call (a few µs,
    several times a request); the children it returns live as long as the metric, so they
    can be kept. Label sets are bounded (route templates, channels, statuses, key names).
    """

    def __init__(self, metric: _Metric) -> None:
        self.metric: _Metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


def multiprocess_dir() -> str | None:
    """prometheus_client's own switch (it reads the variable itself, at import)."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """The service's metrics, registered in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.request_seconds = Histogram(
            "upsell_http_request_duration_seconds",
            "Server-side time of an HTTP request, by route template and channel.",
            ["route", "method", "channel"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "upsell_http_requests",
            "HTTP requests answered, by route template, channel and status code.",
            ["route", "method", "channel", "status"],
            registry=registry,
        )
        self.candidates = Counter(
            "upsell_candidates_generated",
            "Candidates the generators proposed (before the rules), by channel.",
            ["channel"],
            registry=registry,
        )
        self.dropped = Counter(
            "upsell_candidates_dropped",
            "Candidates a rule removed, by channel and the rule's reason code.",
            ["channel", "rule"],
            registry=registry,
        )
        self.explanations = Counter(
            "upsell_explanations",
            "Explanations served, by channel and source (template, cache, llm).",
            ["channel", "source"],
            registry=registry,
        )
        self.redis_seconds = Histogram(
            "upsell_redis_operation_duration_seconds",
            "Time of a Redis operation (snapshot store, rate limiter), by operation.",
            ["operation"],
            buckets=_REDIS_BUCKETS,
            registry=registry,
        )
        self.redis_errors = Counter(
            "upsell_redis_errors",
            "Redis operations that failed (error or timeout), by operation.",
            ["operation"],
            registry=registry,
        )
        self.snapshot_age = Gauge(
            "upsell_snapshot_age_seconds",
            "Age of the served snapshot's as_of, as of the last request or scrape.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.versions = Gauge(
            "upsell_versions_info",
            "1 for the model, snapshot and policy versions being served; 0 for ones served before.",
            ["model", "snapshot", "policy"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.rate_limited = Counter(
            "upsell_rate_limited",
            "Requests refused with 429, by key name.",
            ["key"],
            registry=registry,
        )
        self.rate_limit_fallbacks = Counter(
            "upsell_rate_limit_fallbacks",
            "Rate-limit decisions taken in process because Redis failed.",
            registry=registry,
        )
        self.auth_failures = Counter(
            "upsell_auth_failures",
            "Requests refused by authentication or authorization, by reason.",
            ["reason"],
            registry=registry,
        )
        self.api_keys_reloads = Counter(
            "upsell_api_keys_reloads",
            "Changed keys files loaded while serving (reloaded) or refused as bad (refused).",
            ["outcome"],
            registry=registry,
        )
        self._versions_shown: tuple[str, str, str] | None = None
        # The series labelled on every request, through the cache.
        self.request_seconds_of = Labelled(self.request_seconds)
        self.requests_of = Labelled(self.requests)
        self._candidates_of = Labelled(self.candidates)
        self._dropped_of = Labelled(self.dropped)
        self._explanations_of = Labelled(self.explanations)
        self._redis_seconds_of = Labelled(self.redis_seconds)

    def observe_redis(self, operation: str, seconds: float, failed: bool) -> None:
        self._redis_seconds_of(operation).observe(seconds)
        if failed:
            self.redis_errors.labels(operation).inc()

    def observe_recommendation(
        self,
        *,
        channel: str,
        candidates: int,
        dropped_by_rule: dict[str, int],
        explanation_sources: Iterable[str],
    ) -> None:
        self._candidates_of(channel).inc(candidates)
        for rule, count in dropped_by_rule.items():
            if count:
                self._dropped_of(channel, rule).inc(count)
        # Counted first: each inc of a multiprocess series takes a lock and checks the pid,
        # and a response's items mostly share one source.
        for source, count in collections.Counter(explanation_sources).items():
            self._explanations_of(channel, source).inc(count)

    def show_versions(self, model: str, snapshot: str, policy: str) -> None:
        shown = (model, snapshot, policy)
        if shown == self._versions_shown:
            return
        if self._versions_shown is not None:
            self.versions.labels(*self._versions_shown).set(0)
        self.versions.labels(*shown).set(1)
        self._versions_shown = shown

    def exposition(self) -> bytes:
        """The text format: this app's registry, or every worker's files in multiprocess mode."""
        if multiprocess_dir() is not None:
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # untyped in 0.2x
            return generate_latest(merged)
        return generate_latest(self.registry)
