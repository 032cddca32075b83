"""The hybrid's compiled pass (models.generators.CompiledHybridGenerator) against the hybrid it
replaces (models.candidates.HybridGenerator), on real implicit fits of the bundled Online
Retail sample and of a checkerboard with regions: the same lists, bit for bit, for random
requests of every shape.
"""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from models.candidates import HybridGenerator, ItemItemGenerator
from models.data.adapters import import_online_retail
from models.data.contract import read_orders, read_snapshot_dir
from models.generators import CompiledHybridGenerator, HybridWeights, ItemFacts, build_generator
from models.interfaces import Candidates, GenerationContext, ModelArtifacts
from models.training import train
from rules.catalog import catalog_from_items
from tests.models.test_generators import NODES, item_master, weekly_checkerboard

SAMPLE = Path(__file__).resolve().parents[2] / "models" / "sample" / "online_retail_sample.parquet"
MIXES = {
    "default policy": HybridWeights(
        factor_cross_sell=0.5, bundle=0.5, upgrade=0.2, replenish=1.0, segment_popular=0.2
    ),
    "basic three": HybridWeights(),
    "without anchors' sources": HybridWeights(cross_sell=0.0, segment_popular=0.7),
    "upgrades and bundles": HybridWeights(personal=0.0, bundle=2.0, upgrade=1.0),
}


class ShiftedItemItem(ItemItemGenerator):
    """A generator the pass does not know (a subclass may generate otherwise): generated in
    Python, in its place among the sources."""

    def generate(self, **kwargs: object) -> Candidates:
        candidates = super().generate(**kwargs)  # type: ignore[arg-type]
        return Candidates(
            item_idx=candidates.item_idx[::-1].copy(),
            score=candidates.score * np.float32(0.5),
            kind=candidates.kind,
        )


@pytest.fixture(scope="module", params=["online retail sample", "checkerboard with regions"])
def model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ModelArtifacts, ItemFacts]:
    """The sample as `upsell train` trains on an import (its orders name no store, so no
    regional popularity), and the generator tests' checkerboard, whose stores have regions."""
    if request.param == "checkerboard with regions":
        artifacts = train(weekly_checkerboard(), factors=2, neighbours=8, nodes=NODES)
        assert artifacts.region_popularity is not None
        return artifacts, ItemFacts.from_items(artifacts.item_skus, item_master())
    contract = tmp_path_factory.mktemp("contract")
    import_online_retail(SAMPLE, contract, seed=7)
    snapshot = read_snapshot_dir(contract)
    artifacts = train(read_orders(contract / "orders.parquet"), nodes=snapshot.nodes)
    catalog = catalog_from_items(snapshot.items)
    return artifacts, ItemFacts.from_catalog(catalog, catalog.positions(artifacts.item_skus))


def requests(
    artifacts: ModelArtifacts, facts: ItemFacts, count: int, *, seed: int
) -> list[dict[str, object]]:
    """Random anchors (none, repeated, several), guests and customers, counts from one to
    more than the catalog, known, unknown and no regions, and new items' categories."""
    rng = random.Random(seed)
    n_items, n_users = len(artifacts.item_skus), len(artifacts.user_ids)
    known = list(artifacts.region_popularity.regions) if artifacts.region_popularity else []
    regions = [None, "NOWHERE", *known]
    made = []
    for _ in range(count):
        anchors = [rng.randrange(n_items) for _ in range(rng.choice([0, 1, 1, 2, 3, 6]))]
        made.append(
            {
                "anchors": np.array(anchors + anchors[:1], dtype=np.int32),
                "user_row": rng.choice([None, None, rng.randrange(n_users)]),
                "count": rng.choice([1, 5, 40, 300, n_items + 10]),
                "context": GenerationContext(
                    now=datetime(2011, 12, 1) if rng.random() < 0.8 else None,
                    region=rng.choice(regions),
                    categories=tuple(rng.sample(facts.categories, k=rng.choice([0, 0, 1, 2]))),
                ),
            }
        )
    return made


def assert_same(expected: Candidates, got: Candidates) -> None:
    for column in ("item_idx", "score", "kind"):
        want, have = getattr(expected, column), getattr(got, column)
        assert have.dtype == want.dtype, column
        np.testing.assert_array_equal(have, want, err_msg=column)


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_the_pass_gives_the_hybrids_lists(
    model: tuple[ModelArtifacts, ItemFacts], mix: str
) -> None:
    artifacts, facts = model
    generator = build_generator(artifacts, MIXES[mix], facts=facts)
    assert isinstance(generator, CompiledHybridGenerator)
    proposed = 0
    for request in requests(artifacts, facts, 300, seed=len(mix)):
        expected = HybridGenerator.generate(generator, **request)  # type: ignore[arg-type]
        got = generator.generate(**request)  # type: ignore[arg-type]
        assert_same(expected, got)
        proposed += len(got)
    assert proposed > 0


def test_a_generator_the_pass_does_not_know_keeps_its_place(
    model: tuple[ModelArtifacts, ItemFacts],
) -> None:
    artifacts, facts = model
    served = build_generator(artifacts, MIXES["default policy"], facts=facts)
    assert isinstance(served, HybridGenerator)
    sources = [*served._generators[:2], ShiftedItemItem(artifacts), *served._generators[2:]]
    weights = [*served._weights[:2], 0.7, *served._weights[2:]]
    compiled = CompiledHybridGenerator(sources, weights)
    reference = HybridGenerator(sources, weights)
    for request in requests(artifacts, facts, 150, seed=3):
        assert_same(reference.generate(**request), compiled.generate(**request))  # type: ignore[arg-type]


def test_anchors_and_customers_outside_the_model_are_refused_as_before(
    model: tuple[ModelArtifacts, ItemFacts],
) -> None:
    artifacts, facts = model
    generator = build_generator(artifacts, MIXES["default policy"], facts=facts)
    n_items, n_users = len(artifacts.item_skus), len(artifacts.user_ids)
    with pytest.raises(ValueError, match=rf"anchor item indexes must be in \[0, {n_items}\)"):
        generator.generate(anchors=np.array([n_items], np.int32), user_row=None, count=5)
    with pytest.raises(ValueError, match=f"user_row {n_users} out of range"):
        generator.generate(anchors=np.array([0], np.int32), user_row=n_users, count=5)
    nothing = generator.generate(anchors=np.array([0], np.int32), user_row=None, count=0)
    assert len(nothing) == 0
