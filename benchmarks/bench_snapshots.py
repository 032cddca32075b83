"""ERP snapshots in Redis at scale: publish time, Redis memory, stock read latency, replica
memory, delta throughput.

A synthetic, deterministic snapshot (seeded numpy): ``--skus`` items x ``--nodes`` nodes, each
SKU ranged at each node with probability ``--density`` (default 100,000 x 500 at 0.4, about
20 million stock cells). It is published to a redis-server this script starts on a free port
(no persistence, so memory figures are ours alone), or to ``--redis-url``. Then:

- Redis memory: ``INFO memory`` used_memory before and after the publish, per stock cell, and
  ``MEMORY USAGE`` of sampled stock hashes;
- stock reads as a request makes them: ``RedisSnapshotStore.read_stock`` of ``--candidates``
  random SKUs at ``--request-nodes`` random nodes (p50, p99), next to the plain pipelined HMGET
  it replaced; Redis-side time per call from ``INFO commandstats``;
- the same reads on a local three-master Redis Cluster (``--cluster``), on a snapshot with
  fewer nodes (reads touch 8 nodes whatever the total; publishing 20M cells twice would
  double the run);
- memory per replica for the mirrored item master (the ``Catalog`` a replica builds from the
  items frame), by object size and by RSS;
- inventory deltas: batches of 2,000 applied, deltas per second; batches replayed (all
  duplicates); the ledger of delta ids and the delta log, bytes per delta.

Writes ``benchmarks/results/snapshots.json`` and prints a summary.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_snapshots.py [--skus 100000]
        [--nodes 500] [--density 0.4] [--requests 2000] [--cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from models.data.contract import validate_table
from models.data.schema import INVENTORY, ITEMS, NODES, SnapshotData
from rules.catalog import catalog_from_items
from service.store.deltas import deltas_from_frame
from service.store.factory import HiredisPackingConnection
from service.store.redis_store import AnyRedis, RedisSnapshotStore

RESULTS = Path(__file__).resolve().parent / "results" / "snapshots.json"
HOST = "127.0.0.1"
AS_OF = datetime(2026, 11, 23, 6, 0)


# -- data -----------------------------------------------------------------------------------


def synthetic_snapshot(skus: int, nodes: int, density: float, *, seed: int) -> SnapshotData:
    """Items, nodes and sparse inventory; the same arguments always give the same snapshot."""
    rng = np.random.default_rng(seed)
    sku_ids = pl.Series("sku", [f"SKU-{n:07d}" for n in range(skus)])
    items = validate_table(
        pl.DataFrame(
            {
                "sku": sku_ids,
                "name": [f"Item {n}" for n in range(skus)],
                "category": [f"cat-{n % 200:03d}" for n in range(skus)],
                "brand": [f"brand-{n % 900:03d}" for n in range(skus)],
                "unit_cost": np.round(rng.uniform(1, 80, skus), 2),
                "unit_price": np.round(rng.uniform(100, 160, skus), 2),
            }
        ),
        ITEMS,
        file="synthetic items",
    )
    node_ids = [f"{'DC' if n < 10 else 'ST'}-{n:04d}" for n in range(nodes)]
    nodes_frame = validate_table(
        pl.DataFrame(
            {
                "node_id": node_ids,
                "kind": ["dc" if n < 10 else "store" for n in range(nodes)],
                "region": [f"R{n % 12:02d}" for n in range(nodes)],
                "fulfillment_cost": np.round(rng.uniform(2, 8, nodes), 2),
            }
        ),
        NODES,
        file="synthetic nodes",
    )
    parts = []
    for node_id in node_ids:
        ranged = np.flatnonzero(rng.random(skus) < density)
        count = ranged.size
        parts.append(
            pl.DataFrame(
                {
                    "sku": sku_ids.gather(ranged),
                    "node_id": pl.repeat(node_id, count, eager=True, dtype=pl.String),
                    "atp": rng.integers(0, 60, count),
                    "safety_stock": rng.integers(0, 6, count),
                    "inbound": rng.integers(0, 3, count) * rng.integers(0, 40, count),
                }
            )
        )
    inventory = pl.concat(parts).with_columns(as_of=pl.lit(None, dtype=pl.Datetime("us")))
    inventory = inventory.select(
        [
            pl.col(column.name).cast(column.dtype)
            if column.name in inventory.columns
            else pl.lit(column.default, dtype=column.dtype).alias(column.name)
            for column in INVENTORY.columns
        ]
    )
    return SnapshotData(items=items, nodes=nodes_frame, inventory=inventory, as_of=AS_OF)


# -- servers --------------------------------------------------------------------------------


def free_port(*, bus: bool = False) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
        if not bus:
            return port
        if port + 10_000 > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((HOST, port + 10_000))
            except OSError:
                continue
        return port


def wait_for(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        client = redis.Redis(host=HOST, port=port, socket_timeout=0.2)
        try:
            if client.ping():
                return
        except (redis.RedisError, OSError):
            time.sleep(0.05)
        finally:
            client.close()
    raise RuntimeError(f"redis-server on {port} did not answer")


@contextmanager
def redis_servers(count: int, *, cluster: bool) -> Iterator[list[int]]:
    """``count`` redis-servers on free ports (joined into a cluster if asked), torn down after."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH (or pass --redis-url)")
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        ports, processes = [], []
        try:
            for _ in range(count):
                port = free_port(bus=cluster)
                node_dir = Path(workdir) / str(port)
                node_dir.mkdir()
                command = [binary, "--port", str(port), "--bind", HOST, "--save", ""]
                command += ["--appendonly", "no", "--dir", str(node_dir)]
                if cluster:
                    command += ["--cluster-enabled", "yes"]
                processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
                ports.append(port)
            for port in ports:
                wait_for(port)
            if cluster:
                subprocess.run(
                    [
                        "redis-cli",
                        "--cluster",
                        "create",
                        *[f"{HOST}:{p}" for p in ports],
                        "--cluster-replicas",
                        "0",
                        "--cluster-yes",
                    ],
                    check=True,
                    capture_output=True,
                )
                while not all(
                    redis.Redis(host=HOST, port=p).execute_command("CLUSTER INFO")["cluster_state"]
                    == "ok"
                    for p in ports
                ):
                    time.sleep(0.1)
            yield ports
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)


