"""The in-process stock mirror (``UPSELL_STOCK_MIRROR``) against a real Redis.

What it must hold: the copy reads exactly what ``read_stock`` reads from Redis, after a load,
after deltas (out of order, partial figures, replays, stale ones) and after a new version;
recommendations are the same with and without it; it steps aside (requests read Redis)
when it cannot vouch for its figures; and the change streams it follows are pruned with
their version.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from service.runtime import Runtime
from service.settings import Settings
from service.stock_mirror import StockMirror
from service.store.base import StockMatrix
from service.store.deltas import deltas_from_records
from service.store.redis_store import RedisSnapshotStore
from tests.service.conftest import DemoData
from tests.service.test_faults import (
    cart_bodies,
    fresh_snapshot,
    query_of,
    running_redis,
    settings_for,
)

WAIT_S = 10.0


def mirror_settings(
    redis_url: str, prefix: str, demo: DemoData, tmp_path: Path, *, mirror: bool = True
) -> Settings:
    base = settings_for(redis_url, demo=demo, tmp_path=tmp_path, prefix=prefix)
    return base.model_copy(update={"stock_mirror": mirror})


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}")
        await asyncio.sleep(0.01)


async def started(settings: Settings, demo: DemoData) -> Runtime:
    store = RedisSnapshotStore(
        redis.asyncio.from_url(settings.redis_url or ""), prefix=settings.redis_prefix
    )
    await store.publish(fresh_snapshot(demo.contract_dir))
    await store.close()
    runtime = await Runtime.start(settings)
    mirror = runtime.stock_mirror
    assert mirror is not None
    assert runtime.mirror is not None
    assert runtime.mirror.loaded is not None
    version = runtime.mirror.loaded.meta.version
    await wait_for(lambda: mirror.is_fresh(version), "the first load")
    return runtime


def assert_same_stock(mirrored: StockMatrix | None, read: StockMatrix) -> None:
    assert mirrored is not None
    for name in ("atp", "safety_stock", "inbound", "ranged", "as_of_us"):
        np.testing.assert_array_equal(getattr(mirrored, name), getattr(read, name), err_msg=name)
    assert mirrored.node_ids == read.node_ids
    assert mirrored.skus == read.skus


async def compare_everything(runtime: Runtime) -> int:
    """Every cell of the serving version, mirror against Redis; the ranged cell count."""
    assert runtime.mirror is not None
    assert runtime.stock_mirror is not None
    serving = runtime.mirror.loaded
    assert serving is not None
    positions = np.arange(len(serving.catalog), dtype=np.int64)
    node_positions = np.arange(len(serving.nodes.node_ids), dtype=np.int64)
    skus = tuple(serving.catalog.skus)
    read = await runtime.store.read_stock(
        serving.meta.version, skus, serving.nodes.ids(node_positions)
    )
    mirrored = runtime.stock_mirror.read(serving.meta.version, positions, node_positions, skus)
    assert_same_stock(mirrored, read)
    return int(read.ranged.sum())


def test_a_loaded_mirror_reads_what_redis_holds(
    redis_url: str, redis_prefix: str, demo_data: DemoData, tmp_path: Path
) -> None:
    async def check() -> None:
        runtime = await started(
            mirror_settings(redis_url, redis_prefix, demo_data, tmp_path), demo_data
        )
        try:
            assert await compare_everything(runtime) > 1000
            assert runtime.mirror is not None
            assert runtime.stock_mirror is not None
            serving = runtime.mirror.loaded
            assert serving is not None
            rng = np.random.default_rng(3)
            for _ in range(50):  # subsets, repeats and node orders as requests ask them
                positions = rng.integers(0, len(serving.catalog), size=rng.integers(1, 40))
                node_positions = rng.permutation(len(serving.nodes.node_ids))[
                    : rng.integers(1, len(serving.nodes.node_ids) + 1)
                ]
                skus = tuple(serving.catalog.skus[p] for p in positions.tolist())
                read = await runtime.store.read_stock(
                    serving.meta.version, skus, serving.nodes.ids(node_positions)
                )
                assert_same_stock(
                    runtime.stock_mirror.read(
                        serving.meta.version, positions, node_positions, skus
                    ),
                    read,
                )
            assert (
                runtime.stock_mirror.read("another-version", positions, node_positions, skus)
                is None
            )
        finally:
            await runtime.close()

    asyncio.run(check())


def test_deltas_reach_the_mirror_as_redis_applies_them(
    redis_url: str, redis_prefix: str, demo_data: DemoData, tmp_path: Path
) -> None:
    """Out-of-order deltas with partial figures: the order they land in decides a partial
    one's safety stock, so only copying what Redis holds can agree with it."""

    async def check() -> None:
        runtime = await started(
            mirror_settings(redis_url, redis_prefix, demo_data, tmp_path), demo_data
        )
        try:
            assert runtime.mirror is not None
            assert runtime.stock_mirror is not None
            serving = runtime.mirror.loaded
            assert serving is not None
            rng = random.Random(11)
            skus = list(serving.catalog.skus)
            nodes = list(serving.nodes.node_ids)
            now = datetime.now(UTC).replace(tzinfo=None)
            for batch_number in range(6):
                records: list[dict[str, Any]] = []
                cells = set()
                while len(records) < 150:
                    sku, node = rng.choice(skus), rng.choice(nodes)
                    if (sku, node) in cells:
                        continue
                    cells.add((sku, node))
                    records.append(
                        {
                            "delta_id": f"mirror-{batch_number}-{len(records)}",
                            "sku": sku,
                            "node_id": node,
                            "atp": rng.randint(0, 40),
                            "safety_stock": rng.choice([None, rng.randint(0, 5)]),
                            "inbound": rng.choice([None, rng.randint(0, 9)]),
                            # Some newer, some older than other batches' figures.
                            "as_of": now - timedelta(seconds=rng.randint(0, 50)),
                        }
                    )
                batch = deltas_from_records(records, source="test", now=now)
                applied_before = runtime.stock_mirror.changes_applied
                report = await runtime.store.apply_deltas(batch)
                if report.applied:
                    await wait_for(
                        lambda wanted=applied_before + report.applied: (
                            runtime.stock_mirror is not None
                            and runtime.stock_mirror.changes_applied >= wanted
                        ),
                        "the applied deltas in the mirror",
                    )
                await compare_everything(runtime)
            # A replayed batch changes nothing in Redis, so nothing in the mirror.
            applied_before = runtime.stock_mirror.changes_applied
            report = await runtime.store.apply_deltas(batch)
            assert report.applied == 0
            await asyncio.sleep(0.3)
            assert runtime.stock_mirror.changes_applied == applied_before
            await compare_everything(runtime)
        finally:
            await runtime.close()

    asyncio.run(check())


