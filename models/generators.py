"""Candidate generators for upsell beyond the basic three, and the hybrid built from weights.

- ``FactorItemItemGenerator`` (cross-sell): neighbours of the anchors by ALS item factors.
- ``BundleGenerator`` (bundle): frequently bought together with the anchors, by lift.
- ``UpgradeGenerator`` (upgrade): for each anchor, items of its category that cost more and
  earn more margin, ranked by ALS similarity to it.
- ``ReplenishmentGenerator`` (replenish): items the customer buys at a regular interval that
  are due again at ``context.now``.
- ``SegmentPopularityGenerator`` (popular): the most popular items of the anchors'
  categories and/or of the request's region, for cold start.

They implement ``models.interfaces.CandidateGenerator`` like those in ``models.candidates``,
with scores in [0, 1]:

- factor neighbours and bundles are merged over the anchors as item-item is (per-anchor
  scores summed, divided by the best); a bundle's per-anchor score is ``1 - 1 / lift``, which
  maps independence (lift 1) to 0 and grows towards 1 as the pair becomes inseparable;
- an upgrade's score is its cosine similarity to the anchor it upgrades (the best one);
- a replenishment's score is ``min(r, 1 / r)`` with ``r`` = days since the last purchase over
  the usual interval: 1.0 exactly when due, lower when early (within the tolerance) or late
  (a customer who stopped buying an item is less and less likely to be out of it);
- segment popularity divides by the segment's best seller, as popularity does.

Work per request touches only the anchors' rows, the anchors' categories or the customer's
cycles: no Python loop runs per catalog item and nothing scores the whole catalog, except
regional ranking, which is sorted once at construction.

Item master facts (category, price, cost) come in as ``ItemFacts`` at construction: the model
does not keep them, since prices change between trainings and the service holds the current
item master anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from models.candidates import (
    NEIGHBOUR_SCORE_AS_IS,
    NEIGHBOUR_SCORE_LIFT,
    AlsGenerator,
    HybridGenerator,
    ItemItemGenerator,
    PopularityGenerator,
    _anchor_rows,
    _candidates,
    best_items,
    empty_candidates,
    merge_neighbour_rows,
    merge_weighted_sources,
)
from models.interfaces import (
    CandidateGenerator,
    Candidates,
    GenerationContext,
    Kind,
    ModelArtifacts,
    NeighbourTable,
)
from rules.catalog import Catalog
from rules.compiled import compiled, compiled_inline, read_only, register_warm_up
from rules.sorting import ascending_order, descending_order
from rules.staleness import epoch_us

IntArray = npt.NDArray[np.int32]
_MICROSECONDS_PER_DAY = 86_400_000_000


def _frozen(array: npt.ArrayLike, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """A read-only, C-ordered view (a copy only where the dtype or order differs): the pass
    is compiled for one set of argument types, served (memory-mapped) or trained alike."""
    view = np.ascontiguousarray(array, dtype=dtype).view()
    view.setflags(write=False)
    return view


# A segment request's category codes, group indptr and members, shares, region ranking.
_SegmentInputs = tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int32],
]

# Empty read-only inputs of the compiled sources, for what a generator does not have.
_NO_ROWS = _frozen(np.zeros(0), np.int64)
_NO_SHARES = _frozen(np.zeros(0), np.float64)
_NO_ORDER = _frozen(np.zeros(0), np.int32)

# Category, group indptr and members, price, margin, factors, norms; min similarity, reach.
_UpgradeArrays = tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    float,
    float,
]


# -- item master facts -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ItemFacts:
    """Item master facts aligned with the model's item indexes (row i is ``item_skus[i]``).

    Items the item master lacks have category code -1 and NaN price and cost.
    """

    categories: tuple[str, ...]  # every category of the item master, sorted
    category_code: npt.NDArray[np.int32]  # (n_items,) index into ``categories`` or -1
    unit_price: npt.NDArray[np.float64]  # (n_items,) regular price
    unit_cost: npt.NDArray[np.float64]  # (n_items,)

    @classmethod
    def from_items(cls, item_skus: Sequence[str], items: pl.DataFrame) -> ItemFacts:
        """Facts for ``item_skus`` from an item master frame (``sku``, ``category``,
        ``unit_price``, ``unit_cost``: the ITEMS contract columns)."""
        master = items.select(
            pl.col("sku").cast(pl.String),
            pl.col("category").cast(pl.String),
            pl.col("unit_price").cast(pl.Float64),
            pl.col("unit_cost").cast(pl.Float64),
        ).unique("sku", keep="first")
        categories = tuple(sorted(master.get_column("category").drop_nulls().unique().to_list()))
        codes = pl.DataFrame(
            {"category": list(categories)}, schema={"category": pl.String}
        ).with_row_index("code")
        aligned = (
            pl.DataFrame({"sku": list(item_skus)}, schema={"sku": pl.String})
            .with_row_index("row")
            .join(master, on="sku", how="left")
            .join(codes, on="category", how="left")
            .sort("row")
        )
        return cls(
            categories=categories,
            category_code=aligned.get_column("code").fill_null(-1).to_numpy().astype(np.int32),
            unit_price=aligned.get_column("unit_price").fill_null(np.nan).to_numpy(),
            unit_cost=aligned.get_column("unit_cost").fill_null(np.nan).to_numpy(),
        )

    @classmethod
    def from_catalog(cls, catalog: Catalog, model_to_catalog: npt.NDArray[np.int64]) -> ItemFacts:
        """Facts from the service's mirrored item master: ``model_to_catalog`` holds each model
        item's catalog position, or -1 (``service.mirror.join_model_to_catalog``)."""
        known = model_to_catalog >= 0
        at = np.where(known, model_to_catalog, 0)
        return cls(
            categories=tuple(catalog.categories),
            category_code=np.where(known, catalog.category_code[at], -1).astype(np.int32),
            unit_price=np.where(known, catalog.unit_price[at], np.nan),
            unit_cost=np.where(known, catalog.unit_cost[at], np.nan),
        )

    def __len__(self) -> int:
        return int(self.category_code.shape[0])


