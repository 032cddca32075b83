"""No request compiles: after start-up's warm-up, recommendations on every channel (on the
in-process store and on Redis with the stock mirror, a model memory-mapped read-only as
served) run only loops already compiled for the argument types they pass.

A loop that a request compiles stalls that request for seconds in a fresh container, where
numba's disk cache is empty. Run in a fresh interpreter: in this one, earlier tests may
have compiled the loops for any type already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.service.conftest import DemoData

SCRIPT = r"""
import asyncio, json, sys
from pathlib import Path

import polars as pl

from models.data.contract import read_snapshot_dir
from rules.compiled import compiled_signatures
from service.pipeline import BasketLine, RecommendationQuery
from service.runtime import Runtime
from service.settings import Settings
from service.store.factory import open_configured_store

contract_dir, artifacts_dir, state_dir, redis_url, prefix = sys.argv[1:6]
CHANNELS = ("cart", "pdp", "pos", "contact_center")


def queries():
    baskets = (
        pl.read_parquet(Path(contract_dir) / "orders.parquet")
        .group_by("order_id", maintain_order=True)
        .agg(pl.col("sku"), pl.col("customer_id").first())
        .head(120)
    )
    for number, (skus, customer) in enumerate(baskets.select("sku", "customer_id").iter_rows()):
        channel = CHANNELS[number % len(CHANNELS)]
        yield RecommendationQuery(
            request_id=str(number),
            channel=channel,
            basket=tuple(BasketLine(sku, 1) for sku in skus[:5]) if channel != "pdp" else (),
            pdp_sku=skus[0] if channel == "pdp" else None,
            customer_id=customer,
            consent=customer is not None and number % 3 != 0,
            store_id="S-UK" if channel == "pos" else None,
            region="UK" if channel != "pos" else None,
            limit=10,
        )


async def run(settings):
    store = await open_configured_store(settings)
    await store.publish(read_snapshot_dir(Path(contract_dir)))
    runtime = await Runtime.start(settings, store=store)
    recommender = runtime.require_recommender()
    if runtime.stock_mirror is not None:
        serving = await runtime.mirror.current()
        while not runtime.stock_mirror.is_fresh(serving.meta.version):
            await asyncio.sleep(0.01)
    before = compiled_signatures()
    shown = 0
    for query in queries():
        shown += len((await recommender.recommend(query)).items)
    after = compiled_signatures()
    await runtime.close()
    return shown, {name: [before.get(name, 0), count] for name, count in after.items()
                   if count != before.get(name, 0)}


results = {}
for name, redis, mirror in (("in-process", None, False), ("redis+mirror", redis_url, True)):
    settings = Settings(
        redis_url=redis, redis_prefix=prefix, stock_mirror=mirror,
        state_dir=Path(state_dir) / name, artifacts_dir=Path(artifacts_dir), log_level="error",
    )
    results[name] = asyncio.run(run(settings))
print(json.dumps(results))
"""


def test_requests_compile_nothing_after_the_warm_up(
    demo_data: DemoData, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(demo_data.contract_dir),
            str(demo_data.artifacts_dir),
            str(tmp_path),
            redis_url,
            redis_prefix,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for store, (shown, compiled_by_requests) in results.items():
        assert shown > 0, f"{store}: nothing recommended, so nothing was exercised"
        assert compiled_by_requests == {}, (
            f"{store}: requests compiled these loops for new argument types "
            f"(name: [signatures after warm-up, after requests]): {compiled_by_requests}"
        )
