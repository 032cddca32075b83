"""Order lines -> basket_items and customer_items CSR matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from models.interactions import build_interactions
from rules.errors import InputError
from tests.models.builders import order_lines

BASKETS: list[tuple[str, str | None, list[str]]] = [
    ("o3", "alice", ["mug", "tea"]),
    ("o1", "alice", ["mug", "kettle", "mug"]),  # the same SKU on two lines of one order
    ("o2", "bob", ["tea"]),
    ("o4", None, ["kettle", "tea"]),  # a guest order
    ("o5", "alice", ["mug"]),
]


def test_ids_are_sorted_and_matrices_are_csr_float32() -> None:
    """Items, orders and known customers are numbered in sorted id order; both matrices are
    scipy csr_matrix of float32 (what implicit expects)."""
    interactions = build_interactions(order_lines(BASKETS))

    assert interactions.item_skus == ("kettle", "mug", "tea")
    assert interactions.order_ids == ("o1", "o2", "o3", "o4", "o5")
    assert interactions.customer_ids == ("alice", "bob")
    for matrix in (interactions.basket_items, interactions.customer_items):
        assert isinstance(matrix, sp.csr_matrix)
        assert matrix.dtype == np.float32
        assert matrix.has_sorted_indices
    assert interactions.basket_items.shape == (5, 3)
    assert interactions.customer_items.shape == (2, 3)


def test_basket_items_is_binary_and_includes_guest_orders() -> None:
    """basket_items holds 1.0 per (order, item) present, duplicates counted once, guests kept."""
    interactions = build_interactions(order_lines(BASKETS))

    expected = np.array(
        [
            [1, 1, 0],  # o1: kettle, mug (twice)
            [0, 0, 1],  # o2: tea
            [0, 1, 1],  # o3: mug, tea
            [1, 0, 1],  # o4 (guest): kettle, tea
            [0, 1, 0],  # o5: mug
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(interactions.basket_items.toarray(), expected)
    np.testing.assert_array_equal(interactions.orders_per_item(), [2, 3, 3])


def test_customer_items_counts_distinct_orders_and_skips_guests() -> None:
    """customer_items weighs a pair by the number of distinct orders containing the item."""
    interactions = build_interactions(order_lines(BASKETS))

    expected = np.array(
        [
            [1, 3, 1],  # alice: kettle in o1; mug in o1, o3, o5 (two lines in o1 count once)
            [0, 0, 1],  # bob: tea in o2
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(interactions.customer_items.toarray(), expected)


def test_log1p_weighting_damps_repeat_orders() -> None:
    """With customer_weight='log1p_orders' the weight is log1p of the distinct-order count."""
    interactions = build_interactions(order_lines(BASKETS), customer_weight="log1p_orders")

    expected = np.log1p(np.array([[1, 3, 1], [0, 0, 1]], dtype=np.float32))
    np.testing.assert_allclose(interactions.customer_items.toarray(), expected, rtol=1e-6)


def test_row_order_does_not_change_the_matrices() -> None:
    """Shuffled order lines give identical ids and identical CSR arrays."""
    lines = order_lines(BASKETS)
    reference = build_interactions(lines)
    shuffled = build_interactions(lines.sample(fraction=1.0, shuffle=True, seed=7))

    assert shuffled.item_skus == reference.item_skus
    assert shuffled.order_ids == reference.order_ids
    assert shuffled.customer_ids == reference.customer_ids
    for name in ("basket_items", "customer_items"):
        ours, theirs = getattr(shuffled, name), getattr(reference, name)
        np.testing.assert_array_equal(ours.indptr, theirs.indptr)
        np.testing.assert_array_equal(ours.indices, theirs.indices)
        np.testing.assert_array_equal(ours.data, theirs.data)


def test_guest_only_orders_give_an_empty_customer_matrix() -> None:
    """Without any known customer, customer_items has no rows but the item columns remain."""
    interactions = build_interactions(order_lines([("o1", None, ["a", "b"])]))

    assert interactions.customer_ids == ()
    assert interactions.customer_items.shape == (0, 2)
    assert interactions.basket_items.shape == (1, 2)


def test_missing_column_is_named() -> None:
    """A frame without a needed column raises InputError naming the column."""
    lines = order_lines(BASKETS).drop("customer_id")

    with pytest.raises(InputError, match="customer_id"):
        build_interactions(lines)
