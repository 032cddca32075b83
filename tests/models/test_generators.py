"""Upsell generators (models.generators): one contract test run against each, then known
answers per generator, on real implicit fits.

The data is the checkerboard of ``tests.models.builders`` with three things added: customers
order weekly (so every pair they buy has a 7-day cycle), block-A customers and the guests
shop at store S-N (region N) and block-B customers at S-S (region S), and an item master
giving block A, block B and Z a category each, with prices and costs chosen for upgrades.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from models.candidates import HybridGenerator, PopularityGenerator
from models.data.contract import validate_table
from models.data.schema import ITEMS
from models.generators import (
    BundleGenerator,
    FactorItemItemGenerator,
    HybridWeights,
    ItemFacts,
    ReplenishmentGenerator,
    SegmentPopularityGenerator,
    UpgradeGenerator,
    build_generator,
)
from models.interfaces import (
    CandidateGenerator,
    Candidates,
    GenerationContext,
    Kind,
    ModelArtifacts,
)
from models.training import train
from rules.catalog import catalog_from_items
from tests.models.builders import checkerboard, order_lines

N_ITEMS = 11
A0, A1, A2, A3, A4, B0, B1, B2, B3, B4, Z = range(11)
C00, C15 = 0, 15
FIRST_ORDER = datetime(2024, 3, 1)
LAST_ORDER = FIRST_ORDER + timedelta(days=14)  # every customer's third weekly order

NODES = pl.DataFrame(
    {
        "node_id": ["S-N", "S-S", "DC-1"],
        "kind": ["store", "store", "dc"],
        "region": ["N", "S", "N"],
        "fulfillment_cost": [6.0, 6.0, 4.0],
    }
)
# sku: (category, unit price, unit cost). For anchor A0 (10, margin 4): A1 and A4 are dearer
# with more margin; A2 is dearer with less margin; A3 is more than 3x the price.
ITEM_MASTER = {
    "A0": ("cat-a", 10.0, 6.0),
    "A1": ("cat-a", 12.0, 7.0),
    "A2": ("cat-a", 15.0, 12.0),
    "A3": ("cat-a", 40.0, 10.0),
    "A4": ("cat-a", 11.0, 5.0),
    **{f"B{i}": ("cat-b", 20.0, 10.0) for i in range(5)},
    "Z": ("cat-z", 5.0, 1.0),
}


def weekly_checkerboard() -> pl.DataFrame:
    """The checkerboard, customers' order n placed n weeks after FIRST_ORDER, with stores."""
    lines = checkerboard()
    order_number = pl.col("order_id").str.slice(3, 1).cast(pl.Int64, strict=False).fill_null(0)
    in_block_b = pl.col("customer_id").str.slice(1).cast(pl.Int64, strict=False).fill_null(0) >= 10
    return lines.with_columns(
        ordered_at=pl.lit(FIRST_ORDER) + pl.duration(days=7 * order_number),
        store_id=pl.when(in_block_b).then(pl.lit("S-S")).otherwise(pl.lit("S-N")),
    )


def item_master() -> pl.DataFrame:
    return pl.DataFrame(
        [(sku, *facts) for sku, facts in ITEM_MASTER.items()],
        schema={
            "sku": pl.String,
            "category": pl.String,
            "unit_price": pl.Float64,
            "unit_cost": pl.Float64,
        },
        orient="row",
    )


@pytest.fixture(scope="module")
def artifacts() -> ModelArtifacts:
    return train(weekly_checkerboard(), factors=2, neighbours=8, nodes=NODES)


@pytest.fixture(scope="module")
def facts(artifacts: ModelArtifacts) -> ItemFacts:
    return ItemFacts.from_items(artifacts.item_skus, item_master())


def anchors_of(rows: list[int]) -> np.ndarray[tuple[int], np.dtype[np.int32]]:
    return np.asarray(rows, dtype=np.int32)


def due(days_after_last_order: float) -> GenerationContext:
    return GenerationContext(now=LAST_ORDER + timedelta(days=days_after_last_order))


