"""The compiled merges of candidate generation give, bit for bit, what the numpy forms they
replaced gave (those forms are the oracles here), on random inputs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from models.candidates import (
    NEIGHBOUR_SCORE_AS_IS,
    NEIGHBOUR_SCORE_LIFT,
    _best_positions,
    _divide_by_max,
    _group_by_item,
    _run_starts,
    _run_sum,
    _sum_runs,
    best_clipped,
    best_positions,
    merge_neighbour_rows,
    merge_sources,
    merge_weighted_sources,
)
from models.generators import (
    _best_upgrades,
    _due_items,
    _Groups,
    _max_runs,
    _segment_best,
    _upgrade_pairs,
)


def numpy_merge_sources(
    item_idx: npt.NDArray[np.int32],
    contribution: npt.NDArray[np.float64],
    kinds: npt.NDArray[np.int8],
    source: npt.NDArray[np.int64],
    weight_sum: float,
    count: int,
) -> tuple[list[int], list[float], list[int]]:
    order = np.lexsort((source, -contribution, item_idx))
    starts = _run_starts(item_idx[order])
    items = item_idx[order][starts]
    totals = np.add.reduceat(contribution[order], starts) / weight_sum
    best = _best_positions(totals, count)
    return (
        items[best].tolist(),
        np.clip(totals[best], 0.0, 1.0).astype(np.float32).tolist(),
        kinds[order][starts][best].tolist(),
    )


@pytest.mark.parametrize("seed", range(40))
def test_merge_sources_equals_the_lexsort_form(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(1, 300))
    sources = int(rng.integers(1, 9))
    parts = [
        rng.choice(n_items, size=int(rng.integers(0, n_items + 1)), replace=False)
        for _ in range(sources)
    ]
    weights = rng.uniform(0.05, 1.0, sources)
    # Coarse scores make ties in contribution and in totals, which decide kinds and order.
    scores = [np.round(rng.random(len(part)), 1).astype(np.float32) for part in parts]
    item_idx = np.concatenate(parts).astype(np.int32)
    contribution = np.concatenate(
        [score.astype(np.float64) * weight for score, weight in zip(scores, weights, strict=True)]
    )
    kinds = np.concatenate([np.full(len(part), k, np.int8) for k, part in enumerate(parts)])
    source = np.repeat(np.arange(sources), [len(part) for part in parts])
    count = int(rng.integers(1, n_items + 2))
    if not item_idx.size:
        return
    items, merged, item_kinds = merge_sources(
        item_idx, contribution, kinds, float(weights.sum()), count
    )
    assert (items.tolist(), merged.tolist(), item_kinds.tolist()) == numpy_merge_sources(
        item_idx, contribution, kinds, source, float(weights.sum()), count
    )


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("highest", [50, 100_000])  # a counting sort, and slots per run
def test_group_by_item_is_a_stable_argsort(seed: int, highest: int) -> None:
    keys = np.random.default_rng(seed).integers(0, highest, size=500).astype(np.int32)
    assert _group_by_item(keys).tolist() == np.argsort(keys, kind="stable").tolist()


def test_run_sum_adds_as_reduceat_does() -> None:
    rng = np.random.default_rng(3)
    for size in [*range(1, 40), 127, 128, 129, 130, 257, 1000]:
        values = rng.random(size) * 10
        order = rng.permutation(size)
        assert _run_sum(values, order, 0, size) == np.add.reduceat(values[order], [0])[0]


def numpy_neighbour_merge(
    items_table: npt.NDArray[np.int32],
    scores_table: npt.NDArray[np.float32],
    anchor_rows: npt.NDArray[np.int64],
    count: int,
    lift: bool,
    positive_only: bool,
) -> tuple[list[int], list[float]]:
    neighbour_idx = items_table[anchor_rows].ravel()
    raw = scores_table[anchor_rows].ravel().astype(np.float64)
    filled = neighbour_idx >= 0
    values = np.maximum(1.0 - 1.0 / np.maximum(raw, 1e-12), 0.0) if lift else raw
    items, totals = _sum_runs(neighbour_idx[filled], values[filled])
    keep = ~np.isin(items, anchor_rows)
    if positive_only:
        keep &= totals > 0
    items, totals = items[keep], totals[keep]
    if not items.size:
        return [], []
    best = _best_positions(totals, count)
    return items[best].tolist(), _divide_by_max(totals[best]).tolist()


@pytest.mark.parametrize("seed", range(30))
def test_neighbour_merge_equals_the_numpy_form(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items, width = int(rng.integers(2, 120)), int(rng.integers(1, 12))
    items_table = rng.integers(-1, n_items, size=(n_items, width)).astype(np.int32)
    scores_table = np.round(rng.random((n_items, width)) * 3, 1).astype(np.float32)
    anchor_rows = np.unique(rng.integers(0, n_items, size=int(rng.integers(1, 15))))
    count = int(rng.integers(1, 60))
    for lift, positive_only in ((False, False), (True, True), (False, True)):
        items, scores = merge_neighbour_rows(
            items_table,
            scores_table,
            anchor_rows.astype(np.int64),
            count,
            NEIGHBOUR_SCORE_LIFT if lift else NEIGHBOUR_SCORE_AS_IS,
            positive_only,
        )
        assert (items.tolist(), scores.tolist()) == numpy_neighbour_merge(
            items_table, scores_table, anchor_rows, count, lift, positive_only
        )


@pytest.mark.parametrize("seed", range(20))
def test_upgrade_pairs_equal_the_numpy_selection(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items, n_categories = 200, 6
    category = rng.integers(-1, n_categories, size=n_items).astype(np.int64)
    price = np.round(rng.uniform(1, 20, n_items), 0)
    margin = np.round(price * rng.uniform(0.1, 0.6, n_items), 0)
    valid = np.flatnonzero(category >= 0)
    members = valid[np.argsort(category[valid], kind="stable")].astype(np.int64)
    indptr = np.zeros(n_categories + 1, dtype=np.int64)
    np.cumsum(np.bincount(category[valid], minlength=n_categories), out=indptr[1:])
    anchors = np.unique(rng.integers(0, n_items, size=8))
    anchors = anchors[category[anchors] >= 0].astype(np.int64)
    anchor, member = _upgrade_pairs(anchors, category, indptr, members, price, margin, 3.0)

    expected = [
        (int(a), int(m))
        for a in anchors
        for m in members[indptr[category[a]] : indptr[category[a] + 1]]
        if price[a] < price[m] <= 3.0 * price[a] and margin[m] > margin[a] and m not in anchors
    ]
    assert list(zip(anchor.tolist(), member.tolist(), strict=True)) == expected


@pytest.mark.parametrize("seed", range(20))
def test_segment_best_equals_the_numpy_form(seed: int) -> None:
    """Shares with ties and zeros, counts above and below the members, on both branches of
    ``_best_positions`` (sorted outright, and partitioned first)."""
    rng = np.random.default_rng(seed)
    n_items, n_categories = 300, 8
    codes = rng.integers(-1, n_categories, size=n_items).astype(np.int64)
    groups = _Groups.of(codes, n_groups=n_categories)
    # Rounded so that equal shares happen; some zero, so that some members are left out.
    shares = np.round(rng.uniform(-0.2, 1.0, n_items), 2).clip(0.0, None)
    categories = np.unique(rng.integers(0, n_categories, size=rng.integers(1, 4)))
    count = int(rng.choice([1, 5, 20, 400]))
    items, scores = _segment_best(categories, groups.indptr, groups.members, shares, count)

    _, members = groups.gather(categories)
    members = np.sort(members)
    member_shares = shares[members]
    members, member_shares = members[member_shares > 0], member_shares[member_shares > 0]
    best = _best_positions(member_shares, count)
    assert items.tolist() == members[best].tolist()
    assert items.dtype == np.int32
    assert scores.dtype == np.float32
    assert scores.tolist() == _divide_by_max(member_shares[best]).tolist()


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_best_positions_and_clipping_equal_the_numpy_form(seed: int, dtype: type) -> None:
    """Both branches (sorted outright, partitioned first), with ties at the threshold and
    scores outside [0, 1]."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.uniform(-0.5, 1.5, int(rng.integers(1, 400))), 1).astype(dtype)
    count = int(rng.choice([1, 3, 10, 50, 500]))
    expected = _best_positions(scores, count)
    assert best_positions(scores, count).tolist() == expected.tolist()
    items, clipped = best_clipped(scores, count)
    assert items.dtype == np.int32
    assert clipped.dtype == np.float32
    assert items.tolist() == expected.tolist()
    assert clipped.tolist() == np.clip(scores[expected], 0.0, 1.0).astype(np.float32).tolist()