def used_memory(ports: list[int]) -> int:
    total = 0
    for port in ports:
        client = redis.Redis(host=HOST, port=port)
        total += int(client.info("memory")["used_memory"])
        client.close()
    return total


# -- measurements ---------------------------------------------------------------------------


def percentiles(values_us: list[float]) -> dict[str, float]:
    array = np.array(values_us)
    return {
        "requests": len(values_us),
        "p50_us": round(float(np.percentile(array, 50)), 1),
        "p99_us": round(float(np.percentile(array, 99)), 1),
        "mean_us": round(float(array.mean()), 1),
    }


def random_requests(
    snapshot: SnapshotData, count: int, candidates: int, request_nodes: int, *, seed: int
) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    skus = snapshot.items.get_column("sku").to_list()
    nodes = snapshot.nodes.get_column("node_id").to_list()
    return [(rng.sample(skus, candidates), rng.sample(nodes, request_nodes)) for _ in range(count)]


async def publish(client: AnyRedis, snapshot: SnapshotData, prefix: str) -> dict[str, Any]:
    store = RedisSnapshotStore(client, prefix=prefix, keep=2)
    started = time.perf_counter()
    meta = await store.publish(snapshot)
    return {"version": meta.version, "publish_s": round(time.perf_counter() - started, 1)}


async def read_latencies(
    client: AnyRedis,
    prefix: str,
    version: str,
    requests: list[tuple[list[str], list[str]]],
    *,
    script_path: bool = False,
) -> dict[str, float]:
    """``read_stock`` as a request calls it; ``script_path`` forces the Cluster read path
    (one read-script call per node) on a single Redis, to compare the two."""
    store = RedisSnapshotStore(client, prefix=prefix, keep=2)
    if script_path:
        store._cluster = True  # benchmark only: the Cluster path, on this Redis
    await store.read_stock(version, *requests[0])  # scripts, meta cache
    timings = []
    for skus, nodes in requests:
        started = time.perf_counter()
        await store.read_stock(version, skus, nodes)
        timings.append((time.perf_counter() - started) * 1e6)
    return percentiles(timings)


async def hmget_latencies(
    client: redis.asyncio.Redis,
    prefix: str,
    version: str,
    requests: list[tuple[list[str], list[str]]],
) -> dict[str, float]:
    """The read as it was before: the same pipeline packed by redis-py's Python packer."""
    timings = []
    for skus, nodes in requests:
        started = time.perf_counter()
        async with client.pipeline(transaction=False) as pipe:
            pipe.exists(f"{{{prefix}}}:snap:{version}:meta")
            for node in nodes:
                pipe.hmget(f"{prefix}:snap:{version}:atp:{{{node}}}", skus)
            await pipe.execute()
        timings.append((time.perf_counter() - started) * 1e6)
    return percentiles(timings)