GENERATORS: dict[str, Callable[[ModelArtifacts, ItemFacts], CandidateGenerator]] = {
    "factor item-item": lambda artifacts, _: FactorItemItemGenerator(artifacts),
    "bundle": lambda artifacts, _: BundleGenerator(artifacts),
    "upgrade": UpgradeGenerator,
    "replenish": lambda artifacts, _: ReplenishmentGenerator(artifacts),
    "segment popularity": SegmentPopularityGenerator,
    "every generator": lambda artifacts, facts: build_generator(
        artifacts,
        HybridWeights(
            factor_cross_sell=0.5, bundle=0.5, upgrade=0.3, replenish=1.0, segment_popular=0.3
        ),
        facts=facts,
    ),
}
EXPECTED_KINDS = {
    "factor item-item": {Kind.CROSS_SELL},
    "bundle": {Kind.BUNDLE},
    "upgrade": {Kind.UPGRADE},
    "replenish": {Kind.REPLENISH},
    "segment popularity": {Kind.POPULAR},
    "every generator": set(Kind),
}
REQUESTS: dict[str, tuple[list[int], int | None, GenerationContext | None]] = {
    "cold start, no context": ([], None, None),
    "basket": ([A0], None, GenerationContext(region="N")),
    "basket, customer, due": ([A0, B0], C00, due(7)),
    "customer only, region": ([], C15, GenerationContext(now=LAST_ORDER, region="S")),
    "repeated anchors": ([A1, A1, A2], C00, due(30)),
    "lonely anchor, unknown region": ([Z], None, GenerationContext(region="nowhere")),
    "new item's category": ([], None, GenerationContext(categories=("cat-b", "no-such"))),
}


@pytest.mark.parametrize("generator_name", GENERATORS)
@pytest.mark.parametrize("request_name", REQUESTS)
@pytest.mark.parametrize("count", [0, 1, 3, 300])
def test_generator_contract(
    artifacts: ModelArtifacts,
    facts: ItemFacts,
    generator_name: str,
    request_name: str,
    count: int,
) -> None:
    """Every generator returns at most count unique in-range items, typed parallel arrays,
    scores in [0, 1] sorted descending, and only its own kinds; missing context never raises."""
    generator = GENERATORS[generator_name](artifacts, facts)
    anchors, user_row, context = REQUESTS[request_name]

    candidates = generator.generate(
        anchors=anchors_of(anchors), user_row=user_row, count=count, context=context
    )

    assert isinstance(candidates, Candidates)
    assert len(candidates) <= count
    assert candidates.item_idx.dtype == np.int32
    assert candidates.score.dtype == np.float32
    assert candidates.kind.dtype == np.int8
    assert candidates.item_idx.shape == candidates.score.shape == candidates.kind.shape
    assert np.unique(candidates.item_idx).size == len(candidates)
    assert ((candidates.item_idx >= 0) & (candidates.item_idx < N_ITEMS)).all()
    assert ((candidates.score >= 0) & (candidates.score <= 1)).all()
    assert (np.diff(candidates.score) <= 0).all()
    assert {Kind(kind) for kind in candidates.kind.tolist()} <= EXPECTED_KINDS[generator_name]


@pytest.mark.parametrize("generator_name", ["factor item-item", "bundle", "upgrade"])
@pytest.mark.parametrize("bad_anchor", [-1, N_ITEMS])
def test_generators_reject_anchors_outside_the_model(
    artifacts: ModelArtifacts, facts: ItemFacts, generator_name: str, bad_anchor: int
) -> None:
    """An anchor index outside the model is a caller bug: a ValueError, not a silent wrap."""
    generator = GENERATORS[generator_name](artifacts, facts)

    with pytest.raises(ValueError, match="anchor"):
        generator.generate(anchors=anchors_of([bad_anchor]), user_row=None, count=5)


def test_kinds_keep_their_wire_values() -> None:
    """Kind values are stable on the wire: the first three never move, new ones append."""
    assert {kind.wire: kind.value for kind in Kind} == {
        "cross_sell": 0,
        "personal": 1,
        "popular": 2,
        "bundle": 3,
        "upgrade": 4,
        "replenish": 5,
        "substitute": 6,
    }


# -- factor item-item --------------------------------------------------------------------


