"""The whole request path with LLM explanations, under a slow LLM: 1,000 requests over real
HTTP to `upsell serve` while the (local, Anthropic-compatible) Messages API takes 300 ms.

What it shows: the tight channels (cart, PDP, POS) answer within their server-side budget
(template now, LLM text queued), the contact center, whose 1.5 s budget fits a call, answers
with LLM text, and once the queue has drained the queued text comes back from the cache.

Three processes, as in production: the service (`python -m service.cli serve`, uvicorn with
uvloop, its explainer built from settings: real ``anthropic`` SDK over loopback HTTP), the
test Messages API (``tests/service/explain/fake_anthropic.py``, its own process) and this
client. The service runs on the bundled Online Retail sample, imported, trained and
published here first. Requests arrive open-loop at ``--rate`` per second, the four channels
in turn, each a real basket from the sample's orders (so popular pairs repeat as in real
traffic). The server-side time of each request is the service's own ``Server-Timing`` header:
from the request's arrival in the app (where its deadline starts) to the response's start.
The client's round trip is reported too. Accounting comes from ``GET /v1/admin/explanations``.

Runs on the in-process store and cache, and on Redis when one answers at ``--redis-url``.
Writes ``benchmarks/results/explanations.json`` and prints a table.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_explanations.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import redis
from bench_bodies import request_body

from models.artifacts import save_artifacts
from models.calibration import fit_acceptance, save_calibration
from models.data.adapters import import_online_retail
from models.data.contract import read_orders, read_snapshot_dir
from models.training import train
from rules.policy import CHANNELS
from service.settings import Settings
from service.store.factory import open_configured_store

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "explanations.json"
FAKE_SERVER = REPO / "tests" / "service" / "explain" / "fake_anthropic.py"
ADMIN_TOKEN = "bench-admin"
_SERVER_TIMING = re.compile(r"app;dur=([\d.]+)")


def request_bodies(contract_dir: Path, count: int, *, seed: int) -> list[dict[str, Any]]:
    """Real baskets (1-5 lines of one order), the channels in turn."""
    rng = random.Random(seed)
    baskets = (
        pl.read_parquet(contract_dir / "orders.parquet")
        .group_by("order_id", maintain_order=True)
        .agg(pl.col("sku"))
        .get_column("sku")
        .to_list()
    )
    bodies = []
    for number in range(count):
        skus = rng.sample(basket := baskets[rng.randrange(len(baskets))], k=min(len(basket), 5))
        skus = skus[: rng.randint(1, len(skus))]
        channel = CHANNELS[number % len(CHANNELS)]
        bodies.append(request_body(channel, skus))
    return bodies


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def runnable_wait_s(pid: int) -> float:
    """Seconds the process's threads spent runnable but not running (Linux schedstat)."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total_ns / 1e9


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_pass(
    client: httpx.AsyncClient,
    bodies: list[dict[str, Any]],
    *,
    rate: float,
    budgets_ms: dict[str, float],
    server_pid: int,
    llm_pid: int,
) -> dict[str, Any]:
    """Send every body open-loop at ``rate`` per second; per-channel figures."""
    server_ms: dict[str, list[float]] = {channel: [] for channel in CHANNELS}
    client_ms: dict[str, list[float]] = {channel: [] for channel in CHANNELS}
    found: dict[str, Counter[str]] = {channel: Counter() for channel in CHANNELS}
    statuses: Counter[int] = Counter()

    async def one(body: dict[str, Any]) -> None:
        started = time.perf_counter()
        response = await client.post("/v1/recommendations", json=body)
        client_ms[body["channel"]].append((time.perf_counter() - started) * 1000)
        statuses[response.status_code] += 1
        timing = _SERVER_TIMING.search(response.headers.get("server-timing", ""))
        if timing is not None:
            server_ms[body["channel"]].append(float(timing.group(1)))
        if response.status_code == 200:
            found[body["channel"]].update(
                item["explanation_source"] for item in response.json()["items"]
            )

    begin = time.monotonic()
    cpu_begin, waited_begin = cpu_s(server_pid), runnable_wait_s(server_pid)
    llm_cpu_begin, client_cpu_begin = cpu_s(llm_pid), time.process_time()
    tasks = []
    for number, body in enumerate(bodies):
        await asyncio.sleep(max(0.0, begin + number / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(body)))
    await asyncio.gather(*tasks)
    wall_s = time.monotonic() - begin
    summary: dict[str, Any] = {"status_codes": {str(code): n for code, n in statuses.items()}}
    for channel in CHANNELS:
        server, round_trip = np.array(server_ms[channel]), np.array(client_ms[channel])
        summary[channel] = {
            "requests": len(round_trip),
            "budget_ms": budgets_ms[channel],
            "server_p50_ms": round(float(np.percentile(server, 50)), 2),
            "server_p99_ms": round(float(np.percentile(server, 99)), 2),
            "server_max_ms": round(float(server.max()), 2),
            "over_budget": int((server > budgets_ms[channel]).sum()),
            "client_p50_ms": round(float(np.percentile(round_trip, 50)), 2),
            "client_p99_ms": round(float(np.percentile(round_trip, 99)), 2),
            "sources": dict(found[channel]),
        }
    server_cpu_s = cpu_s(server_pid) - cpu_begin
    summary["wall_s"] = round(wall_s, 2)
    summary["server_cpu_share"] = round(server_cpu_s / wall_s, 3)
    # CPU per request barely depends on what else runs on the machine, unlike latency: the
    # figure to compare designs by on a shared box.
    summary["server_cpu_ms_per_request"] = round(server_cpu_s * 1000 / len(bodies), 2)
    # Time the service was ready to run while the OS ran something else (this client, the
    # Messages API, other jobs on the machine): where it is large, so are the tail latencies.
    summary["server_runnable_but_waiting_share"] = round(
        (runnable_wait_s(server_pid) - waited_begin) / wall_s, 3
    )
    # The other two processes of the benchmark share the machine with the service: in
    # production the LLM is remote, and the clients are elsewhere.
    summary["llm_server_cpu_share"] = round((cpu_s(llm_pid) - llm_cpu_begin) / wall_s, 3)
    summary["client_cpu_share"] = round((time.process_time() - client_cpu_begin) / wall_s, 3)
    summary["load_average_after"] = round(os.getloadavg()[0], 2)
    return summary


