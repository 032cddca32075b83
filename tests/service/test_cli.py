"""The `upsell` command line: demo, publish, policy check as a real subprocess; snapshot list and
rollback through ``service.cli.main`` in this process, against a running app."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main
from service.settings import Settings, load_settings
from tests.service.conftest import DemoData

REPO = Path(__file__).resolve().parents[2]


def upsell_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("UPSELL_")}
    env.update(
        UPSELL_STATE_DIR=str(tmp_path / "state"),
        UPSELL_ARTIFACTS_DIR=str(tmp_path / "artifacts"),
        UPSELL_DATA_DIR=str(tmp_path / "data"),
        UPSELL_LOG_LEVEL="warning",
        OPENBLAS_NUM_THREADS="1",
        **extra,
    )
    return env


def upsell(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO,
        env=upsell_env(tmp_path),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[str]:
    """`upsell demo` in a subprocess (import, train, publish, serve); yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "demo", "--port", str(port)],
        cwd=REPO,
        env=upsell_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"upsell demo exited early:\n{process.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("upsell demo did not become ready within 120 s")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_readme_curl_against_the_demo(demo_server: str) -> None:
    """The README's curl, sent to a real `upsell demo`, returns at least 3 recommendations."""
    readme = (REPO / "README.md").read_text("utf-8")
    curl = re.search(r"curl -s (\S+) \\\n.*?\\\n\s+-d '(.+?)'", readme, flags=re.DOTALL)
    assert curl is not None, "the README has no curl example"
    url = curl.group(1).replace("http://127.0.0.1:8000", demo_server)
    response = httpx.post(url, json=json.loads(curl.group(2)), timeout=10)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["items"]) >= 3
    assert all(item["explanation"] for item in answer["items"])
    assert set(answer["versions"]) == {"model", "snapshot", "policy"}
    assert response.headers["x-request-id"] == answer["request_id"]
    docs = httpx.get(f"{demo_server}/openapi.json", timeout=10).json()
    assert "/v1/recommendations" in docs["paths"]


def test_publish_refuses_a_bad_file_and_keeps_the_current_version(
    tmp_path: Path, demo_data: DemoData
) -> None:
    """A file with negative stock is refused whole, naming file, row and column; the version
    published before it stays current."""
    good = upsell(tmp_path, "snapshot", "publish", str(demo_data.contract_dir))
    assert good.returncode == 0, good.stderr
    version = re.search(r"published snapshot (\w+)", good.stdout).group(1)  # type: ignore[union-attr]

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for table in ("items", "nodes"):
        shutil.copy(demo_data.contract_dir / f"{table}.parquet", bad_dir)
    inventory = pl.read_parquet(demo_data.contract_dir / "inventory.parquet")
    inventory = inventory.with_columns(
        atp=pl.when(pl.int_range(pl.len()) == 41).then(-3).otherwise(pl.col("atp"))
    )
    inventory.write_csv(bad_dir / "inventory.csv")

    refused = upsell(tmp_path, "snapshot", "publish", str(bad_dir))
    assert refused.returncode == 2
    assert "inventory.csv" in refused.stderr
    assert "row 42" in refused.stderr
    assert "'atp'" in refused.stderr
    assert "negative" in refused.stderr

    listing = upsell(tmp_path, "snapshot", "list")
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].startswith(f"* {version}")
    assert len(listing.stdout.splitlines()) == 1


def test_policy_check(tmp_path: Path) -> None:
    """`upsell policy check` accepts the default policy and names the field of a bad one."""
    ok = upsell(tmp_path, "policy", "check", "rules/policies/default.yaml")
    assert ok.returncode == 0
    assert "valid policy" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\nmargin_floors: [{percent: 2}]\n")
    refused = upsell(tmp_path, "policy", "check", str(bad))
    assert refused.returncode == 2
    assert "margin_floors.0.percent" in refused.stderr


def test_train_without_orders_says_what_to_do(tmp_path: Path) -> None:
    """Training on a directory with no orders file is a clear error, not a traceback."""
    (tmp_path / "empty").mkdir()
    result = upsell(tmp_path, "train", "--orders", str(tmp_path / "empty"))
    assert result.returncode == 2
    assert "orders" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(params=["in-process", "redis"])
