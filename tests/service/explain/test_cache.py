"""The explanation cache: keys, in-process LRU and TTL, Redis with a local front tier."""

from __future__ import annotations

import asyncio

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.explain.cache import CacheKey, MemoryExplanationCache, RedisExplanationCache
from tests.conftest import RedisClientFactory, RedisClusterClientFactory
from tests.service.explain.builders import run


def key(item: str = "21733", *, anchor: str | None = "85123A", version: str = "v1") -> CacheKey:
    return CacheKey(
        anchor_sku=anchor,
        item_sku=item,
        kind="cross_sell",
        channel="cart",
        locale="en",
        prompt_version=version,
    )


def test_key_names_every_part_and_escapes_separators() -> None:
    """A SKU holding ':' cannot collide with another key; no anchor reads '-'."""
    assert key().render("p") == "p:explain:v1:cart:en:cross_sell:85123A:21733"
    assert key(anchor=None).render("p") == "p:explain:v1:cart:en:cross_sell:-:21733"
    assert key("a:b", anchor="c").render("p") != key("b", anchor="c:a").render("p")
    assert key(version="v2").render("p") != key().render("p")


def test_memory_cache_expires_entries_after_the_ttl() -> None:
    """An entry is served until its TTL passes, then it is a miss."""
    now = [0.0]
    cache = MemoryExplanationCache(max_entries=10, ttl_seconds=60, clock=lambda: now[0])
    cache.set(key(), "text")
    now[0] = 59.9
    assert cache.get(key()) == "text"
    now[0] = 60.0
    assert cache.get(key()) is None
    assert len(cache) == 0


def test_memory_cache_evicts_the_least_recently_used() -> None:
    """Past max_entries the entry read least recently goes first."""
    cache = MemoryExplanationCache(max_entries=2, ttl_seconds=60)
    cache.set(key("a"), "A")
    cache.set(key("b"), "B")
    assert cache.get(key("a")) == "A"  # a is now the most recent
    cache.set(key("c"), "C")
    assert [cache.get(key(name)) for name in "abc"] == ["A", None, "C"]


def test_redis_cache_round_trips_with_the_ttl_and_prefix(
    redis_client: RedisClientFactory, redis_prefix: str
) -> None:
    """Text written by one cache instance is read by another; the key expires in the TTL."""

    async def scenario() -> tuple[list[str | None], int]:
        async with redis_client() as client:
            writer = RedisExplanationCache(
                client,
                prefix=redis_prefix,
                ttl_seconds=3600,
                local=MemoryExplanationCache(max_entries=10, ttl_seconds=3600),
            )
            await writer.put(key(), "Often bought with the heart.")
            reader = RedisExplanationCache(
                client,
                prefix=redis_prefix,
                ttl_seconds=3600,
                local=MemoryExplanationCache(max_entries=10, ttl_seconds=3600),
            )
            before = reader.peek(key())
            found = await reader.fetch_many([key(), key("missing")])
            ttl = await client.ttl(key().render(redis_prefix))
            return [before, *found, reader.peek(key())], ttl

    found, ttl = run(scenario())
    # not in the reader's process until fetched; then kept there
    assert found == [None, "Often bought with the heart.", None, "Often bought with the heart."]
    assert 0 < ttl <= 3600


def test_unreachable_redis_reads_as_a_miss_and_loses_the_write_quietly() -> None:
    """A Redis that refuses connections is a cache miss, never an error."""

    async def scenario() -> tuple[list[str | None], str | None]:
        # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        client = redis.asyncio.Redis(
            host="127.0.0.1", port=9, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            cache = RedisExplanationCache(
                client,
                prefix="p",
                ttl_seconds=60,
                local=MemoryExplanationCache(max_entries=10, ttl_seconds=60),
            )
            await cache.put(key("written"), "kept locally")
            return await cache.fetch_many([key(), key("written")]), cache.peek(key("written"))
        finally:
            await client.aclose()

    assert run(scenario()) == ([None, None], "kept locally")


