"""The explanation cache: text by (anchor sku, item sku, kind, channel, locale, prompt version).

Two backends behind one protocol:

- ``MemoryExplanationCache``: in-process LRU with a TTL; the cache when no Redis is configured,
  and the front tier of the Redis one.
- ``RedisExplanationCache``: a ``redis.asyncio`` client handed in, one ``STRING`` per key with
  the TTL as its expiry, shared by every replica, behind the in-process LRU.

The two tiers are read separately on purpose: ``peek`` (in process, never suspends) is all a
tight channel reads on its request path, while ``fetch_many`` (Redis) is read where time
allows: on a contact-center request, and by the background worker before it calls the LLM,
so that a replica picks up text another replica paid for without a call of its own.

Since a tight channel never reads Redis, a replica starting up ``preload``s the in-process
tier from Redis (in the background, at most the tier's size, each entry with the TTL it has
left): text written by ``upsell explain warm`` or by other replicas is then served from the
first request on, with source ``cache``.

Key layout (``<p>`` is the prefix handed in; each part percent-encoded so that a SKU holding
``:`` cannot collide with another key)::

    <p>:explain:<prompt version>:<channel>:<locale>:<kind>:<anchor sku or ->:<item sku>

The cache is an optimisation and never an error: a Redis failure reads as a miss (and a lost
write), and is logged.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import quote, unquote

import redis.asyncio
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

__all__ = [
    "CacheKey",
    "ExplanationCache",
    "MemoryExplanationCache",
    "RedisExplanationCache",
]

log = structlog.get_logger(__name__)

_NO_ANCHOR: Final = "-"
_KEY_PARTS: Final = 6
# Keys read per round trip while preloading: large enough to amortise the round trip, small
# enough that decoding one batch never holds the event loop for more than about a millisecond.
_PRELOAD_BATCH: Final = 500

AnyRedis = redis.asyncio.Redis | RedisCluster


@dataclass(frozen=True)
class CacheKey:
    anchor_sku: str | None
    item_sku: str
    kind: str
    channel: str
    locale: str
    prompt_version: str

    def render(self, prefix: str) -> str:
        parts = (
            self.prompt_version,
            self.channel,
            self.locale,
            self.kind,
            self.anchor_sku or _NO_ANCHOR,
            self.item_sku,
        )
        return ":".join([prefix, "explain", *(quote(part, safe="") for part in parts)])

    @classmethod
    def parse(cls, rendered: str, prefix: str) -> CacheKey | None:
        """The key ``render(prefix)`` gave ``rendered``; None for a string of another shape."""
        head = f"{prefix}:explain:"
        if not rendered.startswith(head):
            return None
        parts = rendered[len(head) :].split(":")
        if len(parts) != _KEY_PARTS:
            return None
        version, channel, locale, kind, anchor, item = (unquote(part) for part in parts)
        return cls(
            anchor_sku=None if anchor == _NO_ANCHOR else anchor,
            item_sku=item,
            kind=kind,
            channel=channel,
            locale=locale,
            prompt_version=version,
        )

    @staticmethod
    def pattern(prefix: str, prompt_version: str) -> str:
        """A SCAN pattern matching every key of ``prompt_version`` under ``prefix``."""
        escaped = "".join(f"\\{char}" if char in "*?[]\\" else char for char in prefix)
        return f"{escaped}:explain:{quote(prompt_version, safe='')}:*"


class ExplanationCache(Protocol):
    """Two tiers: in process (``peek``, no I/O) and, optionally, shared (``fetch_many``)."""

    @property
    def shared(self) -> bool:
        """Whether a tier beyond this process exists (``fetch_many`` then does I/O)."""
        ...

    def peek(self, key: CacheKey) -> str | None:
        """The in-process tier's text for ``key``: never suspends, never does I/O."""
        ...

    async def fetch_many(self, keys: Sequence[CacheKey]) -> list[str | None]:
        """The shared tier's text for each key (kept in process too); all None without one."""
        ...

    def keep(self, key: CacheKey, text: str) -> None:
        """Store ``text`` in the in-process tier now (no I/O): a request arriving before the
        shared write lands must already find it, or it would queue the pair again."""
        ...

    async def put(self, key: CacheKey, text: str) -> None:
        """Store ``text`` under ``key`` in every tier, for the cache's TTL."""
        ...

    async def preload(self, prompt_version: str) -> int:
        """Copy the shared tier's entries of ``prompt_version`` into the in-process tier
        (at most its size); the number copied. Nothing to do without a shared tier."""
        ...

    async def aclose(self) -> None: ...


