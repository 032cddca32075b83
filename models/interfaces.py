"""The shapes every model part agrees on: trained artifacts and candidate lists.

Kept apart from fitting code so that the service can depend on these types without pulling
in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt


class Kind(IntEnum):
    """Which generator proposed a candidate; the wire name is ``Kind.X.wire``."""

    CROSS_SELL = 0  # item-item neighbours of the basket / PDP item (co-occurrence or ALS)
    PERSONAL = 1  # ALS for a known customer who consented
    POPULAR = 2  # popularity (overall, or by category / region), for cold start and backfill
    # Values are stable on the wire and in decision records: new kinds only ever append.
    BUNDLE = 3  # frequently bought together with the basket (co-occurrence lift)
    UPGRADE = 4  # a premium alternative to a basket item: same category, dearer, more margin
    REPLENISH = 5  # an item the customer buys at a regular interval and is due again
    SUBSTITUTE = 6  # an in-stock alternative to a basket item no eligible node can fulfil

    @property
    def wire(self) -> str:
        return self.name.lower()


# Per kind value: proposed from the customer's own purchase history, so shown only with
# consent. A table to index with an array of kinds: np.isin over a few kinds costs more
# than several rules together.
USES_HISTORY = np.zeros(max(Kind) + 1, dtype=np.bool_)
USES_HISTORY[[Kind.PERSONAL, Kind.REPLENISH]] = True
USES_HISTORY.flags.writeable = False


@dataclass(frozen=True)
class NeighbourTable:
    """Top-``k`` related items per row as dense padded arrays: a fancy-index away at request
    time, and memory-mappable. Rows are model items (or regions)."""

    items: npt.NDArray[np.int32]  # (rows, k) model item indexes, -1 padded
    scores: npt.NDArray[np.float32]  # (rows, k), descending per row, 0 padded


@dataclass(frozen=True)
class RegionPopularity:
    """Share of each region's orders containing each item (regions from the order's store)."""

    regions: tuple[str, ...]  # row order of ``share``, sorted
    share: npt.NDArray[np.float32]  # (n_regions, n_items)


@dataclass(frozen=True)
class PurchaseCycles:
    """Per known customer, the items bought again and again, with their typical interval.

    A CSR layout over ``ModelArtifacts.user_ids`` rows: customer ``u``'s entries are
    ``indptr[u]:indptr[u + 1]`` of the other arrays, items ascending.
    """

    indptr: npt.NDArray[np.int64]  # (n_users + 1,)
    items: npt.NDArray[np.int32]  # (entries,) model item indexes
    interval_days: npt.NDArray[np.float32]  # median days between the customer's purchases
    last_purchase_us: npt.NDArray[np.int64]  # last purchase day, microseconds since the epoch


@dataclass(frozen=True)
class ModelArtifacts:
    """Everything ``upsell train`` produces; saved as .npy + JSON, loaded memory-mapped.

    Item indexes are *model* indexes into ``item_skus``; the service maps them to the
    snapshot's catalog once per (model, snapshot) pair.
    """

    version: str  # content hash of the arrays and parameters
    item_skus: tuple[str, ...]
    user_ids: tuple[str, ...]  # customer ids seen in training, row order of user_factors
    user_factors: npt.NDArray[np.float32]  # (n_users, factors)
    item_factors: npt.NDArray[np.float32]  # (n_items, factors)
    neighbours: npt.NDArray[np.int32]  # (n_items, k) model item indexes, -1 padded
    neighbour_scores: npt.NDArray[np.float32]  # (n_items, k), descending per row, 0 padded
    popularity: npt.NDArray[np.float32]  # (n_items,) share of orders containing the item
    trained_at: str  # ISO 8601
    params: dict[str, object] = field(default_factory=dict)
    # Optional parts (artifact format 2). None when loaded from format 1 artifacts or not
    # trained; the generators that need a part then propose nothing.
    factor_neighbours: NeighbourTable | None = None  # cosine of ALS item factors
    bundles: NeighbourTable | None = None  # co-occurrence lift, support-filtered; scores = lift
    region_popularity: RegionPopularity | None = None
    purchase_cycles: PurchaseCycles | None = None


@dataclass(frozen=True)
class Candidates:
    """Candidate items from one or more generators, parallel arrays of equal length.

    ``score`` is relevance in [0, 1], comparable across generators; item indexes are unique.
    """

    item_idx: npt.NDArray[np.int32]
    score: npt.NDArray[np.float32]
    kind: npt.NDArray[np.int8]  # Kind values

    def __len__(self) -> int:
        return int(self.item_idx.shape[0])


@dataclass(frozen=True)
class GenerationContext:
    """What a request knows beyond its anchors and customer. Every field is optional, and a
    generator that needs a missing one proposes nothing rather than guessing."""

    now: datetime | None = None  # naive UTC like ``ordered_at``; replenishment is due against it
    region: str | None = None  # the customer's or the store's region, for regional popularity
    # Categories of basket / PDP items the model does not know (new SKUs): cold-start
    # popularity can still use them. Categories of known anchors come from the item master.
    categories: tuple[str, ...] = ()


class CandidateGenerator(Protocol):
    """One source of candidates. Anchors are model item indexes of the basket or PDP item."""

    kind: Kind

    def generate(
        self,
        *,
        anchors: npt.NDArray[np.int32],
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        """Up to ``count`` candidates, best first, excluding nothing (rules filter later).

        ``context`` is optional so that callers written before it keep working.
        """
        ...
