"""Substitutes: same category only, most alike first, never the constrained item itself."""

from __future__ import annotations

import numpy as np

from models.substitutes import substitute_candidates
from models.training import train
from tests.models.builders import checkerboard


def test_substitutes_come_from_the_same_category_best_first() -> None:
    """For an A-block item, substitutes are the other A items, scored in [0, 1], best first."""
    artifacts = train(checkerboard(), factors=4, iterations=10, seed=1)
    skus = list(artifacts.item_skus)
    category = np.array(
        [0 if sku.startswith("A") else 1 if sku.startswith("B") else -1 for sku in skus]
    )
    a4 = skus.index("A4")
    rows, scores = substitute_candidates(
        artifacts, constrained_rows=np.array([a4]), category_of_row=category, count_per_item=10
    )
    assert {skus[row] for row in rows} == {"A0", "A1", "A2", "A3"}
    assert np.all(np.diff(scores) <= 0)
    assert np.all((scores >= 0) & (scores <= 1))


def test_several_constrained_items_merge_without_duplicates() -> None:
    """Two constrained items: each candidate once, with its best score, and neither of them."""
    artifacts = train(checkerboard(), factors=4, iterations=10, seed=1)
    skus = list(artifacts.item_skus)
    category = np.array([0 if sku[0] in "AB" else -1 for sku in skus])  # one big category
    constrained = np.array([skus.index("A0"), skus.index("B0")])
    rows, _ = substitute_candidates(
        artifacts, constrained_rows=constrained, category_of_row=category, count_per_item=3
    )
    assert len(rows) == len(set(rows.tolist()))
    assert not set(rows.tolist()) & set(constrained.tolist())
    assert 3 <= len(rows) <= 6


def test_unknown_category_gets_no_substitutes() -> None:
    """An item whose category the snapshot does not know gets no substitutes."""
    artifacts = train(checkerboard(), factors=4, iterations=10, seed=1)
    category = np.full(len(artifacts.item_skus), -1)
    rows, scores = substitute_candidates(
        artifacts, constrained_rows=np.array([0]), category_of_row=category, count_per_item=5
    )
    assert rows.size == 0
    assert scores.size == 0