def test_redis_that_never_answers_is_bounded_by_the_operation_timeout() -> None:
    """A Redis that accepts and then goes silent (paused, wedged) costs at most the operation
    timeout per command: a miss and a lost write, never a hang."""

    async def scenario() -> tuple[list[str | None], str | None]:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(-1)  # read everything, answer nothing
            writer.close()

        silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        client = redis.asyncio.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
        try:
            cache = RedisExplanationCache(
                client,
                prefix="p",
                ttl_seconds=60,
                local=MemoryExplanationCache(max_entries=10, ttl_seconds=60),
                operation_timeout_s=0.05,
            )
            await cache.put(key("written"), "kept locally")
            return await cache.fetch_many([key(), key("written")]), cache.peek(key("written"))
        finally:
            await client.aclose()
            silent.close()

    assert run(scenario()) == ([None, None], "kept locally")


def test_a_rendered_key_parses_back_to_itself() -> None:
    """parse() inverts render() for every shape of key, and refuses other strings."""
    shapes = [key(), key(anchor=None), key("a:b", anchor="c%d"), key(version="v 2")]
    for original in shapes:
        assert CacheKey.parse(original.render("pre:fix"), "pre:fix") == original
    assert CacheKey.parse("other:explain:v1:cart:en:cross_sell:-:1", "pre:fix") is None
    assert CacheKey.parse("pre:fix:explain:v1:cart:en:1", "pre:fix") is None


def test_preload_copies_one_prompt_version_with_its_remaining_ttl(
    redis_client: RedisClientFactory, redis_prefix: str
) -> None:
    """preload() brings another process's text into the in-process tier: only the prompt
    version asked for, each entry expiring when its Redis key does, at most the tier's size."""
    now = [0.0]

    async def scenario() -> tuple[int, list[str | None], list[str | None], int]:
        async with redis_client() as client:
            writer = RedisExplanationCache(
                client,
                prefix=redis_prefix,
                ttl_seconds=3600,
                local=MemoryExplanationCache(max_entries=2000, ttl_seconds=3600),
                # Set-up, not the subject: a busy machine must not drop a write (put() logs
                # and drops one that outlasts its timeout, by design).
                operation_timeout_s=30.0,
            )
            for number in range(1200):  # more than one SCAN / pipeline batch
                await writer.put(key(f"item{number}"), f"text {number}")
            await writer.put(key("old", version="v0"), "old prompt")
            await client.expire(key("item0").render(redis_prefix), 10)
            local = MemoryExplanationCache(max_entries=5000, ttl_seconds=3600, clock=lambda: now[0])
            reader = RedisExplanationCache(
                client, prefix=redis_prefix, ttl_seconds=3600, local=local
            )
            loaded = await reader.preload("v1")
            found = [reader.peek(key("item0")), reader.peek(key("item1199"))]
            old = [reader.peek(key("old", version="v0"))]
            now[0] = 11.0  # past item0's remaining 10 s, within everyone else's hour
            found += [reader.peek(key("item0")), reader.peek(key("item1"))]
            small = RedisExplanationCache(
                client,
                prefix=redis_prefix,
                ttl_seconds=3600,
                local=MemoryExplanationCache(max_entries=700, ttl_seconds=3600),
            )
            return loaded, found, old, await small.preload("v1")

    loaded, found, old, capped = run(scenario())
    assert loaded == 1200
    assert found == ["text 0", "text 1199", None, "text 1"]
    assert old == [None]
    assert capped == 700


def test_redis_cluster_cache_reads_keys_of_many_slots(
    redis_cluster_client: RedisClusterClientFactory, redis_cluster_prefix: str
) -> None:
    """On Redis Cluster the keys (no hash tag) spread over slots: one read still finds them
    all, and preload scans every master."""

    async def scenario() -> tuple[list[str | None], int]:
        async with redis_cluster_client() as client:
            writer = RedisExplanationCache(
                client,
                prefix=redis_cluster_prefix,
                ttl_seconds=600,
                local=MemoryExplanationCache(max_entries=100, ttl_seconds=600),
            )
            for number in range(30):
                await writer.put(key(f"item{number}"), f"text {number}")
            reader = RedisExplanationCache(
                client,
                prefix=redis_cluster_prefix,
                ttl_seconds=600,
                local=MemoryExplanationCache(max_entries=100, ttl_seconds=600),
            )
            found = await reader.fetch_many([key(f"item{number}") for number in range(30)])
            preloader = RedisExplanationCache(
                client,
                prefix=redis_cluster_prefix,
                ttl_seconds=600,
                local=MemoryExplanationCache(max_entries=100, ttl_seconds=600),
            )
            return found, await preloader.preload("v1")

    found, preloaded = run(scenario())
    assert found == [f"text {number}" for number in range(30)]
    assert preloaded == 30