def test_recommendations_are_the_same_with_and_without_the_mirror(
    redis_url: str, redis_prefix: str, demo_data: DemoData, tmp_path: Path
) -> None:
    async def check() -> None:
        with_mirror = await started(
            mirror_settings(redis_url, redis_prefix, demo_data, tmp_path), demo_data
        )
        without = await Runtime.start(
            mirror_settings(redis_url, redis_prefix, demo_data, tmp_path, mirror=False)
        )
        try:
            assert without.stock_mirror is None
            # A sell-out first, so the comparison covers a changed cell too.
            assert with_mirror.mirror is not None
            assert with_mirror.mirror.loaded is not None
            bodies = cart_bodies(demo_data, 120)
            first_sku = bodies[0]["basket"][0]["sku"]
            now = datetime.now(UTC).replace(tzinfo=None)
            await with_mirror.store.apply_deltas(
                deltas_from_records(
                    [
                        {
                            "delta_id": f"sold-{node}",
                            "sku": first_sku,
                            "node_id": node,
                            "atp": 0,
                            "as_of": now,
                        }
                        for node in with_mirror.mirror.loaded.nodes.node_ids
                    ],
                    source="test",
                    now=now,
                )
            )
            mirror = with_mirror.stock_mirror
            assert mirror is not None
            await wait_for(lambda: mirror.changes_applied > 0, "the sell-out in the mirror")
            compared = 0
            for body in bodies:
                query = query_of(body)
                mirrored = await with_mirror.require_recommender().recommend(query, now=now)
                read = await without.require_recommender().recommend(query, now=now)
                assert [(i.sku, i.fulfillment_node, i.score) for i in mirrored.items] == [
                    (i.sku, i.fulfillment_node, i.score) for i in read.items
                ]
                assert mirrored.dropped_by_rule == read.dropped_by_rule
                assert mirrored.degraded == read.degraded
                compared += bool(read.items)
            assert compared > 100
        finally:
            await with_mirror.close()
            await without.close()

    asyncio.run(check())


