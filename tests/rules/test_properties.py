"""Property test over the whole rules decision, against an independent oracle.

For random catalogs, nodes, stock, policies, baskets and channels the test runs what a request
runs (facts -> item-master rules -> stock read -> basket shipping nodes -> node choice ->
stock rules -> score -> rank) and checks it against ``Oracle``: the issue's rule list
restated in plain Python, one item at a time, from the raw rows (it shares no code with the
vectorised rules). It checks that every dropped candidate names exactly the first rule it
breaks, that no shown item breaks a rule (restricted pairs among the shown items and
split-shipment economics included), and that the list is as full as the rules allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules.catalog import Catalog
from rules.constraints import (
    KEPT,
    MASTER_CONSTRAINTS,
    STOCK_CONSTRAINTS,
    RequestFacts,
    apply_constraints,
    available_units,
    basket_shipping_nodes,
    candidate_facts,
    compile_policy,
    sellable_stock,
    with_fulfilment,
)
from rules.policy import CHANNELS, Channel, Policy
from rules.ranking import RankingInputs, rank, score
from rules.reasons import DropReason
from tests.rules.builders import catalog

NOW = datetime(2024, 6, 1, 12, 0)
CATEGORIES = ("HOME", "TOYS", "ALCOHOL", "FOOD")
BRANDS = (None, None, "ACME", "GLOBEX")
BORDERLINE = 1e-9  # margins this close to a floor may round either way: not judged


@dataclass(frozen=True)
class Cell:
    """One item at one eligible node, as the store reads it."""

    atp: int
    safety_stock: int
    ranged: bool


@dataclass
class World:
    items: list[dict[str, object]]
    policy: Policy
    channel: Channel
    basket: list[int]  # catalog positions
    basket_quantity: list[int]
    quantity: int
    consent: bool
    candidates: list[int]  # catalog positions, -1 for a SKU the item master lacks
    uses_history: list[bool]
    relevance: list[float]
    stock: list[list[Cell]]  # per candidate, then per basket line; one cell per node
    node_cost: list[float]  # column 0 is the store itself on POS (take-home, free)
    limit: int


@st.composite
def worlds(draw: st.DrawFn) -> World:
    """Hypothesis draws the shape and the policy; a seeded generator fills in the rows, so
    that a world has enough candidates surviving to exercise ranking and backfill."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    item_count = int(rng.integers(1, 25))
    items = []
    for index in range(item_count):
        cost = round(float(rng.uniform(0.01, 40)), 2)
        row: dict[str, object] = {
            "sku": f"S{index}",
            "name": f"Item {index}",
            "category": CATEGORIES[rng.integers(len(CATEGORIES))],
            "brand": BRANDS[rng.integers(len(BRANDS))],
            "unit_cost": cost,
            "unit_price": max(round(cost * float(rng.uniform(0.8, 3)), 2), 0.01),
            "age_restricted": bool(rng.random() < 0.15),
            "ship_to_home": bool(rng.random() < 0.5),
        }
        if rng.random() < 0.3:
            start = NOW + timedelta(hours=int(rng.integers(-48, 48)))
            row |= {
                "promo_price": max(round(cost * float(rng.uniform(0.8, 2)), 2), 0.01),
                "promo_start": start,
                "promo_end": start + timedelta(hours=int(rng.integers(1, 96))),
            }
        items.append(row)

    fraction = st.integers(0, 40).map(lambda percent: percent / 100)
    floors: list[dict[str, object]] = [
        {"absolute": draw(st.integers(0, 200)) / 100, "percent": draw(fraction)}
    ]
    for category in draw(st.lists(st.sampled_from(CATEGORIES), unique=True, max_size=2)):
        floors.append({"category": category, "absolute": draw(st.integers(0, 200)) / 100})
    if draw(st.booleans()):
        floors.append({"channel": draw(st.sampled_from(CHANNELS)), "percent": draw(fraction)})
    objectives = st.sampled_from(["margin", "sell_through", "revenue", "relevance"])
    knobs: list[dict[str, object]] = [
        {"objective": draw(objectives), "margin_weight": draw(fraction)}
    ]
    for category in draw(st.lists(st.sampled_from(CATEGORIES), unique=True, max_size=2)):
        knobs.append(
            {"category": category, "objective": draw(objectives), "margin_weight": draw(fraction)}
        )
    policy = Policy.model_validate(
        {
            "name": "random",
            "version": 1,
            "margin_floors": floors,
            "ranking": {
                "knobs": knobs,
                "max_per_category": draw(st.sampled_from([1, 1, 2, 3])),
                "low_stock_units": draw(st.integers(0, 4)),
                "low_stock_factor": draw(fraction),
                "overstock_units": draw(st.sampled_from([0, 3, 6])),
                "sell_through_boost": draw(st.sampled_from([0.0, 0.2, 0.5])),
            },
            "restrictions": {
                "category_pairs": draw(
                    st.lists(st.tuples(*[st.sampled_from(CATEGORIES)] * 2), max_size=4)
                ),
                "age_verified_channels": draw(st.lists(st.sampled_from(CHANNELS), unique=True)),
                "excluded_brands": draw(st.sampled_from([[], [], ["ACME"], ["ACME", "GLOBEX"]])),
            },
            "fulfilment": {
                "charge_split_shipments": draw(st.booleans()),
                "pos_ships_from_region_dcs": draw(st.booleans()),
            },
        }
    )

    channel = draw(st.sampled_from(CHANNELS))
    if channel == "pos" and not policy.fulfilment.pos_ships_from_region_dcs:
        node_count = 1  # the store alone (rules.eligibility)
    else:
        node_count = int(rng.choice([1, 2, 3, 4] if channel == "pos" else [0, 1, 2, 3, 4, 4]))
    node_cost = [
        float(cost) for cost in rng.choice([0.0, 0.5, 2.0, 7.0], node_count, p=[0.1, 0.4, 0.3, 0.2])
    ]
    if channel == "pos":
        node_cost[0] = 0.0  # the store itself: take-home, no shipment
    candidates = rng.permutation(item_count)[: rng.integers(1, 21)].tolist()
    if rng.random() < 0.2:  # a SKU the model knows and the item master no longer has
        candidates.insert(int(rng.integers(len(candidates) + 1)), -1)
    basket = rng.permutation(item_count)[: rng.integers(0, 4)].tolist()
    rows = len(candidates) + len(basket)
    ranged = rng.random((rows, node_count)) < 0.7
    atp = rng.integers(0, 9, (rows, node_count))
    safety = rng.integers(0, 4, (rows, node_count))
    return World(
        items=items,
        policy=policy,
        channel=channel,
        basket=basket,
        basket_quantity=rng.choice([1, 1, 2, 3], len(basket)).tolist(),
        quantity=draw(st.sampled_from([1, 1, 2, 3])),
        consent=draw(st.booleans()),
        candidates=candidates,
        uses_history=(rng.random(len(candidates)) < 0.2).tolist(),
        relevance=rng.random(len(candidates)).round(1).tolist(),  # ties: the tie-break matters
        stock=[
            [
                Cell(int(atp[row, node]), int(safety[row, node]), bool(ranged[row, node]))
                for node in range(node_count)
            ]
            for row in range(rows)
        ],
        node_cost=node_cost,
        limit=draw(st.integers(1, 6)),
    )


