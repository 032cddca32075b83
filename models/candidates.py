"""Candidate generators: item-item neighbours, ALS, popularity, and a hybrid of them.

Each generator implements ``models.interfaces.CandidateGenerator``: model item indexes of the
anchors (basket or PDP items) and an optional user row in, up to ``count`` candidates out,
best first, scores in [0, 1]. Generators exclude nothing except what they must (item-item
drops the anchors themselves); the rules layer filters later.

Scores are made comparable across generators as follows:

- item-item: summed neighbour scores over the anchors, divided by the best one, so the most
  co-bought candidate is 1.0;
- ALS: the raw dot product ``item_factors @ user_factors[row]`` clipped to [0, 1]. ALS fits
  that product to a 0/1 preference, so it already lives on a relevance scale; clipping (rather
  than min-max) keeps a weak profile's scores weak instead of stretching its best guess to 1;
- popularity: share of orders divided by the most popular item's, so the top seller is 1.0.

All work is vectorised over the candidates; no Python loop runs per catalog item. The costs
per call are one fancy-index over the anchors' neighbour rows, one (n_items x factors) matrix
-vector product for ALS, and a partition over n_items.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.interfaces import (
    CandidateGenerator,
    Candidates,
    GenerationContext,
    Kind,
    ModelArtifacts,
)
from rules.compiled import compiled, compiled_inline, read_only, register_warm_up
from rules.sorting import ascending_order, descending_order

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]


# -- id lookups --------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactIndex:
    """SKU -> model item index and customer id -> user row, built once per artifacts."""

    item_rows: dict[str, int]
    user_rows: dict[str, int]

    @classmethod
    def build(cls, artifacts: ModelArtifacts) -> ArtifactIndex:
        return cls(
            item_rows={sku: row for row, sku in enumerate(artifacts.item_skus)},
            user_rows={user: row for row, user in enumerate(artifacts.user_ids)},
        )


# Keyed by id(artifacts) and holding only a weak reference: ModelArtifacts is unhashable (it
# carries arrays and a dict) and must not be kept alive by a cache (its arrays may map files).
_INDEXES: dict[int, tuple[weakref.ref[ModelArtifacts], ArtifactIndex]] = {}
_INDEXES_LOCK = threading.Lock()


def artifact_index(artifacts: ModelArtifacts) -> ArtifactIndex:
    """The cached ``ArtifactIndex`` of these artifacts, built on first use."""
    key = id(artifacts)
    entry = _INDEXES.get(key)
    if entry is not None and entry[0]() is artifacts:
        return entry[1]
    index = ArtifactIndex.build(artifacts)

    def forget(reference: weakref.ref[ModelArtifacts]) -> None:
        with _INDEXES_LOCK:
            # The id may already belong to newer artifacts; only drop our own entry.
            current = _INDEXES.get(key)
            if current is not None and current[0] is reference:
                del _INDEXES[key]

    with _INDEXES_LOCK:
        _INDEXES[key] = (weakref.ref(artifacts, forget), index)
    return index


def user_row_for(artifacts: ModelArtifacts, customer_id: str | None) -> int | None:
    """The customer's row in ``user_factors``, or None for a guest or a customer unseen in
    training."""
    if customer_id is None:
        return None
    return artifact_index(artifacts).user_rows.get(customer_id)


def item_rows_for(artifacts: ModelArtifacts, skus: Iterable[str]) -> tuple[IntArray, list[str]]:
    """Model item indexes of the known SKUs (in the given order) and the SKUs the model does
    not know (new items, or items never sold in the training window)."""
    item_rows = artifact_index(artifacts).item_rows
    rows: list[int] = []
    unknown: list[str] = []
    for sku in skus:
        row = item_rows.get(sku)
        if row is None:
            unknown.append(sku)
        else:
            rows.append(row)
    return np.asarray(rows, dtype=np.int32), unknown


# -- generators --------------------------------------------------------------------------


class ItemItemGenerator:
    """Items co-bought with the anchors: their neighbour lists merged, scores summed."""

    def __init__(self, artifacts: ModelArtifacts) -> None:
        self.kind = Kind.CROSS_SELL
        self._neighbours = artifacts.neighbours
        self._neighbour_scores = artifacts.neighbour_scores
        self._n_items = len(artifacts.item_skus)

    def generate(
        self,
        *,
        anchors: IntArray,
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        anchor_rows = _anchor_rows(anchors, self._n_items)
        if count <= 0 or anchor_rows.size == 0:
            return empty_candidates()
        # An item next to several anchors collects evidence from each of them; padding (-1)
        # and the anchors themselves are not candidates (the customer has them).
        items, scores = merge_neighbour_rows(
            self._neighbours,
            self._neighbour_scores,
            anchor_rows,
            count,
            NEIGHBOUR_SCORE_AS_IS,
            False,
        )
        return _candidates(items, scores, self.kind)


class AlsGenerator:
    """Items the customer's ALS factors score highest; nothing for guests."""

    def __init__(self, artifacts: ModelArtifacts) -> None:
        self.kind = Kind.PERSONAL
        self._user_factors = artifacts.user_factors
        self._item_factors = artifacts.item_factors

    def generate(
        self,
        *,
        anchors: IntArray,
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        if user_row is None or count <= 0:
            return empty_candidates()
        n_users = self._user_factors.shape[0]
        if not 0 <= user_row < n_users:
            raise ValueError(f"user_row {user_row} out of range for {n_users} users")
        items, scores = best_clipped(self._item_factors @ self._user_factors[user_row], count)
        return _candidates(items, scores, self.kind)


class PopularityGenerator:
    """The most ordered items overall: cold start and backfill."""

    def __init__(self, artifacts: ModelArtifacts) -> None:
        self.kind = Kind.POPULAR
        popularity = np.asarray(artifacts.popularity, dtype=np.float32)
        # Ranked once; a request only slices. Stable sort: equal shares in item index order.
        order = np.argsort(-popularity, kind="stable").astype(np.int32)
        ranked_scores = _divide_by_max(popularity[order])
        kinds = np.full(order.shape[0], self.kind, dtype=np.int8)
        for array in (order, ranked_scores, kinds):
            array.setflags(write=False)  # slices are handed out; nobody may change the ranking
        self._order = order
        self._ranked_scores = ranked_scores
        self._kinds = kinds

    def generate(
        self,
        *,
        anchors: IntArray,
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        count = max(count, 0)
        return Candidates(
            item_idx=self._order[:count],
            score=self._ranked_scores[:count],
            kind=self._kinds[:count],
        )


class HybridGenerator:
    """Several generators merged into one ranked list by a weighted sum of their scores.

    An item's score is ``sum(weight_g * score_g) / sum(weight_g)`` over the generators that
    returned anything for this request. A weighted sum (rather than a max) rewards items that
    several sources agree on, e.g. co-bought with the basket *and* liked by the customer;
    dividing by the weights of the active sources keeps the result in [0, 1] and lets a
    request with less evidence (no customer, say) still use the whole scale. An item's kind is
    that of the generator contributing most to it (ties: the earlier generator).

    One generator must be a popularity generator. It is the backfill: it always proposes
    ``count`` items, so the merged list has ``count`` items whenever the catalog does, also
    with no anchors and no customer. With a small weight its items rank below real evidence.
    """

    def __init__(self, generators: Sequence[CandidateGenerator], weights: Sequence[float]) -> None:
        if not generators or len(generators) != len(weights):
            raise ValueError("HybridGenerator needs one weight per generator, and at least one")
        if not all(np.isfinite(weight) and weight > 0 for weight in weights):
            raise ValueError(f"HybridGenerator weights must be finite and positive: {weights}")
        if not any(generator.kind == Kind.POPULAR for generator in generators):
            raise ValueError("HybridGenerator needs a popularity generator to backfill from")
        self.kind = generators[0].kind  # nominal; each candidate carries its own kind
        self._generators = tuple(generators)
        self._weights = tuple(float(weight) for weight in weights)

    @classmethod
    def from_artifacts(
        cls,
        artifacts: ModelArtifacts,
        *,
        cross_sell_weight: float = 1.0,
        personal_weight: float = 1.0,
        popular_weight: float = 0.2,
    ) -> HybridGenerator:
        """Item-item, ALS and popularity over one set of artifacts, with the given weights."""
        return cls(
            (ItemItemGenerator(artifacts), AlsGenerator(artifacts), PopularityGenerator(artifacts)),
            (cross_sell_weight, personal_weight, popular_weight),
        )

    def generate(
        self,
        *,
        anchors: IntArray,
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        if count <= 0:
            return empty_candidates()
        parts = [
            (
                generator.generate(
                    anchors=anchors, user_row=user_row, count=count, context=context
                ),
                weight,
            )
            for generator, weight in zip(self._generators, self._weights, strict=True)
        ]
        active = [(part, weight) for part, weight in parts if len(part) > 0]
        if not active:
            return empty_candidates()

        # One compiled merge weighs and sums the sources' entries: per-source numpy steps
        # cost more than the merge itself.
        items, scores, item_kinds = merge_weighted_sources(
            np.concatenate([part.item_idx for part, _ in active]).astype(np.int32, copy=False),
            np.concatenate([part.score for part, _ in active]).astype(np.float32, copy=False),
            np.concatenate([part.kind for part, _ in active]).astype(np.int8, copy=False),
            np.array([len(part) for part, _ in active], dtype=np.int64),
            np.array([weight for _, weight in active], dtype=np.float64),
            sum(weight for _, weight in active),
            count,
        )
        return Candidates(item_idx=items, score=scores, kind=item_kinds)


# -- helpers -----------------------------------------------------------------------------


def empty_candidates() -> Candidates:
    return Candidates(
        item_idx=np.empty(0, dtype=np.int32),
        score=np.empty(0, dtype=np.float32),
        kind=np.empty(0, dtype=np.int8),
    )


def _candidates(
    item_idx: npt.NDArray[np.integer], score: npt.NDArray[np.floating], kind: Kind
) -> Candidates:
    # No copies where the compiled passes already give these types.
    return Candidates(
        item_idx=item_idx.astype(np.int32, copy=False),
        score=score.astype(np.float32, copy=False),
        kind=kind_column(kind, item_idx.shape[0]),
    )


# Read-only columns of one kind, sliced per request instead of filled: a generator answers
# a few hundred candidates of its one kind many times a second.
_KIND_COLUMNS: dict[int, npt.NDArray[np.int8]] = {}


def kind_column(kind: Kind, size: int) -> npt.NDArray[np.int8]:
    """``size`` entries of ``kind`` (read-only)."""
    column = _KIND_COLUMNS.get(kind)
    if column is None or column.shape[0] < size:
        column = np.full(max(size, 4096), kind, dtype=np.int8)
        column.setflags(write=False)
        _KIND_COLUMNS[kind] = column
    return column[:size]


def _anchor_rows(anchors: npt.ArrayLike, n_items: int) -> npt.NDArray[np.int64]:
    """Unique anchor indexes, sorted; a ValueError for one outside the model."""
    # A set over the few anchors of a request: np.unique's machinery cost ~8 us a call.
    values = sorted(set(np.asarray(anchors, dtype=np.int64).ravel().tolist()))
    if values and (values[0] < 0 or values[-1] >= n_items):
        raise ValueError(f"anchor item indexes must be in [0, {n_items}): got {values}")
    return np.array(values, dtype=np.int64)


def _best_positions(scores: npt.NDArray[np.floating], count: int) -> npt.NDArray[np.intp]:
    """Positions of the ``count`` highest scores, best first, ties broken by position.

    Callers pass scores aligned with ascending item indexes, so ties go to the lower item
    index. Short arrays are simply sorted; long ones (ALS over the whole catalog) are first
    partitioned around the count-th largest score, in linear time, and only the chosen few
    sorted.
    """
    size = scores.shape[0]
    if size <= 4 * count:
        return np.argsort(-scores, kind="stable")[:count]
    kth = size - count
    threshold = np.partition(scores, kth)[kth]  # the count-th largest score
    above = np.flatnonzero(scores > threshold)
    tied = np.flatnonzero(scores == threshold)[: count - above.size]
    chosen = np.sort(np.concatenate((above, tied)))
    return chosen[np.argsort(-scores[chosen], kind="stable")]


def _run_starts(sorted_values: npt.NDArray[np.integer]) -> npt.NDArray[np.intp]:
    """Where each run of equal values begins in a sorted, non-empty array."""
    is_start = np.empty(sorted_values.shape[0], dtype=bool)
    is_start[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=is_start[1:])
    return np.flatnonzero(is_start)


def _sum_runs(
    keys: npt.NDArray[np.integer], values: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.integer], npt.NDArray[np.float64]]:
    """Unique keys (ascending) and the sum of the values of each; cheaper than np.unique with
    return_inverse plus a bincount for the few hundred entries a request has."""
    if keys.size == 0:
        return keys, values
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = _run_starts(sorted_keys)
    return sorted_keys[starts], np.add.reduceat(values[order], starts)


def _contains_sorted(
    needles: npt.NDArray[np.integer], haystack: npt.NDArray[np.integer]
) -> npt.NDArray[np.bool_]:
    """Mask over ``haystack`` (sorted, unique) of the entries found in ``needles`` (sorted);
    two binary searches instead of np.isin's general machinery."""
    found = np.zeros(haystack.shape[0], dtype=bool)
    at = np.searchsorted(haystack, needles)
    inside = at < haystack.shape[0]
    at, needles = at[inside], needles[inside]
    found[at[haystack[at] == needles]] = True
    return found


# -- compiled merges ---------------------------------------------------------------------
# A request merges a few hundred entries per generator: as chains of numpy calls (sort,
# run starts, reduceat, isin, partition) the dispatch cost was most of the work, so the
# merges are single compiled passes. Each gives bit for bit what the numpy form gave: sums
# taken in the same order, stable sorts where the numpy form sorted stably.

NEIGHBOUR_SCORE_AS_IS: int = 0
NEIGHBOUR_SCORE_LIFT: int = 1  # per-anchor evidence ``max(1 - 1 / lift, 0)``


@compiled
def _pairwise_sum(
    values: npt.NDArray[np.float64], order: npt.NDArray[np.intp], start: int, end: int
) -> float:
    """``values[order[start:end]]`` summed as numpy's pairwise sum adds them: runs under 8
    in order, then 8 running sums, halves above 128 entries."""
    size = end - start
    if size < 8:
        total = 0.0
        for at in range(start, end):
            total += values[order[at]]
        return total
    if size <= 128:
        partial = np.empty(8, dtype=np.float64)
        for lane in range(8):
            partial[lane] = values[order[start + lane]]
        at = start + 8
        whole_end = start + size - size % 8
        while at < whole_end:
            for lane in range(8):
                partial[lane] += values[order[at + lane]]
            at += 8
        total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) + (
            (partial[4] + partial[5]) + (partial[6] + partial[7])
        )
        while at < end:
            total += values[order[at]]
            at += 1
        return float(total)
    half = size // 2
    half -= half % 8
    return float(
        _pairwise_sum(values, order, start, start + half)
        + _pairwise_sum(values, order, start + half, end)
    )


@compiled_inline
def _run_sum(
    values: npt.NDArray[np.float64], order: npt.NDArray[np.intp], start: int, end: int
) -> float:
    """One run's sum as ``np.add.reduceat`` makes it: the first entry plus the pairwise sum
    of the others."""
    if end - start <= 8:  # the usual case, without a call
        rest = 0.0
        for at in range(start + 1, end):
            rest += values[order[at]]
        return float(values[order[start]] + rest)
    return float(values[order[start]] + _pairwise_sum(values, order, start + 1, end))


@compiled
def _stable_top(totals: npt.NDArray[np.float64], count: int) -> npt.NDArray[np.intp]:
    """Positions of the ``count`` largest totals, best first, ties by position (what
    ``_best_positions`` chooses, by one stable sort)."""
    order = descending_order(totals)
    return order[: min(count, order.shape[0])]


@compiled
def _group_by_item(item_idx: npt.NDArray[np.int32]) -> npt.NDArray[np.intp]:
    """What a stable argsort of ``item_idx`` (indexes >= 0) gives, in linear time: a counting
    sort where the indexes are few for the entries, else each entry's run found by a slot
    per item index, the distinct items sorted and the entries placed run by run."""
    size = item_idx.shape[0]
    highest = -1
    for at in range(size):
        highest = max(highest, item_idx[at])
    if highest < 4 * size:  # few item indexes for the entries: a counting sort by index
        starts = np.zeros(highest + 2, dtype=np.int64)
        for at in range(size):
            starts[item_idx[at] + 1] += 1
        for item in range(highest + 1):
            starts[item + 1] += starts[item]
        counted = np.empty(size, dtype=np.intp)
        for at in range(size):
            item = item_idx[at]
            counted[starts[item]] = at
            starts[item] += 1
        return counted
    slot = np.full(highest + 1, -1, dtype=np.int64)
    run_of = np.empty(size, dtype=np.int64)
    run_item = np.empty(size, dtype=np.int32)
    run_length = np.zeros(size, dtype=np.int64)
    runs = 0
    for at in range(size):
        item = item_idx[at]
        run = slot[item]
        if run < 0:
            run = runs
            slot[item] = run
            run_item[run] = item
            runs += 1
        run_of[at] = run
        run_length[run] += 1
    by_item = ascending_order(run_item[:runs])
    place = np.empty(runs, dtype=np.int64)
    filled = 0
    for rank in range(runs):
        run = by_item[rank]
        place[run] = filled
        filled += run_length[run]
    order = np.empty(size, dtype=np.intp)
    for at in range(size):
        run = run_of[at]
        order[place[run]] = at
        place[run] += 1
    return order


@compiled
def merge_sources(
    item_idx: npt.NDArray[np.int32],
    contribution: npt.NDArray[np.float64],
    kinds: npt.NDArray[np.int8],
    weight_sum: float,
    count: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.int8]]:
    """The hybrid's merge of its sources' entries (concatenated in source order, each item
    at most once per source): per item the summed contribution over ``weight_sum`` and the
    kind of its largest contribution (ties: the earlier source); the ``count`` best items,
    scores clipped to [0, 1]."""
    size = item_idx.shape[0]
    order = _group_by_item(item_idx)
    items = np.empty(size, dtype=np.int32)
    totals = np.empty(size, dtype=np.float64)
    item_kinds = np.empty(size, dtype=np.int8)
    runs = 0
    start = 0
    while start < size:
        item = item_idx[order[start]]
        end = start + 1
        while end < size and item_idx[order[end]] == item:
            end += 1
        # Largest contribution first, equal ones in source order (the sum's order, too).
        for at in range(start + 1, end):
            entry = order[at]
            back = at - 1
            while back >= start and contribution[order[back]] < contribution[entry]:
                order[back + 1] = order[back]
                back -= 1
            order[back + 1] = entry
        total = _run_sum(contribution, order, start, end)
        items[runs] = item
        totals[runs] = total / weight_sum
        item_kinds[runs] = kinds[order[start]]
        runs += 1
        start = end
    best = _stable_top(totals[:runs], count)
    scores = np.empty(best.shape[0], dtype=np.float32)
    for at in range(best.shape[0]):
        scores[at] = min(max(totals[best[at]], 0.0), 1.0)
    return items[best], scores, item_kinds[best]


