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
        restricted_pairs=compiled.restricted_pairs,
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


def test_each_objective_is_scaled_on_its_own() -> None:
    """A revenue category (price-scaled values) no longer squeezes margin categories: each
    objective's values are divided by their own largest magnitude. With one shared scale,
    B's 0.4 contribution next to C's 20.0 revenue would score 0.02, below D."""
    cat = catalog(
        [item(sku, category=c) for sku, c in [("A", "X"), ("B", "X"), ("C", "Y"), ("D", "Y")]]
    )
    rules = {
        "ranking": {
            "knobs": [
                {"objective": "margin", "margin_weight": 1.0},
                {"category": "Y", "objective": "revenue", "margin_weight": 1.0},
            ]
        }
    }
    compiled = compile_policy(policy(**rules), cat)
    rank_inputs = inputs(
        catalog_pos=[0, 1, 2, 3],
        category_code=[0, 0, 1, 1],
        relevance=[0.9, 0.8, 0.7, 0.6],
        p_accept=[0.3, 0.2, 0.1, 0.2],
        effective_price=[2.0, 5.0, 200.0, 50.0],
        unit_margin=[0.4, 2.0, 90.0, 20.0],
        return_rate=[0.0] * 4,
        fulfilment_cost=[0.0] * 4,
        stock_units=[50] * 4,
    )
    parts = score(rank_inputs, compiled, "cart")
    # margin: 0.12 and 0.40 over 0.40; revenue: 20.0 and 10.0 over 20.0.
    assert parts.objective_value.tolist() == pytest.approx([0.12, 0.4, 20.0, 10.0])
    assert parts.final.tolist() == pytest.approx([0.3, 1.0, 1.0, 0.5])
    order = rank(
        parts.final,
        rank_inputs.catalog_pos,
        rank_inputs.category_code,
        limit=4,
        max_per_category=4,
        restricted_pairs=compiled.restricted_pairs,
    )
    assert order.tolist() == [1, 2, 3, 0]


PAIRED = catalog(
    [
        item(sku, category=c)
        for sku, c in [("P1", "P"), ("Q1", "Q"), ("R1", "R"), ("Q2", "Q"), ("P2", "P")]
    ]
)


def paired_order(pairs: list[list[str]], *, limit: int, cap: int) -> list[str]:
    """Rank P1 > Q1 > R1 > Q2 > P2 by relevance under restricted ``pairs``."""
    compiled = compile_policy(policy(restrictions={"category_pairs": pairs}), PAIRED)
    chosen = rank(
        np.array([0.9, 0.8, 0.7, 0.6, 0.5]),
        np.arange(5, dtype=np.int64),
        PAIRED.category_code[np.arange(5)],
        limit=limit,
        max_per_category=cap,
        restricted_pairs=compiled.restricted_pairs,
    )
    return [PAIRED.skus[row] for row in chosen]


@pytest.mark.parametrize(
    ("case", "pairs", "limit", "cap", "expected"),
    [
        ("no restriction", [], 3, 3, ["P1", "Q1", "R1"]),
        ("P-Q: both Qs skipped, P2 fills", [["P", "Q"]], 3, 3, ["P1", "R1", "P2"]),
        ("Q-P written the other way round", [["Q", "P"]], 5, 3, ["P1", "R1", "P2"]),
        ("P-Q, cap 1: P2 backfills past the cap", [["P", "Q"]], 3, 1, ["P1", "R1", "P2"]),
        ("P with itself: one P at most", [["P", "P"]], 5, 3, ["P1", "Q1", "R1", "Q2"]),
        ("P-Q and P-R: P1 leaves only P2", [["P", "Q"], ["P", "R"]], 5, 3, ["P1", "P2"]),
    ],
)
def test_restricted_pairs_never_shown_together(
    case: str, pairs: list[list[str]], limit: int, cap: int, expected: list[str]
) -> None:
    """rank() skips an item restricted with one already chosen, and backfills the list."""
    assert paired_order(pairs, limit=limit, cap=cap) == expected, case


def test_backfill_relaxes_the_cap_but_never_a_restriction() -> None:
    """A short list takes back items passed over for the cap, never restricted ones.

    X1 > X2 > Y1 > Z1 with cap 1 and X-Z restricted: the walk takes X1, passes X2 over for
    the cap, takes Y1, skips Z1 (X1 is shown); backfill adds X2. With Z1 best instead, both
    Xs are restricted and the list stays short."""
    cat = catalog(
        [item(sku, category=c) for sku, c in [("X1", "X"), ("X2", "X"), ("Y1", "Y"), ("Z1", "Z")]]
    )
    compiled = compile_policy(policy(restrictions={"category_pairs": [["X", "Z"]]}), cat)
    codes = cat.category_code[np.arange(4)]
    chosen = rank(
        np.array([0.9, 0.8, 0.7, 0.6]),
        np.arange(4, dtype=np.int64),
        codes,
        limit=4,
        max_per_category=1,
        restricted_pairs=compiled.restricted_pairs,
    )
    assert [cat.skus[row] for row in chosen] == ["X1", "Y1", "X2"]
    # Z1 first, then the Xs are all blocked: the capped X2 must not come back in backfill.
    chosen = rank(
        np.array([0.9, 0.8, 0.7, 0.95]),
        np.arange(4, dtype=np.int64),
        codes,
        limit=4,
        max_per_category=1,
        restricted_pairs=compiled.restricted_pairs,
    )
    assert [cat.skus[row] for row in chosen] == ["Z1", "Y1"]


