"""Snapshot store behaviour: one suite run against every store.

The stores under test: InProcessStore in memory, InProcessStore over a state directory,
RedisSnapshotStore on a real Redis and on a real local Redis Cluster of three masters (a key
prefix of its own per test). The suite covers publishing, reading, rollback, pruning, the
as_of of every stock figure and inventory deltas. A few tests at the end are about one backend
only (sharing a directory, Redis down, corrupt Redis payloads, the key layout).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl
import pytest
import redis
import redis.asyncio
import redis.cluster
from polars.testing import assert_frame_equal
from redis.asyncio.cluster import RedisCluster

from models.data.schema import INVENTORY, ITEMS, NODES, SnapshotData, TableSpec
from rules.errors import ContractError, SnapshotNotFoundError, StoreError
from rules.staleness import epoch_us
from service.store.base import DeltaReport, SnapshotStore, StockMatrix
from service.store.codec import snapshot_version
from service.store.deltas import DeltaBatch, DeltaOutcome, deltas_from_records
from service.store.factory import open_store
from service.store.memory import InProcessStore
from service.store.redis_store import AnyRedis, RedisSnapshotStore

T = TypeVar("T")
RedisClientFactory = Callable[[], AbstractAsyncContextManager[redis.asyncio.Redis]]
RedisClusterClientFactory = Callable[[], AbstractAsyncContextManager[RedisCluster]]

AS_OF = datetime(2025, 3, 1, 6, 0)
SKUS = ("SKU-1", "SKU-2", "SKU-3", "SKU-4")
NODE_IDS = ("S001", "S002", "DC01")
StockCells = Mapping[tuple[str, str], tuple[int, int, int]]  # (sku, node) -> atp, ss, inbound

# SKU-4 is ranged nowhere; DC01 stocks only SKU-1; S002 lacks SKU-2.
STOCK: StockCells = {
    ("SKU-1", "S001"): (5, 1, 0),
    ("SKU-1", "S002"): (0, 0, 12),
    ("SKU-1", "DC01"): (900, 50, 1_000),
    ("SKU-2", "S001"): (3, 2, 0),
    ("SKU-3", "S001"): (1, 0, 0),
    ("SKU-3", "S002"): (7, 1, 2),
}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Each test runs its scenario in a fresh event loop (redis clients are opened inside)."""
    return asyncio.run(coroutine)


def _schema(spec: TableSpec) -> dict[str, pl.DataType]:
    return {column.name: column.dtype for column in spec.columns}


def make_snapshot(
    *,
    revision: int = 1,
    stock: StockCells = STOCK,
    skus: tuple[str, ...] = SKUS,
    node_ids: tuple[str, ...] = NODE_IDS,
    as_of: datetime = AS_OF,
) -> SnapshotData:
    """A small snapshot in the contract's canonical columns and dtypes.

    ``revision`` changes prices and every ATP, so each revision is another version.
    """
    items = pl.DataFrame(
        [
            {
                "sku": sku,
                "name": f"Item {sku}",
                "category": "tools" if position % 2 else "garden",
                "brand": None if position == 0 else "Acme",
                "unit_cost": 4.25 + position,
                "unit_price": 9.99 + position + revision,
                "promo_price": 8.49 if position == 1 else None,
                "promo_start": datetime(2025, 3, 1) if position == 1 else None,
                "promo_end": datetime(2025, 3, 8, 23, 59, 59, 999_999) if position == 1 else None,
                "age_restricted": position == 2,
                "return_rate": 0.05,
                "weight_kg": None if position == 3 else 1.5,
            }
            for position, sku in enumerate(skus)
        ],
        schema=_schema(ITEMS),
        orient="row",
    )
    nodes = pl.DataFrame(
        [
            {
                "node_id": node_id,
                "kind": "dc" if node_id.startswith("DC") else "store",
                "region": "north",
                "fulfillment_cost": 4.5 if node_id.startswith("DC") else 0.0,
            }
            for node_id in node_ids
        ],
        schema=_schema(NODES),
        orient="row",
    )
    inventory = pl.DataFrame(
        [
            {
                "sku": sku,
                "node_id": node_id,
                "atp": atp + revision - 1,
                "safety_stock": safety_stock,
                "inbound": inbound,
                "as_of": as_of,
            }
            for (sku, node_id), (atp, safety_stock, inbound) in stock.items()
        ],
        schema=_schema(INVENTORY),
        orient="row",
    )
    return SnapshotData(items=items, nodes=nodes, inventory=inventory, as_of=as_of)


# -- the stores under test ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoreUnderTest:
    """One backend: how to open it, and how to look at its storage from outside the store."""

    kind: str
    open: Callable[..., AbstractAsyncContextManager[SnapshotStore]]  # open(keep=3)
    # What is still stored for a version (keys, files); None when storage cannot be observed.
    leftovers: Callable[[str], list[str] | None]
    # Arrange for the next publish of a version to fail half way through writing it.
    break_next_write: Callable[[str, str], None]  # (version, node_id)


def _memory_store() -> StoreUnderTest:
    @asynccontextmanager
    async def open_memory(*, keep: int = 3) -> AsyncIterator[SnapshotStore]:
        store = InProcessStore(keep=keep)
        yield store
        await store.close()

    def cannot_break(version: str, node_id: str) -> None:
        pytest.skip("the in-memory store swaps references: there is no write to break half way")

    return StoreUnderTest("memory", open_memory, lambda version: None, cannot_break)


def _directory_store(state_dir: Path) -> StoreUnderTest:
    snapshots = state_dir / "snapshots"

    @asynccontextmanager
    async def open_directory(*, keep: int = 3) -> AsyncIterator[SnapshotStore]:
        store = InProcessStore(state_dir=state_dir, keep=keep)
        yield store
        await store.close()

    def leftovers(version: str) -> list[str]:
        version_dir = snapshots / version
        files = list(version_dir.rglob("*")) if version_dir.is_dir() else []
        return [str(path) for path in [*files, *snapshots.glob(".tmp-*")]]

    def break_next_write(version: str, node_id: str) -> None:
        # A plain file where the version's directory goes: every table is written to the
        # staging directory, then the final rename fails (NotADirectoryError).
        snapshots.mkdir(parents=True, exist_ok=True)
        (snapshots / version).write_text("in the way\n")

    return StoreUnderTest("directory", open_directory, leftovers, break_next_write)


def _redis_store(
    kind: str,
    prefix: str,
    sync_client: redis.Redis | redis.cluster.RedisCluster,
    open_client: Callable[[], AbstractAsyncContextManager[AnyRedis]],
) -> StoreUnderTest:
    @asynccontextmanager
    async def open_redis(*, keep: int = 3) -> AsyncIterator[SnapshotStore]:
        async with open_client() as client:
            store = RedisSnapshotStore(client, prefix=prefix, keep=keep)
            yield store
            await store.close()

    def leftovers(version: str) -> list[str]:
        patterns = (f"{{{prefix}}}:snap:{version}:*", f"{prefix}:snap:{version}:*")
        return sorted(
            key.decode() for pattern in patterns for key in sync_client.scan_iter(match=pattern)
        )

    def break_next_write(version: str, node_id: str) -> None:
        # A string where the node's stock hash goes: items, nodes and other nodes' hashes are
        # written, then Redis answers this node's write with WRONGTYPE.
        sync_client.set(f"{prefix}:snap:{version}:atp:{{{node_id}}}", b"not a hash")

    return StoreUnderTest(kind, open_redis, leftovers, break_next_write)


STORE_KINDS = ["memory", "directory", "redis", "redis-cluster"]