def test_factor_item_item_proposes_the_anchor_block(artifacts: ModelArtifacts) -> None:
    """For anchor A0 the nearest items by ALS factors are the rest of block A."""
    candidates = FactorItemItemGenerator(artifacts).generate(
        anchors=anchors_of([A0]), user_row=None, count=4
    )

    assert set(candidates.item_idx.tolist()) == {A1, A2, A3, A4}
    assert candidates.score[0] == 1.0
    assert (candidates.kind == Kind.CROSS_SELL).all()


def test_factor_item_item_has_nothing_for_an_item_no_customer_bought(
    artifacts: ModelArtifacts,
) -> None:
    """Z was only bought by a guest: its factors are zero, so it has no neighbours."""
    candidates = FactorItemItemGenerator(artifacts).generate(
        anchors=anchors_of([Z]), user_row=None, count=10
    )

    assert len(candidates) == 0


# -- bundles -----------------------------------------------------------------------------


def test_bundle_ranks_by_lift(artifacts: ModelArtifacts) -> None:
    """For A1: A2, A3, A4 have lift 68/30 and A0 68/32 (it also sells alone); scores are
    1 - 1/lift divided by the best."""
    candidates = BundleGenerator(artifacts).generate(
        anchors=anchors_of([A1]), user_row=None, count=10
    )

    assert candidates.item_idx.tolist() == [A2, A3, A4, A0]
    best, a0 = 1 - 30 / 68, 1 - 32 / 68
    np.testing.assert_allclose(candidates.score, [1.0, 1.0, 1.0, a0 / best], rtol=1e-6)
    assert (candidates.kind == Kind.BUNDLE).all()


def test_bundle_minimum_support_and_lift_filter_pairs() -> None:
    """A0-A4 is in 27 orders: a support floor of 28 drops it; a lift floor of 2.2 drops
    A1-A0 (lift 2.125) but keeps A1-A2 (2.27)."""
    lines = weekly_checkerboard()
    supported = train(lines, factors=2, neighbours=8, bundle_min_support=28)
    lifted = train(lines, factors=2, neighbours=8, bundle_min_lift=2.2)

    by_support = BundleGenerator(supported).generate(
        anchors=anchors_of([A0]), user_row=None, count=9
    )
    by_lift = BundleGenerator(lifted).generate(anchors=anchors_of([A1]), user_row=None, count=9)

    assert by_support.item_idx.tolist() == [A1, A2, A3]
    assert by_lift.item_idx.tolist() == [A2, A3, A4]


# -- upgrades ----------------------------------------------------------------------------


def test_upgrade_is_same_category_dearer_richer_and_within_reach(
    artifacts: ModelArtifacts, facts: ItemFacts
) -> None:
    """A0's upgrades are A1 and A4: A2 earns less margin, A3 costs over 3x, B is another
    category."""
    candidates = UpgradeGenerator(artifacts, facts).generate(
        anchors=anchors_of([A0]), user_row=None, count=10
    )

    assert set(candidates.item_idx.tolist()) == {A1, A4}
    assert (candidates.kind == Kind.UPGRADE).all()
    assert (candidates.score > 0.5).all()  # block A items are near-parallel in factor space


def test_upgrade_price_reach_is_a_parameter(artifacts: ModelArtifacts, facts: ItemFacts) -> None:
    """With a 5x reach, A3 (4x A0's price, far more margin) becomes an upgrade too."""
    candidates = UpgradeGenerator(artifacts, facts, max_price_ratio=5.0).generate(
        anchors=anchors_of([A0]), user_row=None, count=10
    )

    assert set(candidates.item_idx.tolist()) == {A1, A3, A4}


def test_upgrade_of_the_richest_item_is_nothing(
    artifacts: ModelArtifacts, facts: ItemFacts
) -> None:
    """A4 already has the best margin within reach: no upgrade; Z is alone in its category."""
    generator = UpgradeGenerator(artifacts, facts)

    assert len(generator.generate(anchors=anchors_of([A4]), user_row=None, count=10)) == 0
    assert len(generator.generate(anchors=anchors_of([Z]), user_row=None, count=10)) == 0


def test_upgrade_needs_facts_for_every_model_item(artifacts: ModelArtifacts) -> None:
    """Facts for another catalog are refused at construction."""
    wrong = ItemFacts.from_items(artifacts.item_skus[:-1], item_master())

    with pytest.raises(ValueError, match="item facts"):
        UpgradeGenerator(artifacts, wrong)


