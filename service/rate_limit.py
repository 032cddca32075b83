"""Token buckets per API key: in Redis when the service has one, else in process.

In Redis each key's bucket is one hash, ``{<prefix>:rl:<name>}`` (hash-tagged: the script
touches one key, so it runs on Redis Cluster too), updated by one Lua script that reads the
server's clock: replicas share a bucket without trusting their own clocks. When Redis fails
(down, timing out), the request is judged by an in-process bucket instead, so a Redis outage
never turns into refused or failed calls; the fallback is logged and counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog
from redis.exceptions import RedisClusterException, RedisError

from service.api_keys import RateLimit
from service.explain.cache import AnyRedis

__all__ = ["Decision", "RateLimiter"]

log = structlog.get_logger(__name__)

# KEYS[1] the bucket; ARGV rate per second, burst. Returns {allowed 0/1, seconds to wait}.
_TOKEN_BUCKET: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""

Observer = Callable[[str, float, bool], None]  # operation, seconds, failed


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int  # whole seconds, at least 1 when refused


class _LocalBuckets:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, monotonic stamp)

    def take(self, name: str, limit: RateLimit) -> Decision:
        now = time.monotonic()
        tokens, stamp = self._buckets.get(name, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - stamp) * limit.per_second)
        if tokens >= 1:
            self._buckets[name] = (tokens - 1, now)
            return Decision(allowed=True, retry_after_s=0)
        self._buckets[name] = (tokens, now)
        return _refused((1 - tokens) / limit.per_second)


def _refused(wait_s: float) -> Decision:
    return Decision(allowed=False, retry_after_s=max(1, math.ceil(wait_s)))


class RateLimiter:
    """``take(name, limit)``: one token from the key's bucket, or how long to wait."""

    def __init__(
        self,
        *,
        redis: AnyRedis | None,
        prefix: str = "upsell",
        observe: Observer | None = None,
        on_fallback: Callable[[], None] | None = None,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._script = redis.register_script(_TOKEN_BUCKET) if redis is not None else None
        self._local = _LocalBuckets()
        self._observe = observe
        self._on_fallback = on_fallback
        self._redis_failing = False

    @property
    def backend(self) -> str:
        return "redis" if self._redis is not None else "in-process"

    def bucket_key(self, name: str) -> str:
        return f"{{{self._prefix}:rl:{name}}}"

    async def take(self, name: str, limit: RateLimit) -> Decision:
        if limit.per_second <= 0:
            return Decision(allowed=True, retry_after_s=0)
        if self._script is None:
            return self._local.take(name, limit)
        started = time.perf_counter()
        try:
            allowed, wait = await self._script(
                keys=[self.bucket_key(name)], args=[limit.per_second, limit.burst]
            )
        except (RedisError, RedisClusterException, OSError) as exc:
            self._record(started, failed=True)
            if not self._redis_failing:
                self._redis_failing = True
                log.warning(
                    "rate_limit_fallback",
                    reason=f"{type(exc).__name__}: {str(exc)[:200]}",
                    effect="keys are limited per process until Redis answers again",
                )
            if self._on_fallback is not None:
                self._on_fallback()
            return self._local.take(name, limit)
        self._record(started, failed=False)
        if self._redis_failing:
            self._redis_failing = False
            log.info("rate_limit_redis_back")
        if int(allowed) == 1:
            return Decision(allowed=True, retry_after_s=0)
        return _refused(float(wait))

    def _record(self, started: float, *, failed: bool) -> None:
        if self._observe is not None:
            self._observe("rate_limit", time.perf_counter() - started, failed)
