"""Training-time tables (models.tables) against hand counts and dense computations."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from models.tables import (
    bundle_table,
    factor_neighbour_table,
    order_regions_from_nodes,
    purchase_cycles,
    region_popularity,
)
from rules.errors import InputError

# Five orders over items x0..x3: x0+x1 three times, x0+x2 once, x3 alone once.
BASKETS = sp.csr_matrix(
    np.array(
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32
    )
)


def test_bundle_lift_matches_hand_counts() -> None:
    """lift(x0, x1) = 3 * 5 / (4 * 3) = 1.25, lift(x0, x2) = 1 * 5 / (4 * 1) = 1.25;
    x1's partner is x0 at 1.25; x3 has none."""
    table = bundle_table(BASKETS, k=3, min_support=1, min_lift=0.0)

    assert table.items.tolist() == [[1, 2, -1], [0, -1, -1], [0, -1, -1], [-1, -1, -1]]
    np.testing.assert_allclose(table.scores[0], [1.25, 1.25, 0.0])
    assert table.items.dtype == np.int32
    assert table.scores.dtype == np.float32


def test_bundle_support_floor_drops_rare_pairs() -> None:
    """With a support of 2 orders, x0+x2 (one order) is no bundle."""
    table = bundle_table(BASKETS, k=3, min_support=2, min_lift=0.0)

    assert table.items[0].tolist() == [1, -1, -1]
    assert table.items[2].tolist() == [-1, -1, -1]


def test_bundle_matches_a_dense_computation() -> None:
    """On random baskets the table is the dense lift matrix's top k per row (ties by index)."""
    rng = np.random.default_rng(3)
    dense = (rng.random((400, 30)) < 0.15).astype(np.float32)
    together = dense.T @ dense
    counts = dense.sum(axis=0)
    lift = together * dense.shape[0] / np.outer(counts, counts)
    eligible = (together >= 3) & (lift >= 1.1) & ~np.eye(30, dtype=bool)

    table = bundle_table(sp.csr_matrix(dense), k=5, min_support=3, min_lift=1.1)

    for row in range(30):
        candidates = np.flatnonzero(eligible[row])
        order = candidates[np.lexsort((candidates, -lift[row, candidates].astype(np.float32)))]
        expected = order[:5].tolist()
        assert table.items[row, : len(expected)].tolist() == expected, row
        assert (table.items[row, len(expected) :] == -1).all()


def test_factor_neighbours_match_a_dense_cosine() -> None:
    """Top k by cosine of factors, self excluded, positive only; zero factors have none."""
    rng = np.random.default_rng(5)
    factors = rng.standard_normal((60, 8)).astype(np.float32)
    factors[7] = 0.0
    unit = factors / np.maximum(np.linalg.norm(factors, axis=1, keepdims=True), 1e-30)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -np.inf)

    table = factor_neighbour_table(factors, k=6)

    assert (table.items[7] == -1).all()
    assert not (table.items == 7).any()
    for row in (0, 13, 59):
        positive = np.flatnonzero(cosine[row] > 0)
        expected = positive[np.argsort(-cosine[row, positive], kind="stable")][:6]
        assert table.items[row].tolist() == expected.tolist()
        np.testing.assert_allclose(table.scores[row], cosine[row, expected], rtol=1e-5)


def test_region_popularity_is_the_share_of_each_regions_orders() -> None:
    """Region N has orders 0-2 (x0 and x1 in all three), S orders 3 (x0, x2); order 4 has
    no region and counts nowhere."""
    regional = region_popularity(BASKETS, ["N", "N", "N", "S", None])

    assert regional is not None
    assert regional.regions == ("N", "S")
    np.testing.assert_allclose(regional.share, [[1, 1, 0, 0], [1, 0, 1, 0]])
    assert region_popularity(BASKETS, [None] * 5) is None
    with pytest.raises(InputError, match="order regions"):
        region_popularity(BASKETS, ["N"])


def test_order_regions_come_from_the_store_node() -> None:
    """An order's region is its store's; web orders and unknown stores have none."""
    lines = pl.DataFrame(
        {
            "order_id": ["o1", "o1", "o2", "o3"],
            "store_id": ["S-1", "S-1", None, "S-9"],
        }
    )
    nodes = pl.DataFrame({"node_id": ["S-1", "DC-1"], "region": ["north", "north"]})

    assert order_regions_from_nodes(lines, nodes, ["o1", "o2", "o3", "o4"]) == [
        "north",
        None,
        None,
        None,
    ]


def test_purchase_cycles_per_customer_and_item() -> None:
    """Median gap between distinct purchase days and the last day, for pairs bought on at
    least 3 days; rows follow the customer list, items ascend within a row."""
    start = datetime(2024, 1, 1, 10, 30)
    rows = [
        # c1: x1 on days 0, 2, 10 (gaps 2, 8: median 5), x0 on days 0, 4, 8, 8 (gap 4).
        ("c1", "x1", 0),
        ("c1", "x1", 2),
        ("c1", "x1", 10),
        ("c1", "x0", 0),
        ("c1", "x0", 4),
        ("c1", "x0", 8),
        ("c1", "x0", 8),
        # c0: x0 on two days only: no cycle. A guest's purchases never count.
        ("c0", "x0", 0),
        ("c0", "x0", 9),
        (None, "x0", 1),
        (None, "x0", 2),
        (None, "x0", 3),
    ]
    lines = pl.DataFrame(
        {
            "customer_id": [customer for customer, _, _ in rows],
            "sku": [sku for _, sku, _ in rows],
            "ordered_at": [
                start + timedelta(days=day, hours=index) for index, (*_, day) in enumerate(rows)
            ],
        }
    )

    cycles = purchase_cycles(
        lines, customer_ids=["c0", "c1"], item_skus=["x0", "x1"], min_purchases=3
    )

    assert cycles.indptr.tolist() == [0, 0, 2]
    assert cycles.items.tolist() == [0, 1]
    np.testing.assert_allclose(cycles.interval_days, [4.0, 5.0])
    last_days = [datetime(2024, 1, 9), datetime(2024, 1, 11)]
    assert cycles.last_purchase_us.tolist() == [
        int(np.datetime64(day, "us").astype(np.int64)) for day in last_days
    ]


def test_bad_table_parameters_are_named() -> None:
    """Out-of-range parameters raise InputError naming the table."""
    with pytest.raises(InputError, match="bundles"):
        bundle_table(BASKETS, k=0, min_support=1, min_lift=1.0)
    with pytest.raises(InputError, match="factor neighbours"):
        factor_neighbour_table(np.zeros((3, 2), dtype=np.float32), k=0)
    with pytest.raises(InputError, match="min_purchases"):
        purchase_cycles(pl.DataFrame(), customer_ids=[], item_skus=[], min_purchases=1)
