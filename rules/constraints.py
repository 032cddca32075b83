"""Constraints: pure, vectorised keep-masks over the candidate list, each with a reason code.

Every constraint has one signature, ``(candidates, request, policy) -> keep mask``; the engine
is the ordered tuples ``MASTER_CONSTRAINTS`` (item master only) and ``STOCK_CONSTRAINTS``
(need the stock read); adding a rule is adding an entry. A candidate dropped by several rules
is attributed to the first one in that order, so every drop names exactly one rule.

A request runs: ``candidate_facts`` -> ``apply_constraints(MASTER_CONSTRAINTS)`` -> stock read
for the survivors and the basket -> ``rules.staleness.trusted_stock_units`` -> ``sellable_stock`` ->
``basket_shipping_nodes`` -> ``CandidateFacts.with_stock`` -> ``with_fulfilment`` ->
``apply_constraints(STOCK_CONSTRAINTS)``.

The steps that walk every candidate (or every stock cell) in several ways at once are plain
loops compiled by numba (``rules.compiled``): on a few hundred rows, a chain of numpy calls
spent more in dispatch than in work. They stay pure functions over arrays; where the data is
random from one request to the next (stock, the drop masks) they select rather than branch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt

from rules.catalog import Catalog
from rules.compiled import compiled, register_warm_up
from rules.policy import CHANNELS, Channel, Objective, Policy
from rules.reasons import DropReason
from rules.staleness import epoch_us

KEPT = -1  # value of ``drop_reason`` for a candidate no rule dropped
OBJECTIVES: tuple[Objective, ...] = ("margin", "sell_through", "revenue", "relevance")
_UNKNOWN_CATEGORY = "\0unknown-category"

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# Everything a request reads about one item, packed in one 64-byte record: a candidate's
# facts then cost one cache line of the item master, not one line per column (a request
# gathers 500 random items of a 100k catalog, and column by column that was most of the
# cost of building its facts).
ITEM_ROW = np.dtype(
    {
        "names": [
            "unit_price",
            "promo_price",
            "unit_cost",
            "return_rate",
            "promo_start_us",
            "promo_end_us",
            "category_code",
            "age_restricted",
            "ship_to_home",
            "excluded_vendor",
        ],
        "formats": ["f8", "f8", "f8", "f8", "i8", "i8", "i8", "?", "?", "?"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56, 57, 58],
        "itemsize": 64,
    }
)
_CACHE_LINE = 64
_ITEM_WORDS = ITEM_ROW.itemsize // 8
# Where the compiled facts loop finds each field of an ITEM_ROW (8-byte words, then bytes).
_UNIT_PRICE, _PROMO_PRICE, _UNIT_COST, _RETURN_RATE = 0, 1, 2, 3
_PROMO_START, _PROMO_END, _CATEGORY = 4, 5, 6
_AGE_RESTRICTED, _SHIP_TO_HOME, _EXCLUDED_VENDOR = 56, 57, 58


@dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """A policy resolved against one catalog, so that requests only gather from arrays.

    Tables indexed ``[channel row, category code]`` hold the most specific floor and ranking
    knob; the last category column serves candidates of unknown category.
    """

    policy: Policy
    policy_version: str  # ``policy.content_hash``, computed once (it hashes the whole policy)
    channel_row: dict[Channel, int]
    floor_absolute: FloatArray
    floor_percent: FloatArray
    # 0 where the objective is ``relevance``: that objective has nothing to blend in.
    margin_weight: FloatArray
    objective_code: npt.NDArray[np.int8]  # index into OBJECTIVES
    # Per channel row: the objective code every category shares there, or -1 if they differ;
    # and the objective codes in use there.
    single_objective: tuple[int, ...]
    channel_objectives: tuple[tuple[int, ...], ...]
    # The ranking's stock factor as a step function of available + inbound units: the
    # factor of units u is stock_factors[searchsorted(stock_breaks, u, side="right")].
    stock_breaks: IntArray
    stock_factors: FloatArray
    restricted_pairs: BoolArray  # (categories + 1, categories + 1), symmetric
    # Per category code: the codes it may never be shown or recommended with.
    restricted_partners: tuple[frozenset[int], ...]
    excluded_item: BoolArray  # per catalog position: its brand is excluded
    item_rows: npt.NDArray[np.void]  # per catalog position, an ITEM_ROW record
    # The same memory as (positions, 8) words and (positions, 64) bytes: what the compiled
    # facts loop reads (numba checks a record dtype on every call, plain arrays cheaply).
    item_words_f8: FloatArray
    item_words_i8: IntArray
    item_bytes: npt.NDArray[np.uint8]
    age_verified: dict[Channel, bool]
    # Category names the policy mentions that the catalog does not know: settings for them
    # have no effect on this catalog, which is worth a warning, not a refusal (the catalog
    # changes with every snapshot).
    unknown_categories: tuple[str, ...]


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
            objective[row, column] = OBJECTIVES.index(knob.objective)
            weight[row, column] = 0.0 if knob.objective == "relevance" else knob.margin_weight
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
    stock_breaks, stock_factors = _stock_steps(policy)
    item_rows = _item_rows(catalog, excluded_item)
    mentioned = {
        *(entry.category for entry in policy.margin_floors),
        *(knob.category for knob in policy.ranking.knobs),
        *(name for pair in policy.restrictions.category_pairs for name in pair),
    }
    return CompiledPolicy(
        policy=policy,
        policy_version=policy.content_hash,
        channel_row={channel: row for row, channel in enumerate(CHANNELS)},
        floor_absolute=absolute,
        floor_percent=percent,
        margin_weight=weight,
        objective_code=objective,
        single_objective=tuple(
            int(codes[0]) if (codes == codes[0]).all() else -1 for codes in objective
        ),
        channel_objectives=tuple(tuple(np.unique(codes).tolist()) for codes in objective),
        stock_breaks=stock_breaks,
        stock_factors=stock_factors,
        restricted_pairs=restricted,
        restricted_partners=tuple(
            frozenset(int(code) for code in np.flatnonzero(partners)) for partners in restricted
        ),
        excluded_item=excluded_item,
        item_rows=item_rows,
        item_words_f8=item_rows.view(np.float64).reshape(len(catalog), _ITEM_WORDS),
        item_words_i8=item_rows.view(np.int64).reshape(len(catalog), _ITEM_WORDS),
        item_bytes=item_rows.view(np.uint8).reshape(len(catalog), ITEM_ROW.itemsize),
        age_verified={
            channel: channel in policy.restrictions.age_verified_channels for channel in CHANNELS
        },
        unknown_categories=tuple(
            sorted(name for name in mentioned if name is not None and name not in code_of)
        ),
    )


def _stock_steps(policy: Policy) -> tuple[IntArray, FloatArray]:
    """Low stock scales contribution by ``low_stock_factor`` under ``low_stock_units``;
    overstock (at or above ``overstock_units``, when set) by 1 + ``sell_through_boost``."""
    ranking = policy.ranking
    low, over = ranking.low_stock_units, ranking.overstock_units

    def factor(units: int) -> float:
        scaled = ranking.low_stock_factor if units < low else 1.0
        if over and units >= over:
            scaled *= 1.0 + ranking.sell_through_boost
        return scaled

    breaks = sorted({units for units in (low, over) if units})
    # One factor per segment: below the first break, then from each break on.
    factors = [factor(min(breaks, default=0) - 1), *(factor(units) for units in breaks)]
    return np.array(breaks, dtype=np.int64), np.array(factors, dtype=np.float64)


def _item_rows(catalog: Catalog, excluded_item: BoolArray) -> npt.NDArray[np.void]:
    # Aligned to a cache line, so that each record is exactly one line.
    raw = np.zeros(len(catalog) * ITEM_ROW.itemsize + _CACHE_LINE, dtype=np.uint8)
    start = -raw.ctypes.data % _CACHE_LINE
    rows = raw[start : start + len(catalog) * ITEM_ROW.itemsize].view(ITEM_ROW)
    for name in ITEM_ROW.names or ():
        rows[name] = excluded_item if name == "excluded_vendor" else getattr(catalog, name)
    return rows


@dataclass(frozen=True, eq=False)
class CandidateFacts:
    """Everything a rule may look at, one row per candidate (parallel arrays).

    Stock arrays have one column per eligible node. ``available`` is ATP minus safety stock
    where the item may be sold from that node (negative when ATP is under safety stock), -1
    where it may not (no inventory row, a figure too old to trust, or a DC column on POS for
    an item not sold for home delivery). Whether an item is ranged is a separate fact,
    ``ranged_at_store`` (POS only): an item ranged at the store with nothing to sell is out
    of stock, not out of the assortment. Before the stock read (``candidate_facts``) the stock
    arrays have no node columns and no master rule reads them; ``with_stock`` gives the subset
    left for the stock rules its read stock. Stock arrays are row-major, as the store reads
    them: the compiled loops walk each candidate's nodes.
    """

    catalog_pos: IntArray  # -1 where the item master lacks the SKU
    category_code: IntArray  # the unknown-category column where unknown
    uses_history: BoolArray  # proposed from the customer's own history
    age_restricted: BoolArray
    excluded_vendor: BoolArray
    ship_to_home: BoolArray  # may be sold at a store for home delivery
    effective_price: FloatArray  # NaN where unknown
    unit_margin: FloatArray  # effective price - unit cost; NaN where unknown
    return_rate: FloatArray  # share of units sold that come back; NaN where unknown
    # The request channel's floor for this item: max(absolute, percent x effective price).
    margin_floor: FloatArray
    available: IntArray
    inbound: IntArray
    ranged_at_store: BoolArray
    # Incremental cost of the node ``choose_fulfillment_node`` picked (NaN: none covers).
    fulfilment_cost: FloatArray

    def __len__(self) -> int:
        return int(self.catalog_pos.shape[0])

    def take(self, rows: IntArray) -> CandidateFacts:
        """The facts of ``rows`` only (stock arrays too)."""
        return self.with_stock(
            rows,
            available=self.available[rows],
            inbound=self.inbound[rows],
            ranged_at_store=self.ranged_at_store[rows],
        )

    def with_fulfilment_cost(self, cost: FloatArray) -> CandidateFacts:
        return self._with_stock_arrays(
            self.available, self.inbound, self.ranged_at_store, fulfilment_cost=cost
        )

    def with_stock(
        self,
        rows: IntArray,
        *,
        available: IntArray,
        inbound: IntArray,
        ranged_at_store: BoolArray,
    ) -> CandidateFacts:
        """The facts of ``rows`` only, with their stock as read (one row per entry of
        ``rows``): what the stock rules judge, without copying placeholder stock around."""
        return CandidateFacts(
            catalog_pos=self.catalog_pos[rows],
            category_code=self.category_code[rows],
            uses_history=self.uses_history[rows],
            age_restricted=self.age_restricted[rows],
            excluded_vendor=self.excluded_vendor[rows],
            ship_to_home=self.ship_to_home[rows],
            effective_price=self.effective_price[rows],
            unit_margin=self.unit_margin[rows],
            return_rate=self.return_rate[rows],
            margin_floor=self.margin_floor[rows],
            available=available,
            inbound=inbound,
            ranged_at_store=ranged_at_store,
            fulfilment_cost=self.fulfilment_cost[rows],
        )

    def _with_stock_arrays(
        self,
        available: IntArray,
        inbound: IntArray,
        ranged_at_store: BoolArray,
        *,
        fulfilment_cost: FloatArray,
    ) -> CandidateFacts:
        """The same candidates with other stock arrays and costs. Spelled out:
        dataclasses.replace costs more than the rules it sits between."""
        return CandidateFacts(
            catalog_pos=self.catalog_pos,
            category_code=self.category_code,
            uses_history=self.uses_history,
            age_restricted=self.age_restricted,
            excluded_vendor=self.excluded_vendor,
            ship_to_home=self.ship_to_home,
            effective_price=self.effective_price,
            unit_margin=self.unit_margin,
            return_rate=self.return_rate,
            margin_floor=self.margin_floor,
            available=available,
            inbound=inbound,
            ranged_at_store=ranged_at_store,
            fulfilment_cost=fulfilment_cost,
        )


@compiled
def _item_facts(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    words_f8: FloatArray,
    words_i8: IntArray,
    item_bytes: npt.NDArray[np.uint8],
    catalog_pos: IntArray,
    now_us: int,
    floor_absolute: FloatArray,
    floor_percent: FloatArray,
    unknown: int,
    out_category_code: IntArray,
    out_price: FloatArray,
    out_unit_margin: FloatArray,
    out_return_rate: FloatArray,
    out_margin_floor: FloatArray,
    out_age_restricted: BoolArray,
    out_excluded_vendor: BoolArray,
    out_ship_to_home: BoolArray,
) -> int:
    """Per candidate, the ``candidate_facts`` fields read from its ITEM_ROW record (given as
    its words and bytes): effective price (the promotion price inside ``[promo_start_us,
    promo_end_us)``, as ``rules.catalog.price_at``), unit margin, the channel's margin floor
    (the larger of the absolute and the percent one of its category); NaN numbers, category
    code ``unknown`` and False flags where the item master lacks the SKU (position -1).

    Written into the ``out_`` arrays, allocated by the caller: numba boxes an array it
    returns several times slower than numpy allocates one."""
    category_code, price, unit_margin = out_category_code, out_price, out_unit_margin
    return_rate, margin_floor = out_return_rate, out_margin_floor
    age_restricted, excluded_vendor = out_age_restricted, out_excluded_vendor
    ship_to_home = out_ship_to_home
    # A first pass that only touches each record: its body is small enough for the CPU to
    # have many of these (random, usually uncached) loads in flight at once; the full pass
    # then finds them in cache. Returned so that the compiler keeps it.
    touched = 0
    for index in range(catalog_pos.shape[0]):
        touched += words_i8[max(catalog_pos[index], 0), _CATEGORY]
    for index in range(catalog_pos.shape[0]):
        position = catalog_pos[index]
        if position < 0:
            category_code[index] = unknown
            price[index] = unit_margin[index] = np.nan
            return_rate[index] = margin_floor[index] = np.nan
            age_restricted[index] = excluded_vendor[index] = ship_to_home[index] = False
            continue
        # & rather than a chained comparison: no branch on whether a promotion is live.
        live = (words_i8[position, _PROMO_START] <= now_us) & (
            now_us < words_i8[position, _PROMO_END]
        )
        effective = words_f8[position, _PROMO_PRICE if live else _UNIT_PRICE]
        code = words_i8[position, _CATEGORY]
        category_code[index] = code
        price[index] = effective
        unit_margin[index] = effective - words_f8[position, _UNIT_COST]
        return_rate[index] = words_f8[position, _RETURN_RATE]
        margin_floor[index] = max(floor_absolute[code], floor_percent[code] * effective)
        age_restricted[index] = item_bytes[position, _AGE_RESTRICTED] != 0
        excluded_vendor[index] = item_bytes[position, _EXCLUDED_VENDOR] != 0
        ship_to_home[index] = item_bytes[position, _SHIP_TO_HOME] != 0
    return touched


def candidate_facts(
    catalog: Catalog,
    policy: CompiledPolicy,
    catalog_pos: IntArray,
    *,
    uses_history: BoolArray,
    channel: Channel,
    now: datetime,
) -> CandidateFacts:
    """The item-master facts of candidates at catalog positions ``catalog_pos`` (-1 where
    the item master lacks the SKU); stock not read yet (no node columns)."""
    count = len(catalog_pos)
    row = policy.channel_row[channel]
    category_code = np.empty(count, dtype=np.int64)
    price, unit_margin, return_rate, margin_floor = (np.empty(count) for _ in range(4))
    age_restricted, excluded_vendor, ship_to_home = (
        np.empty(count, dtype=np.bool_) for _ in range(3)
    )
    _item_facts(
        policy.item_words_f8,
        policy.item_words_i8,
        policy.item_bytes,
        catalog_pos,
        epoch_us(now),
        policy.floor_absolute[row],
        policy.floor_percent[row],
        len(catalog.categories),
        category_code,
        price,
        unit_margin,
        return_rate,
        margin_floor,
        age_restricted,
        excluded_vendor,
        ship_to_home,
    )
    return CandidateFacts(
        catalog_pos=catalog_pos,
        category_code=category_code,
        uses_history=uses_history,
        age_restricted=age_restricted,
        excluded_vendor=excluded_vendor,
        ship_to_home=ship_to_home,
        effective_price=price,
        unit_margin=unit_margin,
        return_rate=return_rate,
        margin_floor=margin_floor,
        available=np.empty((count, 0), dtype=np.int64),
        inbound=np.empty((count, 0), dtype=np.int64),
        ranged_at_store=np.zeros(count, dtype=np.bool_),
        fulfilment_cost=np.full(count, np.nan),
    )


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

    def with_basket_nodes(self, basket_node: BoolArray) -> RequestFacts:
        """The request once the basket's shipping nodes are known (``basket_shipping_nodes``)."""
        return RequestFacts(
            channel=self.channel,
            excluded_pos=self.excluded_pos,
            basket_category_codes=self.basket_category_codes,
            quantity=self.quantity,
            now=self.now,
            consent=self.consent,
            node_cost=self.node_cost,
            basket_node=basket_node,
        )


