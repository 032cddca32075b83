"""Lookup tables fitted at training time beyond ALS and the cosine neighbours.

- ``bundle_table``: frequently-bought-together partners per item, by co-occurrence *lift*
  among pairs with a minimum *support* (orders containing both). Lift compares how often two
  items share an order with how often they would by chance, so it finds pairs that belong
  together rather than pairs that are both merely popular (what cosine leans towards); the
  support floor keeps lift, which is unstable on tiny counts, from crowning chance pairs.
- ``factor_neighbour_table``: nearest items by cosine of ALS item factors: "liked by the same
  customers", which also relates items never bought in one order (alternatives, upgrades).
- ``region_popularity``: share of each region's orders containing each item.
- ``purchase_cycles``: per (customer, item) bought on at least ``min_purchases`` distinct
  days, the median interval between those days and the last one, for replenishment.

Everything is vectorised: sparse products and sorts over all entries, the co-occurrence
product in row blocks so that its memory does not grow with the square of the catalog.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import polars as pl
import scipy.sparse as sp
from implicit.cpu.topk import topk as implicit_topk

from models.interfaces import NeighbourTable, PurchaseCycles, RegionPopularity
from rules.errors import InputError

# Rows of the item x item co-occurrence computed at once; each block's product is sparse.
_SPARSE_BLOCK_ROWS = 4096
_MICROSECONDS_PER_DAY = 86_400_000_000


def bundle_table(
    basket_items: sp.csr_matrix, *, k: int, min_support: int, min_lift: float
) -> NeighbourTable:
    """Top-``k`` bundle partners per item by lift, among pairs in ``min_support`` or more
    orders and with lift at least ``min_lift``; scores are the lift itself.

    ``lift(i, j) = n_ij * N / (n_i * n_j)`` with ``n_ij`` the orders containing both, ``n_i``
    those containing ``i`` and ``N`` all orders; 1.0 is independence. Ties rank by item index.
    """
    if k < 1 or min_support < 1 or not min_lift >= 0:
        raise InputError(
            f"bundles: need k >= 1, min_support >= 1, min_lift >= 0; got {k}, {min_support}, "
            f"{min_lift}"
        )
    baskets = sp.csr_matrix(basket_items, dtype=np.float32)
    baskets.data[:] = 1.0  # presence, whatever the weights
    n_orders, n_items = baskets.shape
    orders_per_item = np.bincount(baskets.indices, minlength=n_items).astype(np.float64)
    item_baskets = baskets.T.tocsr()  # (items, orders)

    items = np.full((n_items, k), -1, dtype=np.int32)
    scores = np.zeros((n_items, k), dtype=np.float32)
    for start in range(0, n_items, _SPARSE_BLOCK_ROWS):
        stop = min(start + _SPARSE_BLOCK_ROWS, n_items)
        together = sp.csr_matrix(item_baskets[start:stop] @ baskets)  # (block, items) n_ij
        rows = np.repeat(np.arange(start, stop), np.diff(together.indptr))
        cols = together.indices.astype(np.int64)
        support = together.data.astype(np.float64)
        lift = support * n_orders / (orders_per_item[rows] * orders_per_item[cols])
        keep = (cols != rows) & (support >= min_support) & (lift >= min_lift) & (lift > 0)
        _scatter_top_k(
            rows[keep], cols[keep], lift[keep].astype(np.float32), items=items, scores=scores
        )
    return NeighbourTable(items=items, scores=scores)


def factor_neighbour_table(item_factors: npt.NDArray[np.float32], *, k: int) -> NeighbourTable:
    """Top-``k`` items per item by cosine of their factors, positive similarities only, ties
    by item index.

    Items with all-zero factors (never bought by a known customer) have no neighbours and are
    nobody's neighbour. Exact and brute force (n_items^2 * factors flops) with implicit's
    batched, multi-threaded top-k; a catalog of millions would swap in an approximate index,
    the artifact staying the same.
    """
    if k < 1:
        raise InputError(f"factor neighbours: k must be at least 1, got {k}")
    factors = np.asarray(item_factors, dtype=np.float32)
    n_items = factors.shape[0]
    items = np.full((n_items, k), -1, dtype=np.int32)
    scores = np.zeros((n_items, k), dtype=np.float32)
    if n_items < 2:
        return NeighbourTable(items=items, scores=scores)
    norms = np.linalg.norm(factors, axis=1)
    unit = np.divide(factors, norms[:, None], out=np.zeros_like(factors), where=norms[:, None] > 0)
    # One extra per row: the item itself is (nearly always) its own best match.
    fetched = min(k + 1, n_items)
    top, top_scores = implicit_topk(unit, unit, fetched, num_threads=0)
    rows = np.repeat(np.arange(n_items, dtype=np.int64), fetched)
    cols = top.ravel().astype(np.int64)
    values = top_scores.ravel().astype(np.float32)
    keep = (cols != rows) & (cols >= 0) & (values > 0)
    _scatter_top_k(rows[keep], cols[keep], values[keep], items=items, scores=scores)
    return NeighbourTable(items=items, scores=scores)


def region_popularity(
    basket_items: sp.csr_matrix, order_regions: Sequence[str | None]
) -> RegionPopularity | None:
    """Share of each region's orders containing each item; None when no order has a region.

    ``order_regions`` is parallel to the rows of ``basket_items`` (None: region unknown, e.g.
    a web order with no store).
    """
    n_orders = basket_items.shape[0]
    if len(order_regions) != n_orders:
        raise InputError(
            f"region popularity: {len(order_regions)} order regions for {n_orders} orders"
        )
    known = [region for region in order_regions if region is not None]
    if not known:
        return None
    regions = tuple(sorted(set(known)))
    code_of = {region: code for code, region in enumerate(regions)}
    codes = np.fromiter(
        (-1 if region is None else code_of[region] for region in order_regions),
        dtype=np.int64,
        count=n_orders,
    )
    has_region = np.flatnonzero(codes >= 0)
    # Region x order indicator, times the binary basket matrix: orders per (region, item).
    indicator = sp.csr_matrix(
        (np.ones(has_region.size, dtype=np.float32), (codes[has_region], has_region)),
        shape=(len(regions), n_orders),
    )
    baskets = sp.csr_matrix(basket_items, dtype=np.float32)
    baskets.data[:] = 1.0
    counts = np.asarray((indicator @ baskets).todense(), dtype=np.float64)
    orders_per_region = np.bincount(codes[has_region], minlength=len(regions)).astype(np.float64)
    share = (counts / orders_per_region[:, None]).astype(np.float32)
    return RegionPopularity(regions=regions, share=np.ascontiguousarray(share))


def order_regions_from_nodes(
    order_lines: pl.DataFrame, nodes: pl.DataFrame, order_ids: Sequence[str]
) -> list[str | None]:
    """The region of each order (in ``order_ids`` order): its store node's region, or None
    for orders without a store or whose store is not a node."""
    regions = (
        order_lines.lazy()
        .select(pl.col("order_id").cast(pl.String), pl.col("store_id").cast(pl.String))
        .drop_nulls("store_id")
        .unique("order_id", keep="first")
        .join(
            nodes.lazy().select(pl.col("node_id").alias("store_id"), pl.col("region")),
            on="store_id",
            how="inner",
        )
        .select("order_id", "region")
        .collect()
    )
    region_of: dict[str, str] = dict(
        zip(regions["order_id"].to_list(), regions["region"].to_list(), strict=True)
    )
    return [region_of.get(order_id) for order_id in order_ids]


def purchase_cycles(
    order_lines: pl.DataFrame,
    *,
    customer_ids: Sequence[str],
    item_skus: Sequence[str],
    min_purchases: int,
) -> PurchaseCycles:
    """For every (known customer, item) bought on ``min_purchases`` or more distinct days:
    the median number of days between consecutive purchase days, and the last purchase day.

    Days, not orders: two orders on one day are one purchase (a forgotten item fetched in a
    second trip is not a cycle of zero days). Rows follow ``customer_ids``; items follow
    ``item_skus``; pairs whose customer or item is not in those lists are left out.
    """
    if min_purchases < 2:
        raise InputError(f"purchase cycles: min_purchases must be at least 2, got {min_purchases}")
    customer_index = pl.DataFrame(
        {"customer_id": list(customer_ids)}, schema={"customer_id": pl.String}
    ).with_row_index("user_row")
    item_index = pl.DataFrame({"sku": list(item_skus)}, schema={"sku": pl.String}).with_row_index(
        "item"
    )
    day = pl.col("ordered_at").cast(pl.Datetime("us")).dt.truncate("1d")
    cycles = (
        order_lines.lazy()
        .select(
            pl.col("customer_id").cast(pl.String),
            pl.col("sku").cast(pl.String),
            day.alias("day"),
        )
        .drop_nulls(["customer_id", "day"])
        .unique()
        # Most pairs are bought once or twice: drop them before the joins and the sort.
        .filter(pl.len().over("customer_id", "sku") >= min_purchases)
        .join(customer_index.lazy(), on="customer_id", how="inner")
        .join(item_index.lazy(), on="sku", how="inner")
        .sort("user_row", "item", "day")
        .group_by("user_row", "item", maintain_order=True)
        .agg(
            (pl.col("day").diff().dt.total_microseconds() / _MICROSECONDS_PER_DAY)
            .median()
            .alias("interval_days"),
            pl.col("day").last().cast(pl.Int64).alias("last_purchase_us"),
        )
        .collect()
    )
    user_rows = cycles["user_row"].to_numpy().astype(np.int64)
    counts = np.bincount(user_rows, minlength=len(customer_ids))
    indptr = np.zeros(len(customer_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return PurchaseCycles(
        indptr=indptr,
        items=cycles["item"].to_numpy().astype(np.int32),
        interval_days=cycles["interval_days"].to_numpy().astype(np.float32),
        last_purchase_us=cycles["last_purchase_us"].to_numpy().astype(np.int64),
    )


def _scatter_top_k(
    rows: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int64],
    values: npt.NDArray[np.float32],
    *,
    items: npt.NDArray[np.int32],
    scores: npt.NDArray[np.float32],
) -> None:
    """Write each row's best ``k`` (value desc, column asc) entries into the padded arrays."""
    k = items.shape[1]
    order = np.lexsort((cols, -values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    if rows.size == 0:
        return
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    rank = np.arange(rows.size) - np.repeat(starts, np.diff(np.r_[starts, rows.size]))
    top = rank < k
    items[rows[top], rank[top]] = cols[top]
    scores[rows[top], rank[top]] = values[top]
