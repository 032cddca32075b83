"""Acceptance calibration (models.calibration) on a known answer: pairs always bought together.

Ten pairs (Pna, Pnb); customer ck orders pair k mod 10 every 20 days, 200 orders in all, one
a day. Every held-out basket is one pair: with one item left out, the other is the request,
and its partner is the one candidate ever accepted.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from models.calibration import (
    CALIBRATION_FILE,
    _fit_curve,
    fit_acceptance,
    load_calibration,
    save_calibration,
)
from models.generators import HybridWeights
from models.interfaces import Kind
from rules.errors import InputError
from tests.models.builders import order_lines

ORDERS = 200
HOLDOUT_BASKETS = 40  # the newest 20% of orders
FIRST = datetime(2024, 1, 1)


def pairs() -> pl.DataFrame:
    baskets = [
        (f"o{n:03d}", f"c{n % 20:02d}", [f"P{n % 10}a", f"P{n % 10}b"]) for n in range(ORDERS)
    ]
    return order_lines(baskets).with_columns(
        ordered_at=pl.lit(FIRST) + pl.duration(days=pl.col("order_id").str.slice(1).cast(pl.Int64))
    )


def items() -> pl.DataFrame:
    skus = [f"P{n}{side}" for n in range(10) for side in "ab"]
    return pl.DataFrame(
        {
            "sku": skus,
            "category": [sku[:2] for sku in skus],
            "unit_price": [10.0 + (sku[2] == "b") for sku in skus],
            "unit_cost": [5.0] * len(skus),
        }
    )


def test_the_partner_is_accepted_and_the_backfill_is_not() -> None:
    """With the service's default hybrid, the partner (item-item's best, score highest) is
    accepted every time: its p(accept) is 1; the popularity backfill below it never is."""
    calibration = fit_acceptance(pairs(), factors=4, iterations=5)

    assert calibration.holdout_baskets == HOLDOUT_BASKETS
    assert calibration.weights == {name: w for name, w in HybridWeights().as_dict().items() if w}
    assert Kind.CROSS_SELL in calibration.by_kind
    curve = calibration.by_kind[Kind.CROSS_SELL]
    assert curve.p_accept[-1] == pytest.approx(1.0)
    # Never-accepted scores sit near zero: shrunk toward the (small) base rate, not at it.
    assert calibration.pooled(np.array([0.0]))[0] < 0.01
    assert np.all(np.diff(curve.p_accept) >= 0)
    # One accepted candidate per basket, out of every candidate proposed.
    assert 0 < calibration.base_rate < 0.5


def test_a_few_accepted_top_scores_are_not_a_sure_sale() -> None:
    """A bare isotonic fit gives its top block, here 3 candidates all accepted, p = 1; shrunk
    toward the base rate it stays well below, and the curve stays monotone."""
    rng = np.random.default_rng(7)
    score = np.concatenate([rng.uniform(0.0, 0.9, 2000), [0.95, 0.97, 0.99]])
    label = np.concatenate([(rng.uniform(size=2000) < 0.02).astype(np.float64), [1.0, 1.0, 1.0]])

    curve = _fit_curve(score, label)

    assert curve(np.array([0.99]))[0] < 0.3
    assert curve(np.array([0.99]))[0] > curve(np.array([0.1]))[0]
    assert np.all(np.diff(curve.p_accept) >= 0)


def test_the_curves_are_fitted_for_the_given_weights() -> None:
    """Item-item alone scores the partner exactly 1.0, and that score is always accepted;
    the weights are recorded with the curves."""
    calibration = fit_acceptance(
        pairs(), weights=HybridWeights.only("cross_sell"), factors=4, iterations=5
    )

    assert calibration.weights == {"cross_sell": 1.0}
    assert set(calibration.by_kind) == {Kind.CROSS_SELL}
    p = calibration.predict(np.array([1.0]), np.array([Kind.CROSS_SELL], dtype=np.int8))
    assert p[0] == pytest.approx(1.0)


def test_the_request_carries_the_basket_time() -> None:
    """Replenishment proposes only when the request says when it is: a calibration of it
    alone has accepted replenishments, so each basket's time reached the generator."""
    calibration = fit_acceptance(
        pairs(), weights=HybridWeights.only("replenish"), factors=4, iterations=5
    )

    assert set(calibration.by_kind) == {Kind.REPLENISH}
    assert calibration.by_kind[Kind.REPLENISH].p_accept.max() > 0


def test_weights_that_need_the_item_master_say_so() -> None:
    """Upgrades need item facts: without items a clear error, with them a calibration."""
    weights = HybridWeights(upgrade=0.5)

    with pytest.raises(InputError, match="need the items"):
        fit_acceptance(pairs(), weights=weights, factors=4, iterations=5)
    calibration = fit_acceptance(pairs(), weights=weights, items=items(), factors=4, iterations=5)
    assert calibration.weights["upgrade"] == 0.5


def test_a_generator_that_proposes_nothing_is_an_error_not_a_crash() -> None:
    """Replenishment needs a customer: on guest orders it proposes nothing, and there is
    nothing to fit."""
    guests = pairs().with_columns(customer_id=pl.lit(None, pl.String))
    with pytest.raises(InputError, match="proposed nothing"):
        fit_acceptance(guests, weights=HybridWeights.only("replenish"), factors=2, iterations=2)


def test_save_and_load_keep_the_curves_and_the_weights(tmp_path: Path) -> None:
    calibration = fit_acceptance(
        pairs(), weights=HybridWeights.only("cross_sell"), factors=4, iterations=5
    )
    save_calibration(calibration, tmp_path)

    loaded = load_calibration(tmp_path)

    assert loaded is not None
    assert loaded.weights == {"cross_sell": 1.0}
    assert loaded.holdout_baskets == calibration.holdout_baskets
    np.testing.assert_array_equal(loaded.pooled.score, calibration.pooled.score)
    assert set(loaded.by_kind) == set(calibration.by_kind)


def test_a_file_without_weights_still_loads_and_bad_weights_are_refused(tmp_path: Path) -> None:
    """Files written before the weights were recorded load with no weights; weights that
    are not a name -> number object make the file invalid, named."""
    calibration = fit_acceptance(
        pairs(), weights=HybridWeights.only("cross_sell"), factors=4, iterations=5
    )
    save_calibration(calibration, tmp_path)
    path = tmp_path / CALIBRATION_FILE
    document = json.loads(path.read_text())
    del document["weights"]
    path.write_text(json.dumps(document))

    old = load_calibration(tmp_path)

    assert old is not None
    assert old.weights == {}
    document["weights"] = ["cross_sell"]
    path.write_text(json.dumps(document))
    with pytest.raises(InputError, match="not a valid calibration file"):
        load_calibration(tmp_path)


def test_no_calibration_file_is_none(tmp_path: Path) -> None:
    assert load_calibration(tmp_path) is None


def test_pairs_span_the_days_they_claim() -> None:
    """The data is what the module docstring says: one order a day for 200 days."""
    lines = pairs()
    assert lines["ordered_at"].max() == FIRST + timedelta(days=ORDERS - 1)
    assert lines["order_id"].n_unique() == ORDERS
