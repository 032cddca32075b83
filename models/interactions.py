"""Order lines -> sparse interaction matrices, with polars doing the grouping.

Two matrices come out of the same order lines, sharing one item index:

- ``basket_items`` (orders x items): 1.0 where the item is in the order. Every order counts,
  guest orders included; item-item neighbours and popularity are learned from it.
- ``customer_items`` (known customers x items): how strongly a customer is tied to an item,
  for ALS. Guest lines (``customer_id`` null) are left out: there is nobody to personalise for.

Indexes are deterministic: items, orders and customers are numbered in sorted order of their
ids, so the same order lines (in any row order) give the same matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import polars as pl
import scipy.sparse as sp

from rules.errors import InputError

CustomerWeight = Literal["orders", "log1p_orders"]
"""How ``customer_items`` weighs a (customer, item) pair.

- ``"orders"``: the number of distinct orders of the customer containing the item. Units per
  line are ignored on purpose: a trade buyer taking 500 units once is one signal, not 500.
  This is ALS's confidence directly (implicit uses the value as c_ui).
- ``"log1p_orders"``: ``log1p`` of that count, damping habitual re-buyers so they do not drown
  the rest of a customer's history. Note a single order then weighs ~0.69, below implicit's
  baseline confidence of 1 for unobserved items; pair it with a larger ALS ``alpha``.
"""

REQUIRED_COLUMNS = ("order_id", "customer_id", "sku")


@dataclass(frozen=True)
class Interactions:
    """Sparse interaction matrices and the ids their rows and columns stand for."""

    item_skus: tuple[str, ...]  # column order of both matrices, sorted
    order_ids: tuple[str, ...]  # row order of basket_items, sorted
    customer_ids: tuple[str, ...]  # row order of customer_items, sorted; known customers only
    basket_items: sp.csr_matrix  # (n_orders, n_items) float32, 1.0 where the item is in the order
    customer_items: sp.csr_matrix  # (n_customers, n_items) float32, see CustomerWeight

    @property
    def n_items(self) -> int:
        return len(self.item_skus)

    @property
    def n_orders(self) -> int:
        return len(self.order_ids)

    def orders_per_item(self) -> npt.NDArray[np.int64]:
        """How many distinct orders contain each item (column counts of ``basket_items``)."""
        return np.bincount(self.basket_items.indices, minlength=self.n_items).astype(np.int64)


def build_interactions(
    order_lines: pl.DataFrame, *, customer_weight: CustomerWeight = "orders"
) -> Interactions:
    """Group order lines into ``basket_items`` and ``customer_items`` CSR matrices.

    Only ``order_id``, ``customer_id`` and ``sku`` are read; validation of the rest of the
    contract is the data layer's job. Raises ``InputError`` when a column is missing.
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in order_lines.columns]
    if missing:
        raise InputError(f"order lines: missing column(s) {', '.join(missing)}")
    if customer_weight not in ("orders", "log1p_orders"):
        raise InputError(f"customer_weight: unknown weighting {customer_weight!r}")

    lines = order_lines.lazy().select(
        pl.col("order_id").cast(pl.String),
        pl.col("customer_id").cast(pl.String),
        pl.col("sku").cast(pl.String),
    )
    item_index, order_index, customer_index = pl.collect_all(
        [
            _id_index(lines, "sku", code="item"),
            _id_index(lines, "order_id", code="row"),
            _id_index(lines.drop_nulls("customer_id"), "customer_id", code="customer"),
        ]
    )
    # Number every line by joining the sorted id tables (faster than an Enum cast or a dense
    # rank once there are millions of orders). Line order is irrelevant: pairs are
    # deduplicated or grouped below, and the CSR conversion sorts them.
    coded = (
        lines.join(item_index.lazy(), on="sku", how="left")
        .join(order_index.lazy(), on="order_id", how="left")
        .join(customer_index.lazy(), on="customer_id", how="left")  # guests: null customer
        .select("row", "customer", "item")
    )
    basket_pairs, customer_pairs = pl.collect_all(
        [
            # Binary basket matrix: duplicate lines of one SKU in one order count once.
            coded.select("row", "item").unique(),
            coded.drop_nulls("customer")
            .group_by("customer", "item")
            .agg(pl.col("row").n_unique().alias("orders")),
        ]
    )
    item_skus: tuple[str, ...] = tuple(item_index["sku"].to_list())
    order_ids: tuple[str, ...] = tuple(order_index["order_id"].to_list())
    customer_ids: tuple[str, ...] = tuple(customer_index["customer_id"].to_list())

    basket_items = _csr(
        rows=basket_pairs["row"].to_numpy(),
        cols=basket_pairs["item"].to_numpy(),
        values=np.ones(basket_pairs.height, dtype=np.float32),
        shape=(len(order_ids), len(item_skus)),
    )
    orders = customer_pairs["orders"].to_numpy().astype(np.float32)
    weights = np.log1p(orders) if customer_weight == "log1p_orders" else orders
    customer_items = _csr(
        rows=customer_pairs["customer"].to_numpy(),
        cols=customer_pairs["item"].to_numpy(),
        values=weights.astype(np.float32),
        shape=(len(customer_ids), len(item_skus)),
    )
    return Interactions(
        item_skus=item_skus,
        order_ids=order_ids,
        customer_ids=customer_ids,
        basket_items=basket_items,
        customer_items=customer_items,
    )


def _id_index(lines: pl.LazyFrame, column: str, *, code: str) -> pl.LazyFrame:
    """The distinct ids of ``column`` in sorted order, numbered 0.. in ``code``."""
    return lines.select(pl.col(column).unique().sort()).with_row_index(code)


def _csr(
    *,
    rows: npt.NDArray[np.integer],
    cols: npt.NDArray[np.integer],
    values: npt.NDArray[np.float32],
    shape: tuple[int, int],
) -> sp.csr_matrix:
    # csr_matrix, not csr_array: implicit checks isinstance(..., csr_matrix). Pairs are unique
    # by construction, so the COO -> CSR conversion sums nothing; sort_indices makes the column
    # order within a row canonical, hence the matrices (and the models fitted on them)
    # independent of the input row order.
    matrix = sp.csr_matrix((values, (rows, cols)), shape=shape, dtype=np.float32)
    matrix.sort_indices()
    return matrix