@dataclass(frozen=True, eq=False)
class _Groups:
    """Items grouped by a code (CSR layout): group g is ``members[indptr[g]:indptr[g + 1]]``,
    items ascending within it."""

    indptr: npt.NDArray[np.int64]
    members: npt.NDArray[np.int64]

    @classmethod
    def of(cls, codes: npt.NDArray[np.integer], *, n_groups: int) -> _Groups:
        """Group the item indexes whose code is >= 0 (items with -1 belong to no group)."""
        valid = np.flatnonzero(codes >= 0)
        members = valid[np.argsort(codes[valid], kind="stable")].astype(np.int64)
        indptr = np.zeros(n_groups + 1, dtype=np.int64)
        np.cumsum(np.bincount(codes[valid], minlength=n_groups), out=indptr[1:])
        return cls(indptr=indptr, members=members)

    def gather(
        self, groups: npt.NDArray[np.integer]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
        """(position in ``groups`` of each member's group, member item) for all the groups'
        members, without a loop over the groups."""
        starts = self.indptr[groups]
        lengths = self.indptr[np.asarray(groups) + 1] - starts
        owner = np.repeat(np.arange(len(groups)), lengths)
        offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return owner, self.members[np.repeat(starts, lengths) + offsets]


def _check_facts(facts: ItemFacts, artifacts: ModelArtifacts) -> None:
    if len(facts) != len(artifacts.item_skus):
        raise ValueError(
            f"item facts cover {len(facts)} items, the model has {len(artifacts.item_skus)}"
        )


# -- neighbour tables: factor item-item and bundles --------------------------------------


class _NeighbourTableGenerator:
    """The anchors' rows of a neighbour table, merged: per-anchor scores summed per item."""

    def __init__(self, table: NeighbourTable | None, *, n_items: int, kind: Kind) -> None:
        self.kind = kind
        self._table = table
        self._n_items = n_items

    _score_kind = NEIGHBOUR_SCORE_AS_IS  # how a table score becomes per-anchor evidence

    def generate(
        self,
        *,
        anchors: IntArray,
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        anchor_rows = _anchor_rows(anchors, self._n_items)
        if self._table is None or count <= 0 or anchor_rows.size == 0:
            return empty_candidates()
        # The anchors are not candidates: the customer has them already.
        items, scores = merge_neighbour_rows(
            self._table.items, self._table.scores, anchor_rows, count, self._score_kind, True
        )
        return _candidates(items, scores, self.kind)


class FactorItemItemGenerator(_NeighbourTableGenerator):
    """Items whose ALS factors are closest (cosine) to the anchors': bought by the same
    customers, if not necessarily in the same order."""

    def __init__(self, artifacts: ModelArtifacts) -> None:
        super().__init__(
            artifacts.factor_neighbours, n_items=len(artifacts.item_skus), kind=Kind.CROSS_SELL
        )


class BundleGenerator(_NeighbourTableGenerator):
    """Items frequently bought together with the anchors (lift over chance, with support)."""

    def __init__(self, artifacts: ModelArtifacts) -> None:
        super().__init__(artifacts.bundles, n_items=len(artifacts.item_skus), kind=Kind.BUNDLE)

    # Lift is in (0, inf); only pairs above chance are evidence for a bundle.
    _score_kind = NEIGHBOUR_SCORE_LIFT


# -- upgrades ----------------------------------------------------------------------------


class UpgradeGenerator:
    """Premium alternatives to the anchors: same category, higher price and higher unit
    margin (at most ``max_price_ratio`` times the price), similar by ALS item factors.

    Similarity must exceed ``min_similarity``: an unrelated dearer item of the category is
    not an upgrade of this one. An item that upgrades several anchors keeps its best score.
    """

    def __init__(
        self,
        artifacts: ModelArtifacts,
        facts: ItemFacts,
        *,
        min_similarity: float = 0.0,
        max_price_ratio: float = 3.0,
    ) -> None:
        _check_facts(facts, artifacts)
        if not max_price_ratio > 1.0:
            raise ValueError(f"max_price_ratio must be above 1, got {max_price_ratio}")
        self.kind = Kind.UPGRADE
        self._n_items = len(artifacts.item_skus)
        price = facts.unit_price
        margin = facts.unit_price - facts.unit_cost
        priced = np.isfinite(price) & np.isfinite(margin)
        category = np.where(priced, facts.category_code, -1).astype(np.int64)
        groups = _Groups.of(category, n_groups=len(facts.categories))
        # What ``_upgrade_source`` reads, read-only: alone or in the hybrid's compiled pass,
        # one compiled signature.
        self._arrays: _UpgradeArrays = (
            _frozen(category, np.int64),
            _frozen(groups.indptr, np.int64),
            _frozen(groups.members, np.int64),
            _frozen(price, np.float64),
            _frozen(margin, np.float64),
            _frozen(artifacts.item_factors, np.float32),
            _frozen(np.linalg.norm(np.asarray(artifacts.item_factors), axis=1), np.float32),
            float(min_similarity),
            float(max_price_ratio),
        )

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
        items, scores = _upgrade_source(anchor_rows, *self._arrays, int(count))
        if items.size == 0:
            return empty_candidates()
        return _candidates(items, scores, self.kind)


@compiled
def _upgrade_source(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    anchor_rows: npt.NDArray[np.int64],
    category: npt.NDArray[np.int64],
    indptr: npt.NDArray[np.int64],
    members: npt.NDArray[np.int64],
    price: npt.NDArray[np.float64],
    margin: npt.NDArray[np.float64],
    factors: npt.NDArray[np.float32],
    norms: npt.NDArray[np.float32],
    min_similarity: float,
    max_price_ratio: float,
    count: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The upgrades of the anchors of a category (sorted, unique): their pairs, the pairs'
    cosine (one row-wise dot product per surviving pair) and the ``count`` best."""
    upgradable = np.empty(anchor_rows.shape[0], dtype=np.int64)
    kept = 0
    for row in anchor_rows:
        if category[row] >= 0:
            upgradable[kept] = row
            kept += 1
    if kept:
        anchor, member = _upgrade_pairs(
            upgradable[:kept], category, indptr, members, price, margin, max_price_ratio
        )
        if member.shape[0]:
            dots = _pair_dots(factors, anchor, member)
            return _best_upgrades(anchor, member, dots, norms, min_similarity, count)
    return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float32)


@compiled
def _upgrade_pairs(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    anchor_rows: npt.NDArray[np.int64],
    category: npt.NDArray[np.integer],
    indptr: npt.NDArray[np.int64],
    members: npt.NDArray[np.int64],
    price: npt.NDArray[np.floating],
    margin: npt.NDArray[np.floating],
    max_price_ratio: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(anchor, member) pairs, anchor by anchor (sorted, each of a category), members in item
    order, where the member is of the anchor's category, dearer (at most ``max_price_ratio``
    times), earns more per unit, and is no anchor itself."""
    total = 0
    for anchor in anchor_rows:
        code = category[anchor]
        total += indptr[code + 1] - indptr[code]
    pair_anchor = np.empty(total, dtype=np.int64)
    pair_member = np.empty(total, dtype=np.int64)
    pairs = 0
    for anchor in anchor_rows:
        code = category[anchor]
        reach = max_price_ratio * price[anchor]
        for at in range(indptr[code], indptr[code + 1]):
            member = members[at]
            if not (price[member] > price[anchor] and price[member] <= reach):
                continue
            if not margin[member] > margin[anchor]:
                continue
            found = np.searchsorted(anchor_rows, member)
            if found < anchor_rows.shape[0] and anchor_rows[found] == member:
                continue
            pair_anchor[pairs] = anchor
            pair_member[pairs] = member
            pairs += 1
    return pair_anchor[:pairs], pair_member[:pairs]


@compiled
def _pair_dots(
    factors: npt.NDArray[np.floating],
    anchor: npt.NDArray[np.int64],
    member: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """Per pair, the dot product of the anchor's and the member's factor rows, in float64
    (one loop: numpy gathered both rows of every pair into copies first)."""
    dots = np.empty(anchor.shape[0], dtype=np.float64)
    for at in range(anchor.shape[0]):
        first, second = anchor[at], member[at]
        total = 0.0
        for column in range(factors.shape[1]):
            total += np.float64(factors[first, column]) * np.float64(factors[second, column])
        dots[at] = total
    return dots


@compiled
def _best_upgrades(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    anchor: npt.NDArray[np.int64],
    member: npt.NDArray[np.int64],
    dots: npt.NDArray[np.float64],
    norms: npt.NDArray[np.floating],
    min_similarity: float,
    count: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """From the pairs' factor dot products: each member's best cosine similarity to an
    anchor, members above ``min_similarity`` only, the ``count`` best (ties: the lower item),
    scores clipped to [0, 1]."""
    size = member.shape[0]
    similar_items = np.empty(size, dtype=np.int64)
    similarity = np.empty(size, dtype=np.float64)
    kept = 0
    for at in range(size):
        norm = np.float64(norms[anchor[at]]) * norms[member[at]]
        value = dots[at] / norm if norm > 0 else 0.0
        if value > min_similarity:
            similar_items[kept] = member[at]
            similarity[kept] = value
            kept += 1
    order = ascending_order(similar_items[:kept])
    items = np.empty(kept, dtype=np.int64)
    best_similarity = np.empty(kept, dtype=np.float64)
    runs = 0
    for at in range(kept):
        entry = order[at]
        item = similar_items[entry]
        if runs and items[runs - 1] == item:
            best_similarity[runs - 1] = max(best_similarity[runs - 1], similarity[entry])
        else:
            items[runs] = item
            best_similarity[runs] = similarity[entry]
            runs += 1
    return best_items(items[:runs], best_similarity[:runs], count)


def _warm_up_upgrades() -> None:
    """``_upgrade_source`` (and the steps it calls) with ``UpgradeGenerator``'s types."""
    prices = _frozen([1.0, 2.0, 2.5], np.float64)
    _upgrade_source(
        np.array([0], dtype=np.int64),
        _frozen([0, 0, -1], np.int64),
        _frozen([0, 2], np.int64),
        _frozen([0, 1], np.int64),
        prices,
        _frozen([0.5, 1.0, 1.25], np.float64),
        _frozen(np.ones((3, 2)), np.float32),
        _frozen([1.0, 1.0, 0.0], np.float32),
        0.0,
        3.0,
        1,
    )


register_warm_up(_warm_up_upgrades)


# -- replenishment -----------------------------------------------------------------------


class ReplenishmentGenerator:
    """Items the customer buys at a regular interval and is due to buy again.

    Due when ``now - last purchase >= interval * (1 - tolerance)``; needs ``context.now`` and
    a customer (their purchase history, so only with consent, like ALS).
    """

    def __init__(self, artifacts: ModelArtifacts, *, tolerance: float = 0.2) -> None:
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
        self.kind = Kind.REPLENISH
        self._cycles = artifacts.purchase_cycles
        self._n_users = len(artifacts.user_ids)
        self._tolerance = tolerance

    def generate(
        self,
        *,
        anchors: IntArray,
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        cycles = self._cycles
        now = context.now if context is not None else None
        if cycles is None or user_row is None or now is None or count <= 0:
            return empty_candidates()
        if not 0 <= user_row < self._n_users:
            raise ValueError(f"user_row {user_row} out of range for {self._n_users} users")
        start, stop = int(cycles.indptr[user_row]), int(cycles.indptr[user_row + 1])
        items, scores = _due_items(
            cycles.items[start:stop],
            cycles.last_purchase_us[start:stop],
            cycles.interval_days[start:stop],
            epoch_us(now),
            1.0 - self._tolerance,
            count,
        )
        if items.size == 0:
            return empty_candidates()
        return _candidates(items, scores, self.kind)


@compiled
def _due_items(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    items: npt.NDArray[np.integer],
    last_purchase_us: npt.NDArray[np.int64],
    interval_days: npt.NDArray[np.floating],
    now_us: int,
    due_ratio: float,
    count: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """One customer's cycles (items ascending) that are due: days since the last purchase
    over the interval at least ``due_ratio``, scored ``min(r, 1 / r)``; the ``count`` best
    (ties: the lower item)."""
    size = items.shape[0]
    due_items = np.empty(size, dtype=np.int64)
    due_scores = np.empty(size, dtype=np.float64)
    due = 0
    for at in range(size):
        elapsed_days = (now_us - last_purchase_us[at]) / _MICROSECONDS_PER_DAY
        interval = np.float64(interval_days[at])
        if interval != 0:
            ratio = elapsed_days / interval
        else:  # as numpy divides (compiled code would raise): inf, or NaN for 0 / 0
            ratio = np.inf * np.sign(elapsed_days) if elapsed_days != 0 else np.nan
        if ratio >= due_ratio:
            due_items[due] = items[at]
            due_scores[due] = min(ratio, 1.0 / ratio)
            due += 1
    # Scores of due items are in (0, 1]: the clipping changes none.
    return best_items(due_items[:due], due_scores[:due], count)


def _warm_up_replenishment() -> None:
    items = np.array([1, 2], dtype=np.int32)
    last_purchase_us = np.array([0, 10], dtype=np.int64)
    interval_days = np.array([1.0, 2.0], dtype=np.float32)
    # Served cycles are memory-mapped read-only, trained ones in memory: both types.
    now_us = _MICROSECONDS_PER_DAY * 3
    _due_items(items, last_purchase_us, interval_days, now_us, 0.8, 1)
    _due_items(
        read_only(items), read_only(last_purchase_us), read_only(interval_days), now_us, 0.8, 1
    )


register_warm_up(_warm_up_replenishment)


# -- popularity by category and region ---------------------------------------------------


class SegmentPopularityGenerator:
    """The best sellers of the request's segment, for cold start.

    The segment is the anchors' categories (from ``facts``) plus ``context.categories`` (new
    items the model does not know), ranked by the share of orders in ``context.region`` when
    the model has that region, else overall. With a region but no category, the region's
    best sellers; with neither, nothing: overall popularity is ``PopularityGenerator``'s job.
    """

    def __init__(self, artifacts: ModelArtifacts, facts: ItemFacts | None = None) -> None:
        self.kind = Kind.POPULAR
        self._n_items = len(artifacts.item_skus)
        # What ``_segment_source`` reads, read-only (one compiled signature, alone or in the
        # hybrid's pass); a region's shares as float64 once it is first asked for.
        self._popularity = _frozen(artifacts.popularity, np.float64)
        regional = artifacts.region_popularity
        self._region_row = (
            {region: row for row, region in enumerate(regional.regions)} if regional else {}
        )
        self._region_share = regional.share if regional is not None else None
        self._region_shares: dict[int, npt.NDArray[np.float64]] = {}
        # Each region's ranking, sorted once (stable: ties in item index order).
        self._region_order = (
            _frozen(np.argsort(-np.asarray(regional.share), axis=1, kind="stable"), np.int32)
            if regional is not None
            else None
        )
        self._facts = facts
        if facts is not None:
            _check_facts(facts, artifacts)
            self._category_of = {name: code for code, name in enumerate(facts.categories)}
            groups = _Groups.of(facts.category_code, n_groups=len(facts.categories))
            self._groups = (_frozen(groups.indptr, np.int64), _frozen(groups.members, np.int64))
        else:
            self._category_of = {}
            self._groups = (_NO_ROWS, _NO_ROWS)  # no categories: regional ranking only

    def generate(
        self,
        *,
        anchors: IntArray,
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        anchor_rows = _anchor_rows(anchors, self._n_items)
        if count <= 0:
            return empty_candidates()
        items = np.empty(count, dtype=np.int32)
        scores = np.empty(count, dtype=np.float32)
        codes, indptr, members, shares, region_order = self._request_inputs(anchor_rows, context)
        filled = _segment_source(
            codes, indptr, members, shares, region_order, int(count), items, scores, 0
        )
        if not filled:
            return empty_candidates()
        return _candidates(items[:filled], scores[:filled], self.kind)

    def _request_inputs(
        self, anchor_rows: npt.NDArray[np.int64], context: GenerationContext | None
    ) -> _SegmentInputs:
        """``_segment_source``'s inputs for a request: the segment's category codes, the
        category groups, the shares it ranks by (the region's, else overall) and the region's
        ranking (empty: no region)."""
        region = context.region if context is not None else None
        region_row = self._region_row.get(region) if region is not None else None
        shares, region_order = self._popularity, _NO_ORDER
        if region_row is not None and self._region_share is not None:
            converted = self._region_shares.get(region_row)
            if converted is None:
                converted = self._region_shares[region_row] = _frozen(
                    self._region_share[region_row], np.float64
                )
            shares = converted
        if region_row is not None and self._region_order is not None:
            region_order = self._region_order[region_row]
        codes = self._segment_categories(anchor_rows, context)
        return codes, *self._groups, shares, region_order

    def _segment_categories(
        self, anchor_rows: npt.NDArray[np.int64], context: GenerationContext | None
    ) -> npt.NDArray[np.int64]:
        if self._facts is None:
            return np.empty(0, dtype=np.int64)
        # A set over a request's few codes: np.unique's machinery costs more than the work.
        codes = set(self._facts.category_code[anchor_rows].tolist())
        if context is not None and context.categories:
            codes.update(self._category_of.get(name, -1) for name in context.categories)
        codes.discard(-1)
        return np.array(sorted(codes), dtype=np.int64)


@compiled
def _segment_best(
    categories: npt.NDArray[np.int64],
    indptr: npt.NDArray[np.int64],
    members: npt.NDArray[np.int64],
    shares: npt.NDArray[np.float64],
    count: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The categories' members with a share above 0, the ``count`` best by share (ties: the
    lower item index), scores divided by the best one: what ``_Groups.gather``, a sort,
    ``_best_positions`` and ``_divide_by_max`` give, in one pass (an item has one category,
    so the gathered members are distinct)."""
    total = 0
    for code in categories:
        total += indptr[code + 1] - indptr[code]
    gathered = np.empty(total, dtype=np.int64)
    filled = 0
    for code in categories:
        for at in range(indptr[code], indptr[code + 1]):
            gathered[filled] = members[at]
            filled += 1
    gathered = gathered[ascending_order(gathered)]  # so that ties go to the lower index
    kept_items = np.empty(total, dtype=np.int64)
    kept_shares = np.empty(total, dtype=np.float64)
    kept = 0
    for item in gathered:
        if shares[item] > 0:
            kept_items[kept] = item
            kept_shares[kept] = shares[item]
            kept += 1
    best = descending_order(kept_shares[:kept])[: min(count, kept)]
    items = np.empty(best.shape[0], dtype=np.int32)
    scores = np.empty(best.shape[0], dtype=np.float32)
    top = kept_shares[best[0]] if best.shape[0] else 0.0
    for at in range(best.shape[0]):
        items[at] = kept_items[best[at]]
        scores[at] = min(max(kept_shares[best[at]] / top, 0.0), 1.0) if top > 0 else 0.0
    return items, scores


@compiled_inline
def _append(
    source_items: npt.NDArray[np.int32],
    source_scores: npt.NDArray[np.float32],
    items: npt.NDArray[np.int32],
    scores: npt.NDArray[np.float32],
    filled: int,
) -> int:
    for at in range(source_items.shape[0]):
        items[filled] = source_items[at]
        scores[filled] = source_scores[at]
        filled += 1
    return filled


@compiled
def _segment_source(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    codes: npt.NDArray[np.int64],
    indptr: npt.NDArray[np.int64],
    members: npt.NDArray[np.int64],
    shares: npt.NDArray[np.float64],
    region_order: npt.NDArray[np.int32],
    count: int,
    items: npt.NDArray[np.int32],
    scores: npt.NDArray[np.float32],
    filled: int,
) -> int:
    """``SegmentPopularityGenerator.generate``'s list appended to ``items`` and ``scores``:
    the segment's best sellers, else the region's (``region_order``, empty: no region)."""
    if codes.shape[0] and indptr.shape[0]:
        best, best_scores = _segment_best(codes, indptr, members, shares, count)
        return _append(best, best_scores, items, scores, filled)
    if not region_order.shape[0]:
        return filled
    start, top = filled, 0.0
    for at in range(min(count, region_order.shape[0])):
        item = region_order[at]
        if shares[item] > 0:
            items[filled] = item
            top = max(top, shares[item])
            filled += 1
    for at in range(start, filled):
        # _divide_by_max: the share over the best one, clipped to [0, 1], as float32
        scores[at] = min(max(shares[items[at]] / top, 0.0), 1.0) if top > 0 else 0.0
    return filled


def _warm_up_segments() -> None:
    """``_segment_source`` with ``SegmentPopularityGenerator``'s types, by category and by
    region."""
    indptr, members = _frozen([0, 2], np.int64), _frozen([0, 1], np.int64)
    shares, region_order = _frozen([0.5, 0.25], np.float64), _frozen([0, 1], np.int32)
    for codes in (np.array([0], dtype=np.int64), np.empty(0, dtype=np.int64)):
        items, scores = np.empty(1, dtype=np.int32), np.empty(1, dtype=np.float32)
        _segment_source(codes, indptr, members, shares, region_order, 1, items, scores, 0)


register_warm_up(_warm_up_segments)


# -- generators from weights -------------------------------------------------------------


@dataclass(frozen=True)
class HybridWeights:
    """A weight per generator; 0 leaves the generator out. One non-zero weight means that
    generator alone; several mean a ``HybridGenerator``, which needs ``popular`` > 0."""

    cross_sell: float = 1.0  # ItemItemGenerator (co-occurrence cosine)
    personal: float = 1.0  # AlsGenerator
    popular: float = 0.2  # PopularityGenerator (overall; the hybrid's backfill)
    factor_cross_sell: float = 0.0  # FactorItemItemGenerator
    bundle: float = 0.0  # BundleGenerator
    upgrade: float = 0.0  # UpgradeGenerator (needs item facts)
    replenish: float = 0.0  # ReplenishmentGenerator (needs context.now)
    segment_popular: float = 0.0  # SegmentPopularityGenerator (categories need item facts)

    @classmethod
    def only(cls, name: str, weight: float = 1.0) -> HybridWeights:
        """The one generator ``name`` (a field name) alone."""
        if name not in {field.name for field in fields(cls)}:
            raise ValueError(f"no generator weight named {name!r}")
        zero = dict.fromkeys((field.name for field in fields(cls)), 0.0)
        return cls(**{**zero, name: weight})

    def as_dict(self) -> dict[str, float]:
        return {field.name: float(getattr(self, field.name)) for field in fields(self)}


def build_generator(
    artifacts: ModelArtifacts,
    weights: HybridWeights,
    *,
    facts: ItemFacts | None = None,
    replenish_tolerance: float = 0.2,
) -> CandidateGenerator:
    """The generator ``weights`` describe over ``artifacts`` (see ``HybridWeights``)."""
    chosen = {name: weight for name, weight in weights.as_dict().items() if weight != 0}
    if not all(math.isfinite(weight) and weight > 0 for weight in chosen.values()):
        raise ValueError(f"generator weights must be finite and >= 0: {weights}")
    if not chosen:
        raise ValueError("at least one generator weight must be positive")
    if facts is None and (weights.upgrade or weights.segment_popular):
        raise ValueError("upgrade and segment popularity need the item master's facts")
    generators: list[CandidateGenerator] = []
    for name in chosen:
        generators.append(_make(name, artifacts, facts, replenish_tolerance))
    if len(generators) == 1:
        return generators[0]
    return CompiledHybridGenerator(generators, list(chosen.values()))


def _make(
    name: str, artifacts: ModelArtifacts, facts: ItemFacts | None, replenish_tolerance: float
) -> CandidateGenerator:
    if name == "cross_sell":
        return ItemItemGenerator(artifacts)
    if name == "personal":
        return AlsGenerator(artifacts)
    if name == "popular":
        return PopularityGenerator(artifacts)
    if name == "factor_cross_sell":
        return FactorItemItemGenerator(artifacts)
    if name == "bundle":
        return BundleGenerator(artifacts)
    if name == "upgrade":
        assert facts is not None  # checked by build_generator
        return UpgradeGenerator(artifacts, facts)
    if name == "replenish":
        return ReplenishmentGenerator(artifacts, tolerance=replenish_tolerance)
    if name == "segment_popular":
        return SegmentPopularityGenerator(artifacts, facts)
    raise ValueError(f"no generator named {name!r}")


# -- the hybrid in one compiled pass -----------------------------------------------------

# What each source of a ``CompiledHybridGenerator`` is, in its plan.
_SOURCE_CROSS_SELL, _SOURCE_FACTOR, _SOURCE_BUNDLE = 0, 1, 2
_SOURCE_UPGRADE, _SOURCE_SEGMENT, _SOURCE_POPULAR = 3, 4, 5
_SOURCE_GIVEN = 6  # generated in Python before the pass (customer models, any other kind)

# The generators the pass runs itself, by exact type (a subclass may generate otherwise).
_PASS_SOURCES: dict[type, int] = {
    ItemItemGenerator: _SOURCE_CROSS_SELL,
    FactorItemItemGenerator: _SOURCE_FACTOR,
    BundleGenerator: _SOURCE_BUNDLE,
    UpgradeGenerator: _SOURCE_UPGRADE,
    SegmentPopularityGenerator: _SOURCE_SEGMENT,
    PopularityGenerator: _SOURCE_POPULAR,
}
# Generators that propose nothing without a customer: a guest's request skips them.
_NEEDS_A_CUSTOMER = (AlsGenerator, ReplenishmentGenerator)
# Generators that check anchors against the model's item count.
_ANCHORED = (
    ItemItemGenerator,
    _NeighbourTableGenerator,
    UpgradeGenerator,
    SegmentPopularityGenerator,
)


_Table = tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]  # items, scores


def _no_table() -> _Table:
    return _frozen(np.zeros((0, 0)), np.int32), _frozen(np.zeros((0, 0)), np.float32)


def _table_arrays(generator: CandidateGenerator | None) -> _Table:
    table = generator._table if isinstance(generator, _NeighbourTableGenerator) else None
    if table is None:
        return _no_table()
    return _frozen(table.items, np.int32), _frozen(table.scores, np.float32)


class CompiledHybridGenerator(HybridGenerator):
    """``HybridGenerator`` over the generators ``build_generator`` makes, run as one compiled
    pass: the same sources in the same order, each computed by the same compiled steps, and
    the same merge, without a Python call, a boxed array and a concatenation per source
    (which had cost as much as the work). A test holds it equal to ``HybridGenerator``.

    Generators of other types, and the customer models when there is a customer, generate
    in Python first; their lists enter the pass in their place in the order.
    """

    def __init__(self, generators: Sequence[CandidateGenerator], weights: Sequence[float]) -> None:
        super().__init__(generators, weights)
        by_type = {type(generator): generator for generator in generators}
        self._plan = _frozen(
            [_PASS_SOURCES.get(type(g), _SOURCE_GIVEN) for g in generators], np.int64
        )
        self._plan_weights = _frozen(self._weights, np.float64)
        self._plan_kinds = _frozen([int(g.kind) for g in generators], np.int8)
        self._given = tuple(g for g in generators if type(g) not in _PASS_SOURCES)
        # Anchors are checked against the model once, as each anchored generator checks them.
        sized = [g._n_items for g in generators if isinstance(g, _ANCHORED)]
        self._n_items = sized[0] if sized else np.iinfo(np.int64).max
        cross_sell = by_type.get(ItemItemGenerator)
        cross_sell_table = (
            (
                _frozen(cross_sell._neighbours, np.int32),
                _frozen(cross_sell._neighbour_scores, np.float32),
            )
            if isinstance(cross_sell, ItemItemGenerator)
            else _no_table()
        )
        factor_table = _table_arrays(by_type.get(FactorItemItemGenerator))
        bundle_table = _table_arrays(by_type.get(BundleGenerator))
        self._tables: tuple[_Table, _Table, _Table] = (cross_sell_table, factor_table, bundle_table)
        upgrade = by_type.get(UpgradeGenerator)
        self._upgrade = upgrade._arrays if isinstance(upgrade, UpgradeGenerator) else _NO_UPGRADES
        segment = by_type.get(SegmentPopularityGenerator)
        self._segment = segment if isinstance(segment, SegmentPopularityGenerator) else None
        popular = by_type.get(PopularityGenerator)
        self._popular = (
            (_frozen(popular._order, np.int32), _frozen(popular._ranked_scores, np.float32))
            if isinstance(popular, PopularityGenerator)
            else (_NO_ORDER, _frozen(np.zeros(0), np.float32))
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
        anchor_rows = _anchor_rows(anchors, self._n_items)
        given = [
            generator.generate(anchors=anchors, user_row=user_row, count=count, context=context)
            if user_row is not None or not isinstance(generator, _NEEDS_A_CUSTOMER)
            else empty_candidates()
            for generator in self._given
        ]
        segment: _SegmentInputs = (
            self._segment._request_inputs(anchor_rows, context)
            if self._segment is not None
            else (np.empty(0, dtype=np.int64), _NO_ROWS, _NO_ROWS, _NO_SHARES, _NO_ORDER)
        )
        # One tuple: mypy cannot follow several unpacked tuples onto 31 parameters.
        arguments: tuple[Any, ...] = (
            self._plan,
            self._plan_weights,
            self._plan_kinds,
            int(count),
            anchor_rows,
            *self._tables[0],
            *self._tables[1],
            *self._tables[2],
            *self._upgrade,
            *segment,
            *self._popular,
            _concatenated([part.item_idx for part in given], np.int32),
            _concatenated([part.score for part in given], np.float32),
            _concatenated([part.kind for part in given], np.int8),
            np.array([len(part) for part in given], dtype=np.int64),
        )
        items, scores, kinds = _hybrid_pass(*arguments)
        return Candidates(item_idx=items, score=scores, kind=kinds)


_NO_UPGRADES: _UpgradeArrays = (
    *(_NO_ROWS, _NO_ROWS, _NO_ROWS),
    *(_frozen(np.zeros(0), np.float64), _frozen(np.zeros(0), np.float64)),
    _frozen(np.zeros((0, 0)), np.float32),
    _frozen(np.zeros(0), np.float32),
    0.0,
    2.0,
)


def _concatenated(parts: list[npt.NDArray[Any]], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)


@compiled
def _hybrid_pass(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    plan: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float64],
    kinds: npt.NDArray[np.int8],
    count: int,
    anchor_rows: npt.NDArray[np.int64],
    cross_sell_items: npt.NDArray[np.int32],
    cross_sell_scores: npt.NDArray[np.float32],
    factor_items: npt.NDArray[np.int32],
    factor_scores: npt.NDArray[np.float32],
    bundle_items: npt.NDArray[np.int32],
    bundle_scores: npt.NDArray[np.float32],
    upgrade_category: npt.NDArray[np.int64],
    upgrade_indptr: npt.NDArray[np.int64],
    upgrade_members: npt.NDArray[np.int64],
    upgrade_price: npt.NDArray[np.float64],
    upgrade_margin: npt.NDArray[np.float64],
    factors: npt.NDArray[np.float32],
    norms: npt.NDArray[np.float32],
    min_similarity: float,
    max_price_ratio: float,
    segment_codes: npt.NDArray[np.int64],
    segment_indptr: npt.NDArray[np.int64],
    segment_members: npt.NDArray[np.int64],
    shares: npt.NDArray[np.float64],
    region_order: npt.NDArray[np.int32],
    popular_order: npt.NDArray[np.int32],
    popular_scores: npt.NDArray[np.float32],
    given_items: npt.NDArray[np.int32],
    given_scores: npt.NDArray[np.float32],
    given_kinds: npt.NDArray[np.int8],
    given_lengths: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.int8]]:
    """Every source of the plan in order, as its generator computes it, then the hybrid's
    merge (``merge_weighted_sources``) over the sources that proposed anything."""
    sources = plan.shape[0]
    room = sources * count + given_items.shape[0]
    items = np.empty(room, dtype=np.int32)
    scores = np.empty(room, dtype=np.float32)
    item_kinds = np.empty(room, dtype=np.int8)
    lengths = np.zeros(sources, dtype=np.int64)
    active_weights = np.zeros(sources, dtype=np.float64)
    filled, active, weight_sum, given, given_at = 0, 0, 0.0, 0, 0
    has_anchors = anchor_rows.shape[0] > 0
    for slot in range(sources):
        source = plan[slot]
        start = filled
        if source == _SOURCE_GIVEN:
            length = given_lengths[given]
            for at in range(length):
                items[filled] = given_items[given_at + at]
                scores[filled] = given_scores[given_at + at]
                item_kinds[filled] = given_kinds[given_at + at]
                filled += 1
            given += 1
            given_at += length
        elif source == _SOURCE_POPULAR:
            for at in range(min(count, popular_order.shape[0])):
                items[filled] = popular_order[at]
                scores[filled] = popular_scores[at]
                filled += 1
        elif source == _SOURCE_SEGMENT:
            filled = _segment_source(
                segment_codes, segment_indptr, segment_members, shares, region_order, count,
                items, scores, filled,
            )  # fmt: skip
        elif not has_anchors:
            pass  # the table and upgrade sources propose for anchors only
        elif source == _SOURCE_UPGRADE:
            best, best_scores = _upgrade_source(
                anchor_rows, upgrade_category, upgrade_indptr, upgrade_members, upgrade_price,
                upgrade_margin, factors, norms, min_similarity, max_price_ratio, count,
            )  # fmt: skip
            filled = _append(best, best_scores, items, scores, filled)
        else:
            if source == _SOURCE_CROSS_SELL:
                table_items, table_scores = cross_sell_items, cross_sell_scores
                score_kind, positive_only = NEIGHBOUR_SCORE_AS_IS, False
            elif source == _SOURCE_FACTOR:
                table_items, table_scores = factor_items, factor_scores
                score_kind, positive_only = NEIGHBOUR_SCORE_AS_IS, True
            else:
                table_items, table_scores = bundle_items, bundle_scores
                score_kind, positive_only = NEIGHBOUR_SCORE_LIFT, True
            if table_items.shape[0]:
                merged, merged_scores = merge_neighbour_rows(
                    table_items, table_scores, anchor_rows, count, score_kind, positive_only
                )
                filled = _append(merged, merged_scores, items, scores, filled)
        if filled > start:
            if source != _SOURCE_GIVEN:
                item_kinds[start:filled] = kinds[slot]
            lengths[active] = filled - start
            active_weights[active] = weights[slot]
            weight_sum += weights[slot]
            active += 1
    if not active:
        return (
            np.empty(0, dtype=np.int32),
            np.empty(0, dtype=np.float32),
            np.empty(0, dtype=np.int8),
        )
    return merge_weighted_sources(
        items[:filled],
        scores[:filled],
        item_kinds[:filled],
        lengths[:active],
        active_weights[:active],
        weight_sum,
        count,
    )


def _warm_up_hybrid_pass() -> None:
    """The pass on a two-item model, with the argument types ``CompiledHybridGenerator``
    gives it: read-only arrays from construction, writable ones made per request."""
    table_items = _frozen([[1], [0]], np.int32)
    table_scores = _frozen([[2.0], [2.0]], np.float32)
    codes, floats = _frozen([0, 0], np.int64), _frozen([1.0, 2.0], np.float64)
    _hybrid_pass(
        _frozen(list(range(7)), np.int64),
        _frozen([1.0] * 7, np.float64),
        _frozen([1] * 7, np.int8),
        2,
        np.array([0], dtype=np.int64),
        *(table_items, table_scores, table_items, table_scores, table_items, table_scores),
        *(codes, _frozen([0, 2], np.int64), _frozen([0, 1], np.int64), floats, floats),
        *(_frozen([[1.0], [1.0]], np.float32), _frozen([1.0, 1.0], np.float32), 0.0, 3.0),
        np.array([0], dtype=np.int64),
        *(_frozen([0, 2], np.int64), _frozen([0, 1], np.int64), floats, _frozen([1, 0], np.int32)),
        *(_frozen([1, 0], np.int32), _frozen([1.0, 0.5], np.float32)),
        np.array([1], dtype=np.int32),
        np.array([0.5], dtype=np.float32),
        np.array([1], dtype=np.int8),
        np.array([1], dtype=np.int64),
    )


register_warm_up(_warm_up_hybrid_pass)


def _max_runs(
    keys: npt.NDArray[np.integer], values: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.integer], npt.NDArray[np.float64]]:
    """Unique keys (ascending) and the largest value of each."""
    if keys.size == 0:
        return keys, values
    order = np.lexsort((values, keys))
    sorted_keys = keys[order]
    last_of_run = np.r_[sorted_keys[1:] != sorted_keys[:-1], True]
    return sorted_keys[last_of_run], values[order][last_of_run]
