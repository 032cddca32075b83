"""Candidate generators: one contract test run against each, then known answers per generator.

Artifacts come from a real implicit fit on a checkerboard (see ``checkerboard``): items 0-4
(block A) and 5-9 (block B) are only ever bought within their block, item 10 (Z) alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from models.candidates import (
    AlsGenerator,
    HybridGenerator,
    ItemItemGenerator,
    PopularityGenerator,
    artifact_index,
    item_rows_for,
    user_row_for,
)
from models.interfaces import CandidateGenerator, Candidates, Kind, ModelArtifacts
from models.training import train
from tests.models.builders import checkerboard

N_ITEMS = 11
A0, A1, A2, A3, A4, B0, Z = 0, 1, 2, 3, 4, 5, 10
C00, C15 = 0, 15  # user rows: a block-A customer who never bought A4, a block-B customer


POPULARITY_ORDER = [B0, A0, A1, A2, A3, 6, 7, 8, 9, A4, Z]  # ties in item index order


@pytest.fixture(scope="module")
def artifacts() -> ModelArtifacts:
    # Two factors for two blocks, as implicit's own checkerboard tests keep the rank small.
    return train(checkerboard(), factors=2, neighbours=8)


GENERATORS: dict[str, Callable[[ModelArtifacts], CandidateGenerator]] = {
    "item-item": ItemItemGenerator,
    "als": AlsGenerator,
    "popularity": PopularityGenerator,
    "hybrid": HybridGenerator.from_artifacts,
}
EXPECTED_KINDS = {
    "item-item": {Kind.CROSS_SELL},
    "als": {Kind.PERSONAL},
    "popularity": {Kind.POPULAR},
    "hybrid": {Kind.CROSS_SELL, Kind.PERSONAL, Kind.POPULAR},
}
REQUESTS = {
    "cold start": ([], None),
    "basket": ([A0], None),
    "basket and customer": ([A0, B0], C00),
    "customer only": ([], C15),
    "repeated anchors": ([A1, A1, A2], C00),
    "lonely anchor": ([Z], None),
}


def anchors_of(rows: list[int]) -> np.ndarray[tuple[int], np.dtype[np.int32]]:
    return np.asarray(rows, dtype=np.int32)


@pytest.mark.parametrize("generator_name", GENERATORS)
@pytest.mark.parametrize("request_name", REQUESTS)
@pytest.mark.parametrize("count", [0, 1, 3, 300])
def test_generator_contract(
    artifacts: ModelArtifacts, generator_name: str, request_name: str, count: int
) -> None:
    """Every generator returns at most count unique in-range items, typed parallel arrays,
    scores in [0, 1] sorted descending, and only its own kinds; empty anchors never raise."""
    generator = GENERATORS[generator_name](artifacts)
    anchors, user_row = REQUESTS[request_name]

    candidates = generator.generate(anchors=anchors_of(anchors), user_row=user_row, count=count)

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
    assert generator.kind in EXPECTED_KINDS[generator_name]


@pytest.mark.parametrize("generator_name", ["item-item", "hybrid"])  # the others ignore anchors
@pytest.mark.parametrize("bad_anchor", [-1, N_ITEMS])
def test_generators_reject_anchors_outside_the_model(
    artifacts: ModelArtifacts, generator_name: str, bad_anchor: int
) -> None:
    """An anchor index outside the model is a caller bug: a ValueError, not a silent wrap."""
    generator = GENERATORS[generator_name](artifacts)

    with pytest.raises(ValueError, match="anchor"):
        generator.generate(anchors=anchors_of([bad_anchor]), user_row=None, count=5)


# -- item-item ---------------------------------------------------------------------------


def test_item_item_proposes_the_anchor_block_without_the_anchor(artifacts: ModelArtifacts) -> None:
    """For anchor A0 the candidates are exactly A1-A4, the best scored 1.0."""
    candidates = ItemItemGenerator(artifacts).generate(
        anchors=anchors_of([A0]), user_row=None, count=10
    )

    assert candidates.item_idx.tolist() == [A1, A2, A3, A4]
    assert candidates.score[0] == 1.0
    assert (candidates.kind == Kind.CROSS_SELL).all()


def test_item_item_sums_evidence_over_anchors(artifacts: ModelArtifacts) -> None:
    """With anchors A1 and A2, A3 (next to both at 1.0) leads, then A0 and A4; no anchor."""
    candidates = ItemItemGenerator(artifacts).generate(
        anchors=anchors_of([A1, A2]), user_row=None, count=10
    )

    assert candidates.item_idx.tolist() == [A3, A0, A4]
    # Sums 2 * 1.0, 2 * cos(A1, A0), 2 * cos(A1, A4), divided by the largest.
    np.testing.assert_allclose(
        candidates.score, [1.0, 30 / np.sqrt(32 * 30), 27 / np.sqrt(30 * 27)], rtol=1e-6
    )


def test_item_item_mixes_blocks_for_a_mixed_basket(artifacts: ModelArtifacts) -> None:
    """A basket with A0 and B0 gets both blocks' other items, and neither anchor."""
    candidates = ItemItemGenerator(artifacts).generate(
        anchors=anchors_of([A0, B0]), user_row=None, count=300
    )

    assert sorted(candidates.item_idx.tolist()) == [1, 2, 3, 4, 6, 7, 8, 9]


