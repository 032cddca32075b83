"""Constraints + ranking over 500 candidates x 16 nodes on a 100k-SKU synthetic catalog.

Times, per request, everything the pipeline does in pure code between the candidate
generator and the response, in the pipeline's order: building the candidate facts (effective
price with the promotion window, category codes, margin floors), the item-master rules,
then, after the stock read, available units, POS masking, the basket's shipping nodes, the
node choice, the stock rules, the calibrated p(accept) (isotonic curves per kind, as
``models.calibration`` applies them), scoring and ranking. Not timed: candidate generation
and the stock read itself (I/O, measured in ``bench_request_path.py``); its result, shaped
as the store returns it, is built beforehand. Requests rotate over the four channels; each
has exactly 500 candidates and 16 eligible nodes, plus a basket of 3-5 lines that is not
counted in the 500. Writes ``benchmarks/results/rules.json``. Target: median under 200 us.

Two kinds of input, in alternating rounds: *fresh* (the headline), each request's candidates
and stock read newly written just before it is timed, as the generator and the store's
parser leave them in a served request; and *cold*, the same requests cycled from a pool
that outgrows the caches, so that every input comes from memory (a pessimistic bound). The
catalog and policy are, in both, as warm as the requests before left them. Compiled rule
loops are warmed up first, as the service does at start-up.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rules.py [--iterations 3000]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
import polars as pl
from sklearn.isotonic import IsotonicRegression

from models.calibration import AcceptanceCalibration, Curve
from models.data.contract import validate_table
from models.data.schema import ITEMS, NODES
from models.interfaces import USES_HISTORY, Kind
from rules.catalog import Catalog, catalog_from_items, node_table_from_nodes
from rules.compiled import warm_up
from rules.constraints import (
    KEPT,
    MASTER_CONSTRAINTS,
    STOCK_CONSTRAINTS,
    CompiledPolicy,
    RequestFacts,
    apply_constraints,
    available_units,
    basket_shipping_nodes,
    candidate_facts,
    compile_policy,
    sellable_stock,
    with_fulfilment,
)
from rules.eligibility import EligibleNodes, eligible_nodes
from rules.policy import CHANNELS, Channel, Policy
from rules.ranking import RankingInputs, rank, score

RESULTS = Path(__file__).resolve().parent / "results" / "rules.json"
SKUS, CATEGORIES, CANDIDATES, NODE_COUNT, LIMIT, POOL = 100_000, 200, 500, 16, 10, 256
NOW = datetime(2024, 6, 1)
STAGES = ("facts + master rules", "stock prep + basket nodes", "node choice + stock rules",
          "p(accept) + inputs + score", "rank")  # fmt: skip

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def synthetic_items(rng: np.random.Generator) -> pl.DataFrame:
    cost = rng.uniform(1, 50, SKUS).round(2)
    price = (cost * rng.uniform(0.9, 2.5, SKUS)).round(2) + 0.01
    on_promo = rng.random(SKUS) < 0.1
    # Promotion windows around NOW: about half live, the rest over or still to come.
    start = [NOW + timedelta(days=int(d)) for d in rng.integers(-20, 10, SKUS)]
    frame = pl.DataFrame(
        {
            "sku": [f"SKU{i:06d}" for i in range(SKUS)],
            "name": [f"Item {i}" for i in range(SKUS)],
            "category": [f"CAT{c:03d}" for c in rng.integers(0, CATEGORIES, SKUS)],
            "brand": [f"BRAND{b}" for b in rng.integers(0, 50, SKUS)],
            "unit_cost": cost,
            "unit_price": price,
            "promo_price": pl.Series(np.where(on_promo, (price * 0.85).round(2), np.nan)).fill_nan(
                None
            ),
            "promo_start": [s if p else None for s, p in zip(start, on_promo, strict=True)],
            "promo_end": [
                s + timedelta(days=14) if p else None for s, p in zip(start, on_promo, strict=True)
            ],
            "age_restricted": rng.random(SKUS) < 0.02,
            "ship_to_home": rng.random(SKUS) < 0.5,
            "return_rate": rng.uniform(0, 0.2, SKUS),
        }
    )
    return validate_table(frame, ITEMS, file="synthetic items")


def synthetic_nodes() -> pl.DataFrame:
    """Region NORTH: 15 DCs and store S-N, so a POS request (the store and its region's DCs)
    and a NORTH ecommerce request both see 16 nodes; region SOUTH is noise."""
    rows = [
        {"node_id": f"DC-N{i}", "kind": "dc", "region": "NORTH", "fulfillment_cost": 3.0 + i / 4}
        for i in range(15)
    ]
    rows.append({"node_id": "S-N", "kind": "store", "region": "NORTH", "fulfillment_cost": 6.0})
    rows += [
        {"node_id": f"DC-S{i}", "kind": "dc", "region": "SOUTH", "fulfillment_cost": 4.0}
        for i in range(8)
    ]
    return validate_table(pl.DataFrame(rows), NODES, file="synthetic nodes")


def synthetic_policy() -> Policy:
    return Policy.model_validate(
        {
            "name": "bench",
            "version": 1,
            "margin_floors": [
                {"absolute": 0.5, "percent": 0.15},
                {"channel": "pos", "absolute": 0.8, "percent": 0.18},
                *({"category": f"CAT{c:03d}", "percent": 0.25} for c in range(0, 200, 10)),
            ],
            "ranking": {
                "knobs": [
                    {"margin_weight": 0.4},
                    {"channel": "pos", "margin_weight": 0.2},
                    # Mixed objectives on one channel: the per-objective scaling path.
                    *(
                        {
                            "category": f"CAT{c:03d}",
                            "channel": "pdp",
                            "objective": "revenue",
                            "margin_weight": 0.3,
                        }
                        for c in range(0, 200, 7)
                    ),
                ],
                "low_stock_units": 3,
                "low_stock_factor": 0.7,
                "overstock_units": 200,
                "sell_through_boost": 0.1,
            },
            "restrictions": {
                "category_pairs": [[f"CAT{c:03d}", f"CAT{c + 1:03d}"] for c in range(0, 60, 2)],
                "excluded_brands": ["BRAND3", "BRAND7"],
                "age_verified_channels": ["pos", "contact_center"],
            },
        }
    )


def synthetic_calibration(rng: np.random.Generator) -> AcceptanceCalibration:
    """Isotonic curves fitted as ``models.calibration`` fits them, on synthetic outcomes."""

    def curve(slope: float) -> Curve:
        score = rng.random(20_000)
        accepted = rng.random(20_000) < np.clip(slope * score**2, 0, 1)
        isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        isotonic.fit(score, accepted.astype(np.float64))
        return Curve(
            score=np.asarray(isotonic.X_thresholds_, dtype=np.float64),
            p_accept=np.asarray(isotonic.y_thresholds_, dtype=np.float64),
        )

    return AcceptanceCalibration(
        pooled=curve(0.2),
        by_kind={Kind.CROSS_SELL.value: curve(0.3), Kind.PERSONAL.value: curve(0.25)},
        holdout_baskets=20_000,
        base_rate=0.05,
    )


@dataclass(frozen=True)
class StockRead:
    """What the store's read returns, one row per survivor then per basket line (C order,
    as the store returns it)."""

    atp: IntArray
    safety_stock: IntArray
    inbound: IntArray
    ranged: BoolArray


@dataclass(frozen=True)
class Request:
    channel: Channel
    catalog_pos: IntArray  # the 500 candidates; -1 for an SKU the item master lacks
    kind: npt.NDArray[np.int8]
    relevance: npt.NDArray[np.float64]
    basket_pos: IntArray
    basket_quantity: IntArray
    facts: RequestFacts
    nodes: EligibleNodes
    read: StockRead | None  # None until the survivors of the item-master rules are known


def synthetic_request(
    rng: np.random.Generator,
    index: int,
    catalog: Catalog,
    nodes: dict[Channel, EligibleNodes],
) -> Request:
    channel = CHANNELS[index % len(CHANNELS)]
    drawn = rng.choice(SKUS, CANDIDATES + 5, replace=False).astype(np.int64)
    basket_pos = drawn[: rng.integers(3, 6)]
    catalog_pos = drawn[5:]
    if index % 20 == 0:  # now and then the model knows SKUs the item master has dropped
        catalog_pos[rng.choice(CANDIDATES, 2, replace=False)] = -1
    eligible = nodes[channel]
    return Request(
        channel=channel,
        catalog_pos=catalog_pos,
        kind=rng.choice(
            np.array([Kind.CROSS_SELL, Kind.PERSONAL, Kind.POPULAR], dtype=np.int8),
            CANDIDATES,
            p=[0.6, 0.25, 0.15],
        ),
        relevance=np.sort(rng.random(CANDIDATES))[::-1].copy(),
        basket_pos=basket_pos,
        basket_quantity=rng.integers(1, 3, len(basket_pos)),
        facts=RequestFacts(
            channel=channel,
            excluded_pos=basket_pos,
            basket_category_codes=catalog.category_code[basket_pos].astype(np.int64),
            quantity=1,
            now=NOW,
            consent=bool(rng.random() < 0.7),
            node_cost=eligible.shipment_cost,
            basket_node=np.zeros(NODE_COUNT, dtype=np.bool_),
        ),
        nodes=eligible,
        read=None,
    )


def stock_read(rng: np.random.Generator, rows: int) -> StockRead:
    shape = (rows, NODE_COUNT)
    ranged = rng.random(shape) < 0.6
    return StockRead(
        atp=np.where(ranged, rng.integers(0, 30, shape), 0),
        safety_stock=np.where(ranged, rng.integers(0, 5, shape), 0),
        inbound=np.where(ranged, rng.integers(0, 10, shape), 0),
        ranged=ranged,
    )


def recommend(
    request: Request,
    catalog: Catalog,
    compiled: CompiledPolicy,
    calibration: AcceptanceCalibration,
    laps: list[int] | None = None,
) -> tuple[IntArray, IntArray]:
    """The rules stage of one request: (shown candidate indexes, survivors of the master
    rules). ``laps`` collects a perf_counter_ns reading after each stage."""
    channel, nodes = request.channel, request.nodes
    facts = candidate_facts(
        catalog,
        compiled,
        request.catalog_pos,
        uses_history=USES_HISTORY[request.kind],
        channel=channel,
        now=NOW,
    )
    drop = apply_constraints(facts, request.facts, compiled, MASTER_CONSTRAINTS)
    survivors = np.flatnonzero(drop == KEPT)
    if laps is not None:
        laps.append(time.perf_counter_ns())
    # The stock read (I/O, not part of this figure) returns the survivors and the basket.
    read = request.read
    if read is None:  # building the pool: learning how many rows the read returns
        return np.empty(0, dtype=np.int64), survivors
    available = available_units(read.atp, read.safety_stock, read.ranged)
    split = len(survivors)
    if channel == "pos":
        ship_to_home = np.concatenate(
            [facts.ship_to_home[survivors], catalog.ship_to_home[request.basket_pos]]
        )
        available = sellable_stock(available, ship_to_home, nodes.take_home, channel=channel)
    basket_node = basket_shipping_nodes(
        available[split:], request.basket_quantity, request.facts.node_cost
    )
    request_facts = request.facts.with_basket_nodes(basket_node)
    if channel == "pos":
        ranged_at_store = read.ranged[:split, nodes.take_home].any(axis=1)
    else:
        ranged_at_store = np.zeros(split, dtype=np.bool_)
    view = facts.with_stock(
        survivors,
        available=available[:split],
        inbound=read.inbound[:split],  # the store reads 0 where not ranged
        ranged_at_store=ranged_at_store,
    )
    if laps is not None:
        laps.append(time.perf_counter_ns())

    view, column = with_fulfilment(view, request_facts, compiled)
    stock_drop = apply_constraints(view, request_facts, compiled, STOCK_CONSTRAINTS)
    drop[survivors] = stock_drop
    rows = np.flatnonzero(stock_drop == KEPT)
    if laps is not None:
        laps.append(time.perf_counter_ns())

    kept = survivors[rows]
    columns = column[rows]
    relevance = request.relevance[kept]
    catalog_pos = view.catalog_pos[rows]
    inputs = RankingInputs(
        catalog_pos=catalog_pos,
        category_code=view.category_code[rows],
        relevance=relevance,
        p_accept=calibration.predict(relevance, request.kind[kept]),
        effective_price=view.effective_price[rows],
        unit_margin=view.unit_margin[rows],
        return_rate=view.return_rate[rows],
        fulfilment_cost=view.fulfilment_cost[rows],
        stock_units=view.available[rows, columns] + view.inbound[rows, columns],
    )
    parts = score(inputs, compiled, channel)
    if laps is not None:
        laps.append(time.perf_counter_ns())
    shown = rank(
        parts.final,
        inputs.catalog_pos,
        inputs.category_code,
        limit=LIMIT,
        max_per_category=compiled.policy.ranking.max_per_category,
        restricted_pairs=compiled.restricted_pairs,
    )
    if laps is not None:
        laps.append(time.perf_counter_ns())
    return kept[shown], survivors


def _fresh(request: Request) -> Request:
    """``request`` with its arrays newly written, as a served request's are when the rules
    start: the generator has just produced the candidates and the store's parser the stock
    read (copies made outside the timed part)."""
    read = request.read
    assert read is not None
    return replace(
        request,
        catalog_pos=request.catalog_pos.copy(),
        kind=request.kind.copy(),
        relevance=request.relevance.copy(),
        read=StockRead(
            atp=read.atp.copy(),
            safety_stock=read.safety_stock.copy(),
            inbound=read.inbound.copy(),
            ranged=read.ranged.copy(),
        ),
    )


def time_requests(
    pool: list[Request],
    catalog: Catalog,
    compiled: CompiledPolicy,
    calibration: AcceptanceCalibration,
    iterations: int,
    *,
    fresh: bool,
) -> dict[str, Any]:
    """Median and p99 (microseconds, wall and CPU) over ``iterations`` requests cycled from
    ``pool``; the first tenth only warms up."""
    timings_us: list[float] = []
    stage_us: list[list[float]] = [[] for _ in STAGES]
    by_channel: dict[Channel, list[float]] = {channel: [] for channel in CHANNELS}
    shown_counts, kept_counts = [], []
    cpu_used_ns = wall_used_ns = 0
    cpu_us: list[float] = []
    for index in range(iterations):
        request = pool[index % len(pool)]
        if fresh:
            request = _fresh(request)
        cpu_started = time.process_time_ns()
        laps = [time.perf_counter_ns()]
        shown, survivors = recommend(request, catalog, compiled, calibration, laps)
        cpu_spent = time.process_time_ns() - cpu_started
        cpu_used_ns += cpu_spent
        cpu_us.append(cpu_spent / 1000)
        wall_used_ns += laps[-1] - laps[0]
        total = (laps[-1] - laps[0]) / 1000
        timings_us.append(total)
        by_channel[request.channel].append(total)
        for stage, (begin, end) in enumerate(itertools.pairwise(laps)):
            stage_us[stage].append((end - begin) / 1000)
        shown_counts.append(len(shown))
        kept_counts.append(len(survivors))
    warm = len(timings_us) // 10  # the first tenth warms caches up
    timings = np.array(timings_us[warm:])
    return {
        "cpu_share_while_timed": round(cpu_used_ns / wall_used_ns, 3),
        "iterations_timed": len(timings),
        "median_us": round(float(np.median(timings)), 1),
        "p99_us": round(float(np.percentile(timings, 99)), 1),
        # CPU time of this process per request: what the wall figures would be on a core of
        # its own, so a run on the shared machine can be told apart from the code's cost.
        "median_cpu_us": round(float(np.median(cpu_us[warm:])), 1),
        "median_us_by_channel": {
            channel: round(float(np.median(values[warm // 4 :])), 1)
            for channel, values in by_channel.items()
        },
        "median_us_by_stage": {
            name: round(float(np.median(values[warm:])), 1)
            for name, values in zip(STAGES, stage_us, strict=True)
        },
        "mean_master_survivors": round(float(np.mean(kept_counts)), 1),
        "mean_shown": round(float(np.mean(shown_counts)), 2),
    }


def _over_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure per measure: the median over rounds (each round's own is in
    ``round_medians_us``)."""

    def middle(values: list[float]) -> float:
        return round(float(np.median(values)), 1)

    first = rounds[0]
    return {
        **{
            key: middle([r[key] for r in rounds])
            for key in ("median_us", "p99_us", "median_cpu_us", "cpu_share_while_timed")
        },
        "round_medians_us": [r["median_us"] for r in rounds],
        "iterations_timed": sum(r["iterations_timed"] for r in rounds),
        **{
            group: {name: middle([r[group][name] for r in rounds]) for name in first[group]}
            for group in ("median_us_by_channel", "median_us_by_stage")
        },
        "mean_master_survivors": first["mean_master_survivors"],
        "mean_shown": first["mean_shown"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000, help="per round and input kind")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    catalog = catalog_from_items(synthetic_items(rng))
    node_table = node_table_from_nodes(synthetic_nodes())
    policy = synthetic_policy()
    compiled = compile_policy(policy, catalog)
    calibration = synthetic_calibration(rng)
    nodes: dict[Channel, EligibleNodes] = {
        channel: eligible_nodes(
            node_table, channel=channel, store_id="S-N", region="NORTH", policy=policy
        )
        for channel in CHANNELS
    }
    assert all(len(eligible.positions) == NODE_COUNT for eligible in nodes.values())

    # Built beforehand and cycled: 256 requests of ~0.2 MB each outgrow the caches, so each
    # request's inputs come from memory, and the catalog is as warm as the requests before
    # it left it. (Building each one just before timing it would also time how the builder
    # itself evicts the caches.)
    pool = []
    for index in range(POOL):
        request = synthetic_request(rng, index, catalog, nodes)
        survivors = recommend(request, catalog, compiled, calibration)[1]
        read = stock_read(rng, len(survivors) + len(request.basket_pos))
        pool.append(replace(request, read=read))
    warm_up()  # as the app does at start-up: compiled rule loops are built before requests
    gc.collect()
    gc.freeze()  # as the app does after start-up: no collector pauses over set-up objects
    # Rounds alternate the two kinds of input: this machine's speed drifts by tens of
    # percent over minutes (other tenants), and a figure should not hang on one stretch.
    rounds: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for fresh_inputs in (True, False):
            rounds[fresh_inputs].append(
                time_requests(
                    pool, catalog, compiled, calibration, args.iterations, fresh=fresh_inputs
                )
            )
    fresh, cold = (_over_rounds(rounds[kind]) for kind in (True, False))
    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "catalog_skus": SKUS,
        "candidates": CANDIDATES,
        "eligible_nodes": NODE_COUNT,
        "basket_lines": "3-5, not counted in the candidates",
        "channels": list(CHANNELS),
        "limit": LIMIT,
        "inputs": "fresh: each request's candidates and stock read freshly written, as the "
        "generator and the store's parser leave them just before the rules run",
        **fresh,
        "cold_inputs": {
            "inputs": "the same requests cycled from a pool that outgrows the caches: every "
            "request's candidates and stock read come from memory (a pessimistic bound)",
            **{
                key: cold[key]
                for key in ("median_us", "p99_us", "median_cpu_us", "round_medians_us")
            },
            "median_us_by_stage": cold["median_us_by_stage"],
        },
        "target_median_us": 200,
    }
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
