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


def numpy_find(
    finder: SubstituteFinder, constrained_rows: list[int], count_per_item: int
) -> tuple[list[int], list[float], list[int]]:
    """The numpy form ``find`` replaced: the oracle of its compiled steps."""
    factors, norms = finder._factors, finder._norms
    category, members, indptr = finder._category, finder._members, finder._indptr
    constrained = np.unique(np.asarray(constrained_rows, dtype=np.int64))
    found = []
    for row in constrained:
        if category[row] < 0:
            continue
        same = members[indptr[category[row]] : indptr[category[row] + 1]]
        same = same[~np.isin(same, constrained)]
        if not same.size:
            continue
        cosine = (factors[same] @ factors[row]) / (norms[same] * norms[row])
        top = np.argsort(-cosine, kind="stable")[:count_per_item]
        found.append((same[top], (cosine[top] + 1.0) / 2.0, int(row)))
    if not found:
        return [], [], []
    rows = np.concatenate([part[0] for part in found])
    scores = np.concatenate([part[1] for part in found])
    owners = np.concatenate([np.full(len(part[0]), part[2]) for part in found])
    order = np.lexsort((rows, -scores))
    rows, scores, owners = rows[order], scores[order], owners[order]
    _, first = np.unique(rows, return_index=True)
    keep = np.sort(first)
    return (
        rows[keep].tolist(),
        np.clip(scores[keep], 0.0, 1.0).astype(np.float32).tolist(),
        owners[keep].tolist(),
    )


@pytest.mark.parametrize("seed", range(25))
def test_find_equals_the_numpy_form(artifacts: ModelArtifacts, seed: int) -> None:
    """Random categories (some unknown) and constrained rows (repeats, several per category),
    counts below and above the category sizes."""
    rng = np.random.default_rng(seed)
    n_items = len(artifacts.item_skus)
    category = rng.integers(-1, 3, size=n_items)
    finder = SubstituteFinder(artifacts, category)
    constrained = rng.integers(0, n_items, size=int(rng.integers(1, 6))).tolist()
    count = int(rng.choice([1, 2, 5, 50]))
    found = finder.find(constrained, count_per_item=count)
    assert (found.item_idx.tolist(), found.score.tolist(), found.for_row.tolist()) == numpy_find(
        finder, constrained, count
    )
