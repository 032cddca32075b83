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
    _divide_by_max,
    best_items,
    empty_candidates,
    merge_neighbour_rows,
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
from rules.compiled import compiled, read_only, register_warm_up
from rules.staleness import epoch_us

IntArray = npt.NDArray[np.int32]
_MICROSECONDS_PER_DAY = 86_400_000_000


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
        self._factors = artifacts.item_factors
        self._norms = np.linalg.norm(np.asarray(artifacts.item_factors), axis=1)
        self._price = facts.unit_price
        self._margin = facts.unit_price - facts.unit_cost
        priced = np.isfinite(self._price) & np.isfinite(self._margin)
        self._category = np.where(priced, facts.category_code, -1).astype(np.int64)
        self._groups = _Groups.of(self._category, n_groups=len(facts.categories))
        self._min_similarity = min_similarity
        self._max_price_ratio = max_price_ratio

    def generate(
        self,
        *,
        anchors: IntArray,
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        anchor_rows = _anchor_rows(anchors, self._n_items)
        anchor_rows = anchor_rows[self._category[anchor_rows] >= 0]
        if count <= 0 or anchor_rows.size == 0:
            return empty_candidates()
        anchor, member = _upgrade_pairs(
            anchor_rows,
            self._category,
            self._groups.indptr,
            self._groups.members,
            self._price,
            self._margin,
            self._max_price_ratio,
        )
        if member.size == 0:
            return empty_candidates()
        # Cosine over the surviving pairs only: one row-wise dot product per pair.
        dots = np.einsum(
            "ij,ij->i",
            np.asarray(self._factors[anchor], dtype=np.float64),
            np.asarray(self._factors[member], dtype=np.float64),
        )
        items, scores = _best_upgrades(
            anchor, member, dots, self._norms, self._min_similarity, count
        )
        if items.size == 0:
            return empty_candidates()
        return _candidates(items, scores, self.kind)


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
    order = np.argsort(similar_items[:kept], kind="mergesort")
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
    prices = np.array([1.0, 2.0, 2.5])
    _upgrade_pairs(
        np.array([0], dtype=np.int64),
        np.array([0, 0, -1], dtype=np.int64),
        np.array([0, 2], dtype=np.int64),
        np.array([0, 1], dtype=np.int64),
        prices,
        prices / 2,
        3.0,
    )
    pairs = np.array([0, 0], dtype=np.int64)
    _best_upgrades(
        pairs,
        np.array([1, 2], dtype=np.int64),
        np.array([0.5, 0.25]),
        np.array([1.0, 1.0, 0.0], dtype=np.float32),
        0.0,
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
        self._popularity = np.asarray(artifacts.popularity, dtype=np.float64)
        regional = artifacts.region_popularity
        self._region_row = (
            {region: row for row, region in enumerate(regional.regions)} if regional else {}
        )
        self._region_share = regional.share if regional is not None else None
        # Each region's ranking, sorted once (stable: ties in item index order).
        self._region_order = (
            np.argsort(-np.asarray(regional.share), axis=1, kind="stable").astype(np.int32)
            if regional is not None
            else None
        )
        self._facts = facts
        if facts is not None:
            _check_facts(facts, artifacts)
            self._category_of = {name: code for code, name in enumerate(facts.categories)}
            self._groups: _Groups | None = _Groups.of(
                facts.category_code, n_groups=len(facts.categories)
            )
        else:
            self._category_of = {}
            self._groups = None

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
        region = context.region if context is not None else None
        region_row = self._region_row.get(region) if region is not None else None
        shares = (
            np.asarray(self._region_share[region_row], dtype=np.float64)
            if region_row is not None and self._region_share is not None
            else self._popularity
        )
        categories = self._segment_categories(anchor_rows, context)
        if categories.size and self._groups is not None:
            items, scores = _segment_best(
                categories, self._groups.indptr, self._groups.members, shares, count
            )
            if items.size == 0:
                return empty_candidates()
            return _candidates(items, scores, self.kind)
        if region_row is not None and self._region_order is not None:
            ranked = self._region_order[region_row, :count]
            ranked = ranked[shares[ranked] > 0]
            return _candidates(ranked, _divide_by_max(shares[ranked]), self.kind)
        return empty_candidates()

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
    gathered.sort()  # ascending, so that ties go to the lower index
    kept_items = np.empty(total, dtype=np.int64)
    kept_shares = np.empty(total, dtype=np.float64)
    kept = 0
    for item in gathered:
        if shares[item] > 0:
            kept_items[kept] = item
            kept_shares[kept] = shares[item]
            kept += 1
    best = np.argsort(-kept_shares[:kept], kind="mergesort")[: min(count, kept)]
    items = np.empty(best.shape[0], dtype=np.int32)
    scores = np.empty(best.shape[0], dtype=np.float32)
    top = kept_shares[best[0]] if best.shape[0] else 0.0
    for at in range(best.shape[0]):
        items[at] = kept_items[best[at]]
        scores[at] = min(max(kept_shares[best[at]] / top, 0.0), 1.0) if top > 0 else 0.0
    return items, scores


def _warm_up_segments() -> None:
    _segment_best(
        np.array([0], dtype=np.int64),
        np.array([0, 2], dtype=np.int64),
        np.array([0, 1], dtype=np.int64),
        np.array([0.5, 0.25]),
        1,
    )


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
    return HybridGenerator(generators, list(chosen.values()))


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
