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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rules.compiled import compiled, register_warm_up
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
    restricted_partners: Sequence[frozenset[int]],
) -> IntArray:
    """Indexes of the best ``limit`` candidates, best first (ties: lower catalog position).

    Walks the candidates in score order and takes each one unless its category is
    restricted with the category of one already taken (``restricted_partners``, per
    category code: ``CompiledPolicy.restricted_partners``; never relaxed) or its category
    already has ``max_per_category`` items while others are left. When the cap would leave
    the list short, the best capped-out candidates fill it, in score order, still never
    next to a restricted partner.
    """
    count = len(final)
    if limit <= 0 or not count:
        return np.empty(0, dtype=np.int64)
    picker = _Picker(limit, max_per_category, restricted_partners)
    head_size = 4 * limit
    if count <= head_size:
        picker.walk(_score_order(final, catalog_pos, np.arange(count)), category_code)
    else:
        # Only the best few can usually be shown: sort those, keeping every tie at the cut,
        # and look deeper only when they do not fill the list within the rules.
        threshold = np.partition(final, count - head_size)[count - head_size]
        in_head = final >= threshold
        picker.walk(_score_order(final, catalog_pos, np.flatnonzero(in_head)), category_code)
        if not picker.full:
            rest = np.flatnonzero(~in_head)
            picker.walk(_score_order(final, catalog_pos, rest), category_code)
    picker.backfill()
    return np.array(picker.chosen, dtype=np.int64)


def _score_order(final: FloatArray, catalog_pos: IntArray, rows: IntArray) -> IntArray:
    ordered: IntArray = rows[np.lexsort((catalog_pos[rows], -final[rows]))]
    return ordered


class _Picker:
    """The greedy walk of ``rank``, in plain Python: it looks at a dozen or so candidates,
    where per-item numpy calls would cost more than the loop."""

    def __init__(
        self, limit: int, max_per_category: int, restricted_partners: Sequence[frozenset[int]]
    ) -> None:
        self.limit = limit
        self.max_per_category = max_per_category
        self.partners = restricted_partners
        self.chosen: list[int] = []
        self.per_category: dict[int, int] = {}
        self.blocked: set[int] = set()  # categories restricted with one already chosen
        self.capped: list[tuple[int, int]] = []  # (row, category) passed over for the cap

    @property
    def full(self) -> bool:
        return len(self.chosen) >= self.limit

    def walk(self, order: IntArray, category_code: IntArray) -> None:
        """Take candidates in ``order`` within the cap until the list is full."""
        if self.full:
            return
        for row, code in zip(order.tolist(), category_code[order].tolist(), strict=True):
            if code in self.blocked:
                continue
            taken = self.per_category.get(code, 0)
            if taken >= self.max_per_category:
                self.capped.append((row, code))
                continue
            self._take(row, code, taken)
            if self.full:
                return

    def backfill(self) -> None:
        """Fill a short list from the capped-out candidates, best first. No restriction
        check is needed: a capped candidate's category is already shown, so any partner
        chosen since would have clashed with that shown item first."""
        for row, code in self.capped:
            if self.full:
                return
            self._take(row, code, self.per_category[code])

    def _take(self, row: int, code: int, taken: int) -> None:
        self.chosen.append(row)
        self.per_category[code] = taken + 1
        self.blocked |= self.partners[code]
