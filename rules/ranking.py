"""Ranking of the candidates that survived every constraint.

Expected contribution = p(accept) x (unit margin - expected return cost - incremental
fulfilment cost), scaled for stock health. A bounded knob per category and channel blends
relevance with the objective's value:

    final = (1 - w) * relevance + w * value / max |value|

so ``w = 0`` is the relevance order exactly. A diversity cap per category is relaxed only to
fill the list; ties break on catalog position, so the same inputs always give the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rules.constraints import OBJECTIVES, CompiledPolicy
from rules.policy import Channel

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_MARGIN, _SELL_THROUGH, _REVENUE, _RELEVANCE = (OBJECTIVES.index(name) for name in OBJECTIVES)


@dataclass(frozen=True, eq=False)
class RankingInputs:
    """Per surviving candidate (parallel arrays)."""

    catalog_pos: IntArray
    category_code: IntArray
    relevance: FloatArray  # [0, 1], comparable across generators
    p_accept: FloatArray  # calibrated probability that the item is bought when shown
    effective_price: FloatArray
    unit_margin: FloatArray
    return_rate: FloatArray
    fulfilment_cost: FloatArray  # incremental cost of the chosen node
    stock_units: IntArray  # available plus inbound at the chosen node


@dataclass(frozen=True, eq=False)
class ScoreParts:
    """How each candidate's final score was made: shown in debug traces and decision logs."""

    return_cost: FloatArray
    contribution: FloatArray  # p(accept) x net margin x stock factor
    objective_value: FloatArray
    margin_weight: FloatArray
    final: FloatArray


def score(inputs: RankingInputs, policy: CompiledPolicy, channel: Channel) -> ScoreParts:
    """Score parts for every candidate under the knob of its category on ``channel``."""
    ranking = policy.policy.ranking
    row = policy.channel_row[channel]
    weight = policy.margin_weight[row, inputs.category_code]
    objective = policy.objective_code[row, inputs.category_code]

    # A return refunds the price and costs handling: the margin is lost, plus handling.
    return_cost = inputs.return_rate * (inputs.unit_margin + ranking.return_handling_cost)
    stock_factor = np.where(
        inputs.stock_units < ranking.low_stock_units, ranking.low_stock_factor, 1.0
    )
    if ranking.overstock_units:
        overstocked = inputs.stock_units >= ranking.overstock_units
        stock_factor = stock_factor * np.where(overstocked, 1.0 + ranking.sell_through_boost, 1.0)
        pressure = inputs.stock_units / (inputs.stock_units + ranking.overstock_units)
    else:
        pressure = np.zeros(len(inputs.stock_units))
    net_margin = inputs.unit_margin - return_cost - inputs.fulfilment_cost
    contribution = inputs.p_accept * net_margin * stock_factor
    values_by_objective: dict[int, Callable[[], FloatArray]] = {
        _MARGIN: lambda: contribution,
        _SELL_THROUGH: lambda: inputs.p_accept * pressure * stock_factor,
        _REVENUE: lambda: inputs.p_accept * inputs.effective_price,
        _RELEVANCE: lambda: inputs.relevance,
    }
    lowest, highest = (int(objective.min()), int(objective.max())) if len(objective) else (0, 0)
    if lowest == highest:  # the usual case: one objective for every candidate
        value = values_by_objective[lowest]()
    else:
        value = np.select(
            [objective == code for code in values_by_objective],
            [compute() for compute in values_by_objective.values()],
        )
    scale = float(np.max(np.abs(value))) if value.size else 0.0
    normalised = value / scale if scale > 0 else np.zeros_like(value)
    weight = np.where(objective == _RELEVANCE, 0.0, weight)
    final = (1.0 - weight) * inputs.relevance + weight * normalised
    return ScoreParts(
        return_cost=return_cost,
        contribution=contribution,
        objective_value=value,
        margin_weight=weight,
        final=final,
    )


def rank(
    final: FloatArray,
    catalog_pos: IntArray,
    category_code: IntArray,
    *,
    limit: int,
    max_per_category: int,
) -> IntArray:
    """Indexes of the best ``limit`` candidates, best first.

    At most ``max_per_category`` per category while others are left; when the cap would leave
    the list short, the best capped-out candidates fill it, in score order.
    """
    head_size = 4 * limit
    if len(final) > head_size:
        # Only the best few can be shown: sort those, keeping every tie at the cut.
        threshold = np.partition(final, len(final) - head_size)[len(final) - head_size]
        head = np.flatnonzero(final >= threshold)
        chosen, within_cap = _capped_order(
            final[head], catalog_pos[head], category_code[head], limit, max_per_category
        )
        # Relaxing the cap may only borrow from the head when nothing deeper is within it.
        if within_cap >= limit:
            return head[chosen]
    return _capped_order(final, catalog_pos, category_code, limit, max_per_category)[0]


def _capped_order(
    final: FloatArray,
    catalog_pos: IntArray,
    category_code: IntArray,
    limit: int,
    max_per_category: int,
) -> tuple[IntArray, int]:
    """The capped order and how many candidates in it were within the cap."""
    order = np.lexsort((catalog_pos, -final))
    categories = category_code[order]
    # Occurrence number of each candidate within its category, in score order.
    by_category = np.argsort(categories, kind="stable")
    sorted_categories = categories[by_category]
    boundaries = np.empty(len(sorted_categories), dtype=np.bool_)
    boundaries[:1] = True
    np.not_equal(sorted_categories[1:], sorted_categories[:-1], out=boundaries[1:])
    starts = np.flatnonzero(boundaries)
    run_lengths = np.diff(starts, append=len(sorted_categories))
    occurrence = np.empty(len(order), dtype=np.int64)
    occurrence[by_category] = np.arange(len(order)) - np.repeat(starts, run_lengths)
    within_cap = occurrence < max_per_category
    chosen = np.concatenate([order[within_cap], order[~within_cap]])
    return chosen[:limit].astype(np.int64), int(within_cap.sum())


def rank_by_relevance(
    relevance: npt.NDArray[np.float32] | FloatArray, catalog_pos: IntArray, *, limit: int
) -> IntArray:
    """Indexes of the best ``limit`` candidates by relevance alone, lower position on ties."""
    order = np.lexsort((catalog_pos, -np.asarray(relevance, dtype=np.float64)))
    return order[:limit].astype(np.int64)