def test_a_new_version_is_loaded_and_the_old_copy_is_not_used(
    redis_url: str, redis_prefix: str, demo_data: DemoData, tmp_path: Path
) -> None:
    async def check() -> None:
        settings = mirror_settings(redis_url, redis_prefix, demo_data, tmp_path)
        runtime = await started(settings, demo_data)
        try:
            assert runtime.mirror is not None
            assert runtime.stock_mirror is not None
            old = runtime.mirror.loaded
            assert old is not None
            snapshot = fresh_snapshot(demo_data.contract_dir)
            newer = snapshot.inventory.with_columns(atp=snapshot.inventory["atp"] + 1)
            meta = await runtime.store.publish(replace(snapshot, inventory=newer))
            assert meta.version != old.meta.version
            positions = np.arange(5, dtype=np.int64)
            columns = np.arange(1, dtype=np.int64)
            skus = tuple(old.catalog.skus[:5])
            assert runtime.stock_mirror.read(old.meta.version, positions, columns, skus) is not None
            mirror = runtime.stock_mirror
            await wait_for(lambda: mirror.is_fresh(meta.version), "the new version's copy")
            assert mirror.read(old.meta.version, positions, columns, skus) is None
            assert await compare_everything(runtime) > 1000
        finally:
            await runtime.close()

    asyncio.run(check())


def test_a_lost_redis_sends_requests_to_the_store_and_they_fail_closed(
    demo_data: DemoData, tmp_path: Path
) -> None:
    with running_redis(tmp_path / "redis") as server:
        settings = mirror_settings(server.url, "mirror-lost", demo_data, tmp_path)

        async def check() -> None:
            runtime = await started(settings, demo_data)
            try:
                mirror = runtime.stock_mirror
                assert mirror is not None
                assert runtime.mirror is not None
                serving = runtime.mirror.loaded
                assert serving is not None
                query = query_of(cart_bodies(demo_data, 1)[0])
                answer = await runtime.require_recommender().recommend(query)
                assert answer.items
                assert not answer.degraded
                server.kill()
                await wait_for(
                    lambda: not mirror.is_fresh(serving.meta.version), "the mirror to step aside"
                )
                answer = await runtime.require_recommender().recommend(query)
                assert not answer.items
                assert any("stock unavailable" in note for note in answer.degraded)
                # What it knew stays readable for the last-known fallback, marked as such.
                positions = np.arange(3, dtype=np.int64)
                columns = np.arange(1, dtype=np.int64)
                skus = tuple(serving.catalog.skus[:3])
                assert mirror.read(serving.meta.version, positions, columns, skus) is None
                assert (
                    mirror.read(serving.meta.version, positions, columns, skus, stale_ok=True)
                    is not None
                )
            finally:
                await runtime.close()

        asyncio.run(check())


def test_change_streams_are_pruned_with_their_version(
    redis_url: str, redis_prefix: str, demo_data: DemoData, tmp_path: Path
) -> None:
    async def check() -> None:
        client = redis.asyncio.from_url(redis_url)
        store = RedisSnapshotStore(client, prefix=redis_prefix, keep=2)
        try:
            snapshot = fresh_snapshot(demo_data.contract_dir)
            first = await store.publish(snapshot)
            sku = snapshot.inventory["sku"][0]
            node = snapshot.inventory["node_id"][0]
            now = datetime.now(UTC).replace(tzinfo=None)
            await store.apply_deltas(
                deltas_from_records(
                    [{"delta_id": "prune-1", "sku": sku, "node_id": node, "atp": 3, "as_of": now}],
                    source="test",
                    now=now,
                )
            )
            pattern = f"{redis_prefix}:snap:{first.version}:chg:*"
            assert [key async for key in client.scan_iter(match=pattern)]
            for bump in (1, 2, 3):
                inventory = snapshot.inventory.with_columns(atp=snapshot.inventory["atp"] + bump)
                await store.publish(replace(snapshot, inventory=inventory))
            assert [key async for key in client.scan_iter(match=pattern)] == []
        finally:
            await store.close()

    asyncio.run(check())


