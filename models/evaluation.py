"""Offline evaluation on real baskets: temporal split, leave-one-out cases, ranking metrics.

Pure functions over order lines and recommendation lists; running the request path to get
those lists is the service's job (``service.evaluate``), so that constraints are really
applied.

Protocol
    * Temporal split: whole orders placed before the cutoff train the models, the rest test
      them. The default cutoff leaves the last ``test_fraction`` of orders (by time) for test.
    * Leave one out: from each test order with at least two distinct items, one item the
      trained model knows is hidden (chosen at random, seeded); the rest of the order is the
      request, with the order's customer, store and time. An item the model never saw cannot
      be recommended by any strategy, so hiding it would only dilute every row alike.
    * Metrics at k, over the cases (one relevant item each):
      hit rate = share of cases whose hidden item is in the top k;
      NDCG = mean of 1 / log2(1 + rank) over hits (the ideal DCG of one item is 1);
      MRR = mean of 1 / rank over hits;
      coverage = distinct items shown in any top k / items in the catalog;
      margin captured = sum of the unit margins of the hidden items hit, per 1,000 cases;
      violations = recommended items breaking a constraint (counted by the caller).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from rules.errors import InputError


@dataclass(frozen=True)
class Split:
    train: pl.DataFrame
    test: pl.DataFrame
    cutoff: datetime  # first instant of the test period


def temporal_split(
    order_lines: pl.DataFrame, *, cutoff: datetime | None = None, test_fraction: float = 0.2
) -> Split:
    """Orders placed before ``cutoff`` train, the others test; an order's time is that of its
    earliest line, so an order is never cut in two.

    Without ``cutoff``: the time of the first order of the last ``test_fraction`` of orders.
    """
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    placed = order_lines.group_by("order_id").agg(pl.col("ordered_at").min().alias("placed_at"))
    if placed.height < 2:
        raise InputError("order lines: at least two orders are needed to split")
    if cutoff is None:
        times = placed.get_column("placed_at").sort()
        first_test = min(placed.height - 1, max(1, round(placed.height * (1 - test_fraction))))
        cutoff = times[first_test]
    assert cutoff is not None
    lines = order_lines.join(placed, on="order_id", how="left")
    is_test = pl.col("placed_at") >= cutoff
    train = lines.filter(~is_test).drop("placed_at")
    test = lines.filter(is_test).drop("placed_at")
    if train.height == 0 or test.height == 0:
        raise InputError(f"cutoff {cutoff}: leaves the train or the test period empty")
    return Split(train=train, test=test, cutoff=cutoff)


@dataclass(frozen=True)
class HeldOutCase:
    """One test order with one item hidden: the request is the rest of it."""

    order_id: str
    customer_id: str | None
    store_id: str | None
    ordered_at: datetime
    basket: tuple[str, ...]  # the other distinct SKUs of the order, sorted
    hidden: str  # the SKU to find


def leave_one_out(
    test_lines: pl.DataFrame,
    *,
    known_skus: Collection[str],
    seed: int,
    max_cases: int | None = None,
) -> list[HeldOutCase]:
    """One case per test order with two or more distinct SKUs, one of them known: a known
    SKU hidden at random. With ``max_cases``, a seeded sample of that many orders.

    Orders are visited in ``order_id`` order, so the same lines and seed give the same cases.
    """
    known = set(known_skus)
    optional = [name for name in ("customer_id", "store_id") if name in test_lines.columns]
    orders = (
        test_lines.lazy()
        .group_by("order_id")
        .agg(
            pl.col("sku").cast(pl.String).unique().sort().alias("skus"),
            pl.col("ordered_at").min(),
            *(pl.col(name).cast(pl.String).first() for name in optional),
        )
        .filter(pl.col("skus").list.len() >= 2)
        .sort("order_id")
        .collect()
    )
    rng = random.Random(seed)
    rows = list(orders.iter_rows(named=True))
    if max_cases is not None and len(rows) > max_cases:
        rows = sorted(rng.sample(rows, max_cases), key=lambda row: str(row["order_id"]))
    cases = []
    for row in rows:
        skus: list[str] = row["skus"]
        hideable = [sku for sku in skus if sku in known]
        if not hideable:
            continue
        hidden = hideable[rng.randrange(len(hideable))]
        cases.append(
            HeldOutCase(
                order_id=str(row["order_id"]),
                customer_id=row.get("customer_id"),
                store_id=row.get("store_id"),
                ordered_at=row["ordered_at"],
                basket=tuple(sku for sku in skus if sku != hidden),
                hidden=hidden,
            )
        )
    return cases


@dataclass(frozen=True)
class RankingMetrics:
    """Metrics of one strategy at one cut-off ``k`` (see the module docstring)."""

    k: int
    cases: int
    hit_rate: float
    ndcg: float
    mrr: float
    coverage: float
    margin_per_1000: float
    violations: int


def ranking_metrics(
    recommended: Sequence[Sequence[str]],
    hidden: Sequence[str],
    *,
    k: int,
    unit_margin: Mapping[str, float],
    catalog_size: int,
    violations: int = 0,
) -> RankingMetrics:
    """Metrics at ``k`` of ranked lists against the one hidden item of each case.

    ``unit_margin`` gives the margin of every hidden item (a missing one counts 0);
    ``violations`` is passed through, counted by whoever checked the lists.
    """
    if len(recommended) != len(hidden):
        raise ValueError(f"{len(recommended)} recommendation lists for {len(hidden)} cases")
    if k < 1 or catalog_size < 1:
        raise ValueError(f"k and catalog_size must be positive, got {k}, {catalog_size}")
    hits = 0
    dcg = 0.0
    reciprocal_ranks = 0.0
    margin = 0.0
    shown: set[str] = set()
    for items, target in zip(recommended, hidden, strict=True):
        top = list(items[:k])
        shown.update(top)
        if target in top:
            rank = top.index(target) + 1
            hits += 1
            dcg += 1.0 / math.log2(rank + 1)
            reciprocal_ranks += 1.0 / rank
            margin += unit_margin.get(target, 0.0)
    cases = len(hidden)
    per_case = 1.0 / cases if cases else 0.0
    return RankingMetrics(
        k=k,
        cases=cases,
        hit_rate=hits * per_case,
        ndcg=dcg * per_case,
        mrr=reciprocal_ranks * per_case,
        coverage=len(shown) / catalog_size,
        margin_per_1000=margin * per_case * 1000.0,
        violations=violations,
    )
