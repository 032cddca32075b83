"""Property tests: for random catalogs, policies, baskets and stock, no kept candidate breaks
any constraint, every drop names a rule that really fails, and node choice is optimal.

The checks below restate each rule in plain Python from the raw rows, independently of the
vectorised code under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules.constraints import (
    CONSTRAINTS,
    KEPT,
    CandidateFacts,
    RequestFacts,
    apply_constraints,
    compile_policy,
    with_fulfilment,
)
from rules.policy import CHANNELS, Policy
from rules.reasons import DropReason
from tests.rules.builders import catalog

NOW = datetime(2024, 6, 1, 12, 0)
CATEGORIES = ("HOME", "TOYS", "ALCOHOL", "FOOD")
BRANDS = (None, "ACME", "GLOBEX")


@dataclass
class World:
    items: list[dict[str, object]]
    policy: Policy
    channel: str
    basket: list[int]
    quantity: int
    consent: bool
    candidate_pos: list[int]
    uses_history: list[bool]
    available: list[list[int]]
    ranged_at_store: list[bool]
    node_cost: list[float]
    basket_node: list[bool]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    money = st.floats(min_value=0.01, max_value=50, allow_nan=False)
    item_count = draw(st.integers(1, 12))
    items = []
    for index in range(item_count):
        cost, price = draw(money), draw(money)
        row: dict[str, object] = {
            "sku": f"S{index}",
            "name": f"Item {index}",
            "category": draw(st.sampled_from(CATEGORIES)),
            "brand": draw(st.sampled_from(BRANDS)),
            "unit_cost": cost,
            "unit_price": price,
            "age_restricted": draw(st.booleans()),
            "ship_to_home": draw(st.booleans()),
        }
        if draw(st.booleans()):
            start = NOW + timedelta(hours=draw(st.integers(-48, 48)))
            row |= {
                "promo_price": draw(money),
                "promo_start": start,
                "promo_end": start + timedelta(hours=draw(st.integers(1, 96))),
            }
        items.append(row)
    floors = [{"absolute": draw(st.floats(0, 2)), "percent": draw(st.floats(0, 0.6))}]
    for category in draw(st.lists(st.sampled_from(CATEGORIES), unique=True, max_size=2)):
        floors.append({"category": category, "absolute": draw(st.floats(0, 2))})
    pairs = draw(st.lists(st.tuples(*[st.sampled_from(CATEGORIES)] * 2), max_size=3))
    policy = Policy.model_validate(
        {
            "name": "random",
            "version": 1,
            "margin_floors": floors,
            "restrictions": {
                "category_pairs": pairs,
                "age_verified_channels": draw(st.lists(st.sampled_from(CHANNELS), unique=True)),
                "excluded_brands": draw(st.lists(st.sampled_from(["ACME", "GLOBEX"]), unique=True)),
            },
            "fulfilment": {"charge_split_shipments": draw(st.booleans())},
        }
    )
    node_count = draw(st.integers(0, 4))
    candidate_pos = draw(st.lists(st.integers(-1, item_count - 1), min_size=1, max_size=15))
    count = len(candidate_pos)
    return World(
        items=items,
        policy=policy,
        channel=draw(st.sampled_from(CHANNELS)),
        basket=draw(st.lists(st.integers(0, item_count - 1), unique=True, max_size=3)),
        quantity=draw(st.integers(1, 3)),
        consent=draw(st.booleans()),
        candidate_pos=candidate_pos,
        uses_history=draw(st.lists(st.booleans(), min_size=count, max_size=count)),
        available=[
            draw(st.lists(st.integers(-1, 5), min_size=node_count, max_size=node_count))
            for _ in range(count)
        ],
        ranged_at_store=draw(st.lists(st.booleans(), min_size=count, max_size=count)),
        node_cost=draw(
            st.lists(
                st.sampled_from([0.0, 0.5, 2.0, 7.0]), min_size=node_count, max_size=node_count
            )
        ),
        basket_node=draw(st.lists(st.booleans(), min_size=node_count, max_size=node_count)),
    )


def effective_price(row: dict[str, object]) -> float:
    live = row.get("promo_price") is not None and row["promo_start"] <= NOW < row["promo_end"]  # type: ignore[operator]
    return float(row["promo_price"] if live else row["unit_price"])  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_no_kept_candidate_breaks_a_rule_and_every_drop_is_real(world: World) -> None:
    """Kept candidates satisfy every rule; each drop names a rule its candidate breaks."""
    cat = catalog(world.items)
    compiled = compile_policy(world.policy, cat)
    positions = np.array(world.candidate_pos, dtype=np.int64)
    known = positions >= 0
    safe = np.where(known, positions, 0)
    price = np.where(known, cat.effective_price(safe, now=NOW), np.nan)
    nodes = len(world.node_cost)
    available = np.array(world.available, dtype=np.int64).reshape(len(positions), nodes)
    facts = CandidateFacts(
        catalog_pos=positions,
        category_code=np.where(known, cat.category_code[safe], len(cat.categories)).astype(
            np.int64
        ),
        uses_history=np.array(world.uses_history),
        age_restricted=known & cat.age_restricted[safe],
        excluded_vendor=known & compiled.excluded_item[safe],
        effective_price=price,
        unit_margin=price - np.where(known, cat.unit_cost[safe], np.nan),
        available=available,
        inbound=np.zeros_like(available),
        ranged_at_store=np.array(world.ranged_at_store),
        fulfilment_cost=np.full(len(positions), np.nan),
    )
    basket = np.array(world.basket, dtype=np.int64)
    request = RequestFacts(
        channel=world.channel,  # type: ignore[arg-type]
        excluded_pos=basket,
        basket_category_codes=cat.category_code[basket].astype(np.int64),
        quantity=world.quantity,
        now=NOW,
        consent=world.consent,
        node_cost=np.array(world.node_cost, dtype=np.float64),
        basket_node=np.array(world.basket_node, dtype=np.bool_),
    )
    facts, column = with_fulfilment(facts, request, compiled)
    cost = facts.fulfilment_cost
    drops = apply_constraints(facts, request, compiled, CONSTRAINTS)

    charge = world.policy.fulfilment.charge_split_shipments and any(world.basket_node)
    for row, pos in enumerate(world.candidate_pos):
        for tolerance in (1e-9, -1e-9):  # kept: may not clearly break; dropped: must at least tie
            check(world, row, pos, drops, column, cost, nodes, charge, tolerance=tolerance)


def check(
    world: World,
    row: int,
    pos: int,
    drops: np.ndarray,
    column: np.ndarray,
    cost: np.ndarray,
    nodes: int,
    charge: bool,
    *,
    tolerance: float,
) -> None:
    """``tolerance`` > 0 judges kept rows leniently, < 0 judges drops leniently (floats)."""
    rules = world.policy
    basket_categories = {world.items[i]["category"] for i in world.basket}
    restricted = {frozenset(pair) for pair in rules.restrictions.category_pairs}
    breaks: dict[DropReason, bool] = {}
    breaks[DropReason.UNKNOWN_SKU] = pos < 0
    if pos >= 0:
        master = world.items[pos]
        unit_price = effective_price(master)
        margin = unit_price - float(master["unit_cost"])  # type: ignore[arg-type]
        floor = rules.floor_for(category=str(master["category"]), channel=world.channel)  # type: ignore[arg-type]
        covering = [n for n in range(nodes) if world.available[row][n] >= world.quantity]
        free = [
            n for n in covering if not charge or world.basket_node[n] or world.node_cost[n] == 0
        ]
        extra = 0.0 if free or not covering else min(world.node_cost[n] for n in covering)
        breaks[DropReason.IN_BASKET] = pos in world.basket
        breaks[DropReason.NO_CONSENT] = world.uses_history[row] and not world.consent
        breaks[DropReason.RESTRICTED_PAIRING] = any(
            frozenset((master["category"], other)) in restricted for other in basket_categories
        )
        breaks[DropReason.AGE_RESTRICTED] = bool(master["age_restricted"]) and (
            world.channel not in rules.restrictions.age_verified_channels
        )
        breaks[DropReason.EXCLUDED_VENDOR] = master["brand"] in rules.restrictions.excluded_brands
        breaks[DropReason.BELOW_MARGIN_FLOOR] = (
            margin < floor.absolute - tolerance or margin < floor.percent * unit_price - tolerance
        )
        breaks[DropReason.NOT_IN_ASSORTMENT] = world.channel == "pos" and not (
            world.ranged_at_store[row] or any(a >= 0 for a in world.available[row])
        )
        breaks[DropReason.NO_STOCK] = not covering
        net = margin - extra
        breaks[DropReason.SPLIT_SHIPMENT_COST] = bool(covering) and (
            net < floor.absolute - tolerance or net < floor.percent * unit_price - tolerance
        )
    if drops[row] == KEPT and tolerance > 0:
        assert not any(breaks.values()), (row, {r.code: b for r, b in breaks.items() if b})
        chosen = int(column[row])
        assert world.available[row][chosen] >= world.quantity
        assert abs(float(cost[row]) - extra) < 1e-9
        if free:
            assert chosen in free
    elif drops[row] != KEPT and tolerance < 0:
        reason = DropReason(int(drops[row]))
        assert breaks[reason], (row, reason.code)
    elif drops[row] != KEPT:
        reason = DropReason(int(drops[row]))
        earlier = [r for r in DropReason if r < reason and breaks.get(r)]
        assert not earlier, (row, reason.code, [r.code for r in earlier])