@compiled
def merge_weighted_sources(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    item_idx: npt.NDArray[np.int32],
    scores: npt.NDArray[np.float32],
    kinds: npt.NDArray[np.int8],
    lengths: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float64],
    weight_sum: float,
    count: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.int8]]:
    """``merge_sources`` of sources given as concatenated entries, ``lengths[s]`` of them from
    source ``s``, each contributing its score times ``weights[s]``."""
    contribution = np.empty(item_idx.shape[0], dtype=np.float64)
    at = 0
    for source in range(lengths.shape[0]):
        weight = weights[source]
        for _ in range(lengths[source]):
            contribution[at] = np.float64(scores[at]) * weight
            at += 1
    return merge_sources(item_idx, contribution, kinds, weight_sum, count)


@compiled
def best_positions(scores: npt.NDArray[np.floating], count: int) -> npt.NDArray[np.intp]:
    """``_best_positions`` compiled: the ``count`` highest, best first, ties by position."""
    size = scores.shape[0]
    if size <= 4 * count:
        return descending_order(scores)[: min(count, size)]
    kth = size - count
    threshold = np.partition(scores, kth)[kth]
    chosen = np.empty(count, dtype=np.intp)
    above = 0
    for at in range(size):
        if scores[at] > threshold:
            chosen[above] = at
            above += 1
    filled = above
    for at in range(size):
        if filled == count:
            break
        if scores[at] == threshold:
            chosen[filled] = at
            filled += 1
    chosen = np.sort(chosen[:filled])
    return chosen[descending_order(scores[chosen])]


