"""Load benchmark: real uvicorn workers + real Redis + wrk, on the bundled Online Retail sample,
with the ceiling of the same stack (``POST /v1/ping``) measured in the same run.

1. Starts its own ``redis-server`` on a free port (no persistence) in a temp dir.
2. Imports, trains and publishes the bundled sample into it with the ``upsell`` CLI verbs
   (what ``scripts/demo.sh`` does, on Redis).
3. Starts the service with ``--workers`` uvicorn workers against that Redis (``serve_command``:
   the one place that knows how), auth by API key (``UPSELL_AUTH=keys``, a keys file holding
   the hash of a bench key with every scope and a rate limit far above what wrk can ask).
4. Drives it with ``wrk`` (``benchmarks/wrk_post_bodies.lua`` posts real baskets of the
   sample, per channel, a fresh draw of ``BODIES_PER_RUN`` for each run, so that a basket
   repeats only as baskets do, and guests' candidate lists are remembered that often):
   - ``--rate`` (500) requests per second, paced by the script's ``delay()``, one run per
     channel (cart, pdp, pos, contact_center): achieved rate and p50/p95/p99; then cart
     once more at ``--light-rate`` (200), a rate this box can hold, so the latency of an
     unsaturated server is in the same run;
   - as fast as answered: ``/v1/recommendations`` (cart) between two runs of ``/v1/ping``
     (the trivial endpoint: same server, same middleware, no work), and the ratio of their
     requests per second (against the mean of the two ping runs, so drift shows);
   - then (``--no-floor`` skips it) the same workers serving ``floor_app:app``, whose
     recommender replays its first answer: the peak of the route without its pipeline.
     From the three peaks, the box's CPU per request that the pipeline takes, and what the
     ratio target would leave it (``pipeline_budget``).
5. Writes ``benchmarks/results/load.json`` and prints a markdown table.

Targets (issue 7): cart p99 < 15 ms at 500 req/s; peak recommendations >= 35% of ping's.
wrk runs on the same 2 cores as the workers and Redis: every figure is of the whole box.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_load.py [--duration 20]
        [--rate 500] [--workers 2] [--paced-connections 16] [--peak-connections 4]
        [--stock-mirror on|off] [--generation-memory-lists N] [--no-floor]

Needs ``wrk`` (Debian package ``wrk``): installed with apt-get when run as root, else the
script exits saying so. Not a test: run it by hand on a quiet machine (see ``uptime``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import yaml
from bench_bodies import request_body

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "load.json"
LUA_SCRIPT = REPO / "benchmarks" / "wrk_post_bodies.lua"
HOST = "127.0.0.1"
CHANNELS = ("cart", "pdp", "pos", "contact_center")
SCOPES = ["cart", "pdp", "pos", "contact_center", "admin", "events"]
# Bodies per wrk run, each run its own draw: more than the fastest run sends, so that no run
# replays a body list it has sent (a guest's repeated basket is then remembered only as often
# as real baskets repeat, not because the list went round).
BODIES_PER_RUN = 100_000
TARGET_CART_P99_MS = 15.0
TARGET_PEAK_RATIO = 0.35
FLOOR_RUN = "cart, peak, pipeline replayed"


# -- the app, as each uvicorn worker builds it --------------------------------------------------


def serve_command(*, port: int, workers: int) -> list[str]:
    """How the service is started with several workers: ``upsell serve --workers N``, as
    docs/operations.md documents it (uvicorn workers building the app from UPSELL_*)."""
    return [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def floor_command(*, port: int, workers: int) -> list[str]:
    """The same workers serving ``floor_app:app`` (the pipeline replayed; see floor_app.py)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "floor_app:app",
        "--factory",
        "--app-dir",
        str(REPO / "benchmarks"),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def require_wrk() -> str:
    """wrk's path; installs the Debian package when root, else exits saying how."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("bench_load: wrk is not installed; run `apt-get install -y wrk` (as root)")
    print("wrk is missing: apt-get install -y wrk", flush=True)
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        sys.exit("bench_load: apt-get installed wrk but it is not on PATH")
    return found


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server (no persistence) on a free port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_load: redis-server is not on PATH (Debian package redis-server)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*command, "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    url = f"redis://{HOST}:{port}/0"
    try:
        give_up_at = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > give_up_at:
                    sys.exit(f"bench_load: redis-server did not start on port {port}")
                time.sleep(0.05)
        yield url
    finally:
        stop(process)


def write_bench_key(path: Path, token: str, rate_limit: dict[str, int]) -> Path:
    """A keys file holding the hash of ``token``: one bench key with every scope."""
    entry = {
        "name": "bench",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "scopes": SCOPES,
        "rate_limit": rate_limit,
    }
    path.write_text(yaml.safe_dump({"keys": [entry]}))
    return path


def published_sample(root: Path, redis_url: str) -> tuple[dict[str, str], Path]:
    """The service's environment on ``redis_url`` (auth by API key, its directories under
    ``root``; no keys file yet), once the bundled Online Retail sample is imported, trained
    and published with the ``upsell`` verbs: (that environment, the sample's data dir)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("UPSELL_")}
    env.update(
        OPENBLAS_NUM_THREADS="1",
        UPSELL_REDIS_URL=redis_url,
        UPSELL_REDIS_PREFIX="bench",
        UPSELL_STATE_DIR=str(root / "state"),
        UPSELL_ARTIFACTS_DIR=str(root / "artifacts"),
        UPSELL_DATA_DIR=str(root / "data"),
        UPSELL_LOG_LEVEL="warning",
        UPSELL_AUTH="keys",
    )
    data_dir = root / "data" / "online-retail-sample"
    sample = resources.files("models").joinpath("sample/online_retail_sample.parquet")
    upsell(env, "import", "online-retail", str(sample), "--out", str(data_dir))
    upsell(env, "train", "--orders", str(data_dir))
    upsell(env, "snapshot", "publish", str(data_dir))
    return env, data_dir


def upsell(env: dict[str, str], *verb: str) -> None:
    """One ``upsell`` CLI verb, as demo.sh runs them; its one-line summary is printed."""
    print(f"$ upsell {' '.join(verb)}", flush=True)
    subprocess.run([sys.executable, "-m", "service.cli", *verb], cwd=REPO, env=env, check=True)


@contextmanager
def service(env: dict[str, str], *, port: int, workers: int, floor: bool = False) -> Iterator[str]:
    """The service under ``workers`` uvicorn workers (``floor``: its pipeline replayed); yields
    its base URL once every worker is likely ready (readiness answered ok on many fresh
    connections in a row)."""
    command = (floor_command if floor else serve_command)(port=port, workers=workers)
    process = subprocess.Popen(command, cwd=REPO, env=env)
    base_url = f"http://{HOST}:{port}"
    try:
        in_a_row, give_up_at = 0, time.monotonic() + 180
        while in_a_row < 10 * workers:
            if process.poll() is not None:
                sys.exit(f"bench_load: the service exited with status {process.returncode}")
            if time.monotonic() > give_up_at:
                sys.exit("bench_load: the service did not become ready in 180 s")
            try:
                ready = httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                ready = False
            in_a_row = in_a_row + 1 if ready else 0
            time.sleep(0.05 if ready else 0.3)
        yield base_url
    finally:
        stop(process)


# -- request bodies -------------------------------------------------------------------------------


def channel_bodies(orders_path: Path, channel: str, count: int, *, seed: str) -> list[str]:
    """Real baskets of the sample (1-5 lines of one order) as JSON bodies for ``channel``."""
    rng = random.Random(f"{seed}-{channel}")
    baskets = (
        pl.read_parquet(orders_path)
        .group_by("order_id", maintain_order=True)
        .agg(pl.col("sku").unique(maintain_order=True))
        .get_column("sku")
        .to_list()
    )
    bodies = []
    for _ in range(count):
        basket = baskets[rng.randrange(len(baskets))]
        skus = rng.sample(basket, k=rng.randint(1, min(len(basket), 5)))
        bodies.append(json.dumps(request_body(channel, skus), separators=(",", ":")))
    return bodies


def probe(base_url: str, token: str, bodies: list[str]) -> dict[str, Any]:
    """A few bodies sent one by one: all must answer 200; how many get items, how many are
    degraded (a benchmark of empty answers would flatter the service)."""
    statuses: dict[str, int] = {}
    with_items = degraded = 0
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with httpx.Client(base_url=base_url, timeout=10, headers=headers) as client:
        for body in bodies:
            answer = client.post("/v1/recommendations", content=body)
            statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1
            if answer.status_code != 200:
                sys.exit(f"bench_load: {body} answered {answer.status_code}: {answer.text}")
            payload = answer.json()
            with_items += bool(payload["items"])
            degraded += bool(payload["degraded"])
    return {
        "sent": len(bodies),
        "statuses": statuses,
        "with_items": with_items,
        "degraded": degraded,
    }


# -- wrk ------------------------------------------------------------------------------------------


def run_wrk(
    wrk: str,
    url: str,
    *,
    bodies_file: Path,
    token: str,
    duration_s: int,
    connections: int,
    threads: int,
    rate: int,
) -> dict[str, Any]:
    """One wrk run; its figures (requests per second, latency in ms, errors)."""
    env = {
        **os.environ,
        "WRK_BODIES": str(bodies_file),
        "WRK_RATE": str(rate),
        "WRK_THREADS": str(threads),
        "WRK_TOKEN": token,
    }
    command = [
        wrk,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration_s}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("WRK_RESULT ")]
    if finished.returncode != 0 or not lines:
        sys.exit(f"bench_load: wrk failed ({finished.returncode}): {finished.stderr.strip()}")
    raw = json.loads(lines[-1].removeprefix("WRK_RESULT "))
    seconds = raw["duration_us"] / 1e6
    latency = {name: round(value / 1000, 3) for name, value in raw["latency_us"].items()}
    return {
        "url": url,
        "paced_at": rate or None,
        "connections": connections,
        "threads": threads,
        "seconds": round(seconds, 2),
        "requests": raw["requests"],
        "requests_per_s": round(raw["requests"] / seconds, 1),
        "latency_ms": latency,
        "errors": raw["errors"],
    }


