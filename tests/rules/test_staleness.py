"""Staleness: which stock figures are recent enough to promise from."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from rules.constraints import available_units
from rules.staleness import epoch_us, fresh_stock_mask, trusted_stock_units

NOW = datetime(2025, 3, 1, 12, 0)
NOW_US = epoch_us(NOW)
MINUTE_US = 60 * 1_000_000


def test_epoch_us_counts_microseconds_since_1970_utc() -> None:
    """A naive datetime is UTC; an aware one is converted; microseconds are kept exactly."""
    assert epoch_us(datetime(1970, 1, 1)) == 0
    assert epoch_us(datetime(2025, 3, 1, 6, 0)) == 1_740_808_800_000_000
    assert epoch_us(datetime(2025, 3, 1, 6, 0, 0, 7)) == 1_740_808_800_000_007
    cet = timezone(timedelta(hours=1))
    assert epoch_us(datetime(2025, 3, 1, 7, 0, tzinfo=cet)) == epoch_us(datetime(2025, 3, 1, 6))
    assert epoch_us(datetime(2025, 3, 1, 6, tzinfo=UTC)) == epoch_us(datetime(2025, 3, 1, 6))


@pytest.mark.parametrize(
    ("age_minutes", "fresh"),
    [(0, True), (59, True), (60, True), (61, False), (60 * 24 * 400, False)],
)
def test_figure_is_fresh_up_to_the_limit_inclusive(age_minutes: int, fresh: bool) -> None:
    """A figure exactly at the limit is trusted; one microsecond older is not."""
    as_of = np.array([NOW_US - age_minutes * MINUTE_US], dtype=np.int64)
    assert fresh_stock_mask(as_of, now_us=NOW_US, max_age_seconds=3600).tolist() == [fresh]


def test_one_microsecond_past_the_limit_is_stale() -> None:
    """The comparison is in integer microseconds, not rounded floats."""
    as_of = np.array([NOW_US - 3600 * 1_000_000 - 1], dtype=np.int64)
    assert fresh_stock_mask(as_of, now_us=NOW_US, max_age_seconds=3600).tolist() == [False]


def test_future_figures_are_fresh_and_unknown_ones_never() -> None:
    """A source clock slightly ahead is not punished; as_of <= 0 (unknown) is never trusted."""
    as_of = np.array([NOW_US + 5 * MINUTE_US, 0, -1], dtype=np.int64)
    assert fresh_stock_mask(as_of, now_us=NOW_US, max_age_seconds=60).tolist() == [
        True,
        False,
        False,
    ]


def test_mask_keeps_the_shape_of_a_stock_matrix() -> None:
    """A (candidates x nodes) array gives a boolean mask of the same shape."""
    as_of = np.array([[NOW_US, NOW_US - 10 * MINUTE_US], [NOW_US - MINUTE_US, 1]], np.int64)
    mask = fresh_stock_mask(as_of, now_us=NOW_US, max_age_seconds=300)
    assert mask.dtype == np.bool_
    assert mask.tolist() == [[True, False], [True, False]]


def test_infinite_limit_trusts_every_known_figure() -> None:
    """max_age_seconds=inf switches the limit off, but unknown as_of is still untrusted."""
    as_of = np.array([1, NOW_US - 10**15, 0], dtype=np.int64)
    assert fresh_stock_mask(as_of, now_us=NOW_US, max_age_seconds=math.inf).tolist() == [
        True,
        True,
        False,
    ]


@pytest.mark.parametrize("limit", [-1.0, math.nan])
def test_negative_or_nan_limit_is_refused(limit: float) -> None:
    """A limit that cannot mean an age raises ValueError naming the argument."""
    with pytest.raises(ValueError, match="max_age_seconds"):
        fresh_stock_mask(np.array([NOW_US]), now_us=NOW_US, max_age_seconds=limit)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("max_age", [None, math.inf, 0.0, 3600.0])
@pytest.mark.parametrize("strided", [False, True])
def test_trusted_units_equal_the_numpy_form(
    seed: int, max_age: float | None, strided: bool
) -> None:
    """Cells unranged, of unknown age, stale and fresh (the boundary included), as contiguous
    arrays and as the stock mirror's strided views."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(0, 30)), int(rng.integers(1, 6)))
    figures = np.stack(
        [
            rng.integers(-3, 20, shape),
            rng.integers(0, 5, shape),
            rng.integers(0, 9, shape),
            NOW_US - rng.choice([0, 3_600_000_000, 3_600_000_001, NOW_US, -MINUTE_US], shape),
        ],
        axis=-1,
    ).astype(np.int64)
    atp, safety, inbound, as_of = (
        (figures[:, :, k] for k in range(4))
        if strided
        else (np.ascontiguousarray(figures[:, :, k]) for k in range(4))
    )
    ranged = rng.random(shape) < 0.8
    available, trusted_inbound, ranged_cells, any_stale = trusted_stock_units(
        atp, safety, inbound, ranged, as_of, now_us=NOW_US, max_age_seconds=max_age
    )
    assert ranged_cells.tolist() == ranged.tolist()

    trusted = ranged
    expected_stale = False
    if max_age is not None:
        fresh = fresh_stock_mask(as_of, now_us=NOW_US, max_age_seconds=max_age)
        expected_stale = bool((ranged & ~fresh).any())
        trusted = ranged & fresh
    assert available.tolist() == available_units(atp, safety, trusted).tolist()
    assert trusted_inbound.tolist() == np.where(trusted, inbound, 0).tolist()
    assert any_stale is expected_stale

    # Some cells picked, in any order and with repeats, as a request picks them from a copy.
    rows = rng.integers(0, max(shape[0], 1), size=int(rng.integers(0, 9))) if shape[0] else None
    if rows is not None:
        columns = rng.permutation(shape[1])[: int(rng.integers(1, shape[1] + 1))]
        picked = trusted_stock_units(
            atp,
            safety,
            inbound,
            ranged,
            as_of,
            now_us=NOW_US,
            max_age_seconds=max_age,
            rows=rows,
            columns=columns,
        )
        cells = np.ix_(rows, columns)
        assert picked[0].tolist() == available[cells].tolist()
        assert picked[1].tolist() == trusted_inbound[cells].tolist()
        assert picked[2].tolist() == ranged[cells].tolist()
        expected_picked_stale = bool(
            max_age is not None
            and (ranged & ~fresh_stock_mask(as_of, now_us=NOW_US, max_age_seconds=max_age))[
                cells
            ].any()
        )
        assert picked[3] is expected_picked_stale


@pytest.mark.parametrize("max_age", [-1.0, math.nan])
def test_trusted_units_refuse_a_negative_or_nan_age(max_age: float) -> None:
    cells = np.zeros((1, 1), dtype=np.int64)
    with pytest.raises(ValueError, match="max_age_seconds"):
        trusted_stock_units(
            cells, cells, cells, np.ones((1, 1), bool), cells, now_us=0, max_age_seconds=max_age
        )
