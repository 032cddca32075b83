"""Server-side latency of the request path (candidates -> constraints -> ranking -> template
explanation) on the bundled Online Retail sample, on the in-process store and on Redis.

Measures ``Recommender.recommend`` directly: what a request costs inside the service, without
HTTP framing (the HTTP load benchmark is a separate one). Writes
``benchmarks/results/request_path.json`` and prints a table.

    .venv/bin/python benchmarks/bench_request_path.py [--requests 2000] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl

from models.artifacts import save_artifacts
from models.data.adapters import import_online_retail
from models.data.contract import read_orders, read_snapshot_dir
from models.training import train
from service.logging import configure_logging
from service.pipeline import BasketLine, RecommendationQuery
from service.runtime import Runtime
from service.settings import Settings
from service.store.factory import open_configured_store

RESULTS = Path(__file__).resolve().parent / "results" / "request_path.json"
CHANNELS = ("cart", "pdp", "pos", "contact_center")
# (name, Redis: None = in-process, "" = --redis-url, stock mirror)
STORES = (("in-process", None, False), ("redis", "", False), ("redis+mirror", "", True))


def queries(contract_dir: Path, count: int, *, seed: int) -> list[RecommendationQuery]:
    rng = random.Random(seed)
    baskets = (
        pl.read_parquet(contract_dir / "orders.parquet")
        .group_by("order_id", maintain_order=True)
        .agg(pl.col("sku"), pl.col("customer_id").first())
    )
    skus, customers = (
        baskets.get_column("sku").to_list(),
        baskets.get_column("customer_id").to_list(),
    )
    made = []
    for number in range(count):
        index = rng.randrange(len(skus))
        basket = rng.sample(skus[index], k=min(len(skus[index]), rng.randint(1, 5)))
        channel = CHANNELS[number % len(CHANNELS)]
        made.append(
            RecommendationQuery(
                request_id=str(number),
                channel=channel,
                basket=tuple(BasketLine(sku, 1) for sku in basket) if channel != "pdp" else (),
                pdp_sku=basket[0] if channel == "pdp" else None,
                customer_id=customers[index],
                consent=customers[index] is not None,
                store_id="S-UK" if channel == "pos" else None,
                region="UK" if channel != "pos" else None,
                limit=10,
            )
        )
    return made


async def measure(
    settings: Settings, contract_dir: Path, count: int
) -> dict[str, dict[str, float]]:
    store = await open_configured_store(settings)
    await store.publish(read_snapshot_dir(contract_dir))
    runtime = await Runtime.start(settings, store=store)
    recommender = runtime.require_recommender()
    if runtime.stock_mirror is not None and runtime.mirror is not None:
        serving = await runtime.mirror.current()
        while not runtime.stock_mirror.is_fresh(serving.meta.version):
            await asyncio.sleep(0.01)
    all_queries = queries(contract_dir, count, seed=5)
    for query in all_queries[:200]:  # warm caches and code paths
        await recommender.recommend(query)
    timings: dict[str, list[float]] = {channel: [] for channel in CHANNELS}
    for query in all_queries:
        started = time.perf_counter()
        await recommender.recommend(query)
        timings[query.channel].append((time.perf_counter() - started) * 1e6)
        await asyncio.sleep(0)  # the event loop's turn between requests, as a server gives it
    await runtime.close()
    summary = {}
    for channel, values in timings.items():
        array = np.array(values)
        summary[channel] = {
            "requests": len(values),
            "p50_us": round(float(np.percentile(array, 50)), 1),
            "p99_us": round(float(np.percentile(array, 99)), 1),
            "mean_us": round(statistics.fmean(values), 1),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    configure_logging(level="error")  # as served: decision lines filtered, not rendered
    sample = Path(str(resources.files("models").joinpath("sample/online_retail_sample.parquet")))
    results: dict[str, object] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "requests_per_store": args.requests,
        "what": "server-side Recommender.recommend, sample data, limit 10, pool 300",
    }
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        import_online_retail(sample, root / "contract", seed=7)
        save_artifacts(train(read_orders(root / "contract" / "orders.parquet")), root / "artifacts")
        for name, redis_url, stock_mirror in STORES:
            settings = Settings(
                stock_mirror=stock_mirror,
                redis_url=None if redis_url is None else args.redis_url,
                redis_prefix=f"upsell-bench:{int(time.time())}",
                state_dir=root / f"state-{name}",
                artifacts_dir=root / "artifacts",
                log_level="error",
            )
            results[name] = asyncio.run(measure(settings, root / "contract", args.requests))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'store':<13} {'channel':<15} {'p50 us':>9} {'p99 us':>9}")
    for name, _, _ in STORES:
        for channel, figures in results[name].items():  # type: ignore[attr-defined]
            print(f"{name:<13} {channel:<15} {figures['p50_us']:>9} {figures['p99_us']:>9}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
