"""Constraints: pure, vectorised keep-masks over the candidate list, each with a reason code.

Every constraint has one signature, ``(candidates, request, policy) -> keep mask``; the engine
is the ordered tuples ``MASTER_CONSTRAINTS`` (item master only) and ``STOCK_CONSTRAINTS``
(need the stock read); adding a rule is adding an entry. A candidate dropped by several rules
is attributed to the first one in that order, so every drop names exactly one rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
import numpy.typing as npt

from rules.catalog import Catalog
from rules.policy import CHANNELS, Channel, Objective, Policy
from rules.reasons import DropReason

KEPT = -1  # value of ``drop_reason`` for a candidate no rule dropped
OBJECTIVES: tuple[Objective, ...] = ("margin", "sell_through", "revenue", "relevance")
_UNKNOWN_CATEGORY = "\0unknown-category"

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """A policy resolved against one catalog, so that requests only gather from arrays.

    Tables indexed ``[channel row, category code]`` hold the most specific floor and ranking
    knob; the last category column serves candidates of unknown category.
    """

    policy: Policy
    channel_row: dict[Channel, int]
    floor_absolute: FloatArray
    floor_percent: FloatArray
    margin_weight: FloatArray
    objective_code: npt.NDArray[np.int8]  # index into OBJECTIVES
    restricted_pairs: BoolArray  # (categories + 1, categories + 1), symmetric
    excluded_item: BoolArray  # per catalog position: its brand is excluded
    age_verified: dict[Channel, bool]


def compile_policy(policy: Policy, catalog: Catalog) -> CompiledPolicy:
    """Resolve every (channel, category) setting once per policy and snapshot."""
    categories = (*catalog.categories, _UNKNOWN_CATEGORY)
    shape = (len(CHANNELS), len(categories))
    absolute, percent, weight = np.empty(shape), np.empty(shape), np.empty(shape)
    objective = np.empty(shape, dtype=np.int8)
    for row, channel in enumerate(CHANNELS):
        for column, category in enumerate(categories):
            floor = policy.floor_for(category=category, channel=channel)
            knob = policy.knob_for(category=category, channel=channel)
            absolute[row, column], percent[row, column] = floor.absolute, floor.percent
            weight[row, column] = knob.margin_weight
            objective[row, column] = OBJECTIVES.index(knob.objective)
    code_of = {name: code for code, name in enumerate(catalog.categories)}
    restricted = np.zeros((len(categories), len(categories)), dtype=np.bool_)
    for first, second in policy.restrictions.category_pairs:
        if first in code_of and second in code_of:
            restricted[code_of[first], code_of[second]] = True
            restricted[code_of[second], code_of[first]] = True
    excluded_brands = set(policy.restrictions.excluded_brands)
    excluded_item = np.fromiter(
        (brand in excluded_brands for brand in catalog.brands), dtype=np.bool_, count=len(catalog)
    )
    return CompiledPolicy(
        policy=policy,
        channel_row={channel: row for row, channel in enumerate(CHANNELS)},
        floor_absolute=absolute,
        floor_percent=percent,
        margin_weight=weight,
        objective_code=objective,
        restricted_pairs=restricted,
        excluded_item=excluded_item,
        age_verified={
            channel: channel in policy.restrictions.age_verified_channels for channel in CHANNELS
        },
    )


@dataclass(frozen=True, eq=False)
class CandidateFacts:
    """Everything a rule may look at, one row per candidate (parallel arrays).

    Stock arrays have one column per eligible node. ``available`` is ATP minus safety stock
    where the item may be sold from that node, -1 where it may not (not ranged, or a DC
    column on POS for an item not sold for delivery); ``ranged_at_store`` is POS only.
    Before the stock read the stock arrays are placeholders that no master rule reads.
    Stock arrays are column-major (Fortran order): rules reduce across the few node columns
    for every candidate, which numpy does several times faster in that layout.
    """

    catalog_pos: IntArray  # -1 where the item master lacks the SKU
    category_code: IntArray  # the unknown-category column where unknown
    uses_history: BoolArray  # proposed from the customer's own history
    age_restricted: BoolArray
    excluded_vendor: BoolArray
    effective_price: FloatArray  # NaN where unknown
    unit_margin: FloatArray  # effective price - unit cost; NaN where unknown
    available: IntArray
    inbound: IntArray
    ranged_at_store: BoolArray
    # Incremental cost of the node ``choose_fulfillment_node`` picked (NaN: none covers).
    fulfilment_cost: FloatArray

    def __len__(self) -> int:
        return int(self.catalog_pos.shape[0])

    def take(self, rows: IntArray) -> CandidateFacts:
        """The facts of ``rows`` only (stock arrays too)."""
        return CandidateFacts(
            catalog_pos=self.catalog_pos[rows],
            category_code=self.category_code[rows],
            uses_history=self.uses_history[rows],
            age_restricted=self.age_restricted[rows],
            excluded_vendor=self.excluded_vendor[rows],
            effective_price=self.effective_price[rows],
            unit_margin=self.unit_margin[rows],
            available=_take_rows(self.available, rows),
            inbound=_take_rows(self.inbound, rows),
            ranged_at_store=self.ranged_at_store[rows],
            fulfilment_cost=self.fulfilment_cost[rows],
        )


def _take_rows(matrix: IntArray, rows: IntArray) -> IntArray:
    # Indexing the transpose's columns keeps a column-major input column-major.
    taken: IntArray = matrix.T[:, rows].T
    return taken


@dataclass(frozen=True, eq=False)
class RequestFacts:
    """What the request fixes for every candidate.

    Node arrays have one entry per eligible node (the columns of the stock arrays):
    ``node_cost`` is the cost of one extra shipment from it (0 for POS take-home), and
    ``basket_node`` marks nodes that already fulfil a basket line.
    """

    channel: Channel
    excluded_pos: IntArray  # basket items and the PDP item (catalog positions)
    basket_category_codes: IntArray
    quantity: int
    now: datetime
    consent: bool
    node_cost: FloatArray
    basket_node: BoolArray


Constraint = Callable[[CandidateFacts, RequestFacts, CompiledPolicy], BoolArray]


def known_in_item_master(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """Keep candidates the current item master knows."""
    return c.catalog_pos >= 0


def not_in_basket(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """Never recommend what is already in the basket or on screen."""
    if r.excluded_pos.size > 16:
        return ~np.isin(c.catalog_pos, r.excluded_pos)
    keep = np.ones(len(c), dtype=np.bool_)
    for position in r.excluded_pos:  # a few whole-array compares beat isin's sort here
        keep &= c.catalog_pos != position
    return keep


def consent_for_history(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """Customer-history candidates only with consent (basket-based ones are always fine)."""
    if r.consent:
        return np.ones(len(c), dtype=np.bool_)
    return ~c.uses_history


def pairing_allowed(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """No candidate whose category is restricted with a category in the basket."""
    if not r.basket_category_codes.size:
        return np.ones(len(c), dtype=np.bool_)
    clashing_categories: BoolArray = np.any(p.restricted_pairs[r.basket_category_codes], axis=0)
    return ~clashing_categories[c.category_code]


def age_check_available(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """Age-restricted items only on channels that verify age."""
    if p.age_verified[r.channel]:
        return np.ones(len(c), dtype=np.bool_)
    return ~c.age_restricted


def vendor_allowed(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """No item of an excluded vendor."""
    return ~c.excluded_vendor


def margin_floor_met(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """Unit margin at or above the absolute and the percent floor of its category/channel."""
    return _clears_floor(c, r, p, cost=np.zeros(len(c)))


def in_store_assortment(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """POS: the item is ranged at the store, or may be sold there for home delivery."""
    if r.channel != "pos":
        return np.ones(len(c), dtype=np.bool_)
    if c.available.shape[1] == 0:
        return c.ranged_at_store.copy()
    sellable_somewhere: BoolArray = c.available.max(axis=1) >= 0
    return c.ranged_at_store | sellable_somewhere


def stock_covers_quantity(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """ATP minus safety stock covers the quantity at one eligible node at least."""
    if c.available.shape[1] == 0:
        return np.zeros(len(c), dtype=np.bool_)
    return np.asarray(c.available.max(axis=1) >= r.quantity, dtype=np.bool_)


def split_shipment_economic(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray:
    """Margin minus the incremental fulfilment cost of the chosen node still clears the floor
    (``fulfilment_cost`` comes from ``choose_fulfillment_node``; NaN where no node covers the
    quantity, which the stock rule has already dropped)."""
    return _clears_floor(c, r, p, cost=np.nan_to_num(c.fulfilment_cost, nan=0.0))


def _clears_floor(
    c: CandidateFacts, r: RequestFacts, p: CompiledPolicy, *, cost: FloatArray
) -> BoolArray:
    row = p.channel_row[r.channel]
    net = c.unit_margin - cost
    # NaN margins (unknown items) compare False, so they can never pass a floor.
    with np.errstate(invalid="ignore"):
        passes = (net >= p.floor_absolute[row][c.category_code]) & (
            net >= p.floor_percent[row][c.category_code] * c.effective_price
        )
    return np.asarray(passes, dtype=np.bool_)


MASTER_CONSTRAINTS: tuple[tuple[DropReason, Constraint], ...] = (
    (DropReason.UNKNOWN_SKU, known_in_item_master),
    (DropReason.IN_BASKET, not_in_basket),
    (DropReason.NO_CONSENT, consent_for_history),
    (DropReason.RESTRICTED_PAIRING, pairing_allowed),
    (DropReason.AGE_RESTRICTED, age_check_available),
    (DropReason.EXCLUDED_VENDOR, vendor_allowed),
    (DropReason.BELOW_MARGIN_FLOOR, margin_floor_met),
)
STOCK_CONSTRAINTS: tuple[tuple[DropReason, Constraint], ...] = (
    (DropReason.NOT_IN_ASSORTMENT, in_store_assortment),
    (DropReason.NO_STOCK, stock_covers_quantity),
    (DropReason.SPLIT_SHIPMENT_COST, split_shipment_economic),
)
CONSTRAINTS = MASTER_CONSTRAINTS + STOCK_CONSTRAINTS


def apply_constraints(
    candidates: CandidateFacts,
    request: RequestFacts,
    policy: CompiledPolicy,
    constraints: tuple[tuple[DropReason, Constraint], ...] = CONSTRAINTS,
) -> npt.NDArray[np.int8]:
    """Per candidate, the first rule that dropped it (a ``DropReason`` value), or ``KEPT``.

    Every rule is evaluated over the whole batch (cheaper than slicing the batch between
    rules at these sizes); a drop is attributed to the first failing rule in order.
    """
    drop_reason = np.full(len(candidates), KEPT, dtype=np.int8)
    for reason, constraint in reversed(constraints):
        drop_reason[~constraint(candidates, request, policy)] = reason.value
    return drop_reason


def available_units(atp: IntArray, safety_stock: IntArray, ranged: BoolArray) -> IntArray:
    """Units that may be promised: ATP minus safety stock; -1 where the item is not ranged."""
    available: IntArray = np.where(ranged, atp - safety_stock, -1).astype(np.int64)
    return available


_COLUMN_BITS = 6  # up to 64 eligible nodes in the packed key; more take the slower path
_STOCK_BITS = 21
_STOCK_CAP = 2**_STOCK_BITS - 1
_NOT_COVERED = np.iinfo(np.int64).max


def choose_fulfillment_node(
    available: IntArray, request: RequestFacts, policy: CompiledPolicy
) -> tuple[IntArray, FloatArray]:
    """Per candidate, the node column to fulfil from and its incremental cost.

    Preference: a node already fulfilling the basket (no extra shipment), then the cheapest
    extra shipment, then the most stock, then the first column. Cost is 0 at a basket node,
    when the basket ships from nowhere yet, or when the policy does not charge splits.
    Column -1 and cost NaN where no eligible node covers the quantity.
    """
    rows, columns = available.shape
    if columns == 0:
        return np.full(rows, -1, dtype=np.int64), np.full(rows, np.nan)
    charge = policy.policy.fulfilment.charge_split_shipments and bool(request.basket_node.any())
    node_cost = request.node_cost if charge else np.zeros(columns)
    free = request.basket_node | (node_cost == 0)
    # Per node: how many nodes are strictly cheaper (equal costs share a rank).
    cost_rank = (node_cost[np.newaxis, :] < node_cost[:, np.newaxis]).sum(axis=1)
    preference = np.where(free, 0, 1 + cost_rank).astype(np.int64)
    covers = available >= request.quantity
    stock = np.minimum(available, _STOCK_CAP)
    if columns <= 2**_COLUMN_BITS:
        # One integer per cell ordering (preference, shortfall, column): a row's minimum is
        # its choice, and the column rides in the low bits. A min over the node axis is far
        # cheaper than argmin in the column-major layout the rules use.
        node_part = (
            (preference << (_STOCK_BITS + _COLUMN_BITS))
            + (_STOCK_CAP << _COLUMN_BITS)
            + np.arange(columns)
        )
        key = np.where(covers, node_part - (stock << _COLUMN_BITS), _NOT_COVERED)
        best = key.min(axis=1)
        covered = best != _NOT_COVERED
        column = best & (2**_COLUMN_BITS - 1)
    else:
        key = np.where(covers, (preference << _STOCK_BITS) + _STOCK_CAP - stock, _NOT_COVERED)
        column = key.argmin(axis=1)
        covered = covers.any(axis=1)
    column = np.where(covered, column, -1)
    cost = np.where(free[column], 0.0, node_cost[column])
    return column, np.where(covered, cost, np.nan)


def with_fulfilment(
    candidates: CandidateFacts, request: RequestFacts, policy: CompiledPolicy
) -> tuple[CandidateFacts, IntArray]:
    """The facts with ``fulfilment_cost`` set from the node choice, and the chosen columns.

    Run before ``STOCK_CONSTRAINTS``: the split-shipment rule reads the cost it sets.
    """
    column, cost = choose_fulfillment_node(candidates.available, request, policy)
    return replace(candidates, fulfilment_cost=cost), column
