"""Fit the models behind the candidate generators and package them as ``ModelArtifacts``.

Three parts, all from the same order lines:

- ALS (implicit, CPU) on ``customer_items``: user and item factors for personal candidates.
- Item-item neighbours from basket co-occurrence: implicit's ``CosineRecommender`` fitted on
  ``basket_items`` (rows are baskets), then the top ``neighbours`` per item as dense arrays so
  serving is a fancy-index away and the arrays memory-map.
- Popularity: the share of orders containing each item, for cold start and backfill.
- The optional parts of ``models.tables`` (artifact format 2): bundles by co-occurrence
  lift, neighbours by ALS item factors, purchase cycles for replenishment, and popularity by
  region (only when ``nodes`` is given, since an order's region is its store's).

Training is deterministic for a given seed: same order lines and parameters give the same
arrays and hence the same ``version`` (a content hash), whatever the row order of the input.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import polars as pl
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from implicit.nearest_neighbours import CosineRecommender
from implicit.utils import ParameterWarning
from threadpoolctl import threadpool_limits

from models.interactions import CustomerWeight, build_interactions
from models.interfaces import ModelArtifacts
from models.tables import (
    bundle_table,
    factor_neighbour_table,
    order_regions_from_nodes,
    purchase_cycles,
    region_popularity,
)
from rules.errors import InputError

CUSTOMER_WEIGHT: CustomerWeight = "orders"
ITEM_SIMILARITY = "cosine"


def train(
    order_lines: pl.DataFrame,
    *,
    factors: int = 64,
    iterations: int = 15,
    regularization: float = 0.05,
    neighbours: int = 50,
    seed: int = 42,
    nodes: pl.DataFrame | None = None,
    bundle_min_support: int = 3,
    bundle_min_lift: float = 1.0,
    cycle_min_purchases: int = 3,
) -> ModelArtifacts:
    """Fit ALS, item-item neighbours, popularity and the optional tables on order lines (the
    ORDER_LINES columns). ``neighbours`` is also the width of the bundle and factor-neighbour
    tables. ``nodes`` (the NODES table) maps each order's store to a region; without it there
    is no regional popularity.

    Raises ``InputError`` for parameters out of range or order lines without any item.
    """
    _check_params(
        factors=factors, iterations=iterations, regularization=regularization, neighbours=neighbours
    )
    if cycle_min_purchases < 2:
        raise InputError(f"cycle_min_purchases: must be at least 2, got {cycle_min_purchases}")
    interactions = build_interactions(order_lines, customer_weight=CUSTOMER_WEIGHT)
    if interactions.n_items == 0:
        raise InputError("order lines: nothing to train on (no order lines)")

    user_factors, item_factors = fit_als(
        interactions.customer_items,
        factors=factors,
        iterations=iterations,
        regularization=regularization,
        seed=seed,
    )
    neighbour_idx, neighbour_scores = item_neighbours(interactions.basket_items, k=neighbours)
    popularity = (interactions.orders_per_item() / interactions.n_orders).astype(np.float32)
    bundles = bundle_table(
        interactions.basket_items,
        k=neighbours,
        min_support=bundle_min_support,
        min_lift=bundle_min_lift,
    )
    factor_neighbours = factor_neighbour_table(item_factors, k=neighbours)
    cycles = purchase_cycles(
        order_lines,
        customer_ids=interactions.customer_ids,
        item_skus=interactions.item_skus,
        min_purchases=cycle_min_purchases,
    )
    regional = (
        region_popularity(
            interactions.basket_items,
            order_regions_from_nodes(order_lines, nodes, interactions.order_ids),
        )
        if nodes is not None and "store_id" in order_lines.columns
        else None
    )

    params: dict[str, object] = {
        "factors": factors,
        "iterations": iterations,
        "regularization": regularization,
        "neighbours": neighbours,
        "seed": seed,
        "customer_weight": CUSTOMER_WEIGHT,
        "item_similarity": ITEM_SIMILARITY,
        "n_orders": interactions.n_orders,
        "n_customers": len(interactions.customer_ids),
        "n_items": interactions.n_items,
        "bundle_min_support": bundle_min_support,
        "bundle_min_lift": bundle_min_lift,
        "cycle_min_purchases": cycle_min_purchases,
        "regions": list(regional.regions) if regional is not None else [],
    }
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "user_factors": user_factors,
        "item_factors": item_factors,
        "neighbours": neighbour_idx,
        "neighbour_scores": neighbour_scores,
        "popularity": popularity,
        "factor_neighbours": factor_neighbours.items,
        "factor_neighbour_scores": factor_neighbours.scores,
        "bundle_items": bundles.items,
        "bundle_lift": bundles.scores,
        "cycle_indptr": cycles.indptr,
        "cycle_items": cycles.items,
        "cycle_interval_days": cycles.interval_days,
        "cycle_last_purchase_us": cycles.last_purchase_us,
    }
    if regional is not None:
        arrays["region_share"] = regional.share
    version = content_version(
        arrays=arrays,
        params=params,
        item_skus=interactions.item_skus,
        user_ids=interactions.customer_ids,
    )
    return ModelArtifacts(
        version=version,
        item_skus=interactions.item_skus,
        user_ids=interactions.customer_ids,
        user_factors=user_factors,
        item_factors=item_factors,
        neighbours=neighbour_idx,
        neighbour_scores=neighbour_scores,
        popularity=popularity,
        trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
        params=params,
        factor_neighbours=factor_neighbours,
        bundles=bundles,
        region_popularity=regional,
        purchase_cycles=cycles,
    )


def fit_als(
    customer_items: sp.csr_matrix,
    *,
    factors: int,
    iterations: int,
    regularization: float,
    seed: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(user_factors, item_factors) from implicit's CPU ALS; zeros when no customer is known."""
    n_users, n_items = customer_items.shape
    if customer_items.nnz == 0:
        # Guest-only data: nothing to factorise, and implicit does not accept an empty matrix.
        # Zero factors make every personal score 0, so the personal generator adds nothing.
        return (
            np.zeros((n_users, factors), dtype=np.float32),
            np.zeros((n_items, factors), dtype=np.float32),
        )
    # implicit parallelises over rows itself; a multi-threaded BLAS underneath oversubscribes
    # the cores (implicit warns about it at construction). Limit BLAS here rather than through
    # the environment, so the process's other numpy work keeps its threads.
    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            iterations=iterations,
            dtype=np.float32,
            random_state=seed,
        )
        model.fit(customer_items, show_progress=False)
    return (
        np.ascontiguousarray(model.user_factors, dtype=np.float32),
        np.ascontiguousarray(model.item_factors, dtype=np.float32),
    )


