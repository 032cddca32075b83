"""Explanation stage under load: 1,000 requests through the LLM explainer while the (local,
Anthropic-compatible) Messages API takes 300 ms to answer.

What it shows: the tight channels (cart, PDP, POS) never wait for the LLM (their p99 stays
within the channel's deadline: template now, generation queued), and the contact center,
whose 1.5 s budget fits a call, gets LLM text. A second pass over the same requests, after
the queue has drained, shows the queued text coming back from the cache.

The server is ``tests/service/explain/fake_anthropic.py`` run as a process of its own (as the
real API would be), driven by the real ``anthropic`` SDK over loopback HTTP. Requests arrive
open-loop at ``--rate`` per second, channels in turn, each asking for ``--items`` explanations
of items from the bundled Online Retail sample (anchor and items drawn by popularity, so
popular pairs repeat as they do in real traffic). Latency is measured around
``explainer.explain`` from the moment its request's task starts: the explanation stage's
server-side share, given the channel's whole budget. Writes
``benchmarks/results/explanations.json`` and prints a table.

    .venv/bin/python benchmarks/bench_explanations.py [--requests 1000] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import anthropic
import numpy as np
import polars as pl
import redis.asyncio
import uvloop

from rules.policy import CHANNELS, Channel
from rules.reasons import ShowReason
from service.explain.base import ExplanationRequest
from service.explain.explainer import LlmExplainer, build_explainer, channel_budget_seconds
from service.logging import configure_logging
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "explanations.json"
FAKE_SERVER = REPO / "tests" / "service" / "explain" / "fake_anthropic.py"


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    price: str


def sample_products() -> tuple[list[Product], list[float]]:
    """Distinct sample items with a typical price, and their share of order lines."""
    sample = Path(str(resources.files("models").joinpath("sample/online_retail_sample.parquet")))
    items = (
        pl.read_parquet(sample)
        .filter(pl.col("UnitPrice") > 0, pl.col("Description").is_not_null())
        .group_by("StockCode")
        .agg(
            pl.col("Description").first(),
            pl.col("UnitPrice").median(),
            pl.len().alias("lines"),
        )
        .sort("StockCode")
    )
    products = [
        Product(sku=sku, name=name.strip(), price=f"{price:.2f}")
        for sku, name, price in items.select("StockCode", "Description", "UnitPrice").iter_rows()
    ]
    return products, [float(lines) for lines in items.get_column("lines")]


def make_requests(
    count: int, *, items_per_request: int, seed: int
) -> list[tuple[Channel, list[ExplanationRequest]]]:
    products, weights = sample_products()
    rng = random.Random(seed)
    made: list[tuple[Channel, list[ExplanationRequest]]] = []
    for number in range(count):
        channel = CHANNELS[number % len(CHANNELS)]
        anchor = rng.choices(products, weights)[0]
        chosen: dict[str, Product] = {}
        while len(chosen) < items_per_request:
            item = rng.choices(products, weights)[0]
            if item.sku != anchor.sku:
                chosen[item.sku] = item
        stock = ShowReason.IN_STOCK_AT_STORE if channel == "pos" else ShowReason.IN_STOCK_TO_SHIP
        made.append(
            (
                channel,
                [
                    ExplanationRequest(
                        item_sku=item.sku,
                        item_name=item.name,
                        kind="cross_sell",
                        channel=channel,
                        locale="en",
                        reasons=(ShowReason.BOUGHT_TOGETHER, stock, ShowReason.MARGIN_FLOOR_MET),
                        anchor_sku=anchor.sku,
                        anchor_name=anchor.name,
                        facts={"price": item.price},
                    )
                    for item in chosen.values()
                ],
            )
        )
    return made


async def run_pass(
    explainer: LlmExplainer,
    requests: list[tuple[Channel, list[ExplanationRequest]]],
    *,
    settings: Settings,
    rate: float,
) -> dict[str, Any]:
    """Send every request open-loop at ``rate`` per second; per-channel latency and sources."""
    latencies: dict[str, list[float]] = {channel: [] for channel in CHANNELS}
    sources: dict[str, Counter[str]] = {channel: Counter() for channel in CHANNELS}
    late_starts: list[float] = []

    async def one(channel: Channel, asked: list[ExplanationRequest], due: float) -> None:
        started = time.monotonic()
        late_starts.append(started - due)
        deadline = started + channel_budget_seconds(settings, channel)
        explanations = await explainer.explain(asked, deadline=deadline)
        latencies[channel].append((time.monotonic() - started) * 1000)
        sources[channel].update(explanation.source for explanation in explanations)

    begin, cpu_begin, waited_begin = time.monotonic(), time.process_time(), _runnable_wait_s()
    tasks = []
    for number, (channel, asked) in enumerate(requests):
        due = begin + number / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(one(channel, asked, due)))
    await asyncio.gather(*tasks)
    wall_s, cpu_s = time.monotonic() - begin, time.process_time() - cpu_begin
    summary: dict[str, Any] = {}
    for channel in CHANNELS:
        values = np.array(latencies[channel])
        summary[channel] = {
            "requests": len(values),
            "budget_ms": channel_budget_seconds(settings, channel) * 1000,
            "p50_ms": round(float(np.percentile(values, 50)), 3),
            "p99_ms": round(float(np.percentile(values, 99)), 3),
            "max_ms": round(float(values.max()), 3),
            "sources": dict(sources[channel]),
        }
    # How late request tasks started against their arrival time: the event loop's own
    # queueing, which a real server adds before any stage runs (reported, not hidden).
    summary["event_loop_late_start_p99_ms"] = round(
        float(np.percentile(np.array(late_starts), 99)) * 1000, 3
    )
    summary["event_loop_late_start_p50_ms"] = round(
        float(np.percentile(np.array(late_starts), 50)) * 1000, 3
    )
    summary["process_cpu_share"] = round(cpu_s / wall_s, 3)
    # Time the process was ready to run but the OS ran something else (other jobs on the
    # machine): where that is large, so are the event loop's stalls.
    summary["runnable_but_waiting_share"] = round((_runnable_wait_s() - waited_begin) / wall_s, 3)
    return summary


def _runnable_wait_s() -> float:
    """Seconds this process's threads spent runnable but not running (Linux schedstat)."""
    total_ns = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total_ns / 1e9