class Oracle:
    """The rules of the issue, one item at a time, in the order the reasons are numbered."""

    def __init__(self, world: World) -> None:
        self.world = world
        rules = world.policy
        self.restricted = {frozenset(pair) for pair in rules.restrictions.category_pairs}
        self.basket_nodes = {
            node
            for line, needed in enumerate(world.basket_quantity)
            if (
                node := self.source(
                    world.stock[len(world.candidates) + line], needed, world.basket[line]
                )
            )
            is not None
        }
        self.charge = rules.fulfilment.charge_split_shipments and bool(self.basket_nodes)

    def category(self, pos: int) -> str:
        return str(self.world.items[pos]["category"])

    def clash(self, first: str, second: str) -> bool:
        return frozenset((first, second)) in self.restricted

    def price(self, pos: int) -> float:
        row = self.world.items[pos]
        on_promotion = (
            row.get("promo_price") is not None and row["promo_start"] <= NOW < row["promo_end"]  # type: ignore[operator]
        )
        return float(row["promo_price"] if on_promotion else row["unit_price"])  # type: ignore[arg-type]

    def margin(self, pos: int) -> float:
        return self.price(pos) - float(self.world.items[pos]["unit_cost"])  # type: ignore[arg-type]

    def headroom(self, pos: int, cost: float) -> float:
        """Margin after ``cost`` minus the stricter of the absolute and percent floors."""
        floor = self.world.policy.floor_for(category=self.category(pos), channel=self.world.channel)
        net = self.margin(pos) - cost
        return min(net - floor.absolute, net - floor.percent * self.price(pos))

    def sellable(self, cell: Cell, column: int, pos: int) -> int | None:
        """Units this node may promise for the item on this channel; None if it may not."""
        if not cell.ranged:
            return None
        if self.world.channel == "pos" and column > 0 and not self.world.items[pos]["ship_to_home"]:
            return None
        return cell.atp - cell.safety_stock

    def source(self, cells: list[Cell], needed: int, pos: int) -> int | None:
        """Where a basket line ships from: cheapest covering node, most stock, first."""
        options = [
            (self.world.node_cost[column], -units, column)
            for column, cell in enumerate(cells)
            if (units := self.sellable(cell, column, pos)) is not None and units >= needed
        ]
        return min(options)[2] if options else None

    def covering(self, row: int) -> list[int]:
        pos = self.world.candidates[row]
        return [
            column
            for column, cell in enumerate(self.world.stock[row])
            if (units := self.sellable(cell, column, pos)) is not None
            and units >= self.world.quantity
        ]

    def extra_cost(self, row: int) -> float:
        """What fulfilling this candidate adds: nothing if it can ride with the basket (or
        ship free), else the cheapest covering node's shipment."""
        covering = self.covering(row)
        if not self.charge or any(
            column in self.basket_nodes or self.world.node_cost[column] == 0 for column in covering
        ):
            return 0.0
        return min(self.world.node_cost[column] for column in covering)

    def broken(self, row: int) -> list[DropReason]:
        """Every rule candidate ``row`` breaks, in rule order."""
        world, rules = self.world, self.world.policy
        pos = world.candidates[row]
        if pos < 0:
            return [DropReason.UNKNOWN_SKU]
        item = world.items[pos]
        broken = []
        if pos in world.basket:
            broken.append(DropReason.IN_BASKET)
        if world.uses_history[row] and not world.consent:
            broken.append(DropReason.NO_CONSENT)
        if any(self.clash(self.category(pos), self.category(other)) for other in world.basket):
            broken.append(DropReason.RESTRICTED_PAIRING)
        if item["age_restricted"] and world.channel not in rules.restrictions.age_verified_channels:
            broken.append(DropReason.AGE_RESTRICTED)
        if item["brand"] in rules.restrictions.excluded_brands:
            broken.append(DropReason.EXCLUDED_VENDOR)
        if self.headroom(pos, 0.0) < 0:
            broken.append(DropReason.BELOW_MARGIN_FLOOR)
        at_store = bool(world.stock[row]) and world.stock[row][0].ranged
        for_delivery = bool(item["ship_to_home"]) and rules.fulfilment.pos_ships_from_region_dcs
        if world.channel == "pos" and not (at_store or for_delivery):
            broken.append(DropReason.NOT_IN_ASSORTMENT)
        if not self.covering(row):
            broken.append(DropReason.NO_STOCK)
        elif self.headroom(pos, self.extra_cost(row)) < 0:
            broken.append(DropReason.SPLIT_SHIPMENT_COST)
        return broken

    def ranked(self, final: dict[int, float]) -> list[int]:
        """The list: best score first (lower catalog position on ties); skip an item whose
        category is restricted with a shown one; at most ``max_per_category`` per category
        while other items are left, then fill from the best of those passed over."""
        world = self.world
        order = sorted(final, key=lambda row: (-final[row], world.candidates[row]))
        cap = world.policy.ranking.max_per_category
        shown: list[int] = []

        def fits(row: int) -> bool:
            category = self.category(world.candidates[row])
            return not any(
                self.clash(category, self.category(world.candidates[other])) for other in shown
            )

        for row in order:
            category = self.category(world.candidates[row])
            same = sum(self.category(world.candidates[other]) == category for other in shown)
            if len(shown) < world.limit and fits(row) and same < cap:
                shown.append(row)
        for row in order:
            if len(shown) < world.limit and row not in shown and fits(row):
                shown.append(row)
        return shown

    def borderline(self, row: int) -> bool:
        pos = self.world.candidates[row]
        if pos < 0:
            return False
        costs = [0.0] + ([self.extra_cost(row)] if self.covering(row) else [])
        return any(abs(self.headroom(pos, cost)) < BORDERLINE for cost in costs)


