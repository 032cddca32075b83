"""The ranking knob on real baskets (the bundled Online Retail sample).

Margin-aware ranking must be a dial, not a switch: at 0 it is the relevance order exactly,
and turning it up shows items of higher unit margin, step by step.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import polars as pl
import yaml

from models.data.contract import read_snapshot_dir
from rules.policy import load_policy
from service.pipeline import BasketLine, RecommendationQuery
from service.runtime import Runtime
from service.settings import Settings
from tests.service.conftest import DemoData

KNOBS = (0.0, 0.25, 0.5, 0.75, 1.0)


def policy_file(tmp_path: Path, weight: float) -> Path:
    document = load_policy().model_dump(mode="json")
    document["ranking"]["knobs"] = [{"objective": "margin", "margin_weight": weight}]
    document["ranking"]["max_per_category"] = 50  # isolate the knob from the diversity cap
    path = tmp_path / f"policy-{weight}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def baskets(demo: DemoData, count: int) -> list[list[str]]:
    orders = (
        pl.read_parquet(demo.contract_dir / "orders.parquet")
        .group_by("order_id", maintain_order=True)
        .agg(pl.col("sku"))
        .get_column("sku")
        .to_list()
    )
    rng = random.Random(4)
    return [rng.sample(skus, k=min(len(skus), 3)) for skus in rng.sample(orders, count)]


async def shown_items(settings: Settings, demo: DemoData, drawn: list[list[str]]) -> list[list]:
    runtime = await Runtime.start(settings)
    await runtime.store.publish(read_snapshot_dir(demo.contract_dir))
    await runtime.mirror.refresh()  # type: ignore[union-attr]
    recommender = runtime.require_recommender()
    answers = []
    for number, skus in enumerate(drawn):
        query = RecommendationQuery(
            request_id=str(number),
            channel="cart",
            basket=tuple(BasketLine(sku, 1) for sku in skus),
            region="UK",
            limit=10,
        )
        answers.append(list((await recommender.recommend(query)).items))
    await runtime.close()
    return answers


def test_knob_zero_is_relevance_and_raising_it_raises_margin(
    demo_data: DemoData, tmp_path: Path
) -> None:
    """On 300 real baskets: knob 0 lists items in relevance order; mean unit margin of the
    shown items rises with every step of the knob."""
    drawn = baskets(demo_data, 300)
    mean_margin = []
    for weight in KNOBS:
        settings = Settings(
            auth="off",  # not about auth: channel calls open
            state_dir=tmp_path / f"state-{weight}",
            artifacts_dir=demo_data.artifacts_dir,
            policy_path=policy_file(tmp_path, weight),
            snapshot_refresh_seconds=0,
            log_level="warning",
        )
        answers = asyncio.run(shown_items(settings, demo_data, drawn))
        if weight == 0.0:
            for items in answers:
                relevance = [item.score_parts.relevance for item in items]
                assert relevance == sorted(relevance, reverse=True)
                assert [item.score for item in items] == relevance
        margins = [item.unit_margin for items in answers for item in items]
        assert len(margins) > 2000, "the test needs lists to compare"
        mean_margin.append(sum(margins) / len(margins))
    print("mean unit margin by knob", dict(zip(KNOBS, mean_margin, strict=True)))
    assert mean_margin == sorted(mean_margin), mean_margin
    assert mean_margin[-1] > mean_margin[0] * 1.15, mean_margin