# A constraint returns its keep mask, or None when it keeps every candidate of the request
# (the common case for several rules, and cheaper than a mask of ones).
Constraint = Callable[[CandidateFacts, RequestFacts, CompiledPolicy], BoolArray | None]


def known_in_item_master(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray | None:
    """Keep candidates the current item master knows."""
    return c.catalog_pos >= 0


def not_in_basket(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray | None:
    """Never recommend what is already in the basket or on screen."""
    if not r.excluded_pos.size:
        return None
    if r.excluded_pos.size > _FEW_EXCLUDED:
        return ~np.isin(c.catalog_pos, r.excluded_pos)
    keep = np.empty(len(c), dtype=np.bool_)
    _none_of(c.catalog_pos, r.excluded_pos, keep)
    return keep


_FEW_EXCLUDED = 16  # basket lines up to which a scan of each candidate beats isin's sort


@compiled
def _none_of(values: IntArray, excluded: IntArray, out_keep: BoolArray) -> None:
    for index in range(values.shape[0]):
        value = values[index]
        keep = True
        for other in excluded:
            if value == other:
                keep = False
                break
        out_keep[index] = keep


def consent_for_history(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray | None:
    """Customer-history candidates only with consent (basket-based ones are always fine)."""
    if r.consent:
        return None
    return ~c.uses_history


def pairing_allowed(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray | None:
    """No candidate whose category is restricted with a category in the basket."""
    partners = p.restricted_partners
    clashing = set().union(*(partners[code] for code in r.basket_category_codes.tolist()))
    if not clashing:
        return None
    allowed = np.ones(len(partners), dtype=np.bool_)
    allowed[list(clashing)] = False
    keep: BoolArray = allowed[c.category_code]
    return keep


def age_check_available(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray | None:
    """Age-restricted items only on channels that verify age."""
    if p.age_verified[r.channel]:
        return None
    return ~c.age_restricted


def vendor_allowed(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray | None:
    """No item of an excluded vendor."""
    if not p.policy.restrictions.excluded_brands:
        return None
    return ~c.excluded_vendor


def margin_floor_met(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray | None:
    """Unit margin at or above the absolute and the percent floor of its category/channel
    (``margin_floor``, the larger of the two). NaN margins (unknown items) never pass."""
    return c.unit_margin >= c.margin_floor


def in_store_assortment(c: CandidateFacts, r: RequestFacts, p: CompiledPolicy) -> BoolArray | None:
    """POS: the item is ranged at the store, or sold for home delivery (``ship_to_home``) and
    the policy lets POS ship from distribution centres. Stock does not enter: an item in
    the assortment with nothing to sell is the stock rule's to drop."""
    if r.channel != "pos":
        return None
    if not p.policy.fulfilment.pos_ships_from_region_dcs:
        return c.ranged_at_store
    return c.ranged_at_store | c.ship_to_home


def stock_covers_quantity(
    c: CandidateFacts, r: RequestFacts, p: CompiledPolicy
) -> BoolArray | None:
    """ATP minus safety stock covers the quantity at one eligible node at least: exactly
    where ``choose_fulfillment_node`` found a node, so its cost is not NaN (facts that
    have not been through ``with_fulfilment`` have NaN costs: nothing passes)."""
    covered: BoolArray = c.fulfilment_cost == c.fulfilment_cost  # False only for NaN
    return covered


def split_shipment_economic(
    c: CandidateFacts, r: RequestFacts, p: CompiledPolicy
) -> BoolArray | None:
    """Margin minus the incremental fulfilment cost of the chosen node still clears the floor
    (``fulfilment_cost`` comes from ``choose_fulfillment_node``). Where no node covers the
    quantity the cost is NaN and this mask False, but the stock rule, earlier, names that
    drop."""
    return c.unit_margin - c.fulfilment_cost >= c.margin_floor


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
        keep = constraint(candidates, request, policy)
        if keep is not None:
            _mark_dropped(drop_reason, keep, reason.value)
    return drop_reason


@compiled
def _mark_dropped(drop_reason: npt.NDArray[np.int8], keep: BoolArray, reason: int) -> None:
    # One pass; ``drop_reason[~keep] = reason`` is two, each dearer than the rule itself.
    for index in range(drop_reason.shape[0]):
        drop_reason[index] = drop_reason[index] if keep[index] else reason  # a select


def available_units(atp: IntArray, safety_stock: IntArray, ranged: BoolArray) -> IntArray:
    """Units that may be promised: ATP minus safety stock; -1 where the item is not ranged.

    Row-major, as the store reads stock: see ``CandidateFacts``.
    """
    units: IntArray = _available_units(atp, safety_stock, ranged)
    return units


@compiled
def _available_units(atp: IntArray, safety_stock: IntArray, ranged: BoolArray) -> IntArray:
    rows, columns = atp.shape
    # Row-major out: a column-major copy (strided writes) cost several times this loop.
    units = np.empty((rows, columns), np.int64)
    for row in range(rows):
        for column in range(columns):
            units[row, column] = (
                atp[row, column] - safety_stock[row, column] if ranged[row, column] else -1
            )
    return units


def sellable_stock(
    available: IntArray, ship_to_home: BoolArray, take_home: BoolArray, *, channel: Channel
) -> IntArray:
    """``available`` with -1 in the cells a channel may not sell from: on POS, a node other
    than the store itself serves only items sold for home delivery (``ship_to_home``, one
    entry per row)."""
    if channel != "pos" or bool(take_home.all()):
        return available
    masked = available.copy()
    _mask_home_delivery(masked, ship_to_home, take_home)
    return masked


@compiled
def _mask_home_delivery(available: IntArray, ship_to_home: BoolArray, take_home: BoolArray) -> None:
    for column in range(available.shape[1]):
        if take_home[column]:
            continue
        for row in range(available.shape[0]):
            if not ship_to_home[row]:
                available[row, column] = -1


_STOCK_BITS = 40  # stock above 2**40 - 1 units counts as that much when choosing a node
_STOCK_CAP = (1 << _STOCK_BITS) - 1
_NOT_COVERED = np.iinfo(np.int64).max


@compiled
def _basket_nodes(
    available: IntArray, quantity: IntArray, node_cost: FloatArray, out_basket_node: BoolArray
) -> None:
    """``basket_shipping_nodes``, written into ``out_basket_node`` (all False on entry)."""
    rows, columns = available.shape
    for row in range(rows):
        chosen, best_cost, best_stock = -1, 0.0, 0
        for column in range(columns):
            units = available[row, column]
            if units < quantity[row]:
                continue
            cost = node_cost[column]
            if chosen < 0 or cost < best_cost or (cost == best_cost and units > best_stock):
                chosen, best_cost, best_stock = column, cost, units
        if chosen >= 0:
            out_basket_node[chosen] = True


def basket_shipping_nodes(
    basket_available: IntArray, basket_quantity: IntArray, node_cost: FloatArray
) -> BoolArray:
    """Per eligible node, whether it ships a basket line (``RequestFacts.basket_node``).

    Each line ships from the cheapest node covering its quantity; among equally cheap nodes,
    the one with most stock, then the first column. Cheapest rather than most stocked,
    because that is how an order is sourced when fulfilment cost is what the retailer
    minimises, and the split-shipment rule should charge a candidate against the nodes the
    basket really ships from: a line that the region's DC and a dearer store could both
    ship goes with the DC, even if the store holds more. Lines are sourced one at a time;
    grouping them onto fewer nodes (a set cover) is not attempted. A line no node covers
    ships from nowhere.
    """
    basket_node = np.zeros(basket_available.shape[1], dtype=np.bool_)
    _basket_nodes(
        basket_available, basket_quantity.astype(np.int64, copy=False), node_cost, basket_node
    )
    return basket_node


def choose_fulfillment_node(
    available: IntArray, request: RequestFacts, policy: CompiledPolicy
) -> tuple[IntArray, FloatArray]:
    """Per candidate, the node column to fulfil from and its incremental cost.

    Preference: a node already fulfilling the basket (no extra shipment), then the cheapest
    extra shipment, then the most stock, then the first column. Cost is 0 at a basket node,
    when the basket ships from nowhere yet, or when the policy does not charge splits.
    Column -1 and cost NaN where no eligible node covers the quantity.
    """
    rows = available.shape[0]
    column = np.empty(rows, dtype=np.int64)
    cost = np.empty(rows)
    _choose_nodes(
        available,
        request.quantity,
        request.basket_node,
        request.node_cost,
        policy.policy.fulfilment.charge_split_shipments,
        column,
        cost,
    )
    return column, cost


@compiled
def _choose_nodes(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    available: IntArray,
    quantity: int,
    basket_node: BoolArray,
    node_cost: FloatArray,
    charge_splits: bool,
    out_column: IntArray,
    out_cost: FloatArray,
) -> None:
    columns = node_cost.shape[0]
    preference = np.zeros(columns, np.int64)
    charged = np.zeros(columns)
    if charge_splits and basket_node.any():
        for column in range(columns):
            if basket_node[column] or node_cost[column] == 0:
                continue  # free: preference 0, nothing charged
            # 1 + how many nodes ship more cheaply: equal costs share a preference.
            preference[column] = 1 + (node_cost < node_cost[column]).sum()
            charged[column] = node_cost[column]
    # One integer per cell orders (preference, -stock): a row's smallest key is its choice
    # (the first column on ties, by the strict <). Selects rather than branches: stock is
    # random from one request to the next, and a mispredicted branch per cell cost more
    # than the loop's work.
    for row in range(available.shape[0]):
        chosen, best_key = -1, _NOT_COVERED
        for column in range(columns):
            units = available[row, column]
            key = (preference[column] << _STOCK_BITS) - min(units, _STOCK_CAP)
            key = key if units >= quantity else _NOT_COVERED
            better = key < best_key
            best_key = key if better else best_key
            chosen = column if better else chosen
        out_column[row] = chosen
        out_cost[row] = charged[chosen] if chosen >= 0 else np.nan


def with_fulfilment(
    candidates: CandidateFacts, request: RequestFacts, policy: CompiledPolicy
) -> tuple[CandidateFacts, IntArray]:
    """The facts with ``fulfilment_cost`` set from the node choice, and the chosen columns.

    Run before ``STOCK_CONSTRAINTS``: the split-shipment rule reads the cost it sets.
    """
    column, cost = choose_fulfillment_node(candidates.available, request, policy)
    return candidates.with_fulfilment_cost(cost), column


def _warm_up() -> None:
    # The argument types requests use: row-major stock as the store reads it (its row
    # slices, the survivors then the basket lines, are row-major too).
    units = available_units(
        np.zeros((3, 2), dtype=np.int64), np.zeros((3, 2), dtype=np.int64), np.ones((3, 2), bool)
    )
    quantities = np.ones(len(units), dtype=np.int64)
    _basket_nodes(units, quantities, np.zeros(2), np.zeros(2, dtype=np.bool_))
    for charge_splits in (False, True):
        _choose_nodes(
            units,
            1,
            np.ones(2, dtype=np.bool_),
            np.zeros(2),
            charge_splits,
            np.empty(len(units), dtype=np.int64),
            np.empty(len(units)),
        )
    _mask_home_delivery(units.copy(), np.zeros(3, bool), np.zeros(2, bool))
    _mark_dropped(np.zeros(2, dtype=np.int8), np.zeros(2, dtype=np.bool_), 1)
    _none_of(np.zeros(2, dtype=np.int64), np.zeros(1, dtype=np.int64), np.empty(2, np.bool_))
    rows = np.zeros(1, dtype=ITEM_ROW)
    words_f8, words_i8 = rows.view(np.float64).reshape(1, -1), rows.view(np.int64).reshape(1, -1)
    item_bytes = rows.view(np.uint8).reshape(1, -1)
    floats, flags = np.empty(2), np.empty(2, dtype=np.bool_)
    _item_facts(
        *(words_f8, words_i8, item_bytes, np.array([0, -1]), 0, np.zeros(2), np.zeros(2), 1),
        *(np.empty(2, dtype=np.int64), floats, floats, floats, floats, flags, flags, flags),
    )


register_warm_up(_warm_up)