@compiled
def best_clipped(
    scores: npt.NDArray[np.floating], count: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The positions of the ``count`` highest scores, best first (``best_positions``), and
    their scores clipped to [0, 1]."""
    return best_items(np.arange(scores.shape[0]), scores, count)


@compiled
def best_items(
    items: npt.NDArray[np.integer], scores: npt.NDArray[np.floating], count: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The ``count`` items of highest score, best first (``best_positions``: ties go to the
    earlier entry), and their scores clipped to [0, 1]."""
    best = best_positions(scores, count)
    chosen = np.empty(best.shape[0], dtype=np.int32)
    clipped = np.empty(best.shape[0], dtype=np.float32)
    for at in range(best.shape[0]):
        chosen[at] = items[best[at]]
        clipped[at] = min(max(scores[best[at]], 0.0), 1.0)
    return chosen, clipped


@compiled
def merge_neighbour_rows(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    neighbour_items: npt.NDArray[np.integer],
    neighbour_scores: npt.NDArray[np.floating],
    anchor_rows: npt.NDArray[np.int64],
    count: int,
    score_kind: int,
    positive_only: bool,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The anchors' rows of a neighbour table merged: each neighbour's per-anchor evidence
    summed (in anchor order), padding (-1) and the anchors left out, and with
    ``positive_only`` items of no evidence; the ``count`` best, divided by the best one."""
    width = neighbour_items.shape[1]
    size = anchor_rows.shape[0] * width
    keys = np.empty(size, dtype=np.int64)
    values = np.empty(size, dtype=np.float64)
    filled = 0
    for anchor in anchor_rows:
        for column in range(width):
            item = neighbour_items[anchor, column]
            if item < 0:
                continue
            value = float(neighbour_scores[anchor, column])
            if score_kind == NEIGHBOUR_SCORE_LIFT:
                value = max(1.0 - 1.0 / max(value, 1e-12), 0.0)
            keys[filled] = item
            values[filled] = value
            filled += 1
    order = ascending_order(keys[:filled])
    items = np.empty(filled, dtype=np.int32)
    totals = np.empty(filled, dtype=np.float64)
    runs = 0
    start = 0
    while start < filled:
        item = keys[order[start]]
        end = start + 1
        while end < filled and keys[order[end]] == item:
            end += 1
        total = _run_sum(values, order, start, end)
        start = end
        at = np.searchsorted(anchor_rows, item)
        if at < anchor_rows.shape[0] and anchor_rows[at] == item:
            continue
        if positive_only and not total > 0:
            continue
        items[runs] = item
        totals[runs] = total
        runs += 1
    best = _stable_top(totals[:runs], count)
    scores = np.zeros(best.shape[0], dtype=np.float32)
    top = totals[best[0]] if best.shape[0] else 0.0
    if top > 0:
        for at in range(best.shape[0]):
            scores[at] = min(max(totals[best[at]] / top, 0.0), 1.0)
    return items[best], scores


def _warm_up_merges() -> None:
    merge_sources(
        np.array([1, 0, 1], dtype=np.int32),
        np.array([0.5, 0.25, 0.5]),
        np.array([1, 2, 3], dtype=np.int8),
        1.5,
        2,
    )
    merge_weighted_sources(
        np.array([1, 0, 1], dtype=np.int32),
        np.array([0.5, 0.25, 0.5], dtype=np.float32),
        np.array([1, 2, 3], dtype=np.int8),
        np.array([2, 1], dtype=np.int64),
        np.array([1.0, 0.5]),
        1.5,
        2,
    )
    for scores in (np.array([0.5, 2.0, -1.0], dtype=np.float32), np.array([0.5, 2.0, -1.0])):
        best_clipped(scores, 1)
        best_clipped(scores, 3)
        best_positions(scores, 1)
    table_items = np.array([[1, -1], [0, 1]], dtype=np.int32)
    table_scores = np.array([[0.5, 0.0], [0.25, 2.0]], dtype=np.float32)
    # Served tables are memory-mapped read-only, trained ones in memory: both types.
    for items, scores in (
        (table_items, table_scores),
        tuple(map(read_only, (table_items, table_scores))),
    ):
        for score_kind, positive_only in (
            (NEIGHBOUR_SCORE_AS_IS, False),
            (NEIGHBOUR_SCORE_LIFT, True),
        ):
            merge_neighbour_rows(
                items, scores, np.array([0], dtype=np.int64), 2, score_kind, positive_only
            )


register_warm_up(_warm_up_merges)


def _divide_by_max(scores: npt.NDArray[np.floating]) -> FloatArray:
    top = float(scores.max()) if scores.size else 0.0
    if top <= 0:
        return np.zeros(scores.shape, dtype=np.float32)
    normalised: FloatArray = np.clip(scores / top, 0.0, 1.0).astype(np.float32)
    return normalised