async def accounting(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get(
        "/v1/admin/explanations", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


async def wait_drained(client: httpx.AsyncClient, *, timeout_s: float) -> float | None:
    """Seconds until nothing waits in the queue and no call went out for a second; None when
    ``timeout_s`` passed first."""
    started = time.monotonic()
    previous_calls = -1
    while time.monotonic() - started < timeout_s:
        figures = await accounting(client)
        if figures["queue_waiting"] == 0 and figures["llm_calls"] == previous_calls:
            return round(time.monotonic() - started - 1.0, 1)
        previous_calls = figures["llm_calls"]
        await asyncio.sleep(1.0)
    return None


async def drive(
    base_url: str,
    bodies: list[dict[str, Any]],
    *,
    rate: float,
    budgets_ms: dict[str, float],
    server_pid: int,
    llm_pid: int,
    drain_timeout_s: float,
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        # Warm-up: first requests pay for lazy imports and first-use code paths.
        for body in bodies[:20]:
            await client.post("/v1/recommendations", json=body)
        await wait_drained(client, timeout_s=drain_timeout_s)
        warm_up = await accounting(client)
        pids = {"server_pid": server_pid, "llm_pid": llm_pid}
        first = await run_pass(client, bodies, rate=rate, budgets_ms=budgets_ms, **pids)
        drained_s = await wait_drained(client, timeout_s=drain_timeout_s)
        after_first = await accounting(client)
        second = await run_pass(client, bodies, rate=rate, budgets_ms=budgets_ms, **pids)
        final = await accounting(client)
    return {
        "first_pass": first,
        "queue_drained_in_s": drained_s,
        "queue_after_first_pass": after_first["queue"],
        "second_pass_after_drain": second,
        "accounting": final,
        "warm_up_accounting": {key: warm_up[key] for key in ("served", "llm_calls", "queue")},
    }


def serve(settings_env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("UPSELL_")}
    env.update(settings_env, OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(base_url: str, process: subprocess.Popen[bytes], *, timeout_s: float = 120) -> None:
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with status {process.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the service did not become ready")


def publish(settings: Settings, contract_dir: Path) -> None:
    async def run() -> None:
        store = await open_configured_store(settings)
        try:
            await store.publish(read_snapshot_dir(contract_dir))
        finally:
            await store.close()

    asyncio.run(run())


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def measure(
    name: str,
    *,
    root: Path,
    redis_url: str | None,
    llm_base_url: str,
    llm_pid: int,
    bodies: list[dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    prefix = f"upsell-bench:{int(time.time())}"
    env = {
        "UPSELL_STATE_DIR": str(root / f"state-{name}"),
        "UPSELL_ARTIFACTS_DIR": str(root / "artifacts"),
        "UPSELL_REDIS_PREFIX": prefix,
        "UPSELL_LOG_LEVEL": "warning",
        "UPSELL_ADMIN_TOKEN": ADMIN_TOKEN,
        "UPSELL_ANTHROPIC_API_KEY": "bench",
        "UPSELL_ANTHROPIC_BASE_URL": llm_base_url,
        "UPSELL_EXPLAIN_CONCURRENCY": str(args.concurrency),
        "UPSELL_EXPLAIN_QUEUE_SIZE": str(args.queue_size),
        "UPSELL_SNAPSHOT_REFRESH_SECONDS": "1.0",
    }
    if redis_url:
        env["UPSELL_REDIS_URL"] = redis_url
    settings = Settings(
        redis_url=redis_url,
        redis_prefix=prefix,
        state_dir=root / f"state-{name}",
        artifacts_dir=root / "artifacts",
    )
    publish(settings, root / "contract")
    budgets_ms: dict[str, float] = {
        channel: float(Settings.model_fields[f"deadline_{channel}_ms"].default)
        for channel in CHANNELS
    }
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = serve(env, port)
    try:
        wait_ready(base_url, process)
        return asyncio.run(
            drive(
                base_url,
                bodies,
                rate=args.rate,
                budgets_ms=budgets_ms,
                server_pid=process.pid,
                llm_pid=llm_pid,
                drain_timeout_s=args.drain_timeout,
            )
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
        if redis_url:
            client = redis.Redis.from_url(redis_url)
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.unlink(key)
            for key in client.scan_iter(match=f"{{{prefix}}}:*"):
                client.unlink(key)
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--latency-ms", type=float, default=300.0, help="the LLM's answer time")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=Settings.model_fields["explain_concurrency"].default,
        help="UPSELL_EXPLAIN_CONCURRENCY (default: the setting's default)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=Settings.model_fields["explain_queue_size"].default,
        help="UPSELL_EXPLAIN_QUEUE_SIZE (default: the setting's default)",
    )
    parser.add_argument("--drain-timeout", type=float, default=600.0, help="seconds, at most")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--no-redis", action="store_true", help="the in-process store only")
    args = parser.parse_args()
    sample = Path(str(resources.files("models").joinpath("sample/online_retail_sample.parquet")))
    llm = subprocess.Popen(
        [sys.executable, str(FAKE_SERVER), "--latency-ms", str(args.latency_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert llm.stdout is not None
        llm_base_url = json.loads(llm.stdout.readline())["base_url"]
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            import_online_retail(sample, root / "contract", seed=7)
            orders = read_orders(root / "contract" / "orders.parquet")
            version_dir = save_artifacts(train(orders, seed=42), root / "artifacts")
            save_calibration(fit_acceptance(orders, seed=42), version_dir)
            bodies = request_bodies(root / "contract", args.requests, seed=11)
            stores: list[tuple[str, str | None]] = [("in-process", None)]
            if not args.no_redis and redis_answers(args.redis_url):
                stores.append(("redis", args.redis_url))
            results: dict[str, Any] = {
                "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
                "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
                "what": "POST /v1/recommendations over HTTP to `upsell serve`; server-side = "
                "the service's Server-Timing (arrival in the app to response start)",
                "requests": args.requests,
                "limit": 5,
                "rate_per_s": args.rate,
                "llm_latency_ms": args.latency_ms,
                "explain_concurrency": args.concurrency,
                "explain_queue_size": args.queue_size,
            }
            for name, redis_url in stores:
                results[name] = measure(
                    name,
                    root=root,
                    redis_url=redis_url,
                    llm_base_url=llm_base_url,
                    llm_pid=llm.pid,
                    bodies=bodies,
                    args=args,
                )
    finally:
        if llm.stdin is not None:
            llm.stdin.close()
        llm.wait(timeout=10)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    header = f"{'store':<11} {'pass':<6} {'channel':<15} {'p50 ms':>8} {'p99 ms':>8} {'over':>5}"
    print(f"{header}  sources")
    for name, _ in stores:
        for label, key in (("first", "first_pass"), ("second", "second_pass_after_drain")):
            for channel in CHANNELS:
                row = results[name][key][channel]
                print(
                    f"{name:<11} {label:<6} {channel:<15} {row['server_p50_ms']:>8} "
                    f"{row['server_p99_ms']:>8} {row['over_budget']:>5}  {row['sources']}"
                )
        print(
            f"{name}: queue drained in {results[name]['queue_drained_in_s']} s; "
            f"queue {results[name]['accounting']['queue']}"
        )
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
