"""Constraints, node choice and eligibility: table-driven, on small hand-built catalogs."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import numpy as np
import pytest

from rules.constraints import CONSTRAINTS, available_units, compile_policy
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
    ("case", "ranged_at_store", "available", "expected"),
    [
        ("ranged at the store with stock", True, [[4, -1]], "KEPT"),
        ("ranged at the store, none left", True, [[0, -1]], "NO_STOCK"),
        ("not ranged, not for delivery", False, [[-1, -1]], "NOT_IN_ASSORTMENT"),
        ("not ranged, for delivery from the DC", False, [[-1, 9]], "KEPT"),
    ],
)
def test_store_assortment_on_pos(
    case: str, ranged_at_store: bool, available: list[list[int]], expected: str
) -> None:
    """POS shows items ranged at the store, or sold there for delivery from a DC."""
    candidate = dataclasses.replace(
        facts(CATALOG, ["A"], available=available, compiled=COMPILED),
        ranged_at_store=np.array([ranged_at_store]),
    )
    outcome = judge(candidate, request(CATALOG, channel="pos", node_cost=[0.0, 4.0]), COMPILED)
    assert outcome[0] == [expected], case


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
