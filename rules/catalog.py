"""The item master and node table as numpy arrays, indexed by catalog position.

Built once per snapshot version and shared by every request; rules index these arrays with
candidate catalog indexes instead of looking anything up per item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
import polars as pl

from rules.staleness import epoch_us

_NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True, eq=False)
class Catalog:
    """Item master columns as arrays; ``index`` maps SKU to position."""

    skus: tuple[str, ...]
    names: tuple[str, ...]
    categories: tuple[str, ...]  # distinct category names; category_code indexes this
    category_code: npt.NDArray[np.int64]
    unit_cost: npt.NDArray[np.float64]
    unit_price: npt.NDArray[np.float64]
    promo_price: npt.NDArray[np.float64]  # NaN where there is no promotion
    # Microseconds since the epoch; the start is "never" where there is no promotion price,
    # so that the window test alone says whether a promotion is live.
    promo_start_us: npt.NDArray[np.int64]
    promo_end_us: npt.NDArray[np.int64]
    age_restricted: npt.NDArray[np.bool_]
    ship_to_home: npt.NDArray[np.bool_]
    return_rate: npt.NDArray[np.float64]
    brands: tuple[str | None, ...]
    index: dict[str, int]

    def __len__(self) -> int:
        return len(self.skus)

    def positions(self, skus: Iterable[str]) -> npt.NDArray[np.int64]:
        """Catalog positions of ``skus``; -1 for a SKU the item master does not have."""
        lookup = self.index.get
        return np.fromiter((lookup(sku, -1) for sku in skus), dtype=np.int64)

    def on_promotion(
        self, positions: npt.NDArray[np.int64], *, now: datetime
    ) -> npt.NDArray[np.bool_]:
        """True where a promotion price exists and ``now`` is inside [start, end)."""
        return promotion_live(
            self.promo_start_us[positions], self.promo_end_us[positions], now_us=epoch_us(now)
        )

    def effective_price(
        self, positions: npt.NDArray[np.int64], *, now: datetime
    ) -> npt.NDArray[np.float64]:
        """Promotion price inside its window, regular price otherwise."""
        return price_at(
            self.unit_price[positions],
            self.promo_price[positions],
            self.promo_start_us[positions],
            self.promo_end_us[positions],
            now_us=epoch_us(now),
        )


def promotion_live(
    promo_start_us: npt.NDArray[np.int64], promo_end_us: npt.NDArray[np.int64], *, now_us: int
) -> npt.NDArray[np.bool_]:
    """True where ``now_us`` is inside [start, end) (start is "never" without a promotion)."""
    live: npt.NDArray[np.bool_] = (promo_start_us <= now_us) & (now_us < promo_end_us)
    return live


def price_at(
    unit_price: npt.NDArray[np.float64],
    promo_price: npt.NDArray[np.float64],
    promo_start_us: npt.NDArray[np.int64],
    promo_end_us: npt.NDArray[np.int64],
    *,
    now_us: int,
) -> npt.NDArray[np.float64]:
    """The effective price: the promotion price inside its window, the regular one outside."""
    live = promotion_live(promo_start_us, promo_end_us, now_us=now_us)
    price: npt.NDArray[np.float64] = np.where(live, promo_price, unit_price)
    return price


def catalog_from_items(items: pl.DataFrame) -> Catalog:
    """Build the array form of a validated item master (``models.data.schema.ITEMS``)."""
    skus = tuple(items.get_column("sku").to_list())
    category_series = items.get_column("category")
    categories = tuple(sorted(category_series.unique().to_list()))
    code_of = {name: code for code, name in enumerate(categories)}
    category_code = np.fromiter(
        (code_of[name] for name in category_series.to_list()), dtype=np.int64, count=len(skus)
    )
    promo_price = items.get_column("promo_price").cast(pl.Float64).fill_null(np.nan).to_numpy()
    promo_start = items.get_column("promo_start").cast(pl.Datetime("us")).cast(pl.Int64)
    promo_end = items.get_column("promo_end").cast(pl.Datetime("us")).cast(pl.Int64)
    # A promotion without a start is live from the beginning; without an end, until replaced;
    # without a price, never.
    promo_start_us = promo_start.fill_null(np.iinfo(np.int64).min).to_numpy().astype(np.int64)
    promo_start_us[np.isnan(promo_price)] = _NEVER
    return Catalog(
        skus=skus,
        names=tuple(items.get_column("name").to_list()),
        categories=categories,
        category_code=category_code,
        unit_cost=items.get_column("unit_cost").to_numpy().astype(np.float64),
        unit_price=items.get_column("unit_price").to_numpy().astype(np.float64),
        promo_price=np.asarray(promo_price, dtype=np.float64),
        promo_start_us=promo_start_us,
        promo_end_us=promo_end.fill_null(_NEVER).to_numpy().astype(np.int64),
        age_restricted=items.get_column("age_restricted").to_numpy().astype(np.bool_),
        ship_to_home=items.get_column("ship_to_home").to_numpy().astype(np.bool_),
        return_rate=items.get_column("return_rate").to_numpy().astype(np.float64),
        brands=tuple(items.get_column("brand").to_list()),
        index={sku: position for position, sku in enumerate(skus)},
    )


@dataclass(frozen=True, eq=False)
class NodeTable:
    """Fulfillment nodes as arrays; ``index`` maps node id to position."""

    node_ids: tuple[str, ...]
    is_store: npt.NDArray[np.bool_]
    regions: tuple[str, ...]
    fulfillment_cost: npt.NDArray[np.float64]
    index: dict[str, int]

    def __len__(self) -> int:
        return len(self.node_ids)

    def in_region(self, region: str) -> npt.NDArray[np.int64]:
        return np.flatnonzero(np.asarray(self.regions, dtype=object) == region).astype(np.int64)

    def distribution_centres(self) -> npt.NDArray[np.int64]:
        return np.flatnonzero(~self.is_store).astype(np.int64)

    def ids(self, positions: Sequence[int] | npt.NDArray[np.int64]) -> tuple[str, ...]:
        return tuple(self.node_ids[int(position)] for position in positions)


def node_table_from_nodes(nodes: pl.DataFrame) -> NodeTable:
    """Build the array form of a validated node table (``models.data.schema.NODES``)."""
    node_ids = tuple(nodes.get_column("node_id").to_list())
    return NodeTable(
        node_ids=node_ids,
        is_store=(nodes.get_column("kind") == "store").to_numpy().astype(np.bool_),
        regions=tuple(nodes.get_column("region").to_list()),
        fulfillment_cost=nodes.get_column("fulfillment_cost").to_numpy().astype(np.float64),
        index={node_id: position for position, node_id in enumerate(node_ids)},
    )