def decide(
    world: World, cat: Catalog
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, dict[int, float]]:
    """Run the rules as a request does: (shown rows, drop reasons, node column, cost, final
    score per kept row)."""
    compiled = compile_policy(world.policy, cat)
    positions = np.array(world.candidates, dtype=np.int64)
    nodes = len(world.node_cost)
    facts = candidate_facts(
        cat,
        compiled,
        positions,
        uses_history=np.array(world.uses_history, dtype=np.bool_),
        channel=world.channel,
        now=NOW,
    )
    basket = np.array(world.basket, dtype=np.int64)
    request = RequestFacts(
        channel=world.channel,
        excluded_pos=basket,
        basket_category_codes=cat.category_code[basket],
        quantity=world.quantity,
        now=NOW,
        consent=world.consent,
        node_cost=np.array(world.node_cost, dtype=np.float64),
        basket_node=np.zeros(nodes, dtype=np.bool_),
    )
    drop = apply_constraints(facts, request, compiled, MASTER_CONSTRAINTS)
    survivors = np.flatnonzero(drop == KEPT)

    # The stock read: the survivors, then the basket lines.
    read_rows = [*survivors.tolist(), *range(len(world.candidates), len(world.stock))]
    shape = (len(read_rows), nodes)
    atp, safety, ranged = (
        np.array(
            [[getattr(cell, name) for cell in world.stock[row]] for row in read_rows],
            dtype=dtype,
        ).reshape(shape)
        for name, dtype in (("atp", np.int64), ("safety_stock", np.int64), ("ranged", np.bool_))
    )
    read_pos = np.concatenate([positions[survivors], basket]).astype(np.int64)
    take_home = np.arange(nodes) == 0 if world.channel == "pos" else np.zeros(nodes, np.bool_)
    available = sellable_stock(
        available_units(atp, safety, ranged),
        cat.ship_to_home[read_pos],
        take_home,
        channel=world.channel,
    )
    split = len(survivors)
    request = request.with_basket_nodes(
        basket_shipping_nodes(
            available[split:], np.array(world.basket_quantity, dtype=np.int64), request.node_cost
        )
    )
    view = facts.with_stock(
        survivors,
        available=available[:split],
        inbound=np.zeros_like(available[:split]),
        ranged_at_store=(ranged[:split] & take_home).any(axis=1),
    )
    view, column = with_fulfilment(view, request, compiled)
    drop[survivors] = apply_constraints(view, request, compiled, STOCK_CONSTRAINTS)
    node_column = np.full(len(positions), -1, dtype=np.int64)
    node_column[survivors] = column
    cost = np.full(len(positions), np.nan)
    cost[survivors] = view.fulfilment_cost

    kept = np.flatnonzero(drop == KEPT)
    in_view = np.searchsorted(survivors, kept)
    relevance = np.array(world.relevance)[kept]
    chosen = column[in_view]
    inputs = RankingInputs(
        catalog_pos=positions[kept],
        category_code=view.category_code[in_view],
        relevance=relevance,
        p_accept=relevance * 0.5,
        effective_price=view.effective_price[in_view],
        unit_margin=view.unit_margin[in_view],
        return_rate=view.return_rate[in_view],
        fulfilment_cost=view.fulfilment_cost[in_view],
        stock_units=view.available[in_view, chosen] if len(kept) else np.zeros(0, np.int64),
    )
    parts = score(inputs, compiled, world.channel)
    assert np.all(np.isfinite(parts.final))
    order = rank(
        parts.final,
        inputs.catalog_pos,
        inputs.category_code,
        limit=world.limit,
        max_per_category=world.policy.ranking.max_per_category,
        restricted_pairs=compiled.restricted_pairs,
    )
    final = dict(zip(kept.tolist(), parts.final.tolist(), strict=True))
    return kept[order].tolist(), drop, node_column, cost, final


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_rules_decision_matches_the_oracle(world: World) -> None:
    """Drops name the first rule broken; shown items break none, never show a restricted
    pair together, and fill the list as far as the rules allow."""
    shown, drop, node_column, cost, final = decide(world, catalog(world.items))
    oracle = Oracle(world)

    for row in range(len(world.candidates)):
        if oracle.borderline(row):
            continue
        broken = oracle.broken(row)
        expected = broken[0].code if broken else "KEPT"
        actual = "KEPT" if drop[row] == KEPT else DropReason(int(drop[row])).code
        assert actual == expected, (row, actual, [reason.code for reason in broken])
        if not broken:
            chosen = int(node_column[row])
            assert chosen in oracle.covering(row), (row, chosen)
            assert abs(float(cost[row]) - oracle.extra_cost(row)) < 1e-12

    kept = [row for row in range(len(world.candidates)) if drop[row] == KEPT]
    assert set(shown) <= set(kept)
    assert len(shown) == len(set(shown)) <= world.limit
    shown_categories = [oracle.category(world.candidates[row]) for row in shown]
    for index, first in enumerate(shown_categories):
        for second in shown_categories[index + 1 :]:
            assert not oracle.clash(first, second), (first, second)
    assert shown == oracle.ranked(final), "rank"
    cap = world.policy.ranking.max_per_category
    over_cap = any(shown_categories.count(category) > cap for category in shown_categories)
    for row in set(kept) - set(shown):
        category = oracle.category(world.candidates[row])
        blocked = any(oracle.clash(category, other) for other in shown_categories)
        if len(shown) < world.limit:
            # Backfill: a short list means every other valid item clashes with a shown one.
            assert blocked, row
        if over_cap:
            # The cap was relaxed, so no item that fits within it was left out.
            assert blocked or shown_categories.count(category) >= cap, row