def test_item_facts_align_with_model_items(artifacts: ModelArtifacts) -> None:
    """Facts follow the model's item order; SKUs missing from the master get -1 and NaN."""
    facts = ItemFacts.from_items(["A1", "NEW", "Z"], item_master())

    assert facts.categories == ("cat-a", "cat-b", "cat-z")
    assert facts.category_code.tolist() == [0, -1, 2]
    np.testing.assert_array_equal(facts.unit_price, [12.0, np.nan, 5.0])


def test_item_facts_from_the_mirrored_catalog_match_the_item_master(
    artifacts: ModelArtifacts,
) -> None:
    """The service's catalog arrays give the same facts as the item master frame, with the
    model's items the catalog lacks marked unknown."""
    master = validate_table(
        item_master().filter(pl.col("sku") != "Z").with_columns(name=pl.col("sku")),
        ITEMS,
        file="items",
    )
    catalog = catalog_from_items(master)

    from_catalog = ItemFacts.from_catalog(catalog, catalog.positions(artifacts.item_skus))
    from_frame = ItemFacts.from_items(artifacts.item_skus, master)

    assert from_catalog.categories == from_frame.categories == ("cat-a", "cat-b")
    np.testing.assert_array_equal(from_catalog.category_code, from_frame.category_code)
    np.testing.assert_array_equal(from_catalog.unit_price, from_frame.unit_price)
    np.testing.assert_array_equal(from_catalog.unit_cost, from_frame.unit_cost)
    assert from_catalog.category_code[Z] == -1


# -- replenishment -----------------------------------------------------------------------


def test_replenishment_is_due_on_the_weekly_cycle(artifacts: ModelArtifacts) -> None:
    """c00 bought A0-A3 weekly, last on LAST_ORDER: a week later all four are due, score 1,
    in item order; A4 (never bought) is not proposed."""
    candidates = ReplenishmentGenerator(artifacts).generate(
        anchors=anchors_of([]), user_row=C00, count=10, context=due(7)
    )

    assert candidates.item_idx.tolist() == [A0, A1, A2, A3]
    np.testing.assert_allclose(candidates.score, 1.0)
    assert (candidates.kind == Kind.REPLENISH).all()


@pytest.mark.parametrize(
    ("days", "expected_score"),
    [(3, None), (5.5, None), (6, 6 / 7), (14, 0.5), (70, 0.1)],
)
def test_replenishment_tolerance_and_lateness(
    artifacts: ModelArtifacts, days: float, expected_score: float | None
) -> None:
    """Due from interval x (1 - 0.2) = 5.6 days on; the score is min(r, 1/r), r = elapsed /
    interval: early within the tolerance or late both score below 1."""
    candidates = ReplenishmentGenerator(artifacts, tolerance=0.2).generate(
        anchors=anchors_of([]), user_row=C00, count=10, context=due(days)
    )

    if expected_score is None:
        assert len(candidates) == 0
    else:
        np.testing.assert_allclose(candidates.score, expected_score, rtol=1e-6)


def test_replenishment_needs_now_and_a_customer(artifacts: ModelArtifacts) -> None:
    """Without a time or without a customer nothing is due; a bad user row raises."""
    generator = ReplenishmentGenerator(artifacts)

    assert len(generator.generate(anchors=anchors_of([]), user_row=C00, count=5)) == 0
    assert (
        len(generator.generate(anchors=anchors_of([]), user_row=None, count=5, context=due(7))) == 0
    )
    with pytest.raises(ValueError, match="user_row"):
        generator.generate(anchors=anchors_of([]), user_row=99, count=5, context=due(7))