class MemoryExplanationCache:
    """In-process LRU, at most ``max_entries`` entries, each expiring ``ttl_seconds`` after
    it was written. ``clock`` is handed in so that tests can step time instead of sleeping."""

    def __init__(
        self,
        *,
        max_entries: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._entries: OrderedDict[CacheKey, tuple[float, str]] = OrderedDict()
        self._max_entries = max_entries
        self._ttl_seconds = ttl_seconds
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def shared(self) -> bool:
        return False

    def peek(self, key: CacheKey) -> str | None:
        return self.get(key)

    def get(self, key: CacheKey) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, text = entry
        if expires_at <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return text

    async def fetch_many(self, keys: Sequence[CacheKey]) -> list[str | None]:
        return [None] * len(keys)  # no tier beyond this one

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def set(self, key: CacheKey, text: str, *, ttl_seconds: float | None = None) -> None:
        """Keep ``text`` for ``ttl_seconds`` (default: the cache's TTL)."""
        ttl = self._ttl_seconds if ttl_seconds is None else min(ttl_seconds, self._ttl_seconds)
        self._entries[key] = (self._clock() + ttl, text)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def keep(self, key: CacheKey, text: str) -> None:
        self.set(key, text)

    async def put(self, key: CacheKey, text: str) -> None:
        self.set(key, text)

    async def preload(self, prompt_version: str) -> int:
        return 0  # this tier is the only one

    async def aclose(self) -> None:
        self._entries.clear()


class RedisExplanationCache:
    """Redis-backed, with an in-process LRU in front; the client is the caller's to close.

    Writes go to both tiers; ``fetch_many`` is one ``MGET`` (on Redis Cluster, one per slot:
    the keys have no hash tag, so that they spread over the masters) and keeps what it finds
    in the LRU. Each Redis command is bounded by ``operation_timeout_s`` whatever the client's
    own settings: a paused or wedged Redis must not hold a background write (or shutdown,
    which waits for writes) forever.
    """

    def __init__(
        self,
        client: AnyRedis,
        *,
        prefix: str,
        ttl_seconds: int,
        local: MemoryExplanationCache,
        operation_timeout_s: float = 0.5,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_seconds = ttl_seconds
        self._local = local
        self._operation_timeout_s = operation_timeout_s

    @property
    def shared(self) -> bool:
        return True

    def peek(self, key: CacheKey) -> str | None:
        return self._local.get(key)

    async def fetch_many(self, keys: Sequence[CacheKey]) -> list[str | None]:
        if not keys:
            return []
        rendered = [key.render(self._prefix) for key in keys]
        try:
            values = await asyncio.wait_for(
                self._client.mget_nonatomic(rendered)
                if isinstance(self._client, RedisCluster)
                else self._client.mget(rendered),
                timeout=self._operation_timeout_s,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("explanation_cache_read_failed", error=repr(exc))
            return [None] * len(keys)
        found: list[str | None] = []
        for key, value in zip(keys, values, strict=True):
            text = value.decode() if isinstance(value, bytes) else value
            if isinstance(text, str):
                self._local.set(key, text)
                found.append(text)
            else:
                found.append(None)
        return found

    def keep(self, key: CacheKey, text: str) -> None:
        self._local.set(key, text)

    async def put(self, key: CacheKey, text: str) -> None:
        self._local.set(key, text)
        try:
            await asyncio.wait_for(
                self._client.set(key.render(self._prefix), text.encode(), ex=self._ttl_seconds),
                timeout=self._operation_timeout_s,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("explanation_cache_write_failed", error=repr(exc))

    async def preload(self, prompt_version: str) -> int:
        """SCAN the keys of ``prompt_version``, then GET each with its remaining TTL, in
        batches; stops at the local tier's size. A Redis failure ends it early (logged)."""
        loaded = 0
        batch: list[str] = []
        try:
            async for raw in self._client.scan_iter(
                match=CacheKey.pattern(self._prefix, prompt_version), count=_PRELOAD_BATCH
            ):
                batch.append(raw.decode() if isinstance(raw, bytes) else str(raw))
                if len(batch) >= _PRELOAD_BATCH:
                    loaded += await self._load(batch, limit=self._local.max_entries - loaded)
                    batch = []
                    if loaded >= self._local.max_entries:
                        return loaded
            if batch:
                loaded += await self._load(batch, limit=self._local.max_entries - loaded)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("explanation_cache_preload_failed", error=repr(exc), loaded=loaded)
        return loaded

    async def _load(self, rendered: list[str], *, limit: int) -> int:
        async with self._client.pipeline(transaction=False) as pipe:
            for name in rendered:
                pipe.get(name)
                pipe.pttl(name)
            replies = await asyncio.wait_for(pipe.execute(), timeout=self._operation_timeout_s)
        loaded = 0
        for name, value, ttl_ms in zip(rendered, replies[::2], replies[1::2], strict=True):
            key = CacheKey.parse(name, self._prefix)
            text = value.decode() if isinstance(value, bytes) else value
            # A key that expired between SCAN and GET reads None; one without a TTL (-1) was
            # not written by this cache and is left alone.
            if key is None or not isinstance(text, str) or not isinstance(ttl_ms, int):
                continue
            if ttl_ms <= 0 or loaded >= limit:
                continue
            self._local.set(key, text, ttl_seconds=ttl_ms / 1000)
            loaded += 1
        return loaded

    async def aclose(self) -> None:
        # The client belongs to whoever handed it in; only the local tier is ours.
        await self._local.aclose()
