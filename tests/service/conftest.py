"""Fixtures for service tests: the bundled sample imported and trained once per session."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from models.artifacts import save_artifacts
from models.calibration import fit_acceptance, save_calibration
from models.data.adapters import import_online_retail
from models.data.contract import read_orders
from models.training import train


@dataclass(frozen=True)
class DemoData:
    contract_dir: Path  # orders, items, nodes, inventory of the bundled sample
    artifacts_dir: Path  # a model trained on those orders


def sample_path() -> Path:
    return Path(str(resources.files("models").joinpath("sample/online_retail_sample.parquet")))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    """The sample imported into the data contract and a model trained on it (real implicit)."""
    root = tmp_path_factory.mktemp("demo")
    contract_dir = root / "contract"
    import_online_retail(sample_path(), contract_dir, seed=7)
    orders = read_orders(contract_dir / "orders.parquet")
    artifacts = train(orders, iterations=8, seed=42)
    version_dir = save_artifacts(artifacts, root / "artifacts")
    save_calibration(fit_acceptance(orders, iterations=8, seed=42), version_dir)
    return DemoData(contract_dir=contract_dir, artifacts_dir=root / "artifacts")