def test_item_item_has_nothing_for_an_item_never_co_bought(artifacts: ModelArtifacts) -> None:
    """Z was only ever bought alone: no cross-sell candidates, no error."""
    candidates = ItemItemGenerator(artifacts).generate(
        anchors=anchors_of([Z]), user_row=None, count=10
    )

    assert len(candidates) == 0


# -- ALS ---------------------------------------------------------------------------------


def test_als_needs_a_customer(artifacts: ModelArtifacts) -> None:
    """Without a user row (a guest, or no consent) ALS proposes nothing."""
    candidates = AlsGenerator(artifacts).generate(anchors=anchors_of([A0]), user_row=None, count=5)

    assert len(candidates) == 0


def test_als_ranks_the_customers_block_first(artifacts: ModelArtifacts) -> None:
    """For c00 (block A, never bought A4) every block-A item, A4 included, ranks above block B."""
    candidates = AlsGenerator(artifacts).generate(
        anchors=anchors_of([]), user_row=C00, count=N_ITEMS
    )

    ranking = candidates.item_idx.tolist()
    assert set(ranking[:5]) == {A0, A1, A2, A3, A4}
    assert (candidates.kind == Kind.PERSONAL).all()


def test_als_rejects_an_unknown_user_row(artifacts: ModelArtifacts) -> None:
    """A user row outside user_factors raises ValueError rather than indexing from the end."""
    with pytest.raises(ValueError, match="user_row"):
        AlsGenerator(artifacts).generate(anchors=anchors_of([]), user_row=-1, count=5)


# -- popularity --------------------------------------------------------------------------


def test_popularity_follows_order_share(artifacts: ModelArtifacts) -> None:
    """Popularity ranks by share of orders, ties by item index, the top seller scored 1.0."""
    candidates = PopularityGenerator(artifacts).generate(
        anchors=anchors_of([]), user_row=None, count=300
    )

    assert candidates.item_idx.tolist() == POPULARITY_ORDER
    np.testing.assert_allclose(candidates.score[:3], [1.0, 32 / 35, 30 / 35], rtol=1e-6)


def test_popularity_results_cannot_corrupt_the_ranking(artifacts: ModelArtifacts) -> None:
    """The arrays handed out are read-only views: a caller cannot change later answers."""
    candidates = PopularityGenerator(artifacts).generate(
        anchors=anchors_of([]), user_row=None, count=3
    )

    with pytest.raises(ValueError, match="read-only"):
        candidates.score[0] = 0


# -- hybrid ------------------------------------------------------------------------------


def test_hybrid_cold_start_is_popularity(artifacts: ModelArtifacts) -> None:
    """No anchors and no customer: the popularity order, kind popular, top scored 1.0."""
    candidates = HybridGenerator.from_artifacts(artifacts).generate(
        anchors=anchors_of([]), user_row=None, count=5
    )

    assert candidates.item_idx.tolist() == POPULARITY_ORDER[:5]
    assert (candidates.kind == Kind.POPULAR).all()
    assert candidates.score[0] == pytest.approx(1.0)


@pytest.mark.parametrize("request_name", REQUESTS)
def test_hybrid_backfills_to_count(artifacts: ModelArtifacts, request_name: str) -> None:
    """Whatever the request, the hybrid returns count items while the catalog has them."""
    anchors, user_row = REQUESTS[request_name]
    hybrid = HybridGenerator.from_artifacts(artifacts)

    for count in (1, 7, N_ITEMS):
        result = hybrid.generate(anchors=anchors_of(anchors), user_row=user_row, count=count)
        assert len(result) == count
    everything = hybrid.generate(anchors=anchors_of(anchors), user_row=user_row, count=300)
    assert len(everything) == N_ITEMS


