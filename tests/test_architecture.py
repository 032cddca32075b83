"""Architecture and documentation: layers, package resolution, docs in step with code."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.data.schema import ALL_TABLES
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text("utf-8")


@pytest.mark.parametrize("package", ["service", "models", "rules"])
def test_generic_package_names_resolve_to_this_repo(package: str) -> None:
    """`service`, `models` and `rules` are this project's, not another installed package."""
    module = importlib.import_module(package)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / package


def test_layer_contract_holds() -> None:
    """import-linter: service -> models -> rules, rules import no network or web code."""
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports is not None, "lint-imports is not installed in this environment"
    result = subprocess.run(
        [lint_imports, "--no-cache"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_starts_with_the_two_commands() -> None:
    """The README's first lines are the run and test commands, and both scripts exist."""
    head = README.split("\n## ", 1)[0]
    commands = re.findall(r"^(\./scripts/\S+)", head, flags=re.MULTILINE)
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    for command in commands:
        assert (REPO / command).stat().st_mode & 0o111, f"{command} is not executable"
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text("utf-8")


def test_readme_configuration_table_matches_settings() -> None:
    """Every setting has a README row with its env var and default, and no row is stale."""
    rows = dict(re.findall(r"^\| `(UPSELL_[A-Z_]+)` \| `([^`]*)` \|", README, flags=re.MULTILINE))
    expected = {}
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else str(default)
        expected[f"UPSELL_{name.upper()}"] = shown.lower() if isinstance(default, bool) else shown
    assert rows == expected


def test_data_contract_documented() -> None:
    """Every contract table and column appears in docs/data-contract.md and the README."""
    doc = (REPO / "docs" / "data-contract.md").read_text("utf-8")
    for table in ALL_TABLES:
        assert f"`{table.name}`" in README, table.name
        for column in table.columns:
            assert f"`{column.name}`" in doc, f"{table.name}.{column.name} missing from the doc"
            assert column.name in README, f"{table.name}.{column.name} missing from the README"


@pytest.mark.parametrize(
    "verb",
    [
        [],
        ["import"],
        ["train"],
        ["snapshot"],
        ["snapshot", "publish"],
        ["snapshot", "rollback"],
        ["snapshot", "list"],
        ["policy", "check"],
        ["policy", "reload"],
        ["inventory"],
        ["inventory", "apply"],
        ["serve"],
        ["demo"],
    ],
)
def test_every_cli_verb_has_help(verb: list[str]) -> None:
    """`upsell VERB --help` prints usage and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", *verb, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: upsell" in result.stdout
