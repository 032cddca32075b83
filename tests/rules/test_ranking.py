"""Ranking: expected contribution, objectives, the knob and the diversity cap."""

from __future__ import annotations

import numpy as np
import pytest

from rules.constraints import compile_policy
from rules.ranking import RankingInputs, rank, score
from tests.rules.builders import catalog, item, policy

CATALOG = catalog([item(sku, category=cat) for sku, cat in [("A", "X"), ("B", "X"), ("C", "Y")]])


def inputs(**overrides: list[float] | list[int]) -> RankingInputs:
    """Three candidates: A most relevant but thin margin, C least relevant but rich."""
    base: dict[str, list[float] | list[int]] = {
        "catalog_pos": [0, 1, 2],
        "category_code": [0, 0, 1],
        "relevance": [1.0, 0.6, 0.3],
        "p_accept": [0.3, 0.2, 0.1],
        "effective_price": [2.0, 5.0, 20.0],
        "unit_margin": [0.4, 2.0, 9.0],
        "return_rate": [0.0, 0.0, 0.0],
        "fulfilment_cost": [0.0, 0.0, 0.0],
        "stock_units": [50, 50, 50],
    }
    base.update(overrides)
    ints = {"catalog_pos", "category_code", "stock_units"}
    return RankingInputs(
        **{
            name: np.asarray(values, dtype=np.int64 if name in ints else np.float64)
            for name, values in base.items()
        }  # type: ignore[arg-type]
    )


def order_for(
    rank_inputs: RankingInputs, *, limit: int = 3, cap: int = 3, **rules: object
) -> list[int]:
    compiled = compile_policy(policy(**rules), CATALOG)
    parts = score(rank_inputs, compiled, "cart")
    chosen = rank(
        parts.final,
        rank_inputs.catalog_pos,
        rank_inputs.category_code,
        limit=limit,
        max_per_category=cap,
    )
    return chosen.tolist()


def knob(weight: float, objective: str = "margin") -> dict[str, object]:
    return {"ranking": {"knobs": [{"objective": objective, "margin_weight": weight}]}}


def test_knob_zero_is_the_relevance_order() -> None:
    """With margin_weight 0 the order is relevance, whatever the margins."""
    assert order_for(inputs(), **knob(0.0)) == [0, 1, 2]


def test_knob_one_orders_by_expected_contribution() -> None:
    """With margin_weight 1: p(accept) x margin = 0.12, 0.40, 0.90 -> C, B, A."""
    assert order_for(inputs(), **knob(1.0)) == [2, 1, 0]


def test_relevance_objective_ignores_the_weight() -> None:
    """The relevance objective keeps the relevance order even at weight 1."""
    assert order_for(inputs(), **knob(1.0, "relevance")) == [0, 1, 2]


def test_revenue_objective_uses_price() -> None:
    """Revenue: p(accept) x price = 0.6, 1.0, 2.0 -> C, B, A."""
    assert order_for(inputs(unit_margin=[1.0, 1.0, 1.0]), **knob(1.0, "revenue")) == [2, 1, 0]


def test_sell_through_prefers_deep_stock() -> None:
    """Sell-through ranks the deepest stock first at equal p(accept)."""
    rank_inputs = inputs(p_accept=[0.2, 0.2, 0.2], stock_units=[10, 500, 100])
    rules = knob(1.0, "sell_through")
    rules["ranking"]["overstock_units"] = 100  # type: ignore[index]
    assert order_for(rank_inputs, **rules) == [1, 2, 0]


def test_returns_and_shipping_reduce_contribution() -> None:
    """Expected returns and split-shipment cost come out of the margin before ranking."""
    plain = inputs(unit_margin=[1.0, 1.0, 1.0], p_accept=[0.5, 0.5, 0.5])
    assert order_for(plain, **knob(1.0)) == [0, 1, 2]  # tie: catalog position
    returned = inputs(
        unit_margin=[1.0, 1.0, 1.0], p_accept=[0.5, 0.5, 0.5], return_rate=[0.5, 0.0, 0.0]
    )
    assert order_for(returned, **knob(1.0))[-1] == 0
    shipped = inputs(
        unit_margin=[1.0, 1.0, 1.0], p_accept=[0.5, 0.5, 0.5], fulfilment_cost=[0.0, 0.6, 0.0]
    )
    assert order_for(shipped, **knob(1.0))[-1] == 1


def test_low_stock_ranks_lower() -> None:
    """Low stock (available + inbound under the threshold) scales contribution down."""
    rank_inputs = inputs(
        unit_margin=[1.0, 1.0, 1.0], p_accept=[0.5, 0.5, 0.5], stock_units=[1, 50, 50]
    )
    rules = knob(1.0)
    rules["ranking"].update(low_stock_units=3, low_stock_factor=0.5)  # type: ignore[attr-defined]
    assert order_for(rank_inputs, **rules) == [1, 2, 0]


@pytest.mark.parametrize(
    ("limit", "cap", "expected"), [(2, 1, [0, 2]), (3, 1, [0, 2, 1]), (3, 2, [0, 1, 2])]
)
def test_diversity_cap_is_relaxed_only_to_fill(limit: int, cap: int, expected: list[int]) -> None:
    """At most `cap` per category while others remain; capped items fill a short list."""
    assert order_for(inputs(), limit=limit, cap=cap, **knob(0.0)) == expected


def test_scores_are_bounded_by_the_knob() -> None:
    """Final scores stay within [-1, 1] and equal relevance at weight 0."""
    compiled = compile_policy(policy(**knob(0.5)), CATALOG)
    parts = score(inputs(unit_margin=[-1.0, 2.0, 9.0]), compiled, "cart")
    assert np.all(np.abs(parts.final) <= 1.0)
    zero = score(inputs(), compile_policy(policy(**knob(0.0)), CATALOG), "cart")
    assert zero.final.tolist() == [1.0, 0.6, 0.3]


def test_knob_resolves_per_category_and_channel() -> None:
    """A category's own knob overrides the default for that category only."""
    rules = {
        "ranking": {
            "knobs": [
                {"margin_weight": 0.0},
                {"category": "Y", "channel": "cart", "margin_weight": 1.0},
            ]
        }
    }
    compiled = compile_policy(policy(**rules), CATALOG)
    parts = score(inputs(), compiled, "cart")
    assert parts.margin_weight.tolist() == [0.0, 0.0, 1.0]
    assert score(inputs(), compiled, "pos").margin_weight.tolist() == [0.0, 0.0, 0.0]
