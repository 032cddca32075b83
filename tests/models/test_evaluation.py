"""Offline evaluation (models.evaluation): metrics against hand-computed values, the split
and the held-out cases."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import polars as pl
import pytest

from models.evaluation import leave_one_out, ranking_metrics, temporal_split
from rules.errors import InputError

# Four cases. Ranks of the hidden item: 2, absent, 6, 1. Unit margins: b 2.0, a -1.0 (a loss
# leader: hitting it loses money), f 7.0; x is never shown.
RECOMMENDED = [["a", "b", "c"], ["c", "d"], ["e", "a", "b", "c", "d", "f"], ["a"]]
HIDDEN = ["b", "x", "f", "a"]
MARGINS = {"a": -1.0, "b": 2.0, "f": 7.0, "x": 100.0}


def test_metrics_at_5_match_hand_computation() -> None:
    """At k=5: hits are case 1 (rank 2) and case 4 (rank 1); case 3's rank 6 is past k."""
    metrics = ranking_metrics(
        RECOMMENDED, HIDDEN, k=5, unit_margin=MARGINS, catalog_size=10, violations=3
    )

    assert metrics.cases == 4
    assert metrics.hit_rate == pytest.approx(2 / 4)
    assert metrics.ndcg == pytest.approx((1 / math.log2(3) + 1 / math.log2(2)) / 4)
    assert metrics.mrr == pytest.approx((1 / 2 + 1 / 1) / 4)
    assert metrics.coverage == pytest.approx(5 / 10)  # a, b, c, d, e
    assert metrics.margin_per_1000 == pytest.approx((2.0 - 1.0) / 4 * 1000)
    assert metrics.violations == 3


def test_metrics_at_10_count_the_sixth_place() -> None:
    """At k=10 case 3 (rank 6) is a hit too, and f joins the items shown."""
    metrics = ranking_metrics(RECOMMENDED, HIDDEN, k=10, unit_margin=MARGINS, catalog_size=10)

    assert metrics.hit_rate == pytest.approx(3 / 4)
    assert metrics.ndcg == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(2) + 1 / math.log2(7)) / 4
    )
    assert metrics.mrr == pytest.approx((1 / 2 + 1 + 1 / 6) / 4)
    assert metrics.coverage == pytest.approx(6 / 10)
    assert metrics.margin_per_1000 == pytest.approx((2.0 - 1.0 + 7.0) / 4 * 1000)
    assert metrics.violations == 0


def test_metrics_refuse_mismatched_inputs() -> None:
    """One list per case, and a positive k and catalog size."""
    with pytest.raises(ValueError, match="lists for"):
        ranking_metrics([["a"]], ["a", "b"], k=5, unit_margin={}, catalog_size=3)
    with pytest.raises(ValueError, match="positive"):
        ranking_metrics([["a"]], ["a"], k=0, unit_margin={}, catalog_size=3)


def lines_of(orders: list[tuple[str, str | None, int, list[str]]]) -> pl.DataFrame:
    """Order lines from (order id, customer, day, skus); line n of an order n minutes later."""
    start = datetime(2024, 1, 1, 9)
    rows = [
        (order_id, customer, sku, start + timedelta(days=day, minutes=index))
        for order_id, customer, day, skus in orders
        for index, sku in enumerate(skus)
    ]
    return pl.DataFrame(
        rows,
        schema={
            "order_id": pl.String,
            "customer_id": pl.String,
            "sku": pl.String,
            "ordered_at": pl.Datetime("us"),
        },
        orient="row",
    ).with_columns(store_id=pl.lit("S-1"))


ORDERS = [
    ("o1", "c1", 0, ["a", "b"]),
    ("o2", "c2", 1, ["a", "c"]),
    ("o3", "c1", 2, ["b", "c", "d"]),
    ("o4", None, 3, ["a", "new"]),
    ("o5", "c2", 4, ["new"]),
    ("o6", "c3", 5, ["new", "other-new"]),
]


def test_temporal_split_keeps_orders_whole() -> None:
    """The later half of the orders by time test: o4-o6 (from day 3); lines never split."""
    split = temporal_split(lines_of(ORDERS), test_fraction=0.5)

    assert split.cutoff == datetime(2024, 1, 4, 9)
    assert sorted(split.train["order_id"].unique().to_list()) == ["o1", "o2", "o3"]
    assert sorted(split.test["order_id"].unique().to_list()) == ["o4", "o5", "o6"]


def test_temporal_split_at_an_explicit_cutoff() -> None:
    """With a cutoff, orders placed at or after it test."""
    split = temporal_split(lines_of(ORDERS), cutoff=datetime(2024, 1, 3, 9))

    assert sorted(split.test["order_id"].unique().to_list()) == ["o3", "o4", "o5", "o6"]
    with pytest.raises(InputError, match="empty"):
        temporal_split(lines_of(ORDERS), cutoff=datetime(2030, 1, 1))


def test_leave_one_out_hides_a_known_item_of_each_basket() -> None:
    """Single-item orders and orders without a known item give no case; the hidden item is
    known, the rest of the basket (sorted, unknown items included) is the request."""
    cases = leave_one_out(lines_of(ORDERS), known_skus={"a", "b", "c", "d"}, seed=1)

    assert [case.order_id for case in cases] == ["o1", "o2", "o3", "o4"]
    by_order = {case.order_id: case for case in cases}
    assert by_order["o4"].hidden == "a"
    assert by_order["o4"].basket == ("new",)
    assert by_order["o4"].customer_id is None
    for case in cases:
        assert case.hidden not in case.basket
        assert list(case.basket) == sorted(case.basket)
    assert by_order["o3"].customer_id == "c1"
    assert by_order["o3"].store_id == "S-1"
    assert by_order["o3"].ordered_at == datetime(2024, 1, 3, 9)


def test_leave_one_out_is_seeded_and_samples() -> None:
    """The same seed gives the same cases; max_cases keeps that many, in order id order."""
    lines = lines_of(ORDERS)
    known = {"a", "b", "c", "d"}

    first = leave_one_out(lines, known_skus=known, seed=4)
    again = leave_one_out(lines, known_skus=known, seed=4)
    sampled = leave_one_out(lines, known_skus=known, seed=4, max_cases=2)

    assert first == again
    assert len(sampled) == 2
    assert [case.order_id for case in sampled] == sorted(case.order_id for case in sampled)
