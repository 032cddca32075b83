"""Ranking of the candidates that survived every constraint.

Expected contribution = p(accept) x (unit margin - expected return cost - incremental
fulfilment cost), scaled for stock health. A bounded knob per category and channel blends
relevance with the objective's value:

    final = (1 - w) * relevance + w * value / max |value|   (max over the candidates that
                                                         share the objective)

so ``w = 0`` is the relevance order exactly. Restricted category pairs never appear together
in one list; a diversity cap per category is relaxed only to fill the list; ties break on
catalog position, so the same inputs always give the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rules.compiled import compiled, compiled_inline, register_warm_up
from rules.constraints import OBJECTIVES, CompiledPolicy
from rules.policy import Channel
from rules.sorting import score_order

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
    """Score parts for every candidate under the knob of its category on ``channel``.

    Each objective's values are normalised by their own largest magnitude, among the
    candidates ranked by that objective: objectives come in different units (revenue in
    price, sell-through as a rate), and one shared scale would let a price-scaled objective
    squeeze the others to nothing.
    """
    ranking = policy.policy.ranking
    row = policy.channel_row[channel]
    count = len(inputs.category_code)
    return_cost, contribution, value, weight, final = (np.empty(count) for _ in range(5))
    _score_parts(
        inputs.category_code,
        inputs.relevance,
        inputs.p_accept,
        inputs.effective_price,
        inputs.unit_margin,
        inputs.return_rate,
        inputs.fulfilment_cost,
        inputs.stock_units,
        policy.margin_weight[row],
        policy.objective_code[row],
        policy.stock_breaks,
        policy.stock_factors,
        ranking.return_handling_cost,
        ranking.overstock_units or 0,
        return_cost,
        contribution,
        value,
        weight,
        final,
    )
    return ScoreParts(
        return_cost=return_cost,
        contribution=contribution,
        objective_value=value,
        margin_weight=weight,
        final=final,
    )


@compiled
def _score_parts(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    category_code: IntArray,
    relevance: FloatArray,
    p_accept: FloatArray,
    effective_price: FloatArray,
    unit_margin: FloatArray,
    return_rate: FloatArray,
    fulfilment_cost: FloatArray,
    stock_units: IntArray,
    margin_weight: FloatArray,  # per category code, on the request's channel
    objective_code: npt.NDArray[np.int8],  # likewise
    stock_breaks: IntArray,
    stock_factors: FloatArray,
    return_handling_cost: float,
    overstock_units: int,  # 0: no overstock level, so no sell-through pressure
    out_return_cost: FloatArray,
    out_contribution: FloatArray,
    out_value: FloatArray,
    out_weight: FloatArray,
    out_final: FloatArray,
) -> None:
    """``score``'s parts, written into the ``out_`` arrays: one pass for the values, one for
    the scale of each objective, one for the blend (numpy took two dozen calls)."""
    count = category_code.shape[0]
    scale = np.zeros(len(OBJECTIVES))
    for index in range(count):
        code = category_code[index]
        margin = unit_margin[index]
        # A return refunds the price and costs handling: the margin is lost, plus handling.
        return_cost = return_rate[index] * (margin + return_handling_cost)
        units = stock_units[index]
        stock_factor = 1.0
        if stock_breaks.shape[0]:
            stock_factor = stock_factors[np.searchsorted(stock_breaks, units, side="right")]
        p = p_accept[index]
        contribution = (p * (margin - return_cost - fulfilment_cost[index])) * stock_factor
        objective = objective_code[code]
        if objective == _MARGIN:
            value = contribution
        elif objective == _SELL_THROUGH:
            value = 0.0
            if overstock_units:
                pressure = units / (units + overstock_units)
                value = p * pressure * stock_factor
        elif objective == _REVENUE:
            value = p * effective_price[index]
        else:
            value = relevance[index]
        out_return_cost[index] = return_cost
        out_contribution[index] = contribution
        out_value[index] = value
        out_weight[index] = margin_weight[code]
        scale[objective] = max(scale[objective], abs(value))
    for index in range(count):
        objective = objective_code[category_code[index]]
        normalised = out_value[index] / scale[objective] if scale[objective] > 0 else 0.0
        weight = out_weight[index]
        out_final[index] = (1.0 - weight) * relevance[index] + weight * normalised


def _warm_up() -> None:
    floats, codes = np.zeros(1), np.zeros(1, dtype=np.int64)
    for breaks in (np.zeros(0, dtype=np.int64), np.ones(1, dtype=np.int64)):
        _score_parts(
            *(codes, floats, floats, floats, floats, floats, floats, codes),
            *(floats, np.zeros(1, dtype=np.int8), breaks, np.ones(len(breaks) + 1), 0.0, 0),
            *(np.empty(1), np.empty(1), np.empty(1), np.empty(1), np.empty(1)),
        )


register_warm_up(_warm_up)


def rank(
    final: FloatArray,
    catalog_pos: IntArray,
    category_code: IntArray,
    *,
    limit: int,
    max_per_category: int,
    restricted_pairs: npt.NDArray[np.bool_],
) -> IntArray:
    """Indexes of the best ``limit`` candidates, best first (ties: lower catalog position).

    Walks the candidates in score order and takes each one unless its category is
    restricted with the category of one already taken (``restricted_pairs``, indexed by two
    category codes: ``CompiledPolicy.restricted_pairs``; never relaxed) or its category
    already has ``max_per_category`` items while others are left. When the cap would leave
    the list short, the best capped-out candidates fill it, in score order, still never
    next to a restricted partner.
    """
    chosen: IntArray = _pick(
        np.asarray(final, dtype=np.float64),
        np.asarray(catalog_pos, dtype=np.int64),
        np.asarray(category_code, dtype=np.int64),
        int(limit),
        int(max_per_category),
        np.asarray(restricted_pairs, dtype=np.bool_),
    )
    return chosen


@compiled
def _pick(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    final: FloatArray,
    catalog_pos: IntArray,
    category_code: IntArray,
    limit: int,
    max_per_category: int,
    restricted_pairs: npt.NDArray[np.bool_],
) -> IntArray:
    """``rank``, compiled: the walk looks at a dozen or so candidates, where the Python loop
    and its sets cost more than the sort."""
    count = final.shape[0]
    chosen = np.empty(max(min(limit, count), 0), dtype=np.int64)
    if limit <= 0 or count == 0:
        return chosen
    codes = restricted_pairs.shape[0]
    per_category = np.zeros(codes, dtype=np.int64)
    blocked = np.zeros(codes, dtype=np.bool_)  # restricted with a category already chosen
    capped = np.empty(count, dtype=np.int64)  # rows passed over for the cap, in score order
    head_size = 4 * limit
    if count <= head_size:
        order = _score_order(final, catalog_pos, np.arange(count))
        picked, passed = _walk(
            order, category_code, restricted_pairs, max_per_category, limit,
            chosen, 0, per_category, blocked, capped, 0,
        )  # fmt: skip
    else:
        # Only the best few can usually be shown: sort those, keeping every tie at the cut,
        # and look deeper only when they do not fill the list within the rules.
        threshold = np.partition(final, count - head_size)[count - head_size]
        in_head = final >= threshold
        picked, passed = _walk(
            _score_order(final, catalog_pos, np.flatnonzero(in_head)),
            category_code, restricted_pairs, max_per_category, limit,
            chosen, 0, per_category, blocked, capped, 0,
        )  # fmt: skip
        if picked < limit:
            picked, passed = _walk(
                _score_order(final, catalog_pos, np.flatnonzero(~in_head)),
                category_code, restricted_pairs, max_per_category, limit,
                chosen, picked, per_category, blocked, capped, passed,
            )  # fmt: skip
    # Backfill from the capped-out candidates, best first. No restriction check is needed: a
    # capped candidate's category is already shown, so any partner chosen since would have
    # clashed with that shown item first.
    for at in range(passed):
        if picked >= limit:
            break
        chosen[picked] = capped[at]
        picked += 1
    return chosen[:picked]


@compiled
def _score_order(final: FloatArray, catalog_pos: IntArray, rows: IntArray) -> IntArray:
    """``rows`` by score descending, then catalog position."""
    return rows[score_order(final[rows], catalog_pos[rows])]


@compiled_inline
def _walk(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    order: IntArray,
    category_code: IntArray,
    restricted_pairs: npt.NDArray[np.bool_],
    max_per_category: int,
    limit: int,
    chosen: IntArray,
    picked: int,
    per_category: IntArray,
    blocked: npt.NDArray[np.bool_],
    capped: IntArray,
    passed: int,
) -> tuple[int, int]:
    """Take candidates in ``order`` within the cap until ``limit`` are chosen; (chosen,
    passed over for the cap) counts after the walk."""
    for row in order:
        if picked >= limit:
            break
        code = category_code[row]
        if blocked[code]:
            continue
        if per_category[code] >= max_per_category:
            capped[passed] = row
            passed += 1
            continue
        chosen[picked] = row
        picked += 1
        per_category[code] += 1
        for other in range(restricted_pairs.shape[1]):
            blocked[other] = blocked[other] | restricted_pairs[code, other]
    return picked, passed


def _warm_up_rank() -> None:
    pairs = np.zeros((2, 2), dtype=np.bool_)
    # The steps too, on their own: loaded from the cache, ``_pick`` compiles none of them.
    rows, codes = np.arange(2, dtype=np.int64), np.zeros(2, dtype=np.int64)
    order = _score_order(np.ones(2), rows, rows)
    chosen, capped = np.empty(2, dtype=np.int64), np.empty(2, dtype=np.int64)
    _walk(order, codes, pairs, 1, 2, chosen, 0, np.zeros(2, np.int64), pairs[0].copy(), capped, 0)
    for count in (3, 9):  # the whole list sorted, and the head first
        rank(
            np.linspace(1.0, 0.0, count),
            np.arange(count, dtype=np.int64),
            np.zeros(count, dtype=np.int64),
            limit=2,
            max_per_category=1,
            restricted_pairs=pairs,
        )


register_warm_up(_warm_up_rank)