def test_deep_candidates_fill_when_the_head_is_blocked() -> None:
    """Only the best 4 x limit are sorted first; when restrictions block them all, the walk
    continues into the deeper candidates before relaxing the cap."""
    names = ["P0", *(f"Q{i}" for i in range(1, 20)), "R20"]
    cat = catalog([item(sku, category=sku[0]) for sku in names])
    compiled = compile_policy(policy(restrictions={"category_pairs": [["P", "Q"]]}), cat)
    relevance = np.linspace(1.0, 0.0, len(names))
    chosen = rank(
        relevance,
        np.arange(len(names), dtype=np.int64),
        cat.category_code[np.arange(len(names))],
        limit=2,
        max_per_category=1,
        restricted_pairs=compiled.restricted_pairs,
    )
    assert [cat.skus[row] for row in chosen] == ["P0", "R20"]


@pytest.mark.parametrize(
    ("case", "margins", "expected"),
    [
        ("equal margins: the overstocked one first", [1.0, 1.0, 1.0], [1, 0, 2]),
        ("a boost of 0.2 beats an 0.19 lead", [1.19, 1.0, 1.0], [1, 0, 2]),
        ("but not a 0.21 lead: the boost is bounded", [1.21, 1.0, 1.0], [0, 1, 2]),
    ],
)
def test_overstock_boost_under_the_margin_objective(
    case: str, margins: list[float], expected: list[int]
) -> None:
    """Overstock multiplies contribution by 1 + sell_through_boost (at most 1.5 by policy),
    so it tips close calls and never more."""
    rules = knob(1.0)
    rules["ranking"].update(overstock_units=100, sell_through_boost=0.2)  # type: ignore[attr-defined]
    rank_inputs = inputs(unit_margin=margins, p_accept=[0.5, 0.5, 0.5], stock_units=[50, 100, 99])
    assert order_for(rank_inputs, **rules) == expected, case
    parts = score(rank_inputs, compile_policy(policy(**rules), CATALOG), "cart")
    assert parts.contribution[1] == pytest.approx(0.5 * 1.0 * 1.2)


def test_the_boost_is_bounded_by_the_policy() -> None:
    """A sell-through boost above 0.5 is refused when the policy is validated."""
    with pytest.raises(ValueError, match="sell_through_boost"):
        policy(ranking={"sell_through_boost": 0.6})


# -- the compiled walk against the Python walk it replaced -------------------------------


def python_rank(
    final: np.ndarray,
    catalog_pos: np.ndarray,
    category_code: np.ndarray,
    *,
    limit: int,
    max_per_category: int,
    partners: list[set[int]],
) -> list[int]:
    """``rank`` as it was written in Python (sets of partners, lexsort), kept as the oracle."""
    chosen: list[int] = []
    per_category: dict[int, int] = {}
    blocked: set[int] = set()
    capped: list[tuple[int, int]] = []

    def walk(rows: np.ndarray) -> None:
        order = rows[np.lexsort((catalog_pos[rows], -final[rows]))]
        for row, code in zip(order.tolist(), category_code[order].tolist(), strict=True):
            if len(chosen) >= limit:
                return
            if code in blocked:
                continue
            taken = per_category.get(code, 0)
            if taken >= max_per_category:
                capped.append((row, code))
                continue
            chosen.append(row)
            per_category[code] = taken + 1
            blocked.update(partners[code])

    count = len(final)
    if limit <= 0 or not count:
        return []
    head_size = 4 * limit
    if count <= head_size:
        walk(np.arange(count))
    else:
        threshold = np.partition(final, count - head_size)[count - head_size]
        walk(np.flatnonzero(final >= threshold))
        if len(chosen) < limit:
            walk(np.flatnonzero(final < threshold))
    for row, _ in capped:
        if len(chosen) >= limit:
            break
        chosen.append(row)
    return chosen


@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_walk_chooses_as_the_python_walk(seed: int) -> None:
    """Random scores with many ties, categories, restricted pairs, limits and caps."""
    rng = np.random.default_rng(seed)
    for _ in range(300):
        count, codes = int(rng.integers(0, 120)), int(rng.integers(1, 8))
        final = rng.integers(0, 12, count) / 11.0  # coarse: ties at the cut are common
        catalog_pos = rng.permutation(count * 2)[:count].astype(np.int64)
        category_code = rng.integers(0, codes, count).astype(np.int64)
        pairs = rng.random((codes, codes)) < 0.15
        pairs |= pairs.T
        limit, cap = int(rng.integers(0, 12)), int(rng.integers(1, 4))
        expected = python_rank(
            final,
            catalog_pos,
            category_code,
            limit=limit,
            max_per_category=cap,
            partners=[set(np.flatnonzero(row).tolist()) for row in pairs],
        )
        chosen = rank(
            final,
            catalog_pos,
            category_code,
            limit=limit,
            max_per_category=cap,
            restricted_pairs=pairs,
        )
        assert chosen.dtype == np.int64
        assert chosen.tolist() == expected, (count, codes, limit, cap)