@pytest.fixture(params=STORE_KINDS)
def store_under_test(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    """Each store in turn; Redis ones on a key prefix of their own, skipped without Redis."""
    if request.param == "memory":
        yield _memory_store()
    elif request.param == "directory":
        yield _directory_store(tmp_path)
    elif request.param == "redis":
        redis_url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        open_client: RedisClientFactory = request.getfixturevalue("redis_client")
        sync_client = redis.Redis.from_url(redis_url)
        try:
            yield _redis_store("redis", prefix, sync_client, open_client)
        finally:
            sync_client.close()
    else:
        cluster_url: str = request.getfixturevalue("redis_cluster_url")
        prefix = request.getfixturevalue("redis_cluster_prefix")
        open_cluster: RedisClusterClientFactory = request.getfixturevalue("redis_cluster_client")
        sync_cluster = redis.cluster.RedisCluster.from_url(
            cluster_url.replace("redis+cluster://", "redis://", 1)
        )
        try:
            yield _redis_store("redis-cluster", prefix, sync_cluster, open_cluster)
        finally:
            sync_cluster.close()


# -- behaviour common to every store ------------------------------------------------------------


def test_nothing_is_current_before_the_first_publish(store_under_test: StoreUnderTest) -> None:
    """A fresh store has no current version and no retained versions."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            assert await store.current_version() is None
            assert await store.versions() == []
            assert await store.ping() is True

    run(scenario())


def test_published_master_reads_back_equal(store_under_test: StoreUnderTest) -> None:
    """After publish, current names the version and its items and nodes read back unchanged."""
    snapshot = make_snapshot()

    async def scenario() -> None:
        async with store_under_test.open() as store:
            meta = await store.publish(snapshot)
            assert await store.current_version() == meta.version
            master = await store.load_master(meta.version)
            assert master.meta == meta
            assert_frame_equal(master.items, snapshot.items)
            assert_frame_equal(master.nodes, snapshot.nodes)

    run(scenario())
    assert snapshot_version(snapshot) == snapshot_version(make_snapshot())


def test_meta_describes_the_snapshot(store_under_test: StoreUnderTest) -> None:
    """The published meta counts rows, carries as_of and a 16-hex content version."""
    snapshot = make_snapshot()

    async def scenario() -> None:
        async with store_under_test.open() as store:
            before = datetime.now().astimezone()
            meta = await store.publish(snapshot)
            assert meta.version == snapshot_version(snapshot)
            assert len(meta.version) == 16
            int(meta.version, 16)
            assert meta.as_of == AS_OF
            assert (meta.item_count, meta.node_count, meta.inventory_rows) == (4, 3, 6)
            assert before <= meta.published_at <= datetime.now().astimezone()
            assert await store.versions() == [meta]

    run(scenario())


def test_stock_reads_back_at_nodes_with_unranged_cells_zero(
    store_under_test: StoreUnderTest,
) -> None:
    """read_stock gives (sku x node) arrays; cells with no inventory row are unranged zeros."""
    skus = ["SKU-3", "SKU-1", "SKU-4", "NO-SUCH-SKU", "SKU-2"]
    node_ids = ["DC01", "S002", "S001", "NO-SUCH-NODE"]

    async def scenario() -> None:
        async with store_under_test.open() as store:
            meta = await store.publish(make_snapshot())
            stock = await store.read_stock(meta.version, skus, node_ids)
        assert stock.skus == tuple(skus)
        assert stock.node_ids == tuple(node_ids)
        for array in (stock.atp, stock.safety_stock, stock.inbound, stock.ranged):
            assert array.shape == (len(skus), len(node_ids))
        for row, sku in enumerate(skus):
            for column, node_id in enumerate(node_ids):
                expected = STOCK.get((sku, node_id))
                cell = (
                    int(stock.atp[row, column]),
                    int(stock.safety_stock[row, column]),
                    int(stock.inbound[row, column]),
                )
                assert bool(stock.ranged[row, column]) is (expected is not None), (sku, node_id)
                assert cell == (expected or (0, 0, 0)), (sku, node_id)
        assert stock.atp.dtype == np.int64
        assert stock.ranged.dtype == np.bool_

    run(scenario())


def test_empty_stock_request_gives_empty_arrays(store_under_test: StoreUnderTest) -> None:
    """Asking for no SKUs or no nodes gives arrays of the asked shape, all unranged."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            meta = await store.publish(make_snapshot())
            no_skus = await store.read_stock(meta.version, [], ["S001", "S002"])
            no_nodes = await store.read_stock(meta.version, ["SKU-1"], [])
        assert no_skus.atp.shape == (0, 2)
        assert no_nodes.ranged.shape == (1, 0)

    run(scenario())


def test_many_skus_and_nodes_round_trip(store_under_test: StoreUnderTest) -> None:
    """A snapshot larger than one write batch reads back cell for cell."""
    skus = tuple(f"SKU-{n:05d}" for n in range(2_500))
    node_ids = tuple(f"S{n:03d}" for n in range(40))
    stock = {
        (sku, node_id): (s * 7 + n, s % 5, n)
        for s, sku in enumerate(skus)
        for n, node_id in enumerate(node_ids)
        if (s + n) % 3
    }
    snapshot = make_snapshot(stock=stock, skus=skus, node_ids=node_ids)
    wanted_skus = list(skus[::97])
    wanted_nodes = list(node_ids[::3])

    async def scenario() -> None:
        async with store_under_test.open() as store:
            meta = await store.publish(snapshot)
            assert meta.inventory_rows == len(stock)
            matrix = await store.read_stock(meta.version, wanted_skus, wanted_nodes)
        for row, sku in enumerate(wanted_skus):
            for column, node_id in enumerate(wanted_nodes):
                expected = stock.get((sku, node_id))
                assert bool(matrix.ranged[row, column]) is (expected is not None)
                if expected is not None:
                    assert int(matrix.atp[row, column]) == expected[0]
                    assert int(matrix.safety_stock[row, column]) == expected[1]
                    assert int(matrix.inbound[row, column]) == expected[2]

    run(scenario())


def test_second_publish_flips_current_and_retains_previous(
    store_under_test: StoreUnderTest,
) -> None:
    """Publishing other content makes it current; the previous version stays readable."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            first = await store.publish(make_snapshot(revision=1))
            second = await store.publish(make_snapshot(revision=2))
            assert second.version != first.version
            assert await store.current_version() == second.version
            assert [meta.version for meta in await store.versions()] == [
                second.version,
                first.version,
            ]
            old_stock = await store.read_stock(first.version, ["SKU-1"], ["S001"])
            new_stock = await store.read_stock(second.version, ["SKU-1"], ["S001"])
            assert (int(old_stock.atp[0, 0]), int(new_stock.atp[0, 0])) == (5, 6)
            old_master = await store.load_master(first.version)
            assert_frame_equal(old_master.items, make_snapshot(revision=1).items)

    run(scenario())


def test_rollback_restores_previous_and_goes_further_back(
    store_under_test: StoreUnderTest,
) -> None:
    """Rollback points current at the version before it; a second rollback goes one further."""

    async def scenario() -> None:
        async with store_under_test.open(keep=3) as store:
            first = await store.publish(make_snapshot(revision=1))
            second = await store.publish(make_snapshot(revision=2))
            third = await store.publish(make_snapshot(revision=3))
            assert (await store.rollback()).version == second.version
            assert await store.current_version() == second.version
            assert (await store.rollback()).version == first.version
            assert await store.current_version() == first.version
            with pytest.raises(SnapshotNotFoundError, match="nothing to roll back to"):
                await store.rollback()
            assert await store.current_version() == first.version
            # Rollback moves the pointer only: every version is still retained.
            assert len(await store.versions()) == 3
            assert third.version in {meta.version for meta in await store.versions()}

    run(scenario())


def test_rollback_with_nothing_before_raises(store_under_test: StoreUnderTest) -> None:
    """Rollback with no version before current (or none at all) raises SnapshotNotFoundError."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            with pytest.raises(SnapshotNotFoundError):
                await store.rollback()
            only = await store.publish(make_snapshot())
            with pytest.raises(SnapshotNotFoundError):
                await store.rollback()
            assert await store.current_version() == only.version

    run(scenario())


def test_keep_two_prunes_older_versions_and_their_data(store_under_test: StoreUnderTest) -> None:
    """With keep=2 only the two newest versions survive; older ones' keys or files are gone."""

    async def scenario() -> None:
        async with store_under_test.open(keep=2) as store:
            metas = [await store.publish(make_snapshot(revision=r)) for r in (1, 2, 3, 4)]
            assert [meta.version for meta in await store.versions()] == [
                metas[3].version,
                metas[2].version,
            ]
            for pruned in metas[:2]:
                assert store_under_test.leftovers(pruned.version) in ([], None)
                with pytest.raises(SnapshotNotFoundError):
                    await store.load_master(pruned.version)
                with pytest.raises(SnapshotNotFoundError):
                    await store.read_stock(pruned.version, ["SKU-1"], ["S001"])
            for kept in metas[2:]:
                assert store_under_test.leftovers(kept.version) != []
                assert (await store.load_master(kept.version)).meta.version == kept.version

    run(scenario())


def test_pruning_spares_current_and_its_rollback_target(store_under_test: StoreUnderTest) -> None:
    """With keep=1 the previous version survives anyway, so a rollback is always possible."""

    async def scenario() -> None:
        async with store_under_test.open(keep=1) as store:
            metas = [await store.publish(make_snapshot(revision=r)) for r in (1, 2, 3)]
            assert [meta.version for meta in await store.versions()] == [
                metas[2].version,
                metas[1].version,
            ]
            assert (await store.rollback()).version == metas[1].version

    run(scenario())


def test_identical_republish_is_idempotent(store_under_test: StoreUnderTest) -> None:
    """Publishing the same content again keeps its version and adds no history entry."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            first = await store.publish(make_snapshot())
            again = await store.publish(make_snapshot())
            assert again.version == first.version
            assert again.published_at >= first.published_at
            assert await store.current_version() == first.version
            assert [meta.version for meta in await store.versions()] == [first.version]
            stock = await store.read_stock(first.version, ["SKU-1"], ["DC01"])
            assert int(stock.atp[0, 0]) == 900

    run(scenario())


def test_republishing_an_older_version_makes_it_current(store_under_test: StoreUnderTest) -> None:
    """Republishing retained content moves it to the front, so rollback returns to the other."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            first = await store.publish(make_snapshot(revision=1))
            second = await store.publish(make_snapshot(revision=2))
            again = await store.publish(make_snapshot(revision=1))
            assert again.version == first.version
            assert await store.current_version() == first.version
            assert [meta.version for meta in await store.versions()] == [
                first.version,
                second.version,
            ]
            assert (await store.rollback()).version == second.version

    run(scenario())


def test_failed_publish_midway_leaves_previous_current(store_under_test: StoreUnderTest) -> None:
    """A publish that fails while writing leaves current untouched and nothing half written."""
    broken = make_snapshot(revision=2)
    broken_version = snapshot_version(broken)

    async def scenario() -> None:
        async with store_under_test.open() as store:
            first = await store.publish(make_snapshot(revision=1))
            store_under_test.break_next_write(broken_version, "S002")
            with pytest.raises(StoreError, match="publish"):
                await store.publish(broken)
            assert await store.current_version() == first.version
            assert [meta.version for meta in await store.versions()] == [first.version]
            assert store_under_test.leftovers(broken_version) in ([], None)
            with pytest.raises(SnapshotNotFoundError):
                await store.load_master(broken_version)
            stock = await store.read_stock(first.version, ["SKU-3"], ["S002"])
            assert int(stock.atp[0, 0]) == 7

    run(scenario())


def test_unpublishable_snapshot_is_refused_before_writing(store_under_test: StoreUnderTest) -> None:
    """A snapshot with a null ATP is refused with StoreError naming the column; current stays."""
    good = make_snapshot()
    bad = replace(
        good,
        inventory=good.inventory.with_columns(
            pl.when(pl.col("sku") == "SKU-2").then(None).otherwise(pl.col("atp")).alias("atp")
        ),
    )

    async def scenario() -> None:
        async with store_under_test.open() as store:
            first = await store.publish(make_snapshot(revision=5))
            with pytest.raises(StoreError, match=r"inventory\.atp has 1 null"):
                await store.publish(bad)
            assert await store.current_version() == first.version
            assert len(await store.versions()) == 1

    run(scenario())


def test_unknown_version_raises_snapshot_not_found(store_under_test: StoreUnderTest) -> None:
    """Reading a version that was never published raises SnapshotNotFoundError."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            await store.publish(make_snapshot())
            with pytest.raises(SnapshotNotFoundError):
                await store.load_master("0123456789abcdef")
            with pytest.raises(SnapshotNotFoundError):
                await store.read_stock("0123456789abcdef", ["SKU-1"], ["S001"])

    run(scenario())


# -- as_of and inventory deltas ---------------------------------------------------------------

NOW = AS_OF + timedelta(hours=3)  # "now" for validating deltas: none is in the future


def at(minutes: float) -> datetime:
    """AS_OF shifted by ``minutes``."""
    return AS_OF + timedelta(minutes=minutes)


def delta(
    delta_id: str,
    sku: str,
    node_id: str,
    atp: int,
    *,
    minutes: float,
    safety_stock: int | None = None,
    inbound: int | None = None,
) -> dict[str, object]:
    return {
        "delta_id": delta_id,
        "sku": sku,
        "node_id": node_id,
        "atp": atp,
        "safety_stock": safety_stock,
        "inbound": inbound,
        "as_of": at(minutes),
    }


def batch(*records: dict[str, object]) -> DeltaBatch:
    return deltas_from_records(records, source="deltas.csv", now=NOW)


async def cell(store: SnapshotStore, sku: str, node_id: str) -> tuple[int, int, int, int, bool]:
    """(atp, safety stock, inbound, as_of_us, ranged) of one cell of the current version."""
    version = await store.current_version()
    assert version is not None
    matrix = await store.read_stock(version, [sku], [node_id])
    return (
        int(matrix.atp[0, 0]),
        int(matrix.safety_stock[0, 0]),
        int(matrix.inbound[0, 0]),
        int(matrix.as_of_us[0, 0]),
        bool(matrix.ranged[0, 0]),
    )


def same_stock(left: StockMatrix, right: StockMatrix) -> bool:
    return all(
        np.array_equal(getattr(left, name), getattr(right, name))
        for name in ("atp", "safety_stock", "inbound", "ranged", "as_of_us")
    )


def test_stock_carries_as_of_per_cell(store_under_test: StoreUnderTest) -> None:
    """A row's own as_of is kept per cell; other cells, ranged or not, carry the snapshot's."""
    base = make_snapshot()
    later = at(30)
    snapshot = replace(
        base,
        inventory=base.inventory.with_columns(
            pl.when((pl.col("sku") == "SKU-1") & (pl.col("node_id") == "S001"))
            .then(pl.lit(later))
            .otherwise(pl.col("as_of"))
            .alias("as_of")
        ),
    )

    async def scenario() -> StockMatrix:
        async with store_under_test.open() as store:
            meta = await store.publish(snapshot)
            return await store.read_stock(meta.version, ["SKU-1", "SKU-4"], ["S001", "S002"])

    matrix = run(scenario())
    assert matrix.as_of_us.dtype == np.int64
    assert matrix.as_of_us.tolist() == [
        [epoch_us(later), epoch_us(AS_OF)],
        [epoch_us(AS_OF), epoch_us(AS_OF)],
    ]


def test_delta_sets_absolute_figures_and_its_as_of(store_under_test: StoreUnderTest) -> None:
    """A newer delta replaces ATP outright; empty safety stock and inbound keep stored values."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            meta = await store.publish(make_snapshot())
            report = await store.apply_deltas(
                batch(
                    delta("d1", "SKU-1", "DC01", 2, minutes=10),
                    delta("d2", "SKU-3", "S002", 0, minutes=11, safety_stock=0, inbound=9),
                )
            )
            assert report == DeltaReport(
                version=meta.version, outcomes=(DeltaOutcome.APPLIED, DeltaOutcome.APPLIED)
            )
            assert await cell(store, "SKU-1", "DC01") == (2, 50, 1_000, epoch_us(at(10)), True)
            assert await cell(store, "SKU-3", "S002") == (0, 0, 9, epoch_us(at(11)), True)
            # Untouched cells keep the snapshot's figures.
            assert await cell(store, "SKU-1", "S001") == (5, 1, 0, epoch_us(AS_OF), True)

    run(scenario())


def test_replayed_deltas_change_nothing(store_under_test: StoreUnderTest) -> None:
    """Applying the same batch again reports every delta duplicate and leaves stock equal."""
    deltas = batch(
        delta("d1", "SKU-1", "S001", 4, minutes=5),
        delta("d2", "SKU-2", "S001", 1, minutes=6, safety_stock=1),
    )

    async def scenario() -> None:
        async with store_under_test.open() as store:
            meta = await store.publish(make_snapshot())
            first = await store.apply_deltas(deltas)
            after_first = await store.read_stock(meta.version, list(SKUS), list(NODE_IDS))
            again = await store.apply_deltas(deltas)
            after_again = await store.read_stock(meta.version, list(SKUS), list(NODE_IDS))
            assert first.applied == 2
            assert (again.applied, again.duplicate) == (0, 2)
            assert same_stock(after_first, after_again)

    run(scenario())


def test_older_delta_after_newer_is_ignored_and_counted(store_under_test: StoreUnderTest) -> None:
    """A new delta older than the cell's figure is stale; one stamped at the snapshot row's
    own instant supersedes the row (it is a change event, the row an export)."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            await store.publish(make_snapshot())
            await store.apply_deltas(batch(delta("new", "SKU-1", "S001", 3, minutes=20)))
            late = await store.apply_deltas(
                batch(
                    delta("old", "SKU-1", "S001", 9, minutes=10),
                    delta("before-snapshot", "SKU-3", "S001", 9, minutes=-1),
                    delta("at-snapshot-instant", "SKU-2", "S001", 9, minutes=0),
                )
            )
            assert late.outcomes == (
                DeltaOutcome.STALE,
                DeltaOutcome.STALE,
                DeltaOutcome.APPLIED,
            )
            assert (late.stale, late.duplicate, late.applied) == (2, 0, 1)
            assert (await cell(store, "SKU-1", "S001"))[0] == 3
            assert (await cell(store, "SKU-3", "S001"))[0] == 1
            assert await cell(store, "SKU-2", "S001") == (9, 2, 0, epoch_us(AS_OF), True)

    run(scenario())


@pytest.mark.parametrize("order", ["a-then-b", "b-then-a"])
def test_another_id_at_the_same_instant_is_never_silently_dropped(
    store_under_test: StoreUnderTest, order: str
) -> None:
    """The audit's case: "a" sets 5, then "b" (another id, same as_of) 77. The greater id
    stands whichever arrives first, and the other is reported, never a silent duplicate."""
    a = batch(delta("a", "SKU-1", "S001", 5, minutes=10))
    b = batch(delta("b", "SKU-1", "S001", 77, minutes=10))

    async def scenario() -> tuple[DeltaReport, DeltaReport, int]:
        async with store_under_test.open() as store:
            await store.publish(make_snapshot())
            first, second = (a, b) if order == "a-then-b" else (b, a)
            one = await store.apply_deltas(first)
            two = await store.apply_deltas(second)
            return one, two, (await cell(store, "SKU-1", "S001"))[0]

    one, two, atp = run(scenario())
    assert atp == 77
    assert one.outcomes == (DeltaOutcome.APPLIED,)
    if order == "a-then-b":
        assert two.outcomes == (DeltaOutcome.APPLIED,)
    else:
        assert two.outcomes == (DeltaOutcome.CONFLICT,)
        assert two.conflict == 1


def test_a_replayed_id_is_a_duplicate_even_after_newer_figures(
    store_under_test: StoreUnderTest,
) -> None:
    """The ledger, not the cell, recognises a replay: once a newer delta has replaced its
    figure, a replayed id is still a duplicate (not stale) and changes nothing."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            await store.publish(make_snapshot())
            first = batch(delta("e1", "SKU-1", "S001", 4, minutes=5))
            assert (await store.apply_deltas(first)).applied == 1
            newer = batch(delta("e2", "SKU-1", "S001", 2, minutes=6))
            assert (await store.apply_deltas(newer)).applied == 1
            again = await store.apply_deltas(first)
            assert again.outcomes == (DeltaOutcome.DUPLICATE,)
            assert await cell(store, "SKU-1", "S001") == (2, 1, 0, epoch_us(at(6)), True)

    run(scenario())


def test_an_id_reused_with_other_figures_is_a_conflict(store_under_test: StoreUnderTest) -> None:
    """An id names one change: the same id with another ATP or as_of is refused as a
    conflict, alongside a new id in the same batch that applies."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            await store.publish(make_snapshot())
            await store.apply_deltas(batch(delta("e1", "SKU-1", "S001", 4, minutes=5)))
            reused = await store.apply_deltas(
                batch(
                    delta("e1", "SKU-1", "S001", 6, minutes=5),
                    delta("e2", "SKU-2", "S001", 0, minutes=5),
                )
            )
            later = await store.apply_deltas(batch(delta("e1", "SKU-1", "S001", 4, minutes=9)))
            assert reused.outcomes == (DeltaOutcome.CONFLICT, DeltaOutcome.APPLIED)
            assert later.outcomes == (DeltaOutcome.CONFLICT,)
            assert await cell(store, "SKU-1", "S001") == (4, 1, 0, epoch_us(at(5)), True)
            assert (await cell(store, "SKU-2", "S001"))[0] == 0

    run(scenario())


def test_deltas_reach_the_version_a_lagging_replica_still_serves(
    store_under_test: StoreUnderTest,
) -> None:
    """Right after a flip a replica may still read the version flipped from (it follows the
    pointer within its refresh interval): a delta applied then reaches that version too."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            first = await store.publish(make_snapshot(revision=1))
            await store.publish(make_snapshot(revision=2, as_of=at(5)))
            await store.apply_deltas(batch(delta("sold-out", "SKU-1", "DC01", 0, minutes=30)))
            lagging = await store.read_stock(first.version, ["SKU-1"], ["DC01"])
            assert int(lagging.atp[0, 0]) == 0
            assert int(lagging.as_of_us[0, 0]) == epoch_us(at(30))
            assert (await cell(store, "SKU-1", "DC01"))[0] == 0

    run(scenario())


def test_ledger_forgets_ids_with_the_delta_log_and_a_late_replay_stays_harmless(
    store_under_test: StoreUnderTest,
) -> None:
    """An id is remembered while the delta log keeps its delta: a replay is a duplicate. Once
    every retained snapshot is newer than it (by an hour and more, on Redis), both forget
    it, and a replay is judged by its cell alone: stale, nothing changes."""
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    old = deltas_from_records(
        [
            {
                "delta_id": "e1",
                "sku": "SKU-1",
                "node_id": "S001",
                "atp": 0,
                "as_of": now - timedelta(hours=3),
            }
        ],
        source="deltas.csv",
        now=now,
    )

    async def scenario() -> tuple[DeltaReport, DeltaReport, int]:
        async with store_under_test.open(keep=2) as store:
            await store.publish(make_snapshot(as_of=now - timedelta(hours=4)))
            await store.apply_deltas(old)
            remembered = await store.apply_deltas(old)
            # Snapshots as of the future: Redis trims by arrival, an hour before the oldest
            # retained snapshot's as_of, and the delta arrived just now.
            await store.publish(make_snapshot(revision=2, as_of=now + timedelta(hours=2)))
            await store.publish(make_snapshot(revision=3, as_of=now + timedelta(hours=3)))
            forgotten = await store.apply_deltas(old)
            return remembered, forgotten, (await cell(store, "SKU-1", "S001"))[0]

    remembered, forgotten, atp = run(scenario())
    assert remembered.outcomes == (DeltaOutcome.DUPLICATE,)
    assert forgotten.outcomes == (DeltaOutcome.STALE,)
    assert atp == 5 + 3 - 1  # revision 3's own figure


def test_deltas_of_one_cell_in_a_batch_apply_in_as_of_order(
    store_under_test: StoreUnderTest,
) -> None:
    """Within a batch the newest delta of a cell wins whatever its row; empty fields inherit."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            await store.publish(make_snapshot())
            report = await store.apply_deltas(
                batch(
                    delta("late", "SKU-1", "S001", 3, minutes=20),
                    delta("early", "SKU-1", "S001", 9, minutes=10, safety_stock=4),
                )
            )
            assert report.applied == 2
            assert await cell(store, "SKU-1", "S001") == (3, 4, 0, epoch_us(at(20)), True)

    run(scenario())


def test_delta_may_range_a_known_sku_at_a_known_node(store_under_test: StoreUnderTest) -> None:
    """A delta for a cell with no stock row creates it, with 0 for fields it leaves empty."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            await store.publish(make_snapshot())
            assert (await cell(store, "SKU-4", "DC01"))[4] is False
            await store.apply_deltas(batch(delta("d1", "SKU-4", "DC01", 7, minutes=1, inbound=2)))
            assert await cell(store, "SKU-4", "DC01") == (7, 0, 2, epoch_us(at(1)), True)

    run(scenario())


def test_batch_naming_an_unknown_node_is_refused_whole(store_under_test: StoreUnderTest) -> None:
    """An unknown node or SKU fails the batch with its row and column; nothing is applied."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            meta = await store.publish(make_snapshot())
            before = await store.read_stock(meta.version, list(SKUS), list(NODE_IDS))
            with pytest.raises(ContractError, match=r"deltas\.csv, row 2, column 'node_id'"):
                await store.apply_deltas(
                    batch(
                        delta("d1", "SKU-1", "S001", 0, minutes=1),
                        delta("d2", "SKU-1", "S999", 0, minutes=1),
                    )
                )
            with pytest.raises(ContractError, match=r"row 1, column 'sku': unknown sku 'NOPE'"):
                await store.apply_deltas(batch(delta("d3", "NOPE", "S001", 0, minutes=1)))
            after = await store.read_stock(meta.version, list(SKUS), list(NODE_IDS))
            assert same_stock(before, after)

    run(scenario())


def test_deltas_before_any_publish_raise_not_found(store_under_test: StoreUnderTest) -> None:
    """With nothing published there is no stock to change: SnapshotNotFoundError."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            with pytest.raises(SnapshotNotFoundError, match="publish one first"):
                await store.apply_deltas(batch(delta("d1", "SKU-1", "S001", 0, minutes=1)))

    run(scenario())


def test_publish_keeps_deltas_newer_than_the_new_snapshot(
    store_under_test: StoreUnderTest,
) -> None:
    """At a flip, deltas newer than the new version's rows apply to it; older ones lose."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            await store.publish(make_snapshot(revision=1, as_of=AS_OF))
            await store.apply_deltas(
                batch(
                    delta("sold-out", "SKU-1", "DC01", 0, minutes=30),
                    delta("superseded", "SKU-3", "S002", 99, minutes=5),
                )
            )
            second = await store.publish(make_snapshot(revision=2, as_of=at(10)))
            assert await store.current_version() == second.version
            assert await cell(store, "SKU-1", "DC01") == (0, 50, 1_000, epoch_us(at(30)), True)
            # revision 2's own figure (7 + 1) as of its as_of, not the older delta's 99
            assert await cell(store, "SKU-3", "S002") == (8, 1, 2, epoch_us(at(10)), True)

    run(scenario())


def test_rollback_takes_deltas_newer_than_its_rows(store_under_test: StoreUnderTest) -> None:
    """Rolling back applies logged deltas newer than the older version's rows to it."""

    async def scenario() -> None:
        async with store_under_test.open() as store:
            await store.publish(make_snapshot(revision=1, as_of=AS_OF))
            await store.publish(make_snapshot(revision=2, as_of=at(60)))
            report = await store.apply_deltas(
                batch(
                    delta("fresh", "SKU-1", "S001", 0, minutes=90),
                    delta("older-than-current", "SKU-3", "S001", 0, minutes=30),
                )
            )
            assert report.outcomes == (DeltaOutcome.APPLIED, DeltaOutcome.STALE)
            await store.rollback()
            assert (await cell(store, "SKU-1", "S001"))[0] == 0
            # Stale for revision 2 (as of +60 min), but newer than revision 1's rows.
            assert (await cell(store, "SKU-3", "S001"))[0] == 0

    run(scenario())


def test_delta_reaches_another_replica(store_under_test: StoreUnderTest) -> None:
    """A delta applied through one store instance shows in another's next read (a replica)."""
    if store_under_test.kind == "memory":
        pytest.skip("an in-memory store has no other replica")

    async def scenario() -> None:
        async with store_under_test.open() as writer, store_under_test.open() as replica:
            meta = await writer.publish(make_snapshot())
            assert (await cell(replica, "SKU-1", "DC01"))[0] == 900
            await writer.apply_deltas(batch(delta("d1", "SKU-1", "DC01", 1, minutes=1)))
            assert await cell(replica, "SKU-1", "DC01") == (1, 50, 1_000, epoch_us(at(1)), True)
            assert await replica.current_version() == meta.version

    run(scenario())


def test_many_small_batches_all_count_for_a_fresh_reader(store_under_test: StoreUnderTest) -> None:
    """70 one-delta batches (past the in-process log's folding point) all show, replays
    change nothing, and a store opened afterwards (a new replica) sees the same stock."""
    cells = [(sku, node) for sku in SKUS[:3] for node in NODE_IDS]

    async def scenario() -> tuple[StockMatrix, StockMatrix | None]:
        async with store_under_test.open() as store:
            meta = await store.publish(make_snapshot())
            for n in range(70):
                sku, node = cells[n % len(cells)]
                report = await store.apply_deltas(
                    batch(delta(f"d{n}", sku, node, n, minutes=n + 1))
                )
                assert report.applied == 1
            again = await store.apply_deltas(
                batch(delta("d69", *cells[69 % len(cells)], 69, minutes=70))
            )
            assert again.duplicate == 1
            seen = await store.read_stock(meta.version, list(SKUS), list(NODE_IDS))
        if store_under_test.kind == "memory":
            return seen, None
        async with store_under_test.open() as fresh:
            return seen, await fresh.read_stock(meta.version, list(SKUS), list(NODE_IDS))

    seen, fresh = run(scenario())
    for n in range(70 - len(cells), 70):  # the last delta of each cell wins
        sku, node = cells[n % len(cells)]
        assert int(seen.atp[SKUS.index(sku), NODE_IDS.index(node)]) == n
    if fresh is not None:
        assert same_stock(seen, fresh)


def test_large_batches_and_reads_span_every_chunk(store_under_test: StoreUnderTest) -> None:
    """4,500 deltas (several log chunks) over 4,500 SKUs read back whole in one request."""
    skus = tuple(f"SKU-{n:05d}" for n in range(4_500))
    stock = {(sku, "S001"): (1, 0, 0) for sku in skus[::2]}
    snapshot = make_snapshot(stock=stock, skus=skus)
    deltas = batch(
        *(
            delta(f"d{n}", sku, "S002" if n % 3 else "S001", n, minutes=1 + n % 7)
            for n, sku in enumerate(skus)
        )
    )

    async def scenario() -> tuple[DeltaReport, StockMatrix]:
        async with store_under_test.open() as store:
            meta = await store.publish(snapshot)
            report = await store.apply_deltas(deltas)
            return report, await store.read_stock(meta.version, list(skus), ["S001", "S002"])

    report, matrix = run(scenario())
    assert report.applied == len(skus)
    expected_at_s002 = np.array([n if n % 3 else -1 for n in range(len(skus))])
    assert np.array_equal(np.where(matrix.ranged[:, 1], matrix.atp[:, 1], -1), expected_at_s002)
    expected_at_s001 = np.array(
        [n if n % 3 == 0 else (1 if n % 2 == 0 else -1) for n in range(len(skus))]
    )
    assert np.array_equal(np.where(matrix.ranged[:, 0], matrix.atp[:, 0], -1), expected_at_s001)


# -- the version id -------------------------------------------------------------------------


def test_version_ignores_row_order_but_not_content_or_as_of() -> None:
    """The content hash is the same for reordered rows and differs for any other change."""
    snapshot = make_snapshot()
    shuffled = SnapshotData(
        items=snapshot.items.reverse(),
        nodes=snapshot.nodes.reverse(),
        inventory=snapshot.inventory.sample(fraction=1.0, shuffle=True, seed=7),
        as_of=snapshot.as_of,
    )
    assert snapshot_version(shuffled) == snapshot_version(snapshot)
    assert snapshot_version(make_snapshot(revision=2)) != snapshot_version(snapshot)
    later = replace(snapshot, as_of=AS_OF + timedelta(seconds=1))
    assert snapshot_version(later) != snapshot_version(snapshot)
    renamed = replace(
        snapshot, items=snapshot.items.with_columns(pl.col("brand").fill_null(""))
    )  # null and "" are different content
    assert snapshot_version(renamed) != snapshot_version(snapshot)


# -- one backend only -----------------------------------------------------------------------


def test_directory_store_is_shared_between_instances(tmp_path: Path) -> None:
    """A second InProcessStore on the same state dir (another process) sees publish and rollback."""

    async def scenario() -> None:
        publisher = InProcessStore(state_dir=tmp_path, keep=2)
        server = InProcessStore(state_dir=tmp_path, keep=2)
        assert await server.current_version() is None

        first = await publisher.publish(make_snapshot(revision=1))
        assert await server.current_version() == first.version
        assert_frame_equal((await server.load_master(first.version)).items, make_snapshot().items)
        stock = await server.read_stock(first.version, ["SKU-1"], ["DC01"])
        assert int(stock.atp[0, 0]) == 900

        second = await publisher.publish(make_snapshot(revision=2))
        assert await server.current_version() == second.version
        assert [meta.version for meta in await server.versions()] == [
            second.version,
            first.version,
        ]

        assert (await server.rollback()).version == first.version
        assert await publisher.current_version() == first.version
        # History is publish order: third, second, first; keep=2 prunes first, though it was
        # current a moment ago (the rollback target from third is second).
        third = await publisher.publish(make_snapshot(revision=3))
        assert await server.current_version() == third.version
        assert [meta.version for meta in await server.versions()] == [
            third.version,
            second.version,
        ]
        assert not (tmp_path / "snapshots" / first.version).exists()
        with pytest.raises(SnapshotNotFoundError):
            await server.load_master(first.version)

    run(scenario())
    pointer = (tmp_path / "snapshots" / "CURRENT").read_text()
    assert pointer == f"{snapshot_version(make_snapshot(revision=3))}\n"


def test_unreachable_redis_raises_store_error_and_ping_is_false() -> None:
    """With nothing listening at the URL, open_store still opens; ping is False, calls fail fast."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # nothing listens once the socket is closed

    async def scenario() -> None:
        store = await open_store(
            redis_url=f"redis://127.0.0.1:{closed_port}/0",
            prefix="upsell-test-down",
            state_dir=None,
            keep=3,
        )
        assert isinstance(store, RedisSnapshotStore)
        try:
            started = time.monotonic()
            assert await store.ping() is False
            with pytest.raises(StoreError, match=f"current_version failed.*:{closed_port}"):
                await store.current_version()
            with pytest.raises(StoreError, match=r"publish failed.*ConnectionError"):
                await store.publish(make_snapshot())
            with pytest.raises(StoreError, match="read_stock failed"):
                await store.read_stock("0123456789abcdef", ["SKU-1"], ["S001"])
            assert time.monotonic() - started < 5
        finally:
            await store.close()

    run(scenario())


def test_corrupt_redis_payloads_raise_store_error_naming_the_key(
    redis_prefix: str, redis_client: RedisClientFactory, redis_url: str
) -> None:
    """Payloads that do not decode raise StoreError naming the key (and the SKU for stock)."""
    sync_client = redis.Redis.from_url(redis_url)

    async def scenario() -> None:
        async with redis_client() as client:
            store = RedisSnapshotStore(client, prefix=redis_prefix)
            meta = await store.publish(make_snapshot())
            stock_key = f"{redis_prefix}:snap:{meta.version}:atp:{{S001}}"
            sync_client.hset(stock_key, "SKU-2", b"3,2")
            with pytest.raises(StoreError, match=re.escape(f"{stock_key} field 'SKU-2'")):
                await store.read_stock(meta.version, ["SKU-1", "SKU-2"], ["S002", "S001"])

            items_key = f"{{{redis_prefix}}}:snap:{meta.version}:items"
            sync_client.set(items_key, b"not parquet")
            with pytest.raises(StoreError, match=re.escape(items_key)):
                await store.load_master(meta.version)

            meta_key = f"{{{redis_prefix}}}:snap:{meta.version}:meta"
            sync_client.set(meta_key, b"{not json")
            with pytest.raises(StoreError, match=re.escape(meta_key)):
                await store.versions()

    try:
        run(scenario())
    finally:
        sync_client.close()


def test_redis_layout_matches_the_documented_keys(
    redis_prefix: str, redis_client: RedisClientFactory, redis_url: str
) -> None:
    """Publishing writes the documented keys: pointer, history, meta, tables, a hash per node."""
    sync_client = redis.Redis.from_url(redis_url)

    async def scenario() -> str:
        async with redis_client() as client:
            store = RedisSnapshotStore(client, prefix=redis_prefix)
            return (await store.publish(make_snapshot())).version

    try:
        version = run(scenario())
        keys = sorted(
            key.decode()
            for pattern in (f"{redis_prefix}:*", f"{{{redis_prefix}}}:*")
            for key in sync_client.scan_iter(match=pattern)
        )
        control = f"{{{redis_prefix}}}:snap"
        stock = f"{redis_prefix}:snap:{version}:atp"
        assert keys == sorted(
            [
                f"{control}:current",
                f"{control}:history",
                f"{control}:{version}:meta",
                f"{control}:{version}:items",
                f"{control}:{version}:nodes",
                f"{stock}:{{S001}}",
                f"{stock}:{{S002}}",
                f"{stock}:{{DC01}}",
            ]
        )
        assert sync_client.get(f"{control}:current") == version.encode()
        assert sync_client.lrange(f"{control}:history", 0, -1) == [version.encode()]
        assert sync_client.hgetall(f"{stock}:{{S002}}") == {
            b"SKU-1": b"0,0,12",
            b"SKU-3": b"7,1,2",
        }
    finally:
        sync_client.close()


def test_cluster_keys_share_slots_by_hash_tag(
    redis_cluster_prefix: str, redis_cluster_client: RedisClusterClientFactory
) -> None:
    """On Cluster the control keys share one slot and each node's stock hash has its own tag."""
    from redis.crc import key_slot

    async def scenario() -> list[str]:
        async with redis_cluster_client() as client:
            store = RedisSnapshotStore(client, prefix=redis_cluster_prefix)
            await store.publish(make_snapshot())
            await store.apply_deltas(batch(delta("e1", "SKU-1", "S002", 3, minutes=2)))
            await store.publish(make_snapshot(revision=2))
            return [key.decode() async for key in client.scan_iter(match="*")]

    keys = [key for key in run(scenario()) if redis_cluster_prefix in key]
    control = [key for key in keys if key.startswith("{")]
    stock = [key for key in keys if not key.startswith("{")]
    tag = f"{{{redis_cluster_prefix}}}"
    assert {f"{tag}:inv:log", f"{tag}:inv:ids", f"{tag}:snap:previous"} <= set(control)
    assert len({key_slot(key.encode()) for key in control}) == 1
    assert {key_slot(key.encode()) for key in stock} == {
        key_slot(node.encode()) for node in NODE_IDS
    }


def test_open_store_without_url_is_in_process(tmp_path: Path) -> None:
    """No Redis URL opens the in-process store, persisted under state_dir when given."""

    async def scenario() -> None:
        store = await open_store(redis_url=None, prefix="upsell", state_dir=tmp_path, keep=2)
        assert isinstance(store, InProcessStore)
        meta = await store.publish(make_snapshot())
        assert (tmp_path / "snapshots" / meta.version / "meta.json").is_file()
        await store.close()

    run(scenario())


def test_redis_delta_batch_is_atomic_when_a_cell_is_corrupt(
    redis_prefix: str, redis_client: RedisClientFactory, redis_url: str
) -> None:
    """A corrupt stock cell fails the batch naming key and SKU, and nothing of it is written;
    the ids are in the ledger by then, yet a retry once the cell is repaired applies them
    (a retried id goes to its cell again, which says whether it holds it)."""
    sync_client = redis.Redis.from_url(redis_url)

    async def scenario() -> None:
        async with redis_client() as client:
            store = RedisSnapshotStore(client, prefix=redis_prefix)
            meta = await store.publish(make_snapshot())
            stock_key = f"{redis_prefix}:snap:{meta.version}:atp:{{S001}}"
            sync_client.hset(stock_key, "SKU-3", b"1,0")
            with pytest.raises(StoreError, match=re.escape(f"{stock_key} field SKU-3")):
                await store.apply_deltas(
                    batch(
                        delta("d1", "SKU-1", "S001", 0, minutes=1),
                        delta("d2", "SKU-3", "S001", 0, minutes=1),
                    )
                )
            assert sync_client.hget(stock_key, "SKU-1") == b"5,1,0"
            assert sync_client.hexists(f"{{{redis_prefix}}}:inv:ids", "d1")

            sync_client.hset(stock_key, "SKU-3", b"1,0,0")
            retried = await store.apply_deltas(
                batch(
                    delta("d1", "SKU-1", "S001", 0, minutes=1),
                    delta("d2", "SKU-3", "S001", 0, minutes=1),
                )
            )
            assert retried.outcomes == (DeltaOutcome.APPLIED, DeltaOutcome.APPLIED)
            assert await cell(store, "SKU-3", "S001") == (0, 0, 0, epoch_us(at(1)), True)
            again = await store.apply_deltas(batch(delta("d1", "SKU-1", "S001", 0, minutes=1)))
            assert again.outcomes == (DeltaOutcome.DUPLICATE,)

    try:
        run(scenario())
    finally:
        sync_client.close()


def test_redis_corrupt_cell_in_the_version_flipped_from_does_not_block_deltas(
    redis_prefix: str, redis_client: RedisClientFactory, redis_url: str
) -> None:
    """Deltas also go to the version a flip just left; a corrupt cell there is logged, and
    the current version takes the delta all the same."""
    sync_client = redis.Redis.from_url(redis_url)

    async def scenario() -> None:
        async with redis_client() as client:
            store = RedisSnapshotStore(client, prefix=redis_prefix)
            first = await store.publish(make_snapshot())
            await store.publish(make_snapshot(revision=2))
            sync_client.hset(f"{redis_prefix}:snap:{first.version}:atp:{{S001}}", "SKU-1", b"x")
            report = await store.apply_deltas(batch(delta("d1", "SKU-1", "S001", 0, minutes=9)))
            assert report.outcomes == (DeltaOutcome.APPLIED,)
            assert (await cell(store, "SKU-1", "S001"))[0] == 0

    try:
        run(scenario())
    finally:
        sync_client.close()


def test_redis_delta_keys_match_the_documented_layout(
    redis_prefix: str, redis_client: RedisClientFactory, redis_url: str
) -> None:
    """Deltas write the documented values: the cell with its as_of and delta id, the log,
    the ledger entry (log entry id, fingerprint) and, after a flip, the previous pointer."""
    sync_client = redis.Redis.from_url(redis_url)

    async def scenario() -> tuple[str, str]:
        async with redis_client() as client:
            store = RedisSnapshotStore(client, prefix=redis_prefix)
            first = await store.publish(make_snapshot())
            await store.apply_deltas(batch(delta("e-1", "SKU-1", "S002", 3, minutes=2)))
            second = await store.publish(make_snapshot(revision=2))
            return first.version, second.version

    try:
        first, second = run(scenario())
        control = f"{{{redis_prefix}}}"
        assert sync_client.hget(f"{redis_prefix}:snap:{first}:atp:{{S002}}", "SKU-1") == (
            f"3,0,12,{epoch_us(at(2))},e-1".encode()
        )
        (entry_id, fields), *_ = sync_client.xrange(f"{control}:inv:log")
        assert fields[b"n"] == b"1"
        assert fields[b"d"].split(b"\x00")[:3] == [b"e-1", b"SKU-1", b"S002"]
        logged, fingerprint = sync_client.hget(f"{control}:inv:ids", "e-1").split(b" ")
        assert logged == entry_id
        assert re.fullmatch(rb"[0-9a-f]{16}", fingerprint)
        previous, flipped_ms = sync_client.get(f"{control}:snap:previous").split(b" ")
        assert previous == first.encode()
        assert abs(int(flipped_ms) - time.time() * 1000) < 60_000
        # The new version took the delta from the log: newer than its rows.
        assert sync_client.hget(f"{redis_prefix}:snap:{second}:atp:{{S002}}", "SKU-1") == (
            f"3,0,12,{epoch_us(at(2))},e-1".encode()
        )
    finally:
        sync_client.close()


def test_redis_prefix_with_braces_is_refused(redis_client: RedisClientFactory) -> None:
    """The prefix is the control keys' hash tag, so braces in it are refused up front."""

    async def scenario() -> None:
        async with redis_client() as client:
            with pytest.raises(ValueError, match="without braces"):
                RedisSnapshotStore(client, prefix="up{sell}")

    run(scenario())


def test_open_store_with_cluster_url_opens_redis_cluster(
    redis_cluster_url: str, redis_cluster_prefix: str
) -> None:
    """A redis+cluster:// URL opens the Redis store on a RedisCluster client that works."""

    async def scenario() -> None:
        store = await open_store(
            redis_url=redis_cluster_url, prefix=redis_cluster_prefix, state_dir=None, keep=3
        )
        try:
            assert isinstance(store, RedisSnapshotStore)
            assert "cluster" in repr(store)
            assert await store.ping() is True
            meta = await store.publish(make_snapshot())
            assert await store.current_version() == meta.version
        finally:
            await store.close()

    run(scenario())


@pytest.mark.parametrize(
    "command",
    [
        ("HMGET", "k:{S001}", "SKU-1", b"SKU-2", "Ünïcode"),
        ("SET", b"key", 12, 2.5),
        ("CONFIG GET", "maxmemory"),
        ("EVALSHA", "0" * 40, 1, "k", b"a\x00b"),
    ],
)
def test_hiredis_packing_matches_redis_py(command: tuple[Any, ...]) -> None:
    """The hiredis-packing connection sends byte for byte what redis-py's packer sends."""
    from redis.asyncio.connection import Connection

    from service.store.factory import HiredisPackingConnection

    expected = b"".join(Connection().pack_command(*command))
    assert b"".join(HiredisPackingConnection().pack_command(*command)) == expected


# -- the read script and its parser (issue 7: stock read CPU) -----------------------------------

# More fields than Redis's default hash-max-listpack-entries (512): a hash of this many is a
# hash table, one of fewer a listpack; the read script takes a different path for each.
_LARGE_HASH = 600


@dataclass
class _RawRedis:
    prefix: str
    open_client: Callable[[], AbstractAsyncContextManager[AnyRedis]]
    sync_client: redis.Redis | redis.cluster.RedisCluster


@pytest.fixture(params=["redis", "redis-cluster"])
def raw_redis(request: pytest.FixtureRequest) -> Iterator[_RawRedis]:
    """A Redis store's client factory, prefix and a sync client for writing cells directly."""
    sync_client: redis.Redis | redis.cluster.RedisCluster
    if request.param == "redis":
        sync_client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        yield _RawRedis(
            request.getfixturevalue("redis_prefix"),
            request.getfixturevalue("redis_client"),
            sync_client,
        )
    else:
        cluster_url: str = request.getfixturevalue("redis_cluster_url")
        sync_client = redis.cluster.RedisCluster.from_url(
            cluster_url.replace("redis+cluster://", "redis://", 1)
        )
        yield _RawRedis(
            request.getfixturevalue("redis_cluster_prefix"),
            request.getfixturevalue("redis_cluster_client"),
            sync_client,
        )
    sync_client.close()


@pytest.mark.parametrize("large", [False, True], ids=["listpack", "hashtable"])
def test_redis_reads_cells_of_every_shape(raw_redis: _RawRedis, large: bool) -> None:
    """Cells of 3 numbers (the version's as_of), 4 (their own), 5 (a delta id, dropped), and
    absent ones (not ranged) read back right, from small and large node hashes alike."""
    as_of_us = epoch_us(AS_OF)
    cells = {
        "SKU-1": (b"5,1,2", (5, 1, 2, as_of_us)),
        "SKU-2": (b"6,0,1,1740812400000001", (6, 0, 1, 1740812400000001)),
        "SKU-3": (b"7,2,3,1740812400000002,erp:77/a-b.c", (7, 2, 3, 1740812400000002)),
        "SKU-4": (b"0,0,0,-5,d", (0, 0, 0, -5)),
    }
    fillers = [f"FILL-{i}" for i in range(_LARGE_HASH if large else 20)]

    async def scenario() -> StockMatrix:
        async with raw_redis.open_client() as client:
            store = RedisSnapshotStore(client, prefix=raw_redis.prefix)
            meta = await store.publish(make_snapshot())
            key = f"{raw_redis.prefix}:snap:{meta.version}:atp:{{S001}}"
            raw_redis.sync_client.hset(
                key,
                mapping={**{sku: raw for sku, (raw, _) in cells.items()}}
                | dict.fromkeys(fillers, b"1,0,0"),
            )
            expected = b"hashtable" if large else b"listpack"
            assert raw_redis.sync_client.object("encoding", key) == expected
            skus = [*cells, "NO-SUCH-SKU", *fillers]  # 16 or more: the listpack path
            return await store.read_stock(meta.version, skus, ["DC01", "S001"])

    stock = run(scenario())
    for row, (sku, (_, figures)) in enumerate(cells.items()):
        assert stock.skus[row] == sku
        got = (
            stock.atp[row, 1],
            stock.safety_stock[row, 1],
            stock.inbound[row, 1],
            stock.as_of_us[row, 1],
        )
        assert got == figures, sku
    assert bool(stock.ranged[: len(cells), 1].all())
    unknown = len(cells)
    assert not stock.ranged[unknown].any()
    assert stock.atp[unknown].tolist() == [0, 0]
    assert stock.as_of_us[unknown].tolist() == [as_of_us, as_of_us]
    assert bool(stock.ranged[unknown + 1 :, 1].all())
    assert stock.atp[unknown + 1 :, 1].tolist() == [1] * len(fillers)
    # DC01 holds SKU-1 (make_snapshot's stock) and nothing written here.
    assert stock.ranged[:, 0].tolist() == [True] + [False] * (len(stock.skus) - 1)
    assert stock.atp[0, 0] == 900


@pytest.mark.parametrize(
    "raw",
    [b"3,2", b"1,,3", b"-,1,2", b"1,2,3,4,5,6", b"x,1,2", b"1,2,3-", b"1.5,2,3", b",1,2,3"],
)
def test_redis_malformed_cell_names_key_and_sku(raw_redis: _RawRedis, raw: bytes) -> None:
    """A cell that does not parse raises StoreError naming its key and SKU, whatever the
    other cells of the read hold."""

    async def scenario() -> None:
        async with raw_redis.open_client() as client:
            store = RedisSnapshotStore(client, prefix=raw_redis.prefix)
            meta = await store.publish(make_snapshot())
            key = f"{raw_redis.prefix}:snap:{meta.version}:atp:{{S002}}"
            raw_redis.sync_client.hset(key, mapping={"SKU-4": raw, "SKU-2": b"1,2,3,4,erp-1"})
            with pytest.raises(StoreError, match=re.escape(f"{key} field 'SKU-4'")):
                await store.read_stock(meta.version, list(SKUS), ["S001", "S002", "DC01"])

    run(scenario())


def test_redis_stock_read_refuses_a_sku_holding_nul(raw_redis: _RawRedis) -> None:
    """NUL joins the SKUs the read script takes, so a SKU holding one is refused, not
    misread (publishing refuses such SKUs, so none is ever ranged)."""

    async def scenario() -> None:
        async with raw_redis.open_client() as client:
            store = RedisSnapshotStore(client, prefix=raw_redis.prefix)
            meta = await store.publish(make_snapshot())
            with pytest.raises(StoreError, match="NUL"):
                await store.read_stock(meta.version, ["SKU-1", "SKU\x002"], ["S001"])

    run(scenario())
