"""What each production feature around the route costs, in worker CPU per request.

One uvicorn worker started as ``bench_load.py`` starts its workers (``serve_command``, the
same environment: real Redis, auth by API key, Redis rate limit, metrics in multiprocess
mode, the request log), driven by short closed-loop ``wrk`` runs (``-t1 -c4``) on
``POST /v1/ping`` and ``POST /v1/recommendations`` (cart). Each variant switches one feature
off by configuration and is compared with the full set-up. The figure is the worker's own
CPU time (utime + stime from /proc) divided by the requests answered: on a shared 2-core box
that is far steadier than requests per second, which other processes' load moves.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_http_overhead.py [--duration 8]
        [--variants full,no_log,...] [--rounds 2] [--py-spy DIR]

About 30 s of set-up (import, train, publish into a private redis-server), then per variant
one worker start and two wrk runs; ``--py-spy DIR`` also records the worker's sampled stacks
during each run (collapsed, for flamegraph.pl or speedscope; py-spy must be on PATH or in
the venv, it is not a project dependency). wrk shares the box: figures move by 10-20% from
run to run, so compare variants of one run, and repeat (``--rounds``) before trusting a gap.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from bench_load import (
    BODIES_PER_RUN,
    channel_bodies,
    free_port,
    published_sample,
    redis_server,
    require_wrk,
    run_wrk,
    service,
    write_bench_key,
)

# Each variant: environment overrides on top of the full set-up, and the key's rate limit
# (None: no limit for the key, so the limiter never reaches Redis).
_LIMITED: Final = {"per_second": 100_000, "burst": 100_000}
VARIANTS: dict[str, tuple[dict[str, str], dict[str, int] | None]] = {
    "full": ({}, _LIMITED),
    "no_log": ({"UPSELL_LOG_REQUESTS": "false"}, _LIMITED),
    "no_rate_limit": ({}, None),
    "no_multiprocess_metrics": ({"PROMETHEUS_MULTIPROC_DIR": ""}, _LIMITED),
    "auth_off": ({"UPSELL_AUTH": "off"}, _LIMITED),
    "stock_mirror": ({"UPSELL_STOCK_MIRROR": "true"}, _LIMITED),
}


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    """A py-spy recording of ``pid`` while the block runs, when ``out`` is given."""
    if out is None:
        yield
        return
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [binary, "record", "--pid", str(pid), "--output", str(out), "--rate", "250"]
    recorder = subprocess.Popen(
        [*command, "--format", "raw", "--nonblocking"], stdout=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        recorder.send_signal(2)  # SIGINT: py-spy writes its stacks and exits
        recorder.wait(timeout=30)


def measure(
    wrk: str,
    url: str,
    *,
    pid: int,
    bodies_file: Path,
    token: str,
    duration_s: int,
    flame: Path | None,
) -> dict[str, Any]:
    before = cpu_seconds(pid)
    with py_spy(pid, flame):
        run = run_wrk(
            wrk,
            url,
            bodies_file=bodies_file,
            token=token,
            duration_s=duration_s,
            connections=4,
            threads=1,
            rate=0,
        )
    cpu = cpu_seconds(pid) - before
    errors = sum(run["errors"].values())
    return {
        "requests_per_s": run["requests_per_s"],
        "cpu_us_per_request": round(cpu / max(1, run["requests"]) * 1e6, 1),
        "p50_ms": run["latency_ms"]["p50"],
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run (<= 10)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="runs per variant and endpoint")
    parser.add_argument("--py-spy", type=Path, default=None, help="write sampled stacks here")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the figures")
    args = parser.parse_args()
    wrk = require_wrk()
    chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        sys.exit(f"bench_http_overhead: unknown variants {unknown}; known: {sorted(VARIANTS)}")
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="upsell-http-") as temp:
        root = Path(temp)
        (root / "redis").mkdir()
        token = secrets.token_urlsafe(24)
        with redis_server(root / "redis") as redis_url:
            env, data_dir = published_sample(root, redis_url)

            def fresh_bodies(stream: str) -> Path:
                """Cart bodies of a draw of their own, as bench_load gives each run: a basket
                repeats (and a guest's list is remembered) only as often as baskets do."""
                bodies = channel_bodies(
                    data_dir / "orders.parquet", "cart", BODIES_PER_RUN, seed=f"11-{stream}"
                )
                path = root / f"bodies_{stream}.jsonl"
                path.write_text("\n".join(bodies) + "\n")
                return path

            results: dict[str, dict[str, list[dict[str, Any]]]] = {}
            for name in chosen:
                overrides, limit = VARIANTS[name]
                keys_file = write_bench_key(
                    root / f"keys_{name}.yaml", token, limit or {"per_second": 0, "burst": 1}
                )
                metrics_dir = root / f"metrics_{name}"
                metrics_dir.mkdir()
                variant_env = {
                    **env,
                    "UPSELL_API_KEYS_FILE": str(keys_file),
                    "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                    **overrides,
                }
                if not variant_env["PROMETHEUS_MULTIPROC_DIR"]:
                    del variant_env["PROMETHEUS_MULTIPROC_DIR"]
                port = free_port()
                print(f"variant {name}", flush=True)
                with service(variant_env, port=port, workers=1) as base_url:
                    pid = worker_pid(port)
                    urls = {"ping": f"{base_url}/v1/ping", "cart": f"{base_url}/v1/recommendations"}
                    common = {"pid": pid, "token": token}
                    measure(  # warm-up
                        wrk,
                        urls["cart"],
                        duration_s=3,
                        flame=None,
                        bodies_file=fresh_bodies(f"{name}-warm-up"),
                        **common,
                    )
                    for round_number in range(args.rounds):
                        for endpoint, url in urls.items():
                            flame = (
                                args.py_spy / f"{name}_{endpoint}_{round_number}.txt"
                                if args.py_spy is not None
                                else None
                            )
                            figures = measure(
                                wrk,
                                url,
                                duration_s=args.duration,
                                flame=flame,
                                bodies_file=fresh_bodies(f"{name}-{endpoint}-{round_number}"),
                                **common,
                            )
                            print(f"  {endpoint}: {figures}", flush=True)
                            results.setdefault(name, {}).setdefault(endpoint, []).append(figures)

    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def worker_pid(port: int) -> int:
    """The pid of the process listening on ``port`` (with one worker: ``upsell serve``)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:  # 0A: LISTEN
            inode = fields[9]
            break
    if inode is None:
        sys.exit(f"bench_http_overhead: nothing listens on port {port}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(proc.name)
        except OSError:
            continue
    sys.exit(f"bench_http_overhead: no process holds the socket of port {port}")


def table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Median CPU µs per request by variant and endpoint, and the saving against full."""

    def median(name: str, endpoint: str) -> float:
        return statistics.median(run["cpu_us_per_request"] for run in results[name][endpoint])

    rows = [
        "| variant | ping µs/req | ping req/s | cart µs/req | cart req/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, endpoints in results.items():
        cells = []
        for endpoint in ("ping", "cart"):
            us = median(name, endpoint)
            rate = statistics.median(run["requests_per_s"] for run in endpoints[endpoint])
            saved = f" ({us - median('full', endpoint):+.0f})" if "full" in results else ""
            cells += [f"{us:.0f}{saved}", f"{rate:,.0f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
