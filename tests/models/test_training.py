"""train(): ALS, item-item neighbours and popularity on data with a known answer.

The known answer follows implicit's checkerboard tests: two blocks of items that are only ever
bought together (A0-A4 and B0-B4), their customers, one customer with an item held out, and a
few guest orders that make the popularity order known by construction.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from models.candidates import HybridGenerator
from models.training import content_version, top_k_per_row, train
from rules.errors import InputError
from tests.models.builders import checkerboard

ONLINE_RETAIL = Path("/work/shared/data/online-retail/online_retail.parquet")


ORDERS_PER_ITEM = np.array([32, 30, 30, 30, 27, 35, 30, 30, 30, 30, 1])
N_ORDERS = 68


@pytest.fixture(scope="module")
def lines() -> pl.DataFrame:
    return checkerboard()


def test_item_index_and_users_follow_sorted_ids(lines: pl.DataFrame) -> None:
    """Model item indexes are the sorted SKUs; user rows the sorted known customer ids."""
    artifacts = train(lines, factors=2)

    assert artifacts.item_skus == (*(f"A{i}" for i in range(5)), *(f"B{i}" for i in range(5)), "Z")
    assert artifacts.user_ids == tuple(f"c{n:02d}" for n in range(20))


def test_neighbours_are_exactly_the_co_bought_block(lines: pl.DataFrame) -> None:
    """Item-item neighbours of A0 are exactly A1-A4 by cosine over baskets, best first."""
    artifacts = train(lines, neighbours=50)

    assert artifacts.neighbours.shape == (11, 50)
    # cos(A0, A1..A3) = 30 / sqrt(32 * 30); cos(A0, A4) = 27 / sqrt(32 * 27)
    np.testing.assert_array_equal(artifacts.neighbours[0, :5], [1, 2, 3, 4, -1])
    np.testing.assert_allclose(
        artifacts.neighbour_scores[0, :4],
        [30 / np.sqrt(32 * 30)] * 3 + [27 / np.sqrt(32 * 27)],
        rtol=1e-6,
    )
    # A1: A2 and A3 always with it (1.0), then A0, then A4.
    np.testing.assert_array_equal(artifacts.neighbours[1, :5], [2, 3, 0, 4, -1])
    np.testing.assert_array_equal(artifacts.neighbours[5, :5], [6, 7, 8, 9, -1])


def test_neighbour_rows_are_padded_sorted_and_exclude_self(lines: pl.DataFrame) -> None:
    """Every item has a row: -1/0 padding after the real neighbours, scores descending, no self;
    an item never co-bought (Z) is all padding."""
    artifacts = train(lines, neighbours=6)

    neighbours, scores = artifacts.neighbours, artifacts.neighbour_scores
    assert neighbours.dtype == np.int32
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(neighbours[10], [-1] * 6)
    np.testing.assert_array_equal(scores[10], [0] * 6)
    assert not (neighbours == np.arange(11)[:, None]).any()
    assert (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_array_equal(neighbours < 0, scores == 0)


def test_fewer_neighbours_keep_the_best(lines: pl.DataFrame) -> None:
    """With neighbours=2 each row keeps two of its best-scored items."""
    artifacts = train(lines, neighbours=2)

    # A1, A2, A3 tie for A0's best; which two survive the cut is implicit's (stable) choice.
    assert set(artifacts.neighbours[0].tolist()) <= {1, 2, 3}
    np.testing.assert_allclose(artifacts.neighbour_scores[0], [30 / np.sqrt(32 * 30)] * 2)
    np.testing.assert_array_equal(artifacts.neighbours[1], [2, 3])


def test_popularity_is_the_share_of_orders(lines: pl.DataFrame) -> None:
    """popularity[i] is the share of all orders (guests included) containing item i."""
    artifacts = train(lines)

    assert artifacts.popularity.dtype == np.float32
    np.testing.assert_allclose(artifacts.popularity, ORDERS_PER_ITEM / N_ORDERS, rtol=1e-6)


def test_als_ranks_the_held_out_block_item_above_the_other_block(lines: pl.DataFrame) -> None:
    """ALS for c00 (block A, never bought A4) scores A4 above every block-B item, and a block-B
    customer the other way round."""
    artifacts = train(lines, factors=2)

    block_a_customer = artifacts.item_factors @ artifacts.user_factors[0]
    assert block_a_customer[4] > block_a_customer[5:10].max()
    block_b_customer = artifacts.item_factors @ artifacts.user_factors[15]
    assert block_b_customer[5:10].min() > block_b_customer[0:5].max()


def test_shapes_dtypes_and_metadata(lines: pl.DataFrame) -> None:
    """Factor matrices have the requested width; params and an ISO UTC trained_at are kept."""
    artifacts = train(lines, factors=8, iterations=5, regularization=0.1, neighbours=3, seed=1)

    assert artifacts.user_factors.shape == (20, 8)
    assert artifacts.item_factors.shape == (11, 8)
    assert artifacts.user_factors.dtype == artifacts.item_factors.dtype == np.float32
    assert artifacts.params["factors"] == 8
    assert artifacts.params["neighbours"] == 3
    assert artifacts.params["seed"] == 1
    assert artifacts.params["n_orders"] == N_ORDERS
    assert len(artifacts.version) == 16
    int(artifacts.version, 16)
    trained_at = datetime.fromisoformat(artifacts.trained_at)
    assert trained_at.utcoffset() is not None
    assert trained_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_training_is_deterministic(lines: pl.DataFrame) -> None:
    """The same order lines and seed give the same arrays and version, in any row order."""
    first = train(lines)
    second = train(lines.sample(fraction=1.0, shuffle=True, seed=3))

    assert first.version == second.version
    for name in ("user_factors", "item_factors", "neighbours", "neighbour_scores", "popularity"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_another_seed_gives_another_version(lines: pl.DataFrame) -> None:
    """The version is a content hash: a different ALS seed changes it."""
    assert train(lines, seed=1).version != train(lines, seed=2).version


def test_content_version_covers_params_and_ids() -> None:
    """content_version changes with the parameters, the ids and the array bytes."""
    arrays = {"popularity": np.array([0.5, 0.25], dtype=np.float32)}
    base = content_version(arrays=arrays, params={"seed": 1}, item_skus=("a", "b"), user_ids=())

    assert base == content_version(
        arrays=arrays, params={"seed": 1}, item_skus=("a", "b"), user_ids=()
    )
    assert base != content_version(
        arrays=arrays, params={"seed": 2}, item_skus=("a", "b"), user_ids=()
    )
    assert base != content_version(
        arrays=arrays, params={"seed": 1}, item_skus=("a", "c"), user_ids=()
    )
    changed = {"popularity": np.array([0.5, 0.5], dtype=np.float32)}
    assert base != content_version(
        arrays=changed, params={"seed": 1}, item_skus=("a", "b"), user_ids=()
    )


def test_guest_only_orders_train_with_zero_user_factors() -> None:
    """Without known customers ALS is skipped (zero factors); neighbours are still learned."""
    lines = checkerboard().with_columns(customer_id=pl.lit(None, pl.String))
    artifacts = train(lines, factors=4)

    assert artifacts.user_ids == ()
    assert artifacts.user_factors.shape == (0, 4)
    assert not artifacts.item_factors.any()
    np.testing.assert_array_equal(artifacts.neighbours[0, :4], [1, 2, 3, 4])


def test_top_k_per_row_matches_a_dense_computation() -> None:
    """The vectorised extraction equals a per-row sort of a dense similarity matrix."""
    rng = np.random.default_rng(0)
    dense = rng.random((40, 40)).astype(np.float32)
    dense[rng.random((40, 40)) < 0.7] = 0  # sparse, some rows with fewer than k entries
    k = 5

    neighbours, scores = top_k_per_row(sp.csr_matrix(dense), k=k, n_rows=40)

    for row in range(40):
        values = dense[row].copy()
        values[row] = 0  # self excluded
        order = np.lexsort((np.arange(40), -values))[:k]
        order = order[values[order] > 0]
        np.testing.assert_array_equal(neighbours[row, : order.size], order)
        np.testing.assert_array_equal(scores[row, : order.size], values[order])
        assert (neighbours[row, order.size :] == -1).all()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"factors": 0}, "factors"),
        ({"iterations": 0}, "iterations"),
        ({"regularization": -1.0}, "regularization"),
        ({"neighbours": 0}, "neighbours"),
    ],
)
def test_bad_parameters_are_named(
    lines: pl.DataFrame, params: dict[str, float], field: str
) -> None:
    """A parameter out of range raises InputError naming it."""
    with pytest.raises(InputError, match=field):
        train(lines, **params)  # type: ignore[arg-type]


def test_no_order_lines_is_an_input_error(lines: pl.DataFrame) -> None:
    """Training on an empty frame raises InputError rather than producing an empty model."""
    with pytest.raises(InputError, match="nothing to train"):
        train(lines.clear())


def online_retail_order_lines(path: Path) -> pl.DataFrame:
    """Online Retail (UCI) as ORDER_LINES, 2011-09 onwards: invoices are orders, cancellations
    ('C' invoices) and non-positive quantities dropped."""
    raw = pl.read_parquet(path)
    return (
        raw.filter(~pl.col("InvoiceNo").str.starts_with("C") & (pl.col("Quantity") > 0))
        .select(
            order_id=pl.col("InvoiceNo"),
            customer_id=pl.col("CustomerID").cast(pl.Int64).cast(pl.String),
            sku=pl.col("StockCode"),
            quantity=pl.col("Quantity"),
            unit_price=pl.col("UnitPrice"),
            ordered_at=pl.col("InvoiceDate").str.to_datetime("%Y-%m-%d %H:%M:%S", time_unit="us"),
            store_id=pl.lit(None, pl.String),
            channel=pl.lit("web"),
        )
        .filter(pl.col("ordered_at") >= datetime(2011, 9, 1))
    )


@pytest.mark.shared_data
def test_smoke_on_online_retail() -> None:
    """On real order lines: popular items have scored neighbours and the hybrid fills count."""
    if not ONLINE_RETAIL.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{ONLINE_RETAIL} is required in CI")
        pytest.skip(f"{ONLINE_RETAIL} not present")
    lines = online_retail_order_lines(ONLINE_RETAIL)

    artifacts = train(lines)

    most_popular = int(np.argmax(artifacts.popularity))
    assert (artifacts.neighbours[most_popular] >= 0).all()
    assert (artifacts.neighbour_scores[most_popular] > 0).all()
    hybrid = HybridGenerator.from_artifacts(artifacts)
    anchors = np.array([most_popular], dtype=np.int32)
    candidates = hybrid.generate(anchors=anchors, user_row=0, count=300)
    assert len(candidates) == 300
    assert most_popular not in candidates.item_idx[candidates.kind == 0]