def pipeline_budget(
    peak_per_s: float, ping_per_s: float, floor_per_s: float, cpus: int
) -> dict[str, float]:
    """What the pipeline costs per request, and what the ratio target leaves it, both in us
    of the whole box's CPU (wrk and Redis share the cores, so a run at peak keeps them all
    busy: cores / requests per second is what one request costs the box)."""
    per_request_us = cpus * 1e6 / peak_per_s
    floor_us = cpus * 1e6 / floor_per_s
    allowed_us = cpus * 1e6 / (TARGET_PEAK_RATIO * ping_per_s)
    return {
        "floor_per_s": floor_per_s,
        "floor_ratio": round(floor_per_s / ping_per_s, 4),
        "box_us_per_request": round(per_request_us, 1),
        "box_us_per_request_replayed": round(floor_us, 1),
        "pipeline_box_us": round(per_request_us - floor_us, 1),
        "pipeline_box_us_at_target": round(allowed_us - floor_us, 1),
    }


def candidate_lists(base_url: str, channel: str) -> dict[str, float]:
    """``upsell_candidate_lists_total`` of ``channel`` by origin, summed over the workers."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    counts = {"remembered": 0.0, "generated": 0.0}
    for line in text.splitlines():
        if line.startswith("upsell_candidate_lists_total{") and f'channel="{channel}"' in line:
            origin = line.split('origin="', 1)[1].split('"', 1)[0]
            counts[origin] = counts.get(origin, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def table(results: dict[str, Any]) -> str:
    rows = [
        "| run | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in results["runs"].items():
        latency, errors = run["latency_ms"], sum(run["errors"].values())
        rows.append(
            f"| {name} | {run['requests_per_s']:,.0f} | {latency['p50']:.2f} | "
            f"{latency['p95']:.2f} | {latency['p99']:.2f} | {errors} |"
        )
    summary = results["summary"]
    rows += [
        "",
        f"cart p99 at {summary['paced_rate']} req/s: {summary['cart_p99_ms']:.2f} ms "
        f"(target < {TARGET_CART_P99_MS:g}; achieved {summary['cart_achieved_per_s']:,.0f} req/s)",
        f"peak /v1/recommendations {summary['peak_recommendations_per_s']:,.0f} req/s vs "
        f"/v1/ping {summary['peak_ping_per_s']:,.0f} req/s: "
        f"{summary['peak_ratio']:.1%} (target >= {TARGET_PEAK_RATIO:.0%})",
    ]
    lists = results["runs"]["cart, peak"].get("candidate_lists")
    if lists:
        total = lists["remembered"] + lists["generated"]
        rows.append(
            f"cart peak: {lists['remembered_share']:.1%} of candidate lists remembered for "
            f"guests ({lists['remembered']:,.0f} of {total:,.0f})"
        )
    if "floor_per_s" in summary:
        rows.append(
            f"pipeline replayed: {summary['floor_per_s']:,.0f} req/s, "
            f"{summary['floor_ratio']:.1%} of ping; the pipeline costs "
            f"{summary['pipeline_box_us']:,.0f} us of the box's CPU per request, "
            f"{TARGET_PEAK_RATIO:.0%} would leave it {summary['pipeline_box_us_at_target']:,.0f}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    parser.add_argument("--rate", type=int, default=500, help="paced runs: requests per second")
    parser.add_argument(
        "--light-rate",
        type=int,
        default=200,
        help="one more paced cart run, at a rate the box should hold (0 = none)",
    )
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--paced-connections", type=int, default=16)
    parser.add_argument("--peak-connections", type=int, default=4, help="2 per core")
    parser.add_argument(
        "--stock-mirror",
        choices=("on", "off"),
        default="on",
        help="UPSELL_STOCK_MIRROR: stock followed in each worker (on) or read per request (off)",
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the peak of the route with its pipeline replayed (floor_app.py)",
    )
    parser.add_argument(
        "--generation-memory-lists",
        type=int,
        default=None,
        help="UPSELL_GENERATION_MEMORY_LISTS (0 = guests' lists generated every time); "
        "unset = the service's default",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    wrk = require_wrk()
    started = time.monotonic()
    load_before = load_average()

    with tempfile.TemporaryDirectory(prefix="upsell-load-") as temp:
        root = Path(temp)
        (root / "redis").mkdir()
        token = secrets.token_urlsafe(24)
        keys_file = write_bench_key(
            root / "api_keys.yaml", token, {"per_second": 100_000, "burst": 100_000}
        )
        with redis_server(root / "redis") as redis_url:
            env, data_dir = published_sample(root, redis_url)
            env["UPSELL_API_KEYS_FILE"] = str(keys_file)
            env["UPSELL_STOCK_MIRROR"] = "true" if args.stock_mirror == "on" else "false"

            if args.generation_memory_lists is not None:
                env["UPSELL_GENERATION_MEMORY_LISTS"] = str(args.generation_memory_lists)
            bodies_files: dict[str, Path] = {}
            probes: dict[str, Any] = {}
            # One draw per run: the paced runs (per channel), the warm-up and the cart peak.
            for stream, channel in (
                *((channel, channel) for channel in CHANNELS),
                ("cart light", "cart"),
                ("warm-up", "cart"),
                ("cart peak", "cart"),
            ):
                bodies = channel_bodies(
                    data_dir / "orders.parquet", channel, BODIES_PER_RUN, seed=f"11-{stream}"
                )
                bodies_files[stream] = root / f"bodies_{stream.replace(' ', '_')}.jsonl"
                bodies_files[stream].write_text("\n".join(bodies) + "\n")
                probes.setdefault(channel, bodies[:50])

            port = free_port()
            with service(env, port=port, workers=args.workers) as base_url:
                probed = {
                    channel: probe(base_url, token, bodies) for channel, bodies in probes.items()
                }
                recommendations, ping = f"{base_url}/v1/recommendations", f"{base_url}/v1/ping"
                common = {"token": token, "threads": args.threads}

                def paced(channel: str, rate: int, stream: str | None = None) -> dict[str, Any]:
                    print(f"wrk: {channel} at {rate} req/s for {args.duration} s", flush=True)
                    return run_wrk(
                        wrk,
                        recommendations,
                        bodies_file=bodies_files[stream or channel],
                        duration_s=args.duration,
                        connections=args.paced_connections,
                        rate=rate,
                        **common,
                    )

                def peak(url: str) -> dict[str, Any]:
                    print(f"wrk: {url} as fast as answered for {args.duration} s", flush=True)
                    return run_wrk(
                        wrk,
                        url,
                        bodies_file=bodies_files["cart peak"],
                        duration_s=args.duration,
                        connections=args.peak_connections,
                        rate=0,
                        **common,
                    )

                # Warm-up (not recorded): every worker loads its caches, pages its artifacts in.
                run_wrk(
                    wrk,
                    recommendations,
                    bodies_file=bodies_files["warm-up"],
                    duration_s=5,
                    connections=args.peak_connections,
                    rate=0,
                    **common,
                )
                runs: dict[str, Any] = {}
                for channel in CHANNELS:
                    runs[f"{channel} @ {args.rate}/s"] = paced(channel, args.rate)
                if args.light_rate:
                    runs[f"cart @ {args.light_rate}/s"] = paced(
                        "cart", args.light_rate, stream="cart light"
                    )
                runs["ping, peak (before)"] = peak(ping)
                lists_before = candidate_lists(base_url, "cart")
                runs["cart, peak"] = peak(recommendations)
                lists_after = candidate_lists(base_url, "cart")
                runs["ping, peak (after)"] = peak(ping)
                remembered, generated = (
                    lists_after[origin] - lists_before[origin]
                    for origin in ("remembered", "generated")
                )
                runs["cart, peak"]["candidate_lists"] = {
                    "remembered": remembered,
                    "generated": generated,
                    "remembered_share": round(remembered / max(remembered + generated, 1), 4),
                }

            if args.floor:
                # The same route and workers, the pipeline replayed: what the rest costs.
                metrics_dir = root / "floor-metrics"
                metrics_dir.mkdir()
                floor_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
                port = free_port()
                with service(floor_env, port=port, workers=args.workers, floor=True) as floor_url:
                    replayed = f"{floor_url}/v1/recommendations"
                    warm_up = {**common, "bodies_file": bodies_files["cart peak"], "rate": 0}
                    run_wrk(
                        wrk,
                        replayed,
                        duration_s=5,
                        connections=args.peak_connections,
                        **warm_up,
                    )
                    print(f"wrk: {replayed} (pipeline replayed) as fast as answered", flush=True)
                    runs[FLOOR_RUN] = run_wrk(
                        wrk,
                        replayed,
                        duration_s=args.duration,
                        connections=args.peak_connections,
                        **warm_up,
                    )

    cart = runs[f"cart @ {args.rate}/s"]
    ping_per_s = (
        runs["ping, peak (before)"]["requests_per_s"] + runs["ping, peak (after)"]["requests_per_s"]
    ) / 2
    peak_per_s = runs["cart, peak"]["requests_per_s"]
    summary = {
        "paced_rate": args.rate,
        "cart_achieved_per_s": cart["requests_per_s"],
        "cart_p99_ms": cart["latency_ms"]["p99"],
        "cart_p99_target_met": cart["latency_ms"]["p99"] < TARGET_CART_P99_MS,
        "peak_recommendations_per_s": peak_per_s,
        "peak_ping_per_s": round(ping_per_s, 1),
        "peak_ratio": round(peak_per_s / ping_per_s, 4),
        "peak_ratio_target_met": peak_per_s / ping_per_s >= TARGET_PEAK_RATIO,
    }
    if FLOOR_RUN in runs:
        summary |= pipeline_budget(
            peak_per_s, ping_per_s, runs[FLOOR_RUN]["requests_per_s"], os.cpu_count() or 1
        )
    results = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "setup": {
            "workers": args.workers,
            "duration_s": args.duration,
            "redis": "own, no persistence",
            "wrk": subprocess.run(
                [wrk, "-v"], capture_output=True, text=True, check=False
            ).stdout.split("\n")[0],
            "auth": "UPSELL_AUTH=keys, one bench key with every scope",
            "stock_mirror": args.stock_mirror,
            "generation_memory_lists": args.generation_memory_lists,
            "bodies_per_run": BODIES_PER_RUN,
        },
        "probes": probed,
        "runs": runs,
        "summary": summary,
        "total_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out} ({results['total_s']} s in all)")


if __name__ == "__main__":
    main()