def test_the_mirror_refuses_a_lag_shorter_than_its_blocking_read(
    redis_url: str, redis_prefix: str, demo_data: DemoData, tmp_path: Path
) -> None:
    async def check() -> None:
        runtime = await Runtime.start(
            mirror_settings(redis_url, redis_prefix, demo_data, tmp_path, mirror=False)
        )
        try:
            assert isinstance(runtime.store, RedisSnapshotStore)
            assert runtime.mirror is not None
            with pytest.raises(ValueError, match="must exceed the blocking read"):
                StockMirror(store=runtime.store, snapshots=runtime.mirror, max_lag_seconds=0.1)
        finally:
            await runtime.close()

    asyncio.run(check())


class _WritingDuringScans(RedisSnapshotStore):
    """The real store, applying a real delta batch between two steps of the mirror's scan:
    the race a load must survive, at a moment of the test's choosing."""

    def __init__(self, *args: Any, batch: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch = batch
        self.steps = 0
        self.applied = 0

    async def scan_stock_cells(
        self, version: str, node_id: str, cursor: int, *, count: int = 2_000
    ) -> tuple[int, dict[bytes, bytes]]:
        self.steps += 1
        if self.steps == 2:
            self.applied = (await self.apply_deltas(self.batch)).applied
        return await super().scan_stock_cells(version, node_id, cursor, count=count)


class _Serving:
    """What the mirror asks of the snapshot mirror: the serving snapshot."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded

    async def current(self) -> Any:
        return self.loaded


def test_a_load_racing_deltas_ends_equal_to_redis(demo_data: DemoData, tmp_path: Path) -> None:
    """Deltas applied while the load scans (cells before and after the scan's position, at
    every node): once the copy vouches for itself it equals Redis cell for cell. On a Redis
    of the test's own that keeps every hash a hash table (small ones are listpacks, which
    HSCAN returns whole), so that a scan takes several steps a hash."""
    with running_redis(tmp_path / "redis") as server:
        redis.Redis.from_url(server.url).config_set("hash-max-listpack-entries", "8")
        race_on(server.url, "race", demo_data, tmp_path)


def race_on(redis_url: str, redis_prefix: str, demo_data: DemoData, tmp_path: Path) -> None:
    async def check() -> None:
        publisher = RedisSnapshotStore(redis.asyncio.from_url(redis_url), prefix=redis_prefix)
        await publisher.publish(fresh_snapshot(demo_data.contract_dir))
        await publisher.close()
        runtime = await Runtime.start(
            mirror_settings(redis_url, redis_prefix, demo_data, tmp_path, mirror=False)
        )
        try:
            assert runtime.mirror is not None
            serving = await runtime.mirror.current()
            now = datetime.now(UTC).replace(tzinfo=None)
            rng = random.Random(5)
            skus = list(serving.catalog.skus)
            records = [
                {
                    "delta_id": f"race-{node}-{n}",
                    "sku": sku,
                    "node_id": node,
                    "atp": rng.randint(0, 40),
                    "as_of": now,
                }
                for node in serving.nodes.node_ids
                for n, sku in enumerate(rng.sample(skus, 60))
            ]
            store = _WritingDuringScans(
                redis.asyncio.from_url(redis_url),
                prefix=redis_prefix,
                batch=deltas_from_records(records, source="test", now=now),
            )
            mirror = StockMirror(store=store, snapshots=_Serving(serving), cells_per_scan=50)  # type: ignore[arg-type]
            mirror.start()
            try:
                await wait_for(lambda: mirror.is_fresh(serving.meta.version), "the load")
                assert store.steps > 3 * len(serving.nodes.node_ids)  # several steps a node
                assert store.applied > 100
                positions = np.arange(len(serving.catalog), dtype=np.int64)
                node_positions = np.arange(len(serving.nodes.node_ids), dtype=np.int64)
                read = await store.read_stock(
                    serving.meta.version, tuple(skus), serving.nodes.ids(node_positions)
                )
                assert_same_stock(
                    mirror.read(serving.meta.version, positions, node_positions, tuple(skus)),
                    read,
                )
            finally:
                await mirror.close()
                await store.close()
        finally:
            await runtime.close()

    asyncio.run(check())
