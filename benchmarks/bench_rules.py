"""Constraints + ranking over 500 candidates x 16 nodes on a 100k-SKU synthetic catalog.

Times the pure rules stage the pipeline runs per request (both constraint stages, node
choice, scoring and ranking), with inputs built beforehand, so the figure is the rules' own
cost. Writes ``benchmarks/results/rules.json``. Target: median under 200 us on 2 cores.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rules.py [--iterations 3000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from models.data.contract import validate_table
from models.data.schema import ITEMS
from rules.catalog import catalog_from_items
from rules.constraints import (
    KEPT,
    MASTER_CONSTRAINTS,
    STOCK_CONSTRAINTS,
    CandidateFacts,
    RequestFacts,
    apply_constraints,
    compile_policy,
    with_fulfilment,
)
from rules.policy import Policy
from rules.ranking import RankingInputs, rank, score

RESULTS = Path(__file__).resolve().parent / "results" / "rules.json"
SKUS, CATEGORIES, CANDIDATES, NODES = 100_000, 200, 500, 16
NOW = datetime(2024, 6, 1)


def synthetic_items(rng: np.random.Generator) -> pl.DataFrame:
    cost = rng.uniform(1, 50, SKUS).round(2)
    frame = pl.DataFrame(
        {
            "sku": [f"SKU{i:06d}" for i in range(SKUS)],
            "name": [f"Item {i}" for i in range(SKUS)],
            "category": [f"CAT{c:03d}" for c in rng.integers(0, CATEGORIES, SKUS)],
            "brand": [f"BRAND{b}" for b in rng.integers(0, 50, SKUS)],
            "unit_cost": cost,
            "unit_price": (cost * rng.uniform(0.9, 2.5, SKUS)).round(2) + 0.01,
            "age_restricted": rng.random(SKUS) < 0.02,
            "ship_to_home": rng.random(SKUS) < 0.5,
            "return_rate": rng.uniform(0, 0.2, SKUS),
        }
    )
    return validate_table(frame, ITEMS, file="synthetic items")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    catalog = catalog_from_items(synthetic_items(rng))
    policy = Policy.model_validate(
        {
            "name": "bench",
            "version": 1,
            "margin_floors": [
                {"absolute": 0.5, "percent": 0.15},
                *({"category": f"CAT{c:03d}", "percent": 0.25} for c in range(0, 200, 10)),
            ],
            "ranking": {
                "knobs": [{"margin_weight": 0.4}, {"channel": "pos", "margin_weight": 0.2}],
                "low_stock_units": 3,
                "low_stock_factor": 0.7,
                "overstock_units": 200,
                "sell_through_boost": 0.1,
            },
            "restrictions": {
                "category_pairs": [[f"CAT{c:03d}", f"CAT{c + 1:03d}"] for c in range(0, 40, 2)],
                "excluded_brands": ["BRAND3", "BRAND7"],
            },
        }
    )
    compiled = compile_policy(policy, catalog)

    requests = []
    for _ in range(args.iterations):
        positions = rng.choice(SKUS, CANDIDATES, replace=False).astype(np.int64)
        basket = positions[:5]
        candidates = positions[5:]
        price = catalog.effective_price(candidates, now=NOW)
        # Column-major, as the pipeline builds stock arrays (see CandidateFacts).
        available = np.asfortranarray(rng.integers(-1, 30, (len(candidates), NODES)))
        facts = CandidateFacts(
            catalog_pos=candidates,
            category_code=catalog.category_code[candidates].astype(np.int64),
            uses_history=rng.random(len(candidates)) < 0.2,
            age_restricted=catalog.age_restricted[candidates],
            excluded_vendor=compiled.excluded_item[candidates],
            effective_price=price,
            unit_margin=price - catalog.unit_cost[candidates],
            available=available,
            inbound=np.asfortranarray(rng.integers(0, 10, available.shape)),
            ranged_at_store=np.ones(len(candidates), dtype=np.bool_),
            fulfilment_cost=np.full(len(candidates), np.nan),
        )
        request = RequestFacts(
            channel="cart",
            excluded_pos=basket,
            basket_category_codes=catalog.category_code[basket].astype(np.int64),
            quantity=1,
            now=NOW,
            consent=False,
            node_cost=rng.uniform(2, 8, NODES),
            basket_node=rng.random(NODES) < 0.2,
        )
        relevance = np.sort(rng.random(len(candidates)))[::-1].copy()
        requests.append((facts, request, relevance))

    timings_us = []
    kept_counts = []
    for facts, request, relevance in requests:
        started = time.perf_counter_ns()
        drop = apply_constraints(facts, request, compiled, MASTER_CONSTRAINTS)
        survivors = np.flatnonzero(drop == KEPT)
        view, column = with_fulfilment(facts.take(survivors), request, compiled)
        drop[survivors] = apply_constraints(view, request, compiled, STOCK_CONSTRAINTS)
        cost = view.fulfilment_cost
        kept_in_view = np.flatnonzero(drop[survivors] == KEPT)
        kept = survivors[kept_in_view]
        rows, columns = kept_in_view, column[kept_in_view]
        inputs = RankingInputs(
            catalog_pos=facts.catalog_pos[kept],
            category_code=facts.category_code[kept],
            relevance=relevance[kept],
            p_accept=relevance[kept] * 0.3,
            effective_price=facts.effective_price[kept],
            unit_margin=facts.unit_margin[kept],
            return_rate=catalog.return_rate[facts.catalog_pos[kept]],
            fulfilment_cost=cost[kept_in_view],
            stock_units=view.available[rows, columns] + view.inbound[rows, columns],
        )
        parts = score(inputs, compiled, request.channel)
        rank(parts.final, inputs.catalog_pos, inputs.category_code, limit=10, max_per_category=3)
        timings_us.append((time.perf_counter_ns() - started) / 1000)
        kept_counts.append(len(kept))

    timings = np.array(timings_us[len(timings_us) // 10 :])  # the first tenth warms up
    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "catalog_skus": SKUS,
        "candidates": CANDIDATES - 5,
        "nodes": NODES,
        "iterations_timed": len(timings),
        "median_us": round(float(np.median(timings)), 1),
        "p99_us": round(float(np.percentile(timings, 99)), 1),
        "mean_kept": round(float(np.mean(kept_counts)), 1),
        "target_median_us": 200,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