def item_neighbours(
    basket_items: sp.csr_matrix, *, k: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Top-``k`` co-bought items per item by cosine similarity over baskets, self excluded.

    Returns dense ``(n_items, k)`` arrays: neighbour item indexes (-1 padded) and scores
    (descending per row, ties by item index, 0 padded). Items never co-bought get a row of
    padding. Which of several items tied at the k-th place are kept is implicit's choice (its
    heap's, the same for the same input); everything kept is then ordered as above.
    """
    n_items = basket_items.shape[1]
    model = CosineRecommender(K=k + 1)  # implicit counts the item itself among its K
    with warnings.catch_warnings():
        # CosineRecommender normalises into a COO matrix and then warns about its own
        # conversion back to CSR; the warning is about implicit's internals, not our input.
        warnings.filterwarnings("ignore", category=ParameterWarning)
        model.fit(basket_items, show_progress=False)
    return top_k_per_row(model.similarity, k=k, n_rows=n_items)


def top_k_per_row(
    similarity: sp.csr_matrix, *, k: int, n_rows: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Dense top-``k`` of each row of a sparse similarity matrix, diagonal and zeros dropped.

    Vectorised over all stored entries: one lexsort by (row, score desc, column) and a scatter
    into the padded arrays, instead of a Python loop over rows.
    """
    similarity = sp.csr_matrix(similarity)
    entries_per_row = np.diff(similarity.indptr)
    rows = np.repeat(np.arange(similarity.shape[0], dtype=np.int64), entries_per_row)
    cols = similarity.indices.astype(np.int64)
    scores = similarity.data.astype(np.float32)
    keep = (cols != rows) & (scores > 0)
    rows, cols, scores = rows[keep], cols[keep], scores[keep]

    # Sort on the float32 scores we store, so ties are judged on what is kept.
    order = np.lexsort((cols, -scores, rows))
    rows, cols, scores = rows[order], cols[order], scores[order]
    row_starts = np.searchsorted(rows, np.arange(n_rows, dtype=np.int64))
    rank = np.arange(rows.shape[0], dtype=np.int64) - row_starts[rows]
    top = rank < k

    neighbour_idx = np.full((n_rows, k), -1, dtype=np.int32)
    neighbour_scores = np.zeros((n_rows, k), dtype=np.float32)
    neighbour_idx[rows[top], rank[top]] = cols[top]
    neighbour_scores[rows[top], rank[top]] = scores[top]
    return neighbour_idx, neighbour_scores


def content_version(
    *,
    arrays: Mapping[str, npt.NDArray[Any]],
    params: Mapping[str, object],
    item_skus: tuple[str, ...],
    user_ids: tuple[str, ...],
) -> str:
    """First 16 hex digits of a sha256 over the parameters, ids and arrays (names, dtypes,
    shapes and bytes). ``trained_at`` is left out so that retraining the same data is a no-op."""
    digest = hashlib.sha256()
    digest.update(orjson.dumps(params, option=orjson.OPT_SORT_KEYS))
    digest.update(orjson.dumps(item_skus))
    digest.update(orjson.dumps(user_ids))
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(orjson.dumps([name, array.dtype.str, list(array.shape)]))
        digest.update(array.data)  # the buffer itself: no copy of large factor matrices
    return digest.hexdigest()[:16]


def _check_params(*, factors: int, iterations: int, regularization: float, neighbours: int) -> None:
    if factors < 1:
        raise InputError(f"factors: must be at least 1, got {factors}")
    if iterations < 1:
        raise InputError(f"iterations: must be at least 1, got {iterations}")
    if not regularization >= 0:
        raise InputError(f"regularization: must be >= 0, got {regularization}")
    if neighbours < 1:
        raise InputError(f"neighbours: must be at least 1, got {neighbours}")