def test_replenishment_on_irregular_purchases() -> None:
    """Median interval over purchase days: milk on days 0, 7, 14, 21 (twice on day 21),
    coffee on days 0, 30, 60, soap twice (no cycle). On day 88 coffee is due (28/30 of its
    interval), milk long overdue (67/7 of its interval), soap never proposed."""
    baskets = [
        ("d00", "r1", ["MILK", "COFFEE", "SOAP"]),
        ("d07", "r1", ["MILK"]),
        ("d14", "r1", ["MILK", "SOAP"]),
        ("d21", "r1", ["MILK"]),
        ("d21b", "r1", ["MILK"]),
        ("d30", "r1", ["COFFEE"]),
        ("d60", "r1", ["COFFEE"]),
    ]
    day_of = pl.col("order_id").str.slice(1, 2).cast(pl.Int64)
    lines = order_lines(baskets).with_columns(
        ordered_at=pl.lit(FIRST_ORDER) + pl.duration(days=day_of) + pl.duration(hours=9)
    )
    artifacts = train(lines, factors=2, neighbours=3)
    generator = ReplenishmentGenerator(artifacts, tolerance=0.2)

    candidates = generator.generate(
        anchors=anchors_of([]),
        user_row=0,
        count=10,
        context=GenerationContext(now=FIRST_ORDER + timedelta(days=88)),
    )

    skus = [artifacts.item_skus[row] for row in candidates.item_idx.tolist()]
    assert skus == ["COFFEE", "MILK"]
    np.testing.assert_allclose(candidates.score, [28 / 30, 7 / 67], rtol=1e-6)


# -- popularity by category and region ---------------------------------------------------


def test_segment_popularity_by_region(artifacts: ModelArtifacts) -> None:
    """Region S's orders are block B's only: its best sellers are B0-B4, all scored 1.0.
    Region N (block A, the B0 and A0 guests, the Z guest) ranks A0, A1-A3, A4, B0, Z."""
    generator = SegmentPopularityGenerator(artifacts)

    south = generator.generate(
        anchors=anchors_of([]), user_row=None, count=10, context=GenerationContext(region="S")
    )
    north = generator.generate(
        anchors=anchors_of([]), user_row=None, count=10, context=GenerationContext(region="N")
    )

    assert south.item_idx.tolist() == [B0, B1, B2, B3, B4]
    np.testing.assert_allclose(south.score, 1.0)
    assert north.item_idx.tolist() == [A0, A1, A2, A3, A4, B0, Z]
    np.testing.assert_allclose(north.score[[0, 1, 4, 5]], [1.0, 30 / 32, 27 / 32, 5 / 32])


def test_segment_popularity_by_category(artifacts: ModelArtifacts, facts: ItemFacts) -> None:
    """Anchor B1 (cat-b) in region N: cat-b items ranked by region N's orders (only B0 sold
    there); a new item's category with no region: that category by overall popularity."""
    generator = SegmentPopularityGenerator(artifacts, facts)

    of_anchor = generator.generate(
        anchors=anchors_of([B1]), user_row=None, count=10, context=GenerationContext(region="N")
    )
    of_new_item = generator.generate(
        anchors=anchors_of([]),
        user_row=None,
        count=3,
        context=GenerationContext(categories=("cat-b",)),
    )

    assert of_anchor.item_idx.tolist() == [B0]
    assert of_new_item.item_idx.tolist() == [B0, B1, B2]
    np.testing.assert_allclose(of_new_item.score, [1.0, 30 / 35, 30 / 35], rtol=1e-6)


def test_segment_popularity_without_a_segment_is_nothing(
    artifacts: ModelArtifacts, facts: ItemFacts
) -> None:
    """No category and no known region: overall popularity is another generator's job."""
    generator = SegmentPopularityGenerator(artifacts, facts)

    candidates = generator.generate(
        anchors=anchors_of([]), user_row=None, count=5, context=GenerationContext(region="X")
    )

    assert len(candidates) == 0


# -- weights, hybrid and context ---------------------------------------------------------


def test_hybrid_passes_the_context_to_its_generators(artifacts: ModelArtifacts) -> None:
    """A hybrid with replenishment proposes c00's due items as replenish, given a time."""
    hybrid = build_generator(
        artifacts, HybridWeights(cross_sell=0, personal=0, popular=0.1, replenish=1.0)
    )
    assert isinstance(hybrid, HybridGenerator)

    with_time = hybrid.generate(anchors=anchors_of([]), user_row=C00, count=4, context=due(7))
    without = hybrid.generate(anchors=anchors_of([]), user_row=C00, count=4)

    assert with_time.item_idx.tolist() == [A0, A1, A2, A3]
    assert (with_time.kind == Kind.REPLENISH).all()
    assert (without.kind == Kind.POPULAR).all()


