"""The radix orders equal numpy's stable argsorts, position for position."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from rules.compiled import read_only
from rules.sorting import ascending_order, descending_order, score_order

# Around the insertion-sort cut-over (16), a request's sizes, and past them.
SIZES = (0, 1, 2, 15, 16, 17, 250, 500, 3000)


def _scores(
    rng: np.random.Generator, size: int, dtype: type[np.floating]
) -> npt.NDArray[np.floating]:
    """Scores as requests have them, and worse: many ties, zeros of both signs, negatives,
    infinities, NaN, tiny and huge magnitudes."""
    coarse = np.round(rng.normal(size=size), 1)  # ties
    fine = rng.random(size)
    info = np.finfo(dtype)
    tiny, huge = info.smallest_subnormal, info.max
    special = rng.choice(
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, tiny, -tiny, huge, -huge], dtype), size
    )
    pick = rng.integers(0, 3, size)
    return np.where(pick == 0, coarse, np.where(pick == 1, fine, special)).astype(dtype)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_descending_order_is_numpys_stable_argsort_of_the_negation(
    size: int, dtype: type[np.floating]
) -> None:
    rng = np.random.default_rng(size)
    for _ in range(20):
        values = _scores(rng, size, dtype)
        assert descending_order(values).tolist() == np.argsort(-values, kind="stable").tolist()


def test_descending_order_ties_zero_and_negative_zero_by_position() -> None:
    values = np.array([-0.0, 1.0, 0.0, -0.0, -1.0])
    assert descending_order(values).tolist() == [1, 0, 2, 3, 4]


def test_descending_order_puts_nan_last_in_position_order() -> None:
    values = np.array([np.nan, -np.inf, np.nan, 2.0, np.inf])
    assert descending_order(values).tolist() == [4, 3, 1, 0, 2]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_ascending_order_is_numpys_stable_argsort(size: int, dtype: type[np.integer]) -> None:
    rng = np.random.default_rng(1000 + size)
    info = np.iinfo(dtype)
    for _ in range(20):
        narrow = rng.integers(0, 40, size)  # item indexes: few values, many repeats
        wide = rng.integers(info.min, info.max, size, endpoint=True, dtype=dtype)
        keys = np.where(rng.random(size) < 0.5, narrow, wide).astype(dtype)
        assert ascending_order(keys).tolist() == np.argsort(keys, kind="stable").tolist()


def test_orders_take_read_only_and_strided_arrays() -> None:
    """Model artifacts are memory-mapped read-only; callers may pass a view."""
    values = read_only(np.array([0.5, 0.25, 0.5, 1.0, 0.0] * 8))
    assert descending_order(values).tolist() == np.argsort(-values, kind="stable").tolist()
    strided = np.arange(80, 0, -1)[::2]
    assert ascending_order(strided).tolist() == np.argsort(strided, kind="stable").tolist()


@pytest.mark.parametrize("size", SIZES)
def test_score_order_is_numpys_lexsort_by_score_then_key(size: int) -> None:
    rng = np.random.default_rng(2000 + size)
    for _ in range(20):
        scores = np.round(rng.random(size), 1)  # ties, broken by the key, then by position
        keys = rng.integers(0, 8, size)
        expected = np.lexsort((keys, -scores)).tolist()
        assert score_order(scores, keys).tolist() == expected
