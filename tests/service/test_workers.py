"""`upsell serve --workers 2` as a real subprocess: it answers over HTTP, both workers map the
same model files (one copy in the page cache), and /metrics adds up every worker's counts."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from models.data.contract import read_snapshot_dir
from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_cli import REPO, free_port, upsell_env
from tests.service.test_end_to_end import publish

KEY = "workers-test-key"
CART = {"channel": "cart", "basket": [{"sku": "85123A", "quantity": 1}], "limit": 3}
REQUESTS = 12
START_TIMEOUT_S = 120


def worker_pids(pid: int) -> list[int]:
    """The uvicorn workers among the children of ``pid`` (not multiprocessing's resource
    tracker), from Linux /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in command:
                found.append(int(child))
    return found


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_serve_with_two_workers(demo_data: DemoData, tmp_path: Path) -> None:
    """Two workers answer keyed requests; each maps the artifacts; metrics cover both."""
    keys = tmp_path / "keys.yaml"
    entry = {"name": "shop", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}
    keys.write_text(yaml.safe_dump({"keys": [entry | {"scopes": ["cart"]}]}))
    settings = Settings(auth="off", state_dir=tmp_path / "state")
    publish(settings, read_snapshot_dir(demo_data.contract_dir))
    port = free_port()
    env = upsell_env(tmp_path, UPSELL_API_KEYS_FILE=str(keys), UPSELL_EXPLAIN_STATS_LOG_SECONDS="0")
    env["UPSELL_ARTIFACTS_DIR"] = str(demo_data.artifacts_dir)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--workers", "2", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        workers: list[int] = []
        while True:
            if process.poll() is not None:
                pytest.fail(f"upsell serve exited early:\n{process.stdout.read()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                pytest.fail(f"upsell serve --workers 2 not ready within {START_TIMEOUT_S} s")
            workers = worker_pids(process.pid)
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                ready = False
            if ready and len(workers) == 2 and all(mapped(pid, demo_data) for pid in workers):
                break
            time.sleep(0.3)

        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=base, timeout=10) as client:
            answers = [
                client.post("/v1/recommendations", json=CART, headers=headers)
                for _ in range(REQUESTS)
            ]
            refused = client.post("/v1/recommendations", json=CART)
            scraped = client.get("/metrics").text
        assert [answer.status_code for answer in answers] == [200] * REQUESTS
        assert all(answer.json()["items"] for answer in answers)
        assert refused.status_code == 401
        served = sum(
            sample.value
            for family in text_string_to_metric_families(scraped)
            for sample in family.samples
            if sample.name == "upsell_http_requests_total"
            and sample.labels["route"] == "/v1/recommendations"
            and sample.labels["status"] == "200"
        )
        assert served == REQUESTS  # every worker's count, whichever worker was scraped
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def mapped(pid: int, demo_data: DemoData) -> bool:
    """Whether process ``pid`` memory-maps a model file of the artifacts directory."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    root = str(demo_data.artifacts_dir.resolve())
    return any(line.endswith(".npy") and root in line for line in maps.splitlines())