class GcPauses:
    """Collector pauses by generation: a full (gen 2) collection stops the event loop."""

    def __init__(self) -> None:
        self._started = 0.0
        self.pauses_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses_ms[info["generation"]].append((time.perf_counter() - self._started) * 1e3)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            f"gen{generation}": {
                "count": len(values),
                "max_ms": round(max(values, default=0.0), 2),
            }
            for generation, values in self.pauses_ms.items()
        }


async def warm_up(explainer: LlmExplainer, settings: Settings) -> None:
    """First calls pay for lazy imports and pydantic schema builds: keep them out of the
    figures, then freeze what start-up allocated so full collections stay short."""
    for channel, asked in make_requests(8, items_per_request=2, seed=99):
        budget = channel_budget_seconds(settings, channel)
        await explainer.explain(asked, deadline=time.monotonic() + budget)
    await explainer.drain()
    gc.collect()
    gc.freeze()


async def measure(
    base_url: str,
    *,
    redis_url: str | None,
    requests: list[tuple[Channel, list[ExplanationRequest]]],
    rate: float,
    concurrency: int,
) -> dict[str, Any]:
    settings = Settings(
        anthropic_api_key=None,  # the client is handed in, pointed at the local server
        redis_prefix=f"upsell-bench:{int(time.time())}",
        explain_concurrency=concurrency,
        log_level="error",
    )
    client = anthropic.AsyncAnthropic(api_key="bench", base_url=base_url)
    # As the service opens Redis (service.store.factory): fail fast, never wait on a socket.
    redis_client = (
        redis.asyncio.Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=0.5)
        if redis_url
        else None
    )
    names = tuple(product.name for product in sample_products()[0])
    explainer = build_explainer(
        settings,
        anthropic_client=client,
        redis_client=redis_client,
        catalog_names=lambda: names,
    )
    assert isinstance(explainer, LlmExplainer)
    await explainer.start()
    gc_pauses = GcPauses()
    try:
        await warm_up(explainer, settings)
        gc.callbacks.append(gc_pauses)
        first = await run_pass(explainer, requests, settings=settings, rate=rate)
        drain_started = time.monotonic()
        await asyncio.wait_for(explainer.drain(), timeout=300)
        drained_s = time.monotonic() - drain_started
        second = await run_pass(explainer, requests, settings=settings, rate=rate)
        stats = explainer.stats()
    finally:
        if gc_pauses in gc.callbacks:
            gc.callbacks.remove(gc_pauses)
        gc.unfreeze()
        await explainer.aclose()
        await client.close()
        if redis_client is not None:
            await redis_client.aclose()
    return {
        "first_pass": first,
        "queue_drained_in_s": round(drained_s, 1),
        "second_pass_after_drain": second,
        "accounting": stats,
        "gc_pauses": gc_pauses.summary(),
    }


def redis_answers(url: str) -> bool:
    async def ping() -> bool:
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(await client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            await client.aclose()

    return asyncio.run(ping())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--items", type=int, default=3, help="explanations per request")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--latency-ms", type=float, default=300.0, help="the server's answer time")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=Settings.model_fields["explain_concurrency"].default,
        help="background LLM calls in flight (default: the setting's default)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (uvloop: what `upsell serve` gets from uvicorn)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    configure_logging(level="error")
    if args.loop == "uvloop":
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    requests = make_requests(args.requests, items_per_request=args.items, seed=11)
    server = subprocess.Popen(
        [sys.executable, str(FAKE_SERVER), "--latency-ms", str(args.latency_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        base_url = json.loads(server.stdout.readline())["base_url"]
        caches: list[tuple[str, str | None]] = [("in-process", None)]
        if redis_answers(args.redis_url):
            caches.append(("redis", args.redis_url))
        results: dict[str, Any] = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, Python {platform.python_version()}",
            "what": "LlmExplainer.explain per request, server-side, open-loop arrivals",
            "requests": args.requests,
            "items_per_request": args.items,
            "rate_per_s": args.rate,
            "server_latency_ms": args.latency_ms,
            "background_concurrency": args.concurrency,
            "event_loop": args.loop,
        }
        for name, redis_url in caches:
            results[name] = asyncio.run(
                measure(
                    base_url,
                    redis_url=redis_url,
                    requests=requests,
                    rate=args.rate,
                    concurrency=args.concurrency,
                )
            )
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=10)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    header = f"{'cache':<11} {'pass':<6} {'channel':<15} {'p50 ms':>8} {'p99 ms':>8}  sources"
    print(header)
    for name, _ in caches:
        for label, key in (("first", "first_pass"), ("second", "second_pass_after_drain")):
            for channel in CHANNELS:
                row = results[name][key][channel]
                print(
                    f"{name:<11} {label:<6} {channel:<15} {row['p50_ms']:>8} {row['p99_ms']:>8}"
                    f"  {row['sources']}"
                )
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
