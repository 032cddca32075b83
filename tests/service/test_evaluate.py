"""``upsell evaluate`` (service.evaluate) on the bundled sample: the real request path, every
shown item checked again, and the files it writes."""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pytest

from models.data.contract import read_snapshot_dir
from models.generators import ReplenishmentGenerator
from models.interfaces import GenerationContext, Kind
from models.training import train
from rules.errors import InputError
from rules.policy import load_policy
from service import pipeline
from service.evaluate import (
    ConstraintOracle,
    ContextBinding,
    apply_policy_overrides,
    main,
    margin_knob,
    parse_dataset_arguments,
)
from service.pipeline import BasketLine, RecommendationQuery
from tests.models.builders import order_lines
from tests.service.conftest import DemoData, sample_path


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """One run of the command on the raw sample file: every strategy, 150 baskets."""
    out = tmp_path_factory.mktemp("results")
    status = main(
        [
            f"online-retail={sample_path()}",
            "--out",
            str(out),
            "--cases",
            "150",
            "--margin-weights",
            "0,1",
        ]
    )
    assert status == 0
    with open(out / "evaluation_online-retail.csv", newline="") as file:
        rows = {row["strategy"]: row for row in csv.DictReader(file)}
    rows["_files"] = {path.name: str(path) for path in out.iterdir()}
    return rows


def test_no_strategy_shows_an_item_that_breaks_a_constraint(
    evaluation: dict[str, dict[str, str]],
) -> None:
    """Through the real pipeline, every item shown by every strategy passes the independent
    constraint check: zero violations in every row."""
    strategies = {name: row for name, row in evaluation.items() if name != "_files"}
    assert len(strategies) == 9
    assert {row["violations"] for row in strategies.values()} == {"0"}
    assert {row["cases"] for row in strategies.values()} == {"150"}


def test_the_hybrid_beats_popularity_and_the_knob_buys_margin(
    evaluation: dict[str, dict[str, str]],
) -> None:
    """The hybrid finds more hidden items than popularity; margin weight 1 earns more margin
    per item found than relevance alone (margin weight 0)."""
    popularity = evaluation["popularity"]
    relevance = evaluation["hybrid, margin weight 0"]
    margin = evaluation["hybrid, margin weight 1"]

    assert float(relevance["hit_rate@10"]) > 2 * float(popularity["hit_rate@10"])
    per_hit = {
        name: float(row["margin_per_1000@10"]) / float(row["hit_rate@10"])
        for name, row in (("relevance", relevance), ("margin", margin))
    }
    assert per_hit["margin"] > per_hit["relevance"]
    for row in (popularity, relevance, margin):
        assert float(row["hit_rate@5"]) <= float(row["hit_rate@10"])


def test_the_run_writes_table_plot_and_facts(evaluation: dict[str, dict[str, str]]) -> None:
    """CSV, Markdown table, JSON facts (training time and peak memory, memory-mapped load)
    and the trade-off plot."""
    files = evaluation["_files"]
    assert set(files) >= {
        "evaluation_online-retail.csv",
        "evaluation_online-retail.md",
        "evaluation_online-retail.json",
    }
    facts = orjson.loads(Path(files["evaluation_online-retail.json"]).read_bytes())
    assert facts["training"]["seconds"] > 0
    assert facts["training"]["peak_rss_mib"] > 0
    assert facts["artifacts_memory_mapped"] is True
    assert facts["channel"] == "cart"
    assert "assumed" in facts["cost_assumption"]
    table = Path(files["evaluation_online-retail.md"]).read_text()
    assert "| hybrid, margin weight 1 |" in table
    pytest.importorskip("matplotlib")
    assert Path(files["evaluation_online-retail.png"]).read_bytes()[:4] == b"\x89PNG"


def test_policy_overrides_are_validated_and_name_the_path() -> None:
    """An override replaces one field and keeps the rest; a path the policy lacks, or a value
    it refuses, is an InputError naming it."""
    policy = load_policy()

    knobbed = apply_policy_overrides(policy, margin_knob(0.75))

    assert knobbed.knob_for(category="any", channel="cart").margin_weight == 0.75
    assert knobbed.margin_floors == policy.margin_floors
    with pytest.raises(InputError, match=r"ranking\.no_such_knob"):
        apply_policy_overrides(policy, {"ranking.no_such_knob": 1})
    with pytest.raises(InputError, match="no section 'nowhere'"):
        apply_policy_overrides(policy, {"nowhere.margin_weight": 1})
    with pytest.raises(InputError, match="invalid"):
        apply_policy_overrides(policy, margin_knob(2.0))


def test_dataset_arguments_name_what_is_wrong(tmp_path: Path) -> None:
    """NAME=PATH with a known dataset and an existing path; anything else names the value."""
    assert parse_dataset_arguments([f"ta-feng={tmp_path}"]) == [("ta-feng", tmp_path)]
    with pytest.raises(InputError, match="NAME=PATH"):
        parse_dataset_arguments(["instacart=/x"])
    with pytest.raises(InputError, match="does not exist"):
        parse_dataset_arguments([f"online-retail={tmp_path / 'missing.parquet'}"])


def test_oracle_catches_what_the_rules_must_drop(demo_data: DemoData) -> None:
    """The independent check flags an item already in the basket, a node that may not serve
    the channel, and a misreported margin."""
    snapshot = read_snapshot_dir(demo_data.contract_dir)
    oracle = ConstraintOracle(snapshot, load_policy())
    sku = "85123A"
    query = RecommendationQuery(
        request_id="r", channel="pos", basket=(BasketLine(sku, 1),), store_id="S-UK"
    )
    now = snapshot.as_of

    problems = oracle.violations(query, sku=sku, node="S-EU", reported_margin=-1.0, now=now)

    assert any("already in the basket" in problem for problem in problems)
    assert any("may not serve pos" in problem for problem in problems)
    assert any("reported margin" in problem for problem in problems)


def test_context_binding_passes_context_and_keeps_kinds_showable() -> None:
    """The binding hands its context to the generator (replenishment needs the time) and
    shows each kind as one the pipeline can explain, while ``last`` keeps the real kinds."""
    weekly = order_lines(
        [(f"o{week}", "c1", ["MILK"]) for week in range(4)] + [("g", None, ["BREAD"])]
    ).with_columns(
        ordered_at=pl.lit(datetime(2024, 3, 1))
        + pl.duration(
            days=7 * pl.col("order_id").str.slice(1).cast(pl.Int64, strict=False).fill_null(0)
        )
    )
    artifacts = train(weekly, factors=2, neighbours=2)
    binding = ContextBinding(ReplenishmentGenerator(artifacts))
    binding.context = GenerationContext(now=datetime(2024, 3, 29))

    shown = binding.generate(anchors=np.empty(0, dtype=np.int32), user_row=0, count=3)

    assert [artifacts.item_skus[row] for row in shown.item_idx.tolist()] == ["MILK"]
    assert binding.last.kind.tolist() == [Kind.REPLENISH]
    explained = set(getattr(pipeline, "_LEAD_REASON_BY_KIND"))  # noqa: B009 - private table
    expected = Kind.REPLENISH if Kind.REPLENISH in explained else Kind.PERSONAL
    assert shown.kind.tolist() == [expected]