def test_hybrid_weighs_evidence_and_names_the_main_source(artifacts: ModelArtifacts) -> None:
    """Basket A0, no customer: A1-A4 lead as cross-sell with score (w_cs * s_cs + w_pop * s_pop)
    / (w_cs + w_pop); the rest follow as popular."""
    hybrid = HybridGenerator.from_artifacts(artifacts, cross_sell_weight=1.0, popular_weight=0.2)

    candidates = hybrid.generate(anchors=anchors_of([A0]), user_row=None, count=N_ITEMS)

    assert candidates.item_idx[:4].tolist() == [A1, A2, A3, A4]
    assert (candidates.kind[:4] == Kind.CROSS_SELL).all()
    assert (candidates.kind[4:] == Kind.POPULAR).all()
    assert candidates.score[0] == pytest.approx((1.0 * 1.0 + 0.2 * 30 / 35) / 1.2, rel=1e-6)
    # A0 is the anchor, but the hybrid excludes nothing itself: it comes back as popular.
    assert A0 in candidates.item_idx[4:].tolist()


def test_hybrid_kind_is_the_largest_contribution(artifacts: ModelArtifacts) -> None:
    """When popularity outweighs cross-sell, shared items are labelled popular."""
    hybrid = HybridGenerator.from_artifacts(artifacts, cross_sell_weight=0.01, popular_weight=1.0)

    candidates = hybrid.generate(anchors=anchors_of([A0]), user_row=None, count=N_ITEMS)

    assert (candidates.kind == Kind.POPULAR).all()


def test_hybrid_personal_candidates_for_a_known_customer(artifacts: ModelArtifacts) -> None:
    """A block-B customer with no basket gets personal block-B candidates first."""
    candidates = HybridGenerator.from_artifacts(artifacts).generate(
        anchors=anchors_of([]), user_row=C15, count=5
    )

    assert set(candidates.item_idx.tolist()) == {5, 6, 7, 8, 9}
    assert (candidates.kind == Kind.PERSONAL).all()


def test_hybrid_ties_break_on_item_index(artifacts: ModelArtifacts) -> None:
    """Equal combined scores are ordered by ascending item index."""
    candidates = HybridGenerator.from_artifacts(artifacts).generate(
        anchors=anchors_of([]), user_row=None, count=N_ITEMS
    )

    tied = candidates.item_idx[candidates.score == candidates.score[2]].tolist()
    assert tied == sorted(tied)
    assert len(tied) == 7  # A1-A3 and B1-B4, all in 30 of 68 orders


def test_hybrid_needs_popularity_and_matching_weights(artifacts: ModelArtifacts) -> None:
    """A hybrid without a popularity source (nothing to backfill from) or with mismatched or
    non-positive weights is refused at construction."""
    item_item = ItemItemGenerator(artifacts)
    popularity = PopularityGenerator(artifacts)

    with pytest.raises(ValueError, match="popularity"):
        HybridGenerator([item_item], [1.0])
    with pytest.raises(ValueError, match="one weight per generator"):
        HybridGenerator([item_item, popularity], [1.0])
    with pytest.raises(ValueError, match="positive"):
        HybridGenerator([item_item, popularity], [1.0, 0.0])


# -- id lookups --------------------------------------------------------------------------


def test_user_row_for_known_unknown_and_guest(artifacts: ModelArtifacts) -> None:
    """Known customers map to their row; unknown customers and guests to None."""
    assert user_row_for(artifacts, "c15") == C15
    assert user_row_for(artifacts, "c99") is None
    assert user_row_for(artifacts, None) is None


def test_item_rows_for_reports_unknown_skus(artifacts: ModelArtifacts) -> None:
    """Known SKUs map to model indexes in request order; unknown ones are listed apart."""
    rows, unknown = item_rows_for(artifacts, ["B0", "NEW-1", "A0", "NEW-2"])

    assert rows.dtype == np.int32
    assert rows.tolist() == [B0, A0]
    assert unknown == ["NEW-1", "NEW-2"]


def test_index_is_built_once_per_artifacts(artifacts: ModelArtifacts) -> None:
    """The SKU and customer dicts are cached per artifacts object, not rebuilt per call."""
    assert artifact_index(artifacts) is artifact_index(artifacts)
    other = train(checkerboard(), factors=2, neighbours=8)
    assert artifact_index(other) is not artifact_index(artifacts)