@pytest.mark.parametrize("seed", range(20))
def test_weighted_merge_equals_weighing_in_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items, sources = int(rng.integers(1, 200)), int(rng.integers(1, 9))
    parts = [
        rng.choice(n_items, size=int(rng.integers(0, n_items + 1)), replace=False)
        for _ in range(sources)
    ]
    scores = [np.round(rng.random(len(part)), 1).astype(np.float32) for part in parts]
    weights = rng.uniform(0.05, 1.0, sources)
    kinds = np.concatenate([np.full(len(part), k, np.int8) for k, part in enumerate(parts)])
    item_idx = np.concatenate(parts).astype(np.int32)
    count = int(rng.integers(1, n_items + 2))
    contribution = np.concatenate(
        [score.astype(np.float64) * weight for score, weight in zip(scores, weights, strict=True)]
    )
    weighted = merge_weighted_sources(
        item_idx,
        np.concatenate(scores).astype(np.float32),
        kinds,
        np.array([len(part) for part in parts], dtype=np.int64),
        weights,
        float(weights.sum()),
        count,
    )
    expected = merge_sources(item_idx, contribution, kinds, float(weights.sum()), count)
    assert [array.tolist() for array in weighted] == [array.tolist() for array in expected]


@pytest.mark.parametrize("seed", range(20))
def test_best_upgrades_equal_the_numpy_form(seed: int) -> None:
    """Pairs with zero norms, members of several anchors, similarities tied and outside
    [0, 1]."""
    rng = np.random.default_rng(seed)
    n_items, pairs = 60, int(rng.integers(0, 150))
    norms = np.round(rng.uniform(-0.2, 2.0, n_items), 1).clip(0.0, None).astype(np.float32)
    anchor = rng.integers(0, n_items, size=pairs).astype(np.int64)
    member = rng.integers(0, n_items, size=pairs).astype(np.int64)
    dots = np.round(rng.uniform(-1.0, 3.0, pairs), 1)
    min_similarity, count = float(rng.choice([-1.0, 0.0, 0.3])), int(rng.choice([1, 4, 100]))

    products = norms[anchor].astype(np.float64) * norms[member]
    similarity = np.divide(dots, products, out=np.zeros_like(dots), where=products > 0)
    similar = similarity > min_similarity
    expected_items, best_similarity = _max_runs(member[similar], similarity[similar])
    best = _best_positions(best_similarity, count)
    items, scores = _best_upgrades(anchor, member, dots, norms, min_similarity, count)
    assert items.tolist() == expected_items[best].tolist()
    assert scores.tolist() == np.clip(best_similarity[best], 0.0, 1.0).astype(np.float32).tolist()


@pytest.mark.parametrize("seed", range(20))
def test_due_items_equal_the_numpy_form(seed: int) -> None:
    """Early, due and late cycles, a zero interval, counts above and below the due ones."""
    rng = np.random.default_rng(seed)
    size, day = int(rng.integers(0, 40)), 86_400_000_000
    items = np.sort(rng.choice(1000, size=size, replace=False)).astype(np.int32)
    interval_days = rng.choice([0.0, 1.0, 7.0, 30.5], size=size).astype(np.float32)
    now_us = 1_700_000_000_000_000
    last_purchase_us = now_us - rng.integers(-day, 60 * day, size=size)
    count = int(rng.choice([1, 3, 50]))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ((now_us - last_purchase_us) / day) / interval_days.astype(np.float64)
        due = ratio >= 0.8
        score = np.minimum(ratio[due], 1.0 / ratio[due])
    best = _best_positions(score, count)
    chosen, scores = _due_items(items, last_purchase_us, interval_days, now_us, 0.8, count)
    assert chosen.tolist() == items[due][best].tolist()
    assert scores.tolist() == score[best].astype(np.float32).tolist()
