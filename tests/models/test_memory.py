"""The guest candidate memory (models.memory) on real implicit fits: a remembered list is the
list the generator gives, under exactly the inputs it depends on, and nothing can change it.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from models.generators import HybridWeights, ItemFacts, build_generator
from models.interfaces import CandidateGenerator, Candidates, GenerationContext, ModelArtifacts
from models.memory import GuestCandidateMemory
from models.training import train
from tests.models.test_generators import (
    A0,
    A1,
    B0,
    GENERATORS,
    LAST_ORDER,
    NODES,
    Z,
    anchors_of,
    item_master,
    weekly_checkerboard,
)

EVERY_WEIGHT = HybridWeights(
    cross_sell=1.0,
    personal=1.0,
    popular=0.2,
    factor_cross_sell=0.5,
    bundle=0.5,
    upgrade=0.3,
    replenish=1.0,
    segment_popular=0.3,
)


@pytest.fixture(scope="module")
def artifacts() -> ModelArtifacts:
    return train(weekly_checkerboard(), factors=2, neighbours=8, nodes=NODES)


@pytest.fixture(scope="module")
def generator(artifacts: ModelArtifacts) -> CandidateGenerator:
    facts = ItemFacts.from_items(artifacts.item_skus, item_master())
    return build_generator(artifacts, EVERY_WEIGHT, facts=facts)


def same(first: Candidates, second: Candidates) -> bool:
    return all(
        np.array_equal(getattr(first, column), getattr(second, column))
        for column in ("item_idx", "score", "kind")
    )


def fresh(
    generator: CandidateGenerator, anchors: list[int], count: int, context: GenerationContext
) -> Candidates:
    return generator.generate(
        anchors=anchors_of(anchors), user_row=None, count=count, context=context
    )


def test_a_guest_asking_again_gets_the_list_the_generator_gives(
    generator: CandidateGenerator,
) -> None:
    """The same anchors in another order or repeated are the same request: one generation."""
    memory = GuestCandidateMemory(generator, capacity=8)
    context = GenerationContext(now=LAST_ORDER, region="N")
    first, remembered_first = memory.generate(
        anchors=anchors_of([A0, B0]), count=6, context=context
    )
    again, remembered_again = memory.generate(
        anchors=anchors_of([B0, A0, A0]), count=6, context=context
    )
    assert (remembered_first, remembered_again) == (False, True)
    assert again is first
    assert len(first) > 0
    assert same(first, fresh(generator, [A0, B0], 6, context))
    assert len(memory) == 1


@pytest.mark.parametrize(
    ("anchors", "count", "context"),
    [
        ([A0, A1], 6, GenerationContext(now=LAST_ORDER, region="N")),  # other anchors
        ([A0, B0], 3, GenerationContext(now=LAST_ORDER, region="N")),  # another count
        ([A0, B0], 6, GenerationContext(now=LAST_ORDER, region="S")),  # another region
        ([A0, B0], 6, GenerationContext(now=LAST_ORDER)),  # no region
        ([A0, B0], 6, GenerationContext(now=LAST_ORDER, region="N", categories=("cat-z",))),
    ],
)
def test_each_input_the_list_depends_on_is_part_of_what_it_is_remembered_by(
    generator: CandidateGenerator,
    anchors: list[int],
    count: int,
    context: GenerationContext,
) -> None:
    memory = GuestCandidateMemory(generator, capacity=8)
    memory.generate(
        anchors=anchors_of([A0, B0]), count=6, context=GenerationContext(now=LAST_ORDER, region="N")
    )
    candidates, remembered = memory.generate(
        anchors=anchors_of(anchors), count=count, context=context
    )
    assert not remembered
    assert same(candidates, fresh(generator, anchors, count, context))


def test_a_remembered_list_cannot_be_changed(generator: CandidateGenerator) -> None:
    memory = GuestCandidateMemory(generator, capacity=8)
    candidates, _ = memory.generate(
        anchors=anchors_of([A0]), count=5, context=GenerationContext(region="N")
    )
    for column in (candidates.item_idx, candidates.score, candidates.kind):
        with pytest.raises(ValueError, match="read-only"):
            column[0] = column[-1]


def test_the_least_recently_used_list_is_forgotten_first(generator: CandidateGenerator) -> None:
    memory = GuestCandidateMemory(generator, capacity=2)
    context = GenerationContext(region="N")

    def ask(anchor: int) -> bool:
        return memory.generate(anchors=anchors_of([anchor]), count=4, context=context)[1]

    assert [ask(A0), ask(B0), ask(A0), ask(Z)] == [False, False, True, False]  # B0 goes
    assert len(memory) == 2
    assert [ask(A0), ask(Z), ask(B0)] == [True, True, False]


def test_a_memory_needs_room_for_one_list(generator: CandidateGenerator) -> None:
    with pytest.raises(ValueError, match="capacity must be at least 1, got 0"):
        GuestCandidateMemory(generator, capacity=0)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_no_generator_reads_the_clock_for_a_guest(artifacts: ModelArtifacts, name: str) -> None:
    """What the memory rests on: for a guest, ``context.now`` changes no generator's answer
    (replenishment, the one generator that reads it, needs a customer)."""
    facts = ItemFacts.from_items(artifacts.item_skus, item_master())
    each = GENERATORS[name](artifacts, facts)
    for anchors in ([A0], [A0, B0], [Z], []):
        answers = [
            fresh(each, anchors, 6, GenerationContext(now=now, region="N"))
            for now in (None, LAST_ORDER, LAST_ORDER + timedelta(days=30))
        ]
        assert same(answers[0], answers[1]), anchors
        assert same(answers[0], answers[2]), anchors
