"""Substitutes: same category only, most alike first, never the constrained item itself."""

from __future__ import annotations

import numpy as np
import pytest

from models.interfaces import ModelArtifacts
from models.substitutes import SubstituteFinder
from models.training import train
from tests.models.builders import checkerboard


@pytest.fixture(scope="module")
def artifacts() -> ModelArtifacts:
    return train(checkerboard(), factors=4, iterations=10, seed=1)


def test_substitutes_come_from_the_same_category_best_first(artifacts: ModelArtifacts) -> None:
    """For an A-block item, substitutes are the other A items, scored in [0, 1], best first."""
    skus = list(artifacts.item_skus)
    category = np.array(
        [0 if sku.startswith("A") else 1 if sku.startswith("B") else -1 for sku in skus]
    )
    a4 = skus.index("A4")
    found = SubstituteFinder(artifacts, category).find([a4], count_per_item=10)
    assert {skus[row] for row in found.item_idx} == {"A0", "A1", "A2", "A3"}
    assert np.all(np.diff(found.score) <= 0)
    assert np.all((found.score >= 0) & (found.score <= 1))
    assert set(found.for_row.tolist()) == {a4}


def test_several_constrained_items_merge_without_duplicates(artifacts: ModelArtifacts) -> None:
    """Two constrained items: each candidate once, with its best score, and neither of them;
    each names the constrained item it replaces."""
    skus = list(artifacts.item_skus)
    category = np.array([0 if sku[0] in "AB" else -1 for sku in skus])  # one big category
    constrained = np.array([skus.index("A0"), skus.index("B0")])
    found = SubstituteFinder(artifacts, category).find(constrained, count_per_item=3)
    rows = found.item_idx.tolist()
    assert len(rows) == len(set(rows))
    assert not set(rows) & set(constrained.tolist())
    assert 3 <= len(rows) <= 6
    assert set(found.for_row.tolist()) <= set(constrained.tolist())


def test_count_per_item_caps_each_constrained_item(artifacts: ModelArtifacts) -> None:
    """At most ``count_per_item`` alternatives each; zero asks for none."""
    skus = list(artifacts.item_skus)
    category = np.array([0 if sku.startswith("A") else -1 for sku in skus])
    finder = SubstituteFinder(artifacts, category)
    assert len(finder.find([skus.index("A0")], count_per_item=2)) == 2
    assert len(finder.find([skus.index("A0")], count_per_item=0)) == 0


def test_unknown_category_gets_no_substitutes(artifacts: ModelArtifacts) -> None:
    """An item whose category the snapshot does not know gets no substitutes."""
    category = np.full(len(artifacts.item_skus), -1)
    found = SubstituteFinder(artifacts, category).find([0], count_per_item=5)
    assert len(found) == 0


def test_categories_must_cover_the_model(artifacts: ModelArtifacts) -> None:
    """A category array of the wrong length is refused, naming both sizes."""
    with pytest.raises(ValueError, match="covers 3 items"):
        SubstituteFinder(artifacts, np.zeros(3, dtype=np.int64))
