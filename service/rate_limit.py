"""Token buckets per API key: in Redis when the service has one, else in process.

In Redis each key's bucket is one hash, ``{<prefix>:rl:<name>}`` (hash-tagged: the script
touches one key, so it runs on Redis Cluster too), updated by one Lua script that reads the
server's clock: replicas share a bucket without trusting their own clocks. When Redis fails
(down, timing out), the request is judged by an in-process bucket instead, so a Redis outage
never turns into refused or failed calls; the fallback is logged and counted.

A round trip per request would cost more than the rest of the HTTP layer together, so each
process leases tokens: the script hands out up to ``lease_size(limit)`` tokens at once
(``per_second`` x 50 ms, at most 64 and a quarter of the burst; 1, i.e. a call per request,
for keys under 40/s) and the process spends them locally for up to a second. Tokens are taken
from the shared bucket before they are spent, so no key ever gets more than its bucket gives;
the tolerance is the unspent lease: a key may be refused while up to ``lease - 1`` of its
tokens sit unspent in each other process, and a lease spent late shifts up to that many
requests by at most ``LEASE_HOLD_SECONDS``. A refusal is remembered too: until the bucket
holds a token again (the script says when), the process answers 429 without asking.
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

# KEYS[1] the bucket; ARGV rate per second, burst, tokens wanted. Returns {tokens granted
# (0 up to the wanted count, as many whole tokens as the bucket holds), seconds until one is
# there again when none was granted}.
_TOKEN_BUCKET: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
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
local granted = math.min(want, math.floor(tokens))
local wait = 0
if granted >= 1 then
  tokens = tokens - granted
else
  granted = 0
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {granted, tostring(wait)}
"""

LEASE_SECONDS: Final = 0.05  # a lease is this much of the key's rate ...
MAX_LEASE: Final = 64  # ... at most this many tokens ...
LEASE_HOLD_SECONDS: Final = 1.0  # ... and what is unspent after this is dropped


def lease_size(limit: RateLimit) -> int:
    """Tokens a process takes from a key's shared bucket at once (see the module docstring)."""
    return max(1, min(MAX_LEASE, int(limit.per_second * LEASE_SECONDS), limit.burst // 4))


Observer = Callable[[str, float, bool], None]  # operation, seconds, failed


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int  # whole seconds, at least 1 when refused


_ALLOWED: Final = Decision(allowed=True, retry_after_s=0)


@dataclass
class _Lease:
    """What this process holds of one key's shared bucket."""

    tokens: int = 0  # leased, not yet spent
    expires: float = 0.0  # monotonic: unspent tokens are dropped then
    refused_until: float = 0.0  # monotonic: the bucket is empty until then


class _LocalBuckets:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, monotonic stamp)

    def take(self, name: str, limit: RateLimit) -> Decision:
        now = time.monotonic()
        tokens, stamp = self._buckets.get(name, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - stamp) * limit.per_second)
        if tokens >= 1:
            self._buckets[name] = (tokens - 1, now)
            return _ALLOWED
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
        self._leases: dict[str, _Lease] = {}
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
            return _ALLOWED
        if self._script is None:
            return self._local.take(name, limit)
        lease = self._leases.get(name)
        if lease is None:
            lease = self._leases[name] = _Lease()
        now = time.monotonic()
        if lease.tokens > 0 and now < lease.expires:
            lease.tokens -= 1
            return _ALLOWED
        if now < lease.refused_until:
            return _refused(lease.refused_until - now)
        started = time.perf_counter()
        try:
            granted, wait = await self._script(
                keys=[self.bucket_key(name)],
                args=[limit.per_second, limit.burst, lease_size(limit)],
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
        granted = int(granted)
        if granted >= 1:
            # Concurrent requests may each have leased while this one waited: keep all.
            now = time.monotonic()
            held = lease.tokens if now < lease.expires else 0
            lease.tokens = held + granted - 1
            lease.expires = now + LEASE_HOLD_SECONDS
            return _ALLOWED
        wait_s = float(wait)
        lease.refused_until = time.monotonic() + wait_s
        return _refused(wait_s)

    def _record(self, started: float, *, failed: bool) -> None:
        if self._observe is not None:
            self._observe("rate_limit", time.perf_counter() - started, failed)