def cli_settings(
    request: pytest.FixtureRequest,
    demo_data: DemoData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """UPSELL_* for `service.cli.main` in this process, and the same as Settings for an app."""
    for name in [name for name in os.environ if name.startswith("UPSELL_")]:
        monkeypatch.delenv(name)
    env = {
        "UPSELL_STATE_DIR": str(tmp_path / "state"),
        "UPSELL_ARTIFACTS_DIR": str(demo_data.artifacts_dir),
        "UPSELL_LOG_LEVEL": "warning",
        "UPSELL_SNAPSHOT_REFRESH_SECONDS": "0",
        "UPSELL_AUTH": "off",  # not about auth: channel calls open
    }
    if request.param == "redis":
        env["UPSELL_REDIS_URL"] = request.getfixturevalue("redis_url")
        env["UPSELL_REDIS_PREFIX"] = request.getfixturevalue("redis_prefix")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_snapshot_list_and_rollback_through_the_cli(
    cli_settings: Settings,
    demo_data: DemoData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`upsell snapshot list` marks the current version first; `upsell snapshot rollback`
    exits 0 and a running service serves the previous version afterwards; with nothing
    older it exits 1 naming why, and the current version stays."""
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    for table in ("items", "nodes"):
        shutil.copy(demo_data.contract_dir / f"{table}.parquet", second_dir)
    inventory = pl.read_parquet(demo_data.contract_dir / "inventory.parquet")
    inventory.with_columns(atp=pl.col("atp") + 1).write_parquet(second_dir / "inventory.parquet")

    versions = []
    for directory in (demo_data.contract_dir, second_dir):
        status, out, err = cli(capsys, "snapshot", "publish", str(directory))
        assert status == 0, err
        versions.append(re.search(r"published snapshot (\w{16}) ", out).group(1))  # type: ignore[union-attr]
    first, second = versions
    assert first != second

    line = r"([* ]) (\w{16})  as of \S+  published \S+  (\d+) items"
    status, out, _ = cli(capsys, "snapshot", "list")
    assert status == 0
    listed = [re.fullmatch(line, row) for row in out.splitlines()]
    assert all(listed), out
    items = pl.read_parquet(demo_data.contract_dir / "items.parquet").height
    assert [m.groups() for m in listed if m] == [
        ("*", second, str(items)),
        (" ", first, str(items)),
    ]

    body = {"channel": "cart", "region": "UK", "basket": [{"sku": "85123A"}]}
    with TestClient(create_app(cli_settings)) as client:
        before = client.post("/v1/recommendations", json=body).json()
        status, out, err = cli(capsys, "snapshot", "rollback")
        assert status == 0, err
        assert out.strip() == f"rolled back: current snapshot is now {first}"
        after = client.post("/v1/recommendations", json=body).json()
        status, out, err = cli(capsys, "snapshot", "rollback")
        assert status == 1
        assert "nothing to roll back to" in err
        still = client.post("/v1/recommendations", json=body).json()
    assert before["versions"]["snapshot"] == second
    assert after["versions"]["snapshot"] == first
    assert after["items"]
    assert still["versions"]["snapshot"] == first

    status, out, _ = cli(capsys, "snapshot", "list")
    assert status == 0
    assert [row[:18] for row in out.splitlines()] == [f"  {second}", f"* {first}"]


def test_train_on_an_imported_directory_learns_regional_popularity(
    tmp_path: Path, demo_data: DemoData
) -> None:
    """`upsell train --orders DIR` on an imported directory reads its nodes too: the model has
    popularity by region (an order's region is its store's), and a calibration."""
    from models.artifacts import load_artifacts
    from models.calibration import load_calibration

    # The sample's web orders have no store: sell them in the UK and EU stores instead.
    data = tmp_path / "contract"
    shutil.copytree(demo_data.contract_dir, data)
    orders = pl.read_parquet(data / "orders.parquet")
    in_store = pl.when(pl.col("order_id").str.contains("[02468]$")).then(pl.lit("S-UK"))
    orders.with_columns(store_id=in_store.otherwise(pl.lit("S-EU"))).write_parquet(
        data / "orders.parquet"
    )
    out = tmp_path / "model"

    result = upsell(tmp_path, "train", "--orders", str(data), "--out", str(out))

    assert result.returncode == 0, result.stderr
    artifacts = load_artifacts(out)
    assert artifacts.region_popularity is not None
    assert artifacts.region_popularity.regions == ("EU", "UK")
    assert load_calibration(out / artifacts.version) is not None
