"""Acceptance calibration: from a candidate's relevance score to p(accept), per kind.

Fitted on held-out baskets the way the service meets them: a model trained on the older
orders, and the generator the service runs (the same ``HybridWeights``, since the weights set
the scale of the scores), answer each newer basket with one item left out, and a candidate
counts as accepted when it is that item. The request carries the rest of the basket, the
customer and the basket's time and region, as a served request does, so the relevance seen
here is the relevance the ranking sees. Isotonic regression (scikit-learn) maps score to the
observed acceptance rate; only its breakpoints are kept, as plain arrays in JSON (no pickle),
and applied with ``np.interp``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl
from sklearn.isotonic import IsotonicRegression

from models.candidates import user_row_for
from models.generators import HybridWeights, ItemFacts, build_generator
from models.interfaces import GenerationContext, Kind
from models.tables import order_regions_from_nodes
from models.training import train
from rules.compiled import compiled, register_warm_up
from rules.errors import InputError

CALIBRATION_FILE = "calibration.json"
_MIN_POSITIVES = 20  # below this a kind borrows the pooled curve
_PRIOR_WEIGHT = 20.0  # pseudo-observations at the base rate added to each isotonic block


@dataclass(frozen=True)
class Curve:
    score: npt.NDArray[np.float64]  # increasing breakpoints
    p_accept: npt.NDArray[np.float64]

    def __call__(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.interp(values, self.score, self.p_accept)


@dataclass(frozen=True)
class AcceptanceCalibration:
    pooled: Curve
    by_kind: dict[int, Curve]
    holdout_baskets: int
    base_rate: float  # share of proposed candidates that were bought
    # The generator weights the curves were fitted for (``HybridWeights`` fields); other
    # weights put scores on another scale. Empty when read from a file that predates them.
    weights: dict[str, float] = field(default_factory=dict)

    def predict(
        self, score: npt.NDArray[np.float64], kind: npt.NDArray[np.int8]
    ) -> npt.NDArray[np.float64]:
        """p(accept) per candidate; a kind without its own curve uses the pooled one."""
        if not self.by_kind:
            return self.pooled(score)
        stacked = self._stacked
        p_accept = np.empty(len(score))
        _interp_stacked(
            score, kind, stacked.offset, stacked.score, stacked.p_accept, stacked.slope, p_accept
        )
        return p_accept

    @cached_property
    def _stacked(self) -> _StackedCurves:
        return _StackedCurves.of(self.pooled, self.by_kind)


# Scores a stacked curve answers exactly as its own curve: [-margin, 1 + margin].
_CURVE_MARGIN = 1.0
_CURVE_SPACING = 4.0
_KIND_VALUES = 128  # kinds are int8 values


@dataclass(frozen=True)
class _StackedCurves:
    """Every kind's curve on one axis, each shifted by its own offset, with flat ends, so
    that one ``np.interp`` answers a batch of mixed kinds (one call instead of a mask, a
    gather, an interp and a scatter per kind: most of the cost at a few hundred scores)."""

    offset: npt.NDArray[np.float64]  # per kind value: the shift of the curve it uses
    score: npt.NDArray[np.float64]
    p_accept: npt.NDArray[np.float64]
    slope: npt.NDArray[np.float64]  # of each segment, from its point to the next; last 0

    @classmethod
    def of(cls, pooled: Curve, by_kind: dict[int, Curve]) -> _StackedCurves:
        curves = [pooled, *by_kind.values()]
        offset = np.zeros(_KIND_VALUES)
        for slot, kind_value in enumerate(by_kind, start=1):
            offset[kind_value] = slot * _CURVE_SPACING
        scores, values = [], []
        for slot, curve in enumerate(curves):
            shift = slot * _CURVE_SPACING
            # Flat beyond both ends, as np.interp is for one curve: the next curve's points
            # start only past this curve's span.
            scores.append([shift - _CURVE_MARGIN - 0.5, *(curve.score + shift)])
            scores[-1].append(shift + 1.0 + _CURVE_MARGIN + 0.5)
            values.append([curve.p_accept[0], *curve.p_accept, curve.p_accept[-1]])
        stacked_score = np.concatenate(scores).astype(np.float64)
        stacked_p = np.concatenate(values).astype(np.float64)
        slope = np.zeros(len(stacked_score))
        # A repeated score (isotonic blocks may share an end) is a zero-width segment that
        # the search never lands on: slope 0, not inf.
        width = np.diff(stacked_score)
        np.divide(np.diff(stacked_p), width, out=slope[:-1], where=width > 0)
        return cls(offset=offset, score=stacked_score, p_accept=stacked_p, slope=slope)


@compiled
def _interp_stacked(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    score: npt.NDArray[np.float64],
    kind: npt.NDArray[np.int8],
    offset: npt.NDArray[np.float64],
    stacked_score: npt.NDArray[np.float64],
    stacked_p: npt.NDArray[np.float64],
    slope: npt.NDArray[np.float64],
    out: npt.NDArray[np.float64],
) -> None:
    """``np.interp`` of each score on its kind's stretch of the stacked curves, the same
    arithmetic (slope x distance from the point below, plus that point's value), with a
    branch-free binary search: scores arrive in random order, and a mispredicted branch per
    search step cost more than the search."""
    points = stacked_score.shape[0]
    for index in range(score.shape[0]):
        # Relevance is in [0, 1]; the clip keeps any score inside its own curve's span.
        value = min(max(score[index], -_CURVE_MARGIN), 1.0 + _CURVE_MARGIN)
        shifted = value + offset[kind[index]]
        below, size = 0, points  # the first point is below every shifted score
        while size > 1:
            half = size >> 1
            below = below + half if stacked_score[below + half] <= shifted else below
            size -= half
        out[index] = slope[below] * (shifted - stacked_score[below]) + stacked_p[below]


def _warm_up() -> None:
    floats = np.zeros(2)
    _interp_stacked(floats, np.zeros(2, dtype=np.int8), floats, floats, floats, floats, floats)


register_warm_up(_warm_up)


def fit_acceptance(
    order_lines: pl.DataFrame,
    *,
    weights: HybridWeights | None = None,
    items: pl.DataFrame | None = None,
    nodes: pl.DataFrame | None = None,
    holdout_share: float = 0.2,
    max_baskets: int = 5000,
    candidates_per_basket: int = 300,
    seed: int = 42,
    factors: int = 64,
    iterations: int = 15,
) -> AcceptanceCalibration:
    """Fit p(accept) on the newest ``holdout_share`` of orders (a temporal split).

    ``weights`` are the served generator's (default: ``HybridWeights()``, the service's
    default hybrid); ``items`` (the ITEMS table) is needed when they use upgrades or
    segment popularity, and ``nodes`` gives orders a region (regional popularity), as in
    ``models.training.train``. ``candidates_per_basket`` matches the policy's candidate pool,
    so that the curves cover the scores the ranking sees.
    """
    if not 0 < holdout_share < 1:
        raise InputError(f"holdout_share: must be between 0 and 1, got {holdout_share}")
    if candidates_per_basket < 1:
        raise InputError(f"candidates_per_basket: must be at least 1, got {candidates_per_basket}")
    weights = weights or HybridWeights()
    if items is None and (weights.upgrade or weights.segment_popular):
        raise InputError("calibration: upgrade and segment popularity weights need the items")
    optional = [name for name in ("store_id",) if name in order_lines.columns]
    orders = (
        order_lines.group_by("order_id")
        .agg(
            pl.col("ordered_at").min(),
            pl.col("sku").unique().sort(),
            pl.col("customer_id").first(),
            *(pl.col(name).first() for name in optional),
        )
        .sort("ordered_at", "order_id")
    )
    cut = int(orders.height * (1 - holdout_share))
    past_ids = orders.get_column("order_id").head(cut)
    holdout = orders.slice(cut).filter(pl.col("sku").list.len() >= 2)
    if holdout.is_empty():
        raise InputError("orders: no held-out basket with two or more items to calibrate on")
    if holdout.height > max_baskets:
        holdout = holdout.sample(max_baskets, seed=seed).sort("ordered_at", "order_id")
    model = train(
        order_lines.filter(pl.col("order_id").is_in(past_ids.implode())),
        factors=factors,
        iterations=iterations,
        seed=seed,
        nodes=nodes,
    )
    facts = ItemFacts.from_items(model.item_skus, items) if items is not None else None
    generator = build_generator(model, weights, facts=facts)
    row_of = {sku: row for row, sku in enumerate(model.item_skus)}
    regions: list[str | None] = (
        order_regions_from_nodes(order_lines, nodes, holdout.get_column("order_id").to_list())
        if nodes is not None and "store_id" in order_lines.columns
        else [None] * holdout.height
    )
    rng = np.random.default_rng(seed)

    scores: list[npt.NDArray[np.float32]] = []
    kinds: list[npt.NDArray[np.int8]] = []
    labels: list[npt.NDArray[np.bool_]] = []
    for skus, customer, placed_at, region in zip(
        holdout.get_column("sku").to_list(),
        holdout.get_column("customer_id").to_list(),
        holdout.get_column("ordered_at").to_list(),
        regions,
        strict=True,
    ):
        rows = np.array([row_of[sku] for sku in skus if sku in row_of], dtype=np.int32)
        if len(rows) < 2:
            continue
        left_out = rows[rng.integers(len(rows))]
        proposed = generator.generate(
            anchors=rows[rows != left_out],
            user_row=user_row_for(model, customer),
            count=candidates_per_basket,
            context=GenerationContext(now=placed_at, region=region),
        )
        scores.append(proposed.score)
        kinds.append(proposed.kind)
        labels.append(proposed.item_idx == left_out)
    if not scores:
        raise InputError("orders: no held-out basket has two items the model knows")
    score = np.concatenate(scores).astype(np.float64)
    if score.size == 0:
        raise InputError(f"calibration: weights {weights} proposed nothing for any held-out basket")
    kind = np.concatenate(kinds)
    label = np.concatenate(labels).astype(np.float64)
    by_kind = {
        int(kind_value): _fit_curve(score[kind == kind_value], label[kind == kind_value])
        for kind_value in np.unique(kind)
        if label[kind == kind_value].sum() >= _MIN_POSITIVES
    }
    return AcceptanceCalibration(
        pooled=_fit_curve(score, label),
        by_kind=by_kind,
        holdout_baskets=len(scores),
        base_rate=float(label.mean()),
        weights={name: value for name, value in weights.as_dict().items() if value},
    )


def _fit_curve(score: npt.NDArray[np.float64], label: npt.NDArray[np.float64]) -> Curve:
    """Isotonic fit whose blocks are shrunk toward the overall rate, then made monotone again.

    A bare isotonic fit ends in a block of the few highest scores, often all accepted: p = 1,
    which would rank any such candidate as a sure sale. Each block's rate becomes
    (accepted + m * base rate) / (size + m), m = ``_PRIOR_WEIGHT`` pseudo-observations.
    """
    isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    fitted = isotonic.fit_transform(score, label)
    block_rate, block_of, block_size = np.unique(fitted, return_inverse=True, return_counts=True)
    accepted = np.bincount(block_of, weights=label, minlength=block_rate.size)
    shrunk = (accepted + _PRIOR_WEIGHT * label.mean()) / (block_size + _PRIOR_WEIGHT)
    isotonic.fit(score, shrunk[block_of])
    return Curve(
        score=np.asarray(isotonic.X_thresholds_, dtype=np.float64),
        p_accept=np.asarray(isotonic.y_thresholds_, dtype=np.float64),
    )


def save_calibration(calibration: AcceptanceCalibration, directory: Path) -> Path:
    """Write ``calibration.json`` into an artifact version directory, atomically."""
    document = {
        "format": 1,
        "holdout_baskets": calibration.holdout_baskets,
        "base_rate": calibration.base_rate,
        "weights": calibration.weights,
        "pooled": _curve_json(calibration.pooled),
        "by_kind": {Kind(k).wire: _curve_json(c) for k, c in calibration.by_kind.items()},
    }
    path = directory / CALIBRATION_FILE
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(document, handle)
    os.replace(handle.name, path)
    return path


def load_calibration(directory: Path) -> AcceptanceCalibration | None:
    """The calibration saved with a model, or None when the model has none."""
    path = directory / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text("utf-8"))
        kinds = {kind.wire: kind.value for kind in Kind}
        return AcceptanceCalibration(
            pooled=_curve_from(document["pooled"]),
            by_kind={
                kinds[name]: _curve_from(curve) for name, curve in document["by_kind"].items()
            },
            holdout_baskets=int(document["holdout_baskets"]),
            base_rate=float(document["base_rate"]),
            weights={
                str(name): float(value) for name, value in document.get("weights", {}).items()
            },
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a valid calibration file: {exc}") from exc


def _curve_json(curve: Curve) -> dict[str, list[float]]:
    return {"score": curve.score.tolist(), "p_accept": curve.p_accept.tolist()}


def _curve_from(document: dict[str, list[float]]) -> Curve:
    score = np.asarray(document["score"], dtype=np.float64)
    p_accept = np.asarray(document["p_accept"], dtype=np.float64)
    if score.shape != p_accept.shape or score.ndim != 1 or not score.size:
        raise ValueError("score and p_accept must be equal, non-empty lists")
    if np.any(np.diff(score) < 0) or np.any((p_accept < 0) | (p_accept > 1)):
        raise ValueError("breakpoints must increase and probabilities lie in [0, 1]")
    return Curve(score=score, p_accept=p_accept)