def test_one_weight_builds_that_generator_alone(artifacts: ModelArtifacts) -> None:
    """A single non-zero weight gives the generator itself, not a hybrid around it."""
    assert isinstance(
        build_generator(artifacts, HybridWeights.only("popular")), PopularityGenerator
    )
    assert isinstance(build_generator(artifacts, HybridWeights.only("bundle")), BundleGenerator)


def test_bad_weights_are_refused(artifacts: ModelArtifacts) -> None:
    """Negative weights, no weight at all, upgrades without item facts and unknown names are
    refused with the reason."""
    with pytest.raises(ValueError, match=">= 0"):
        build_generator(artifacts, HybridWeights(bundle=-1.0))
    with pytest.raises(ValueError, match="at least one"):
        build_generator(artifacts, HybridWeights(cross_sell=0, personal=0, popular=0))
    with pytest.raises(ValueError, match="item master"):
        build_generator(artifacts, HybridWeights(upgrade=1.0))
    with pytest.raises(ValueError, match="popularity"):
        build_generator(artifacts, HybridWeights(popular=0))
    with pytest.raises(ValueError, match="no generator weight"):
        HybridWeights.only("substitute")


def test_format_1_artifacts_make_the_new_generators_silent(artifacts: ModelArtifacts) -> None:
    """Artifacts without the optional parts (format 1) give empty candidates, not errors."""
    old = dataclasses.replace(
        artifacts,
        factor_neighbours=None,
        bundles=None,
        region_popularity=None,
        purchase_cycles=None,
    )

    for generator in (
        FactorItemItemGenerator(old),
        BundleGenerator(old),
        ReplenishmentGenerator(old),
        SegmentPopularityGenerator(old),
    ):
        result = generator.generate(
            anchors=anchors_of([A0]),
            user_row=C00,
            count=5,
            context=GenerationContext(now=LAST_ORDER + timedelta(days=7), region="N"),
        )
        assert len(result) == 0, type(generator).__name__


# -- real data ---------------------------------------------------------------------------

TA_FENG = Path("/work/shared/data/ta-feng/ta_feng.csv.zip")


@pytest.mark.shared_data
def test_every_generator_proposes_on_ta_feng(tmp_path: Path) -> None:
    """Trained on Ta-Feng's November: a real basket of a regular customer at their store gets
    candidates from every generator, and due replenishments exist."""
    if not TA_FENG.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{TA_FENG} is required in CI")
        pytest.skip(f"{TA_FENG} not present")
    from models.data.adapters import import_ta_feng

    import_ta_feng(TA_FENG, tmp_path, seed=7)
    orders = pl.read_parquet(tmp_path / "orders.parquet").filter(
        pl.col("ordered_at") < datetime(2000, 12, 1)
    )
    nodes = pl.read_parquet(tmp_path / "nodes.parquet")
    artifacts = train(orders, factors=16, iterations=4, neighbours=20, nodes=nodes)
    facts = ItemFacts.from_items(artifacts.item_skus, pl.read_parquet(tmp_path / "items.parquet"))
    cycles = artifacts.purchase_cycles
    assert cycles is not None
    # The customer with the most purchase cycles, and their last basket.
    user_row = int(np.argmax(np.diff(cycles.indptr)))
    customer = artifacts.user_ids[user_row]
    last = orders.filter(pl.col("customer_id") == customer).sort("ordered_at").tail(1)
    basket = orders.filter(pl.col("order_id") == last["order_id"][0])
    rows = {sku: row for row, sku in enumerate(artifacts.item_skus)}
    anchors = anchors_of([rows[sku] for sku in basket["sku"].to_list()])
    context = GenerationContext(now=datetime(2000, 12, 31), region=basket["store_id"][0][2:])

    for name in ("factor_cross_sell", "bundle", "upgrade", "replenish", "segment_popular"):
        generator = build_generator(artifacts, HybridWeights.only(name), facts=facts)
        candidates = generator.generate(
            anchors=anchors, user_row=user_row, count=50, context=context
        )
        assert len(candidates) > 0, name
