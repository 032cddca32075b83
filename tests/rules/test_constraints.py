"""Constraints, node choice and eligibility: table-driven, on small hand-built catalogs."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from rules.constraints import (
    CONSTRAINTS,
    available_units,
    basket_shipping_nodes,
    compile_policy,
    sellable_stock,
)
from rules.eligibility import eligible_nodes
from rules.errors import InputError, UnknownNodeError
from rules.policy import Channel
from rules.reasons import DropReason
from tests.rules.builders import NOW, catalog, facts, item, judge, nodes, policy, request

CATALOG = catalog(
    [
        item("A", cost=1.0, price=2.0, category="KITCHEN"),
        item("B", cost=2.0, price=2.2, category="HOME"),  # 9% margin
        item(
            "C",
            cost=5.0,
            price=10.0,
            category="BAGS",
            promo_price=5.5,
            promo_start=datetime(2011, 10, 1, 12, 0),
            promo_end=datetime(2011, 10, 8),
        ),
        item("D", cost=0.5, price=1.0, category="HOME"),
        item("BEER", cost=1.0, price=3.0, category="ALCOHOL", age_restricted=True),
        item("TEDDY", cost=2.0, price=6.0, category="TOYS"),
        item("ACME1", cost=1.0, price=4.0, category="HOME", brand="ACME"),
        item("SHIP", cost=1.0, price=2.0, category="KITCHEN", ship_to_home=True),
    ]
)
POLICY = policy(
    margin_floors=[
        {"absolute": 0.10, "percent": 0.15},
        {"channel": "pos", "absolute": 0.50, "percent": 0.0},
        {"category": "HOME", "absolute": 0.0, "percent": 0.40},
        {"category": "HOME", "channel": "pos", "absolute": 0.0, "percent": 0.0},
    ],
    restrictions={
        "category_pairs": [["ALCOHOL", "TOYS"], ["ALCOHOL", "NOT-IN-CATALOG"]],
        "age_verified_channels": ["pos"],
        "excluded_brands": ["ACME"],
    },
)
COMPILED = compile_policy(POLICY, CATALOG)


def run(
    skus: list[str | None],
    available: list[list[int]] | None = None,
    *,
    uses_history: list[bool] | None = None,
    now: datetime = NOW,
    **request_args: object,
) -> list[str]:
    if available is None:
        available = [[10] for _ in skus]
    request_args.setdefault("node_cost", [0.0] * len(available[0]))
    candidate_facts = facts(
        CATALOG,
        skus,
        available=available,
        uses_history=uses_history,
        compiled=COMPILED,
        channel=request_args.get("channel", "cart"),  # type: ignore[arg-type]
        now=now,
    )
    request_facts = request(CATALOG, now=now, **request_args)  # type: ignore[arg-type]
    return judge(candidate_facts, request_facts, COMPILED)[0]


def test_unknown_and_basket_items_are_dropped() -> None:
    """An item the master lacks, and one already in the basket, are never shown."""
    assert run([None, "A", "D"], basket=("A",)) == ["UNKNOWN_SKU", "IN_BASKET", "KEPT"]


@pytest.mark.parametrize(
    ("uses_history", "consent", "expected"),
    [(True, False, "NO_CONSENT"), (True, True, "KEPT"), (False, False, "KEPT")],
)
def test_consent_gates_history_candidates(uses_history: bool, consent: bool, expected: str) -> None:
    """History-based candidates need consent; basket-based ones never do."""
    assert run(["A"], uses_history=[uses_history], consent=consent) == [expected]


@pytest.mark.parametrize(
    ("basket", "candidate", "expected"),
    [
        (("TEDDY",), "BEER", "RESTRICTED_PAIRING"),
        (("BEER",), "TEDDY", "RESTRICTED_PAIRING"),
        (("TEDDY", "A"), "BEER", "RESTRICTED_PAIRING"),
        (("A",), "BEER", "KEPT"),
        ((), "BEER", "KEPT"),
    ],
)
def test_restricted_category_pairs(basket: tuple[str, ...], candidate: str, expected: str) -> None:
    """Restricted category pairs hold both ways, against every basket line (on pos, where age
    is verified so that only the pairing rule decides)."""
    assert run([candidate], basket=basket, channel="pos") == [expected]


@pytest.mark.parametrize(
    ("channel", "expected"),
    [("cart", "AGE_RESTRICTED"), ("contact_center", "AGE_RESTRICTED"), ("pos", "KEPT")],
)
def test_age_restricted_only_where_age_is_verified(channel: Channel, expected: str) -> None:
    """Age-restricted items appear only on channels that verify age."""
    assert run(["BEER"], channel=channel) == [expected]


def test_excluded_vendor() -> None:
    """Items of an excluded brand are dropped; items without a brand are not."""
    assert run(["ACME1", "D"]) == ["EXCLUDED_VENDOR", "KEPT"]


@pytest.mark.parametrize(
    ("case", "sku", "channel", "expected"),
    [
        ("margin 1.00 on 2.00 passes the default floor", "A", "cart", "KEPT"),
        ("margin 0.20 on 2.20 (9%) fails the 15% default", "B", "cart", "BELOW_MARGIN_FLOOR"),
        ("HOME floor 40%: 0.50 on 1.00 passes", "D", "cart", "KEPT"),
        ("HOME on pos: category+channel floor of zero", "B", "pos", "KEPT"),
        ("pos channel floor 0.50 absolute: margin 1.00 passes", "A", "pos", "KEPT"),
    ],
)
def test_margin_floor(case: str, sku: str, channel: Channel, expected: str) -> None:
    """The most specific margin floor applies, absolute and percent."""
    assert run([sku], channel=channel) == [expected], case


@pytest.mark.parametrize(
    ("case", "now", "expected"),
    [
        ("just before the start: 10.00", datetime(2011, 10, 1, 11, 59, 59, 999999), "KEPT"),
        ("at the start: 5.50, margin 9%", datetime(2011, 10, 1, 12, 0), "BELOW_MARGIN_FLOOR"),
        ("inside the window", datetime(2011, 10, 5), "BELOW_MARGIN_FLOOR"),
        ("at the end (exclusive): regular price again", datetime(2011, 10, 8), "KEPT"),
    ],
)
def test_promotion_window(case: str, now: datetime, expected: str) -> None:
    """Margin floors apply to the promotion price inside [start, end) only."""
    assert run(["C"], now=now) == [expected], case


@pytest.mark.parametrize(
    ("case", "available", "quantity", "expected"),
    [
        ("zero stock at the only node", [[0]], 1, "NO_STOCK"),
        ("one unit above safety stock", [[1]], 1, "KEPT"),
        ("covers quantity 3 exactly", [[3]], 3, "KEPT"),
        ("one short of quantity 3", [[2]], 3, "NO_STOCK"),
        ("short at one node, enough at another", [[0, 5]], 2, "KEPT"),
        ("enough only when summed across nodes: not split", [[1, 1]], 2, "NO_STOCK"),
        ("not ranged anywhere", [[-1, -1]], 1, "NO_STOCK"),
    ],
)
def test_stock_rule(case: str, available: list[list[int]], quantity: int, expected: str) -> None:
    """ATP minus safety stock must cover the quantity at one eligible node."""
    assert run(["A"], available, quantity=quantity) == [expected], case


def test_no_eligible_node_means_no_stock() -> None:
    """With no eligible node at all, nothing can be fulfilled."""
    assert run(["A"], [[]], node_cost=[]) == ["NO_STOCK"]


@pytest.mark.parametrize(
    ("case", "atp", "safety", "ranged", "expected"),
    [
        ("stock exactly at safety stock", 5, 5, True, 0),
        ("one above safety stock", 6, 5, True, 1),
        ("zero stock, zero safety", 0, 0, True, 0),
        ("below safety stock", 3, 5, True, -2),
        ("not ranged", 0, 0, False, -1),
    ],
)
def test_available_units(case: str, atp: int, safety: int, ranged: bool, expected: int) -> None:
    """Available units are ATP minus safety stock, never positive where not ranged."""
    result = available_units(
        np.array([[atp]], dtype=np.int64),
        np.array([[safety]], dtype=np.int64),
        np.array([[ranged]]),
    )
    assert result.tolist() == [[expected]], case


@pytest.mark.parametrize(
    ("case", "sku", "ranged_at_store", "available", "expected"),
    [
        ("ranged at the store with stock", "A", True, [[4, -1]], "KEPT"),
        ("ranged at the store, none left", "A", True, [[0, -1]], "NO_STOCK"),
        ("ranged at the store, ATP under safety stock", "A", True, [[-2, -1]], "NO_STOCK"),
        ("ranged at the store, its figure too old to trust", "A", True, [[-1, -1]], "NO_STOCK"),
        ("not ranged, not for delivery", "A", False, [[-1, -1]], "NOT_IN_ASSORTMENT"),
        (
            "not ranged, not for delivery, stock at the DC",
            "A",
            False,
            [[-1, 9]],
            "NOT_IN_ASSORTMENT",
        ),
        ("not ranged, for delivery from the DC", "SHIP", False, [[-1, 9]], "KEPT"),
        ("for delivery, DC ATP under safety stock", "SHIP", False, [[-1, -3]], "NO_STOCK"),
        ("for delivery, ranged nowhere", "SHIP", False, [[-1, -1]], "NO_STOCK"),
    ],
)
def test_store_assortment_on_pos(
    case: str, sku: str, ranged_at_store: bool, available: list[list[int]], expected: str
) -> None:
    """POS shows items ranged at the store, or sold there for home delivery; an item in the
    assortment with nothing to sell (however negative its count) is out of stock, not out of
    the assortment."""
    candidate = facts(
        CATALOG,
        [sku],
        available=available,
        ranged_at_store=[ranged_at_store],
        compiled=COMPILED,
        channel="pos",
    )
    outcome = judge(candidate, request(CATALOG, channel="pos", node_cost=[0.0, 4.0]), COMPILED)
    assert outcome[0] == [expected], case


def test_store_assortment_without_dc_shipping() -> None:
    """When the policy keeps POS to the store's own stock, ship_to_home does not widen the
    assortment."""
    store_only = compile_policy(policy(fulfilment={"pos_ships_from_region_dcs": False}), CATALOG)
    candidate = facts(
        CATALOG,
        ["SHIP"],
        available=[[-1]],
        ranged_at_store=[False],
        compiled=store_only,
        channel="pos",
    )
    outcome = judge(candidate, request(CATALOG, channel="pos", node_cost=[0.0]), store_only)
    assert outcome[0] == ["NOT_IN_ASSORTMENT"]


def test_available_units_is_row_major() -> None:
    """The compiled rules walk each candidate's nodes: whatever the read's layout, units
    come out row-major, with the same values."""
    atp = np.array([[5, 0, 7], [1, 2, 3]], dtype=np.int64)
    safety = np.array([[2, 0, 9], [0, 0, 0]], dtype=np.int64)
    ranged = np.array([[True, False, True], [True, True, False]])
    for layout in ("C", "F"):
        units = available_units(
            np.asarray(atp, order=layout),
            np.asarray(safety, order=layout),
            np.asarray(ranged, order=layout),
        )
        assert units.tolist() == [[3, -1, -2], [1, 2, -1]], layout
        assert units.flags["C_CONTIGUOUS"], layout


@pytest.mark.parametrize(
    ("channel", "expected"),
    [("pos", [[4, -1, -1], [4, 6, 2]]), ("cart", [[4, 6, 2], [4, 6, 2]])],
)
def test_sellable_stock(channel: Channel, expected: list[list[int]]) -> None:
    """On POS a DC column serves only items sold for home delivery (row 1 here)."""
    available = np.ascontiguousarray([[4, 6, 2], [4, 6, 2]])
    take_home = np.array([True, False, False])
    sellable = sellable_stock(available, np.array([False, True]), take_home, channel=channel)
    assert sellable.tolist() == expected
    assert available.tolist() == [[4, 6, 2], [4, 6, 2]]  # the read itself is untouched


@pytest.mark.parametrize(
    ("case", "available", "node_cost", "basket_node", "expected", "column", "cost"),
    [
        ("ships with the basket: free", [[5, 5]], [0.8, 0.8], [True, False], "KEPT", 0, 0.0),
        (
            "basket node preferred over more stock",
            [[2, 9]],
            [0.5, 0.5],
            [True, False],
            "KEPT",
            0,
            0.0,
        ),
        (
            "split, affordable: 1.00 - 0.50 >= 15% of 2.00",
            [[0, 5]],
            [0.5, 0.5],
            [True, False],
            "KEPT",
            1,
            0.5,
        ),
        (
            "split too dear: 1.00 - 0.80 < 0.30",
            [[0, 5]],
            [0.8, 0.8],
            [True, False],
            "SPLIT_SHIPMENT_COST",
            -1,
            None,
        ),
        (
            "cheapest extra shipment wins",
            [[0, 5, 5]],
            [0.5, 0.7, 0.2],
            [True, False, False],
            "KEPT",
            2,
            0.2,
        ),
        (
            "basket ships from nowhere yet: no split",
            [[0, 5]],
            [0.8, 0.8],
            [False, False],
            "KEPT",
            1,
            0.0,
        ),
        (
            "most stock on equal cost, first on ties",
            [[3, 7, 7]],
            [0.2, 0.2, 0.2],
            [False] * 3,
            "KEPT",
            1,
            0.0,
        ),
    ],
)
def test_split_shipments(
    case: str,
    available: list[list[int]],
    node_cost: list[float],
    basket_node: list[bool],
    expected: str,
    column: int,
    cost: float | None,
) -> None:
    """A candidate that cannot ship with the basket pays the extra shipment out of margin."""
    candidate = facts(CATALOG, ["A"], available=available, compiled=COMPILED)
    req = request(CATALOG, node_cost=node_cost, basket_node=basket_node)
    drops, columns, costs = judge(candidate, req, COMPILED)
    assert drops == [expected], case
    if expected == "KEPT":
        assert columns == [column], case
        assert costs == [pytest.approx(cost)], case


def test_splits_free_when_the_policy_does_not_charge_them() -> None:
    """With charge_split_shipments off, a split shipment costs the candidate nothing."""
    free = compile_policy(policy(fulfilment={"charge_split_shipments": False}), CATALOG)
    candidate = facts(CATALOG, ["A"], available=[[0, 5]], compiled=free)
    req = request(CATALOG, node_cost=[0.8, 0.8], basket_node=[True, False])
    assert judge(candidate, req, free) == (["KEPT"], [1], [0.0])


def test_first_rule_names_the_drop() -> None:
    """A candidate failing several rules is attributed to the first, in rule order."""
    # B is in the basket, below the floor and out of stock: IN_BASKET wins.
    assert run([None, "B", "A"], [[0], [0], [0]], basket=("B",)) == [
        "UNKNOWN_SKU",
        "IN_BASKET",
        "NO_STOCK",
    ]


def test_every_drop_reason_has_one_rule_in_order() -> None:
    """Each DropReason is produced by exactly one constraint, in enum order."""
    assert [reason for reason, _ in CONSTRAINTS] == sorted(DropReason)


NODES = nodes(
    [
        {"node_id": "DC-1", "kind": "dc", "region": "UK", "fulfillment_cost": 4.0},
        {"node_id": "DC-2", "kind": "dc", "region": "EU", "fulfillment_cost": 4.5},
        {"node_id": "S-UK", "kind": "store", "region": "UK", "fulfillment_cost": 6.0},
        {"node_id": "S-EU", "kind": "store", "region": "EU", "fulfillment_cost": 6.0},
    ]
)


@pytest.mark.parametrize(
    ("channel", "store_id", "region", "ships_from_dcs", "expected", "costs", "noted"),
    [
        ("pos", "S-UK", None, True, ["S-UK", "DC-1"], [0.0, 4.0], False),
        ("pos", "S-UK", None, False, ["S-UK"], [0.0], False),
        ("cart", None, "UK", True, ["DC-1", "S-UK"], [4.0, 6.0], False),
        ("pdp", None, None, True, ["DC-1", "DC-2"], [4.0, 4.5], False),
        ("contact_center", None, "MARS", True, ["DC-1", "DC-2"], [4.0, 4.5], True),
    ],
)
def test_eligible_nodes(
    channel: Channel,
    store_id: str | None,
    region: str | None,
    ships_from_dcs: bool,
    expected: list[str],
    costs: list[float],
    noted: bool,
) -> None:
    """POS serves from its store (take-home, free) and region DCs; others ship from the
    region, else from every DC."""
    rules = policy(fulfilment={"pos_ships_from_region_dcs": ships_from_dcs})
    eligible = eligible_nodes(
        NODES, channel=channel, store_id=store_id, region=region, policy=rules
    )
    assert list(NODES.ids(eligible.positions)) == expected
    assert eligible.shipment_cost.tolist() == costs
    assert eligible.take_home.tolist() == [node == store_id for node in expected]
    assert bool(eligible.notes) is noted


def test_pos_needs_a_known_store() -> None:
    """POS without a store, or with an unknown one, is an input error naming store_id."""
    with pytest.raises(InputError, match="store_id"):
        eligible_nodes(NODES, channel="pos", store_id=None, region=None, policy=POLICY)
    with pytest.raises(UnknownNodeError, match="store_id: 'S-XX'"):
        eligible_nodes(NODES, channel="pos", store_id="S-XX", region=None, policy=POLICY)


@pytest.mark.parametrize(
    ("case", "available", "quantity", "node_cost", "expected"),
    [
        ("cheapest covering node, not the most stocked", [[9, 2]], [1], [6.0, 4.0], [False, True]),
        ("exactly the quantity covers", [[9, 2]], [2], [6.0, 4.0], [False, True]),
        ("too few at the cheap node: the dearer one", [[9, 1]], [2], [6.0, 4.0], [True, False]),
        ("equal cost: most stock", [[3, 5, 5]], [1], [4.0, 4.0, 4.0], [False, True, False]),
        ("equal cost and stock: the first", [[5, 5]], [1], [4.0, 4.0], [True, False]),
        (
            "two lines from different nodes",
            [[5, 0, 0], [0, 0, 5]],
            [1, 1],
            [4.0, 4.0, 4.0],
            [True, False, True],
        ),
        ("two lines, one node covers both", [[5, 5], [0, 5]], [1, 1], [4.0, 3.0], [False, True]),
        ("a line no node covers ships from nowhere", [[1, 0]], [2], [4.0, 4.0], [False, False]),
        ("take-home at POS costs nothing", [[2, 9]], [1], [0.0, 4.0], [True, False]),
        ("no basket", np.zeros((0, 2), dtype=np.int64), [], [4.0, 4.0], [False, False]),
    ],
)
def test_basket_shipping_nodes(
    case: str,
    available: list[list[int]],
    quantity: list[int],
    node_cost: list[float],
    expected: list[bool],
) -> None:
    """Each basket line ships from the cheapest node covering its quantity (then most
    stock, then the first)."""
    shipping = basket_shipping_nodes(
        np.ascontiguousarray(
            np.array(available, dtype=np.int64).reshape(len(quantity), len(node_cost))
        ),
        np.array(quantity, dtype=np.int64),
        np.array(node_cost),
    )
    assert shipping.tolist() == expected, case


def test_big_baskets_are_sourced_the_same_way() -> None:
    """Many-line baskets: each line sourced on its own, whatever the basket size."""
    rng = np.random.default_rng(3)
    available = np.ascontiguousarray(rng.integers(-1, 6, (40, 16)))
    quantity = rng.integers(1, 4, 40)
    node_cost = rng.choice([0.5, 2.0, 7.0], 16)
    expected = np.zeros(16, dtype=np.bool_)
    for line in range(40):
        options = [
            (node_cost[node], -available[line, node], node)
            for node in range(16)
            if available[line, node] >= quantity[line]
        ]
        if options:
            expected[min(options)[2]] = True
    assert basket_shipping_nodes(available, quantity, node_cost).tolist() == expected.tolist()
    small = basket_shipping_nodes(available[:5], quantity[:5], node_cost)
    big = basket_shipping_nodes(
        np.tile(available[:5], (20, 1)), np.tile(quantity[:5], 20), node_cost
    )
    assert small.tolist() == big.tolist()


# A basket of two lines: line 1 only at node 0, line 2 only at node 1; node 2 is a third DC.
BASKET_STOCK = [[5, 0, 0], [0, 5, 0]]
CHEAP_THIRD, DEAR_THIRD = [0.8, 0.8, 0.3], [0.8, 0.8, 0.8]


@pytest.mark.parametrize(
    ("case", "candidate_stock", "node_cost", "expected", "column", "cost"),
    [
        ("rides along with either basket node", [[5, 5, 5]], CHEAP_THIRD, "KEPT", 0, 0.0),
        ("rides along with the second line's node", [[0, 5, 5]], CHEAP_THIRD, "KEPT", 1, 0.0),
        ("only at a third node: pays its shipment", [[0, 0, 5]], CHEAP_THIRD, "KEPT", 2, 0.3),
        ("the split cost takes it under the floor", [[0, 0, 5]], DEAR_THIRD, "SPLIT_SHIPMENT_COST",
         2, 0.8),
    ],
)  # fmt: skip
def test_multi_node_baskets(
    case: str,
    candidate_stock: list[list[int]],
    node_cost: list[float],
    expected: str,
    column: int,
    cost: float,
) -> None:
    """Two basket lines shipping from different nodes: a candidate at either rides along
    free; one only at a third node pays that node's shipment out of its margin, and is
    dropped when that breaks the floor (A: margin 1.00 on 2.00, floor 0.30)."""
    basket_node = basket_shipping_nodes(
        np.ascontiguousarray(BASKET_STOCK), np.array([1, 1]), np.array(node_cost)
    )
    assert basket_node.tolist() == [True, True, False]
    candidate = facts(CATALOG, ["A"], available=candidate_stock, compiled=COMPILED)
    req = request(CATALOG, node_cost=node_cost, basket_node=basket_node.tolist())
    drops, columns, costs = judge(candidate, req, COMPILED)
    assert drops == [expected], case
    assert columns == [column], case
    assert costs == [pytest.approx(cost)], case


def test_unknown_policy_categories_are_exposed() -> None:
    """Category names the catalog does not know are listed, not silently ignored."""
    rules = policy(
        margin_floors=[{"absolute": 0.1}, {"category": "GARDEN", "percent": 0.2}],
        ranking={"knobs": [{"margin_weight": 0.2}, {"category": "HOME", "margin_weight": 0.5}]},
        restrictions={"category_pairs": [["ALCOHOL", "TOYS"], ["ALCOHOL", "PETS"]]},
    )
    assert compile_policy(rules, CATALOG).unknown_categories == ("GARDEN", "PETS")
    assert COMPILED.unknown_categories == ("NOT-IN-CATALOG",)