async def apply_deltas(
    client: AnyRedis, prefix: str, snapshot: SnapshotData, *, batches: int, seed: int, url: str
) -> dict[str, float]:
    """New deltas in batches of 2,000 (ledger check, log, apply), then a few batches sent
    again (all duplicates: the ledger answers, the cells confirm), and the ledger's size."""
    store = RedisSnapshotStore(client, prefix=prefix, keep=2)
    rng = np.random.default_rng(seed)
    cells = snapshot.inventory.select("sku", "node_id")
    size = 2_000
    elapsed = 0.0
    sent = []
    for number in range(batches):
        picked = cells[rng.integers(0, cells.height, size)].unique(maintain_order=True)
        frame = picked.with_columns(
            delta_id=pl.format("bench-{}-{}", pl.lit(number), pl.int_range(pl.len())),
            atp=pl.lit(rng.integers(0, 60)),
            as_of=pl.lit(AS_OF + timedelta(minutes=1 + number)),
        )
        batch = deltas_from_frame(frame, source="bench", now=datetime.now(UTC))
        started = time.perf_counter()
        report = await store.apply_deltas(batch)
        elapsed += time.perf_counter() - started
        assert report.applied == len(batch), report
        sent.append(batch)
    replays = sent[:5]
    started = time.perf_counter()
    for batch in replays:
        report = await store.apply_deltas(batch)
        assert report.duplicate == len(batch), report
    replay_elapsed = time.perf_counter() - started
    sync = redis.Redis.from_url(url)
    ledger_key = f"{{{prefix}}}:inv:ids"
    ids = int(sync.hlen(ledger_key))
    ledger_bytes = int(sync.memory_usage(ledger_key, samples=0) or 0)
    log_bytes = int(sync.memory_usage(f"{{{prefix}}}:inv:log", samples=0) or 0)
    sync.close()
    applied = sum(len(batch) for batch in sent)
    return {
        "batches": batches,
        "deltas_per_batch": size,
        "deltas_per_s": round(applied / elapsed),
        "ms_per_batch": round(elapsed / batches * 1e3, 1),
        "replayed_batches": len(replays),
        "replayed_ms_per_batch": round(replay_elapsed / len(replays) * 1e3, 1),
        "ledger_ids": ids,
        "ledger_bytes_per_id": round(ledger_bytes / max(ids, 1), 1),
        "log_bytes_per_delta": round(log_bytes / max(applied, 1), 1),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def object_bytes(value: Any) -> int:
    """Bytes held by a Catalog field: array buffers, or containers with their strings."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, tuple | list):
        return sys.getsizeof(value) + sum(sys.getsizeof(item) for item in value)
    if isinstance(value, dict):
        # Keys are the SKU strings the skus tuple holds already; count the table and values.
        return sys.getsizeof(value) + sum(sys.getsizeof(v) for v in value.values())
    return sys.getsizeof(value)


async def mirror_memory(client: AnyRedis, prefix: str, version: str) -> dict[str, Any]:
    store = RedisSnapshotStore(client, prefix=prefix, keep=2)
    gc.collect()
    before = rss_bytes()
    master = await store.load_master(version)
    catalog = catalog_from_items(master.items)
    frame_bytes = int(master.items.estimated_size())
    del master
    gc.collect()
    after = rss_bytes()
    fields = {name: object_bytes(getattr(catalog, name)) for name in catalog.__dataclass_fields__}
    return {
        "items": len(catalog),
        "catalog_bytes_by_field": fields,
        "catalog_bytes": sum(fields.values()),
        "catalog_bytes_per_item": round(sum(fields.values()) / len(catalog), 1),
        "rss_growth_bytes_after_dropping_frames": after - before,
        "items_frame_bytes_while_loading": frame_bytes,
    }


async def measure_single(args: argparse.Namespace, snapshot: SnapshotData, port: int) -> dict:
    url = args.redis_url or f"redis://{HOST}:{port}/0"
    ports = [port] if not args.redis_url else []
    client = redis.asyncio.Redis.from_url(
        url, decode_responses=False, connection_class=HiredisPackingConnection
    )  # as open_store makes it
    plain_client = redis.asyncio.Redis.from_url(url, decode_responses=False)
    prefix = f"bench:{int(time.time())}"
    results: dict[str, Any] = {}
    memory_before = used_memory(ports) if ports else None
    results["publish"] = await publish(client, snapshot, prefix)
    version = results["publish"]["version"]
    cells = snapshot.inventory.height
    if memory_before is not None:
        grown = used_memory(ports) - memory_before
        sync = redis.Redis.from_url(url)
        sampled = [
            int(sync.memory_usage(f"{prefix}:snap:{version}:atp:{{{node}}}", samples=0) or 0)
            for node in snapshot.nodes.get_column("node_id").to_list()[:: max(1, args.nodes // 10)]
        ]
        items_key = int(sync.memory_usage(f"{{{prefix}}}:snap:{version}:items", samples=0) or 0)
        sync.close()
        results["redis_memory"] = {
            "used_memory_growth_bytes": grown,
            "bytes_per_stock_cell": round(grown / cells, 1),
            "sampled_node_hash_bytes_mean": round(float(np.mean(sampled))),
            "items_key_bytes": items_key,
        }
    requests = random_requests(
        snapshot, args.requests, args.candidates, args.request_nodes, seed=11
    )
    sync = redis.Redis.from_url(url)
    variants: list[tuple[str, Any, str]] = [
        ("read_stock", lambda: read_latencies(client, prefix, version, requests), "hmget"),
        (
            "read_stock_script_path_as_on_cluster",
            lambda: read_latencies(plain_client, prefix, version, requests, script_path=True),
            "evalsha",
        ),
        (
            "before_hmget_python_packer_no_decoding",
            lambda: hmget_latencies(plain_client, prefix, version, requests),
            "hmget",
        ),
    ]
    # Two passes, the first unrecorded: the first reads of a 1.6 GB dataset fault pages in,
    # and whichever variant ran first would pay for it.
    for recorded in (False, True):
        for name, measure, command in variants:
            sync.config_resetstat()
            figures = await measure()
            if recorded:
                calls = sync.info("commandstats")[f"cmdstat_{command}"]
                # one call per node of the request, in every variant
                per_request = calls["usec_per_call"] * args.request_nodes
                figures["redis_cpu_us_per_request"] = round(per_request, 1)
                results[name] = figures
    sync.close()
    await plain_client.aclose()
    results["mirror_memory"] = await mirror_memory(client, prefix, version)
    results["deltas"] = await apply_deltas(client, prefix, snapshot, batches=20, seed=5, url=url)
    await client.aclose()
    return results


async def measure_cluster(args: argparse.Namespace, ports: list[int]) -> dict:
    snapshot = synthetic_snapshot(args.skus, args.cluster_nodes, args.density, seed=1)
    client = RedisCluster(host=HOST, port=ports[0], decode_responses=False)
    prefix = f"bench:{int(time.time())}"
    memory_before = used_memory(ports)
    published = await publish(client, snapshot, prefix)
    grown = used_memory(ports) - memory_before
    requests = random_requests(
        snapshot, args.requests, args.candidates, args.request_nodes, seed=11
    )
    await read_latencies(client, prefix, published["version"], requests)  # unrecorded pass
    reads = await read_latencies(client, prefix, published["version"], requests)
    reads["path"] = "one EVALSHA (read script) per node, pipelined over the masters"
    await client.aclose()
    return {
        "nodes": args.cluster_nodes,
        "stock_cells": snapshot.inventory.height,
        "publish": published,
        "bytes_per_stock_cell": round(grown / snapshot.inventory.height, 1),
        "read_stock": reads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skus", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--density", type=float, default=0.4)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--candidates", type=int, default=300)
    parser.add_argument("--request-nodes", type=int, default=8)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--cluster", action="store_true", help="also measure on a local cluster")
    parser.add_argument("--cluster-nodes", type=int, default=50)
    args = parser.parse_args()

    started = time.perf_counter()
    snapshot = synthetic_snapshot(args.skus, args.nodes, args.density, seed=1)
    generated_s = time.perf_counter() - started
    results: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, redis-py {redis.__version__}",
        "redis_server": subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "snapshot": {
            "skus": args.skus,
            "nodes": args.nodes,
            "density": args.density,
            "stock_cells": snapshot.inventory.height,
            "generated_s": round(generated_s, 1),
        },
        "request": {"candidates": args.candidates, "nodes": args.request_nodes},
    }
    with redis_servers(0 if args.redis_url else 1, cluster=False) as ports:
        results["single"] = asyncio.run(measure_single(args, snapshot, ports[0] if ports else 0))
    del snapshot
    gc.collect()
    if args.cluster:
        with redis_servers(3, cluster=True) as ports:
            results["cluster"] = asyncio.run(measure_cluster(args, ports))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
