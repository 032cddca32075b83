"""Synthesize, deterministically from a seed, the ERP tables the public datasets lack.

The public sets have real baskets but no fulfillment nodes and no stock. Recommending only what
can be promised needs both, so the adapters derive them here with a documented rule and a seeded
``numpy.random.Generator(PCG64(seed))``: same inputs and seed, same rows, byte for byte.

Nodes
    One store per region, ``S-<region>`` (kind ``store``), and ``DC_COUNT`` distribution
    centres ``DC-1``, ``DC-2``, ... (kind ``dc``) whose regions are the regions assigned
    round-robin in the order given (the adapters pass them busiest first, so DC-1 serves the
    region with the most orders). ``fulfillment_cost`` is ``DC_FULFILLMENT_COST`` (4.00) for
    a DC and ``STORE_FULFILLMENT_COST`` (6.00) for a store (store picking is dearer), plus a
    seeded jitter in [0, 0.50) rounded to cents so that no two nodes tie exactly.

Inventory
    Every DC ranges every SKU. A store ranges a SKU with probability 0.5 + 0.4 * p, where p in
    [0, 1] is the SKU's popularity percentile (about 70% of SKUs per store on average; popular
    SKUs more often). Stock scales with popularity: mean atp is 20 + 380 * p at a DC and
    2 + 38 * p at a store, times a Gamma(2, 1/2) factor (mean 1), and at least 1. Then 12% of
    cells are set to zero atp (out of stock) and 5% of the rest exactly to their safety stock
    (nothing promisable). ``safety_stock`` is uniform on 0..5. ``inbound`` is set on 50% of
    out-of-stock cells and 20% of the others, uniform on 1..max(1, mean atp).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import polars as pl

__all__ = [
    "DC_COUNT",
    "DC_FULFILLMENT_COST",
    "STORE_FULFILLMENT_COST",
    "synthesize_inventory",
    "synthesize_nodes",
]

DC_COUNT = 2
DC_FULFILLMENT_COST = 4.0
STORE_FULFILLMENT_COST = 6.0
_COST_JITTER = 0.5

_STORE_RANGE_BASE = 0.5  # ranging probability of the least popular SKU at a store
_STORE_RANGE_SLOPE = 0.4  # ... rising to 0.9 for the most popular
_DC_MEAN_ATP = (20.0, 380.0)  # intercept, slope in popularity percentile
_STORE_MEAN_ATP = (2.0, 38.0)
_ZERO_ATP_SHARE = 0.12
_AT_SAFETY_SHARE = 0.05
_MAX_SAFETY_STOCK = 5
_INBOUND_SHARE_WHEN_OUT = 0.5
_INBOUND_SHARE_OTHERWISE = 0.2


def synthesize_nodes(regions: Sequence[str], *, seed: int) -> pl.DataFrame:
    """Contract NODES rows: one store per region and ``DC_COUNT`` DCs (see module docstring).

    ``regions`` order matters (DCs take regions round-robin in that order); repeats are ignored.
    """
    unique_regions = list(dict.fromkeys(regions))
    if not unique_regions:
        raise ValueError("synthesize_nodes needs at least one region")
    dc_ids = [f"DC-{number}" for number in range(1, DC_COUNT + 1)]
    dc_regions = [unique_regions[index % len(unique_regions)] for index in range(DC_COUNT)]
    store_ids = [f"S-{region}" for region in unique_regions]

    rng = np.random.Generator(np.random.PCG64(seed))
    jitter = np.round(rng.uniform(0.0, _COST_JITTER, size=DC_COUNT + len(store_ids)), 2)
    base_cost = np.array(
        [DC_FULFILLMENT_COST] * DC_COUNT + [STORE_FULFILLMENT_COST] * len(store_ids)
    )
    return pl.DataFrame(
        {
            "node_id": dc_ids + store_ids,
            "kind": ["dc"] * DC_COUNT + ["store"] * len(store_ids),
            "region": dc_regions + unique_regions,
            "fulfillment_cost": np.round(base_cost + jitter, 2),
        },
        schema={
            "node_id": pl.String,
            "kind": pl.String,
            "region": pl.String,
            "fulfillment_cost": pl.Float64,
        },
    )


def synthesize_inventory(
    items: pl.DataFrame,
    nodes: pl.DataFrame,
    *,
    popularity: pl.DataFrame | None,
    seed: int,
    as_of: datetime,
) -> pl.DataFrame:
    """Contract INVENTORY rows for ``items`` (needs ``sku``) at ``nodes`` (``node_id``, ``kind``).

    ``popularity`` has columns ``sku`` and ``orders`` (orders containing the SKU); SKUs absent
    from it count as never ordered, and ``None`` treats every SKU as median popular. Rows are
    sorted by (sku, node_id) and independent of the input row order. ``as_of`` (naive UTC, or
    converted to it) is stamped on every row.
    """
    skus = items.get_column("sku").unique().sort()
    node_table = nodes.select("node_id", "kind").unique(subset="node_id").sort("node_id")
    percentile = _popularity_percentile(skus, popularity)

    n_skus = skus.len()
    n_nodes = node_table.height
    n_cells = n_skus * n_nodes
    sku_index = np.repeat(np.arange(n_skus), n_nodes)
    node_index = np.tile(np.arange(n_nodes), n_skus)
    is_dc = (node_table.get_column("kind").to_numpy() == "dc")[node_index]
    p = percentile[sku_index]

    rng = np.random.Generator(np.random.PCG64(seed))
    # Every draw covers every cell, in a fixed order, so each cell's numbers depend only on the
    # seed and the grid, never on which cells an earlier step happened to keep.
    range_draw = rng.random(n_cells)
    size_factor = rng.gamma(shape=2.0, scale=0.5, size=n_cells)
    zero_draw = rng.random(n_cells)
    at_safety_draw = rng.random(n_cells)
    safety_stock = rng.integers(0, _MAX_SAFETY_STOCK + 1, size=n_cells)
    inbound_draw = rng.random(n_cells)
    mean_atp = np.where(
        is_dc,
        _DC_MEAN_ATP[0] + _DC_MEAN_ATP[1] * p,
        _STORE_MEAN_ATP[0] + _STORE_MEAN_ATP[1] * p,
    )
    inbound_size = rng.integers(1, np.maximum(2, np.floor(mean_atp).astype(np.int64) + 1))

    ranged = is_dc | (range_draw < _STORE_RANGE_BASE + _STORE_RANGE_SLOPE * p)
    atp = np.maximum(1, np.rint(mean_atp * size_factor).astype(np.int64))
    out_of_stock = zero_draw < _ZERO_ATP_SHARE
    at_safety = ~out_of_stock & (at_safety_draw < _AT_SAFETY_SHARE)
    atp = np.where(out_of_stock, 0, np.where(at_safety, safety_stock, atp))
    inbound_share = np.where(out_of_stock, _INBOUND_SHARE_WHEN_OUT, _INBOUND_SHARE_OTHERWISE)
    inbound = np.where(inbound_draw < inbound_share, inbound_size, 0)

    keep = np.flatnonzero(ranged)
    stamp = _naive_utc(as_of)
    return pl.DataFrame(
        {
            "sku": skus.gather(sku_index[keep]),
            "node_id": node_table.get_column("node_id").gather(node_index[keep]),
            "atp": atp[keep],
            "safety_stock": safety_stock[keep],
            "inbound": inbound[keep],
        },
        schema={
            "sku": pl.String,
            "node_id": pl.String,
            "atp": pl.Int64,
            "safety_stock": pl.Int64,
            "inbound": pl.Int64,
        },
    ).with_columns(pl.lit(stamp, dtype=pl.Datetime("us")).alias("as_of"))


def _popularity_percentile(
    skus: pl.Series, popularity: pl.DataFrame | None
) -> npt.NDArray[np.float64]:
    """Each SKU's popularity as a percentile in [0, 1] (ties share their average rank)."""
    if popularity is None or skus.len() <= 1:
        return np.full(skus.len(), 0.5)
    orders = (
        pl.DataFrame({"sku": skus})
        .join(
            popularity.group_by("sku").agg(pl.col("orders").sum()),
            on="sku",
            how="left",
            maintain_order="left",
        )
        .get_column("orders")
        .fill_null(0)
    )
    rank = orders.rank("average").to_numpy().astype(np.float64)
    return (rank - 1.0) / (skus.len() - 1.0)


def _naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)
