"""``upsell evaluate``: strategies compared on real baskets through the real request path.

For each dataset (a raw public file, imported on the fly, or a directory already imported
with ``upsell import``):

1. temporal split of the order lines (``models.evaluation``); the models are trained on the
   past in a child process, so that training time and *peak memory* are measured apart from
   the rest of the run; the artifacts are saved and loaded back memory-mapped, as served;
2. the dataset's snapshot (items, nodes, stock) is published to an in-process store;
3. every strategy (generator weights + policy overrides) answers every held-out case through
   ``service.pipeline.Recommender``: constraints really run, and every item shown is checked
   again by ``ConstraintOracle``, written from the contract tables alone, so a rule bug
   cannot hide itself;
4. metrics at k = 5 and 10 go to ``evaluation_<dataset>.{csv,md,json}`` and the trade-off
   plot (hit rate@10 against margin captured@10) to ``evaluation_<dataset>.png``.

The request is the rest of the basket with the order's customer (consent assumed, so that
personal generators can be measured), its store (POS) or no region (web), its time as
``now``, and limit 10.

Until ``service.pipeline`` passes a ``GenerationContext`` to the generator, and can explain
every ``Kind``, ``ContextBinding`` hands the context to the generator for each case and
relabels the kinds the pipeline cannot explain yet; it does nothing once the pipeline does
both.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import polars as pl

from models.artifacts import load_artifacts
from models.candidates import empty_candidates
from models.data.adapters import import_online_retail, import_ta_feng
from models.data.contract import find_table_file, read_orders, read_snapshot_dir
from models.data.schema import ORDER_LINES, SnapshotData
from models.evaluation import (
    HeldOutCase,
    RankingMetrics,
    leave_one_out,
    ranking_metrics,
    temporal_split,
)
from models.generators import HybridWeights, ItemFacts, build_generator
from models.interfaces import (
    CandidateGenerator,
    Candidates,
    GenerationContext,
    Kind,
    ModelArtifacts,
)
from rules.errors import InputError
from rules.policy import CHANNELS, Channel, Policy, load_policy
from service import pipeline
from service.logging import configure_logging
from service.mirror import SnapshotMirror
from service.pipeline import BasketLine, RecommendationQuery, Recommender
from service.store.memory import InProcessStore

KS = (5, 10)
DATASETS = ("ta-feng", "online-retail")
COST_ASSUMPTION = {
    "ta-feng": "real: unit cost = median ASSET / AMOUNT per item, unit price = median "
    "SALES_PRICE / AMOUNT (models/data/adapters.py)",
    "online-retail": "assumed: the set has no cost; unit cost = unit price x r, r in "
    "[0.35, 0.80] drawn per SKU from blake2b(seed:sku) (models/data/adapters.py), so margins "
    "are 20-65% of price and uncorrelated with anything a model can learn",
}
MARGIN_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
# The policy field the margin-aware strategies override (rules.policy.RankingPolicy.knobs):
# one default knob, so every category and channel gets the same weight.
MARGIN_KNOB_PATH = "ranking.knobs"


# -- strategies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """What one row of the table runs: generator weights and policy overrides.

    ``policy_overrides`` maps a dotted policy path (``ranking.max_per_category``) to the
    JSON value it takes; the overridden policy is validated whole, like a policy file.
    """

    name: str
    weights: HybridWeights
    policy_overrides: Mapping[str, object] = field(default_factory=dict)
    family: str = "baseline"  # rows of one family are joined by a line in the plot


def margin_knob(weight: float) -> dict[str, object]:
    """Policy overrides that set the margin weight of every category and channel."""
    return {MARGIN_KNOB_PATH: [{"objective": "margin", "margin_weight": weight}]}


# The service's hybrid today (models.candidates.HybridGenerator.from_artifacts defaults).
SERVICE_HYBRID = HybridWeights()
# Every generator, weighted per dataset. Chosen by coordinate ascent on hit rate@10 of the
# generator alone (no rules), on a validation split *inside the training period* (its last
# 20% of orders, 6,000 baskets), never on the test orders. The two sets differ for real
# reasons: Ta-Feng is a grocery with weekly staples (replenishment and bundles pay), Online
# Retail a gift wholesaler whose baskets are themed ranges (ALS neighbours pay, lift
# bundles of rare pairs do not). See benchmarks/README.md.
TUNED_HYBRID: dict[str, HybridWeights] = {
    "ta-feng": HybridWeights(
        cross_sell=0.5,
        personal=0.5,
        popular=0.2,
        factor_cross_sell=0.25,
        bundle=0.5,
        upgrade=0.05,
        replenish=4.0,
        segment_popular=0.4,
    ),
    "online-retail": HybridWeights(
        cross_sell=1.0,
        personal=1.0,
        popular=0.2,
        factor_cross_sell=1.0,
        bundle=0.0,
        upgrade=0.4,
        replenish=1.0,
        segment_popular=0.2,
    ),
}
# For a dataset without tuned weights: every generator, by judgement.
UNTUNED_HYBRID = HybridWeights(
    cross_sell=1.0,
    personal=1.0,
    popular=0.2,
    factor_cross_sell=0.5,
    bundle=0.5,
    upgrade=0.2,
    replenish=1.0,
    segment_popular=0.2,
)


def default_strategies(
    dataset: str, margin_weights: Sequence[float] = MARGIN_WEIGHTS
) -> list[Strategy]:
    """Single generators, the service's hybrid by relevance alone, and the dataset's tuned
    hybrid at each margin weight. ``margin_weight`` 0 is relevance only: the baseline of the
    margin rows."""
    relevance_only = margin_knob(0.0)
    singles = [
        ("popularity", "popular"),
        ("item-item (co-occurrence)", "cross_sell"),
        ("item-item (ALS factors)", "factor_cross_sell"),
        ("ALS (personal)", "personal"),
        ("bundles (lift)", "bundle"),
        ("replenishment", "replenish"),
    ]
    strategies = [
        Strategy(name, HybridWeights.only(weight), relevance_only) for name, weight in singles
    ]
    strategies.append(Strategy("hybrid (service default)", SERVICE_HYBRID, relevance_only))
    tuned = TUNED_HYBRID.get(dataset, UNTUNED_HYBRID)
    strategies += [
        Strategy(f"hybrid, margin weight {weight:g}", tuned, margin_knob(weight), "margin")
        for weight in margin_weights
    ]
    return strategies


def apply_policy_overrides(policy: Policy, overrides: Mapping[str, object]) -> Policy:
    """``policy`` with each dotted path set to its value, validated again; an InputError names
    the path that does not exist or does not validate."""
    document: dict[str, Any] = policy.model_dump(mode="json")
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = document
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                raise InputError(f"policy override {path}: the policy has no section {part!r}")
            node = child
        if leaf not in node:
            raise InputError(f"policy override {path}: the policy has no field {leaf!r}")
        node[leaf] = value
    try:
        return Policy.model_validate(document)
    except ValueError as error:
        raise InputError(f"policy overrides {dict(overrides)}: invalid: {error}") from error


# -- the generator as the pipeline sees it ------------------------------------------------

# How a kind the pipeline cannot explain yet is shown: as the nearest kind it can explain.
_STAND_IN_KIND = {Kind.BUNDLE: Kind.CROSS_SELL, Kind.UPGRADE: Kind.CROSS_SELL}
_STAND_IN_KIND[Kind.REPLENISH] = Kind.PERSONAL  # history-based: stays under the consent rule


class ContextBinding:
    """Wraps a generator for the evaluation: passes the case's context when the pipeline
    passes none, relabels kinds the pipeline cannot explain, and keeps the last candidates
    (with their own kinds) so that hits can be attributed to generators."""

    def __init__(self, inner: CandidateGenerator) -> None:
        self.kind = inner.kind
        self._inner = inner
        self.context: GenerationContext | None = None
        self.last: Candidates = empty_candidates()
        # The pipeline's table of lead reasons: a kind missing from it cannot be shown.
        explained = set(getattr(pipeline, "_LEAD_REASON_BY_KIND", {}))
        lookup = np.arange(max(Kind) + 1, dtype=np.int8)
        for kind in Kind:
            if kind not in explained and kind in _STAND_IN_KIND:
                lookup[kind] = _STAND_IN_KIND[kind]
        self._shown_kind = lookup

    def generate(
        self,
        *,
        anchors: npt.NDArray[np.int32],
        user_row: int | None,
        count: int,
        context: GenerationContext | None = None,
    ) -> Candidates:
        candidates = self._inner.generate(
            anchors=anchors, user_row=user_row, count=count, context=context or self.context
        )
        self.last = candidates
        return Candidates(
            item_idx=candidates.item_idx,
            score=candidates.score,
            kind=self._shown_kind[candidates.kind],
        )


# -- the independent constraint check -----------------------------------------------------


class ConstraintOracle:
    """The constraints every shown item must meet, checked from the contract tables alone.

    Checks: the SKU is in the item master and not in the basket; the fulfilment node may
    serve the channel (POS: the store, or a DC of its region for items sold for delivery
    when the policy allows; other channels: the region's nodes, else every DC); ATP minus
    safety stock covers the quantity there; the unit margin meets the floor of its category
    and channel (before any split-shipment cost, so the check can only be laxer than the
    rule, never stricter); age-restricted items only where age is verified; no excluded
    brand; the reported unit margin is the item master's.
    """

    def __init__(self, snapshot: SnapshotData, policy: Policy) -> None:
        self._policy = policy
        items = snapshot.items
        columns = set(items.columns)
        self._item = {row["sku"]: row for row in items.to_dicts()}
        self._ship_to_home = "ship_to_home" in columns
        self._available = {
            (sku, node): atp - safety
            for sku, node, atp, safety in snapshot.inventory.select(
                "sku", "node_id", "atp", "safety_stock"
            ).iter_rows()
        }
        nodes = snapshot.nodes
        self._region_of = dict(
            zip(nodes["node_id"].to_list(), nodes["region"].to_list(), strict=True)
        )
        self._dcs = set(nodes.filter(pl.col("kind") == "dc")["node_id"].to_list())
        self._nodes_in_region: dict[str, set[str]] = {}
        for node, region in self._region_of.items():
            self._nodes_in_region.setdefault(region, set()).add(node)

    def region_of(self, node_id: str | None) -> str | None:
        return self._region_of.get(node_id) if node_id is not None else None

    def category_of(self, sku: str) -> str | None:
        row = self._item.get(sku)
        return None if row is None else str(row["category"])

    def unit_margin(self, sku: str, now: datetime) -> float:
        price = self._price(self._item[sku], now)
        return float(price - self._item[sku]["unit_cost"])

    def violations(
        self,
        query: RecommendationQuery,
        *,
        sku: str,
        node: str,
        reported_margin: float,
        now: datetime,
    ) -> list[str]:
        row = self._item.get(sku)
        if row is None:
            return [f"{sku}: not in the item master"]
        problems = []
        asked = {line.sku for line in query.basket} | {query.pdp_sku}
        if sku in asked:
            problems.append(f"{sku}: already in the basket")
        if node not in self._eligible(query, row):
            problems.append(f"{sku}: node {node} may not serve {query.channel}")
        quantity = query.quantity or self._policy.default_quantity
        if self._available.get((sku, node), -1) < quantity:
            problems.append(f"{sku}: stock at {node} does not cover {quantity}")
        price = self._price(row, now)
        margin = price - row["unit_cost"]
        floor = self._policy.floor_for(category=row["category"], channel=query.channel)
        if margin < floor.absolute - 1e-9 or margin < floor.percent * price - 1e-9:
            problems.append(f"{sku}: margin {margin:.4f} on {price:.4f} below {floor}")
        restrictions = self._policy.restrictions
        if row.get("age_restricted") and query.channel not in restrictions.age_verified_channels:
            problems.append(f"{sku}: age-restricted on {query.channel}")
        if row.get("brand") is not None and row["brand"] in restrictions.excluded_brands:
            problems.append(f"{sku}: excluded brand {row['brand']}")
        if abs(reported_margin - margin) > 1e-3:
            problems.append(f"{sku}: reported margin {reported_margin} != {margin:.4f}")
        return problems

    def showable(self, query: RecommendationQuery, sku: str, now: datetime) -> bool:
        """Whether some eligible node could show ``sku`` for this request: the ceiling of
        what any strategy can hit."""
        row = self._item.get(sku)
        if row is None:
            return False
        quantity = query.quantity or self._policy.default_quantity
        stocked = any(
            self._available.get((sku, node), -1) >= quantity for node in self._eligible(query, row)
        )
        price = self._price(row, now)
        margin = price - row["unit_cost"]
        floor = self._policy.floor_for(category=row["category"], channel=query.channel)
        return stocked and margin >= floor.absolute and margin >= floor.percent * price

    def _eligible(self, query: RecommendationQuery, row: Mapping[str, Any]) -> set[str]:
        if query.channel == "pos":
            store = query.store_id
            eligible = {store} if store is not None else set()
            region = self.region_of(store)
            sold_for_delivery = self._ship_to_home and bool(row.get("ship_to_home"))
            if (
                region is not None
                and sold_for_delivery
                and self._policy.fulfilment.pos_ships_from_region_dcs
            ):
                eligible |= self._nodes_in_region.get(region, set()) & self._dcs
            return eligible
        in_region = self._nodes_in_region.get(query.region or "", set())
        return in_region or set(self._dcs)

    @staticmethod
    def _price(row: Mapping[str, Any], now: datetime) -> float:
        promo = row.get("promo_price")
        live = (
            promo is not None
            and (row.get("promo_start") is None or row["promo_start"] <= now)
            and (row.get("promo_end") is None or now < row["promo_end"])
        )
        return float(row["unit_price"]) if promo is None or not live else float(promo)


# -- one dataset --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRun:
    seconds: float
    peak_rss_mib: float  # the training child process's peak resident memory
    order_lines: int
    model_version: str


@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    family: str
    weights: dict[str, float]
    policy_overrides: dict[str, object]
    metrics: dict[int, RankingMetrics]
    hits_by_kind: dict[str, int]  # hits@10 by the generator that proposed the item
    mean_request_us: float


@dataclass(frozen=True)
class DatasetReport:
    dataset: str
    channel: Channel
    cost_assumption: str
    cutoff: str
    train_lines: int
    test_orders: int
    cases: int
    catalog_items: int  # items the trained model knows: the denominator of coverage
    showable_share: float  # cases whose hidden item could be shown at all (the ceiling)
    training: TrainingRun
    artifacts_memory_mapped: bool
    results: list[StrategyResult]


def evaluate_dataset(
    contract_dir: Path,
    *,
    dataset: str,
    strategies: Sequence[Strategy],
    channel: Channel | None = None,
    max_cases: int | None = 10_000,
    seed: int = 7,
    test_fraction: float = 0.2,
    train_params: Mapping[str, Any] | None = None,
    policy: Policy | None = None,
) -> DatasetReport:
    """Run every strategy on one imported dataset (see the module docstring)."""
    return asyncio.run(
        _evaluate_dataset(
            contract_dir,
            dataset=dataset,
            strategies=strategies,
            channel=channel,
            max_cases=max_cases,
            seed=seed,
            test_fraction=test_fraction,
            train_params=dict(train_params or {}),
            policy=policy or load_policy(),
        )
    )


async def _evaluate_dataset(
    contract_dir: Path,
    *,
    dataset: str,
    strategies: Sequence[Strategy],
    channel: Channel | None,
    max_cases: int | None,
    seed: int,
    test_fraction: float,
    train_params: dict[str, Any],
    policy: Policy,
) -> DatasetReport:
    orders = read_orders(find_table_file(contract_dir, ORDER_LINES))
    snapshot = read_snapshot_dir(contract_dir)
    has_stores = "store_id" in orders.columns and orders["store_id"].null_count() < orders.height
    channel = channel or ("pos" if has_stores else "cart")
    split = temporal_split(orders, test_fraction=test_fraction)

    with tempfile.TemporaryDirectory(prefix="upsell-evaluate-") as scratch:
        training = _train_in_child(
            split.train, snapshot.nodes, Path(scratch) / "artifacts", train_params
        )
        artifacts = load_artifacts(Path(scratch) / "artifacts")  # memory-mapped, as served
        memory_mapped = isinstance(artifacts.item_factors, np.memmap)
        cases = leave_one_out(
            split.test, known_skus=artifacts.item_skus, seed=seed, max_cases=max_cases
        )
        if not cases:
            raise InputError(f"{contract_dir}: no test order has two items the model knows")
        if channel == "pos" and any(case.store_id is None for case in cases):
            raise InputError(f"{contract_dir}: channel pos needs every order's store_id")
        facts = ItemFacts.from_items(artifacts.item_skus, snapshot.items)
        store = InProcessStore(state_dir=None, keep=2)
        try:
            await store.publish(snapshot)
            oracle = ConstraintOracle(snapshot, policy)
            queries = [_query(case, channel) for case in cases]
            known = frozenset(artifacts.item_skus)
            contexts = [_context(case, oracle, known) for case in cases]
            showable = sum(
                oracle.showable(query, case.hidden, case.ordered_at)
                for query, case in zip(queries, cases, strict=True)
            )
            results = []
            for strategy in strategies:
                started = time.perf_counter()
                results.append(
                    await _run_strategy(
                        strategy,
                        artifacts=artifacts,
                        facts=facts,
                        store=store,
                        policy=policy,
                        snapshot=snapshot,
                        cases=cases,
                        queries=queries,
                        contexts=contexts,
                    )
                )
                _progress(
                    f"{dataset}: {strategy.name}: hit rate@10 "
                    f"{results[-1].metrics[10].hit_rate:.4f} in "
                    f"{time.perf_counter() - started:.0f} s"
                )
        finally:
            await store.close()
    return DatasetReport(
        dataset=dataset,
        channel=channel,
        cost_assumption=COST_ASSUMPTION.get(dataset, "as imported"),
        cutoff=split.cutoff.isoformat(),
        train_lines=split.train.height,
        test_orders=split.test["order_id"].n_unique(),
        cases=len(cases),
        catalog_items=len(artifacts.item_skus),
        showable_share=showable / len(cases),
        training=training,
        artifacts_memory_mapped=memory_mapped,
        results=results,
    )


async def _run_strategy(
    strategy: Strategy,
    *,
    artifacts: ModelArtifacts,
    facts: ItemFacts,
    store: InProcessStore,
    policy: Policy,
    snapshot: SnapshotData,
    cases: Sequence[HeldOutCase],
    queries: Sequence[RecommendationQuery],
    contexts: Sequence[GenerationContext],
) -> StrategyResult:
    strategy_policy = apply_policy_overrides(policy, strategy.policy_overrides)
    mirror = SnapshotMirror(
        store=store, artifacts=artifacts, policy=strategy_policy, refresh_seconds=math.inf
    )
    await mirror.refresh()
    generator = ContextBinding(build_generator(artifacts, strategy.weights, facts=facts))
    recommender = Recommender(mirror=mirror, store=store, artifacts=artifacts, generator=generator)
    oracle = ConstraintOracle(snapshot, strategy_policy)
    item_row = {sku: row for row, sku in enumerate(artifacts.item_skus)}
    recommended: list[list[str]] = []
    violations = 0
    hits_by_kind: Counter[str] = Counter()
    elapsed = 0.0
    for case, query, context in zip(cases, queries, contexts, strict=True):
        generator.context = context
        started = time.perf_counter()
        answer = await recommender.recommend(query, now=case.ordered_at)
        elapsed += time.perf_counter() - started
        skus = [item.sku for item in answer.items]
        recommended.append(skus)
        for item in answer.items:
            violations += bool(
                oracle.violations(
                    query,
                    sku=item.sku,
                    node=item.fulfillment_node,
                    reported_margin=item.unit_margin,
                    now=case.ordered_at,
                )
            )
        if case.hidden in skus[: max(KS)]:
            hits_by_kind[_proposing_kind(generator.last, item_row[case.hidden])] += 1
    margins = {case.hidden: oracle.unit_margin(case.hidden, case.ordered_at) for case in cases}
    hidden = [case.hidden for case in cases]
    metrics = {
        k: ranking_metrics(
            recommended,
            hidden,
            k=k,
            unit_margin=margins,
            catalog_size=len(artifacts.item_skus),
            violations=violations,
        )
        for k in KS
    }
    return StrategyResult(
        strategy=strategy.name,
        family=strategy.family,
        weights={name: w for name, w in strategy.weights.as_dict().items() if w},
        policy_overrides=dict(strategy.policy_overrides),
        metrics=metrics,
        hits_by_kind=dict(sorted(hits_by_kind.items())),
        mean_request_us=elapsed / len(cases) * 1e6,
    )


def _proposing_kind(candidates: Candidates, model_row: int) -> str:
    at = np.flatnonzero(candidates.item_idx == model_row)
    return Kind(int(candidates.kind[at[0]])).wire if at.size else "unknown"


def _query(case: HeldOutCase, channel: Channel) -> RecommendationQuery:
    return RecommendationQuery(
        request_id=case.order_id,
        channel=channel,
        basket=tuple(BasketLine(sku=sku, quantity=1) for sku in case.basket),
        customer_id=case.customer_id,
        consent=case.customer_id is not None,
        store_id=case.store_id if channel == "pos" else None,
        region=None,
        limit=max(KS),
    )


def _context(
    case: HeldOutCase, oracle: ConstraintOracle, known: frozenset[str]
) -> GenerationContext:
    new_item_categories = {
        category
        for sku in case.basket
        if sku not in known and (category := oracle.category_of(sku)) is not None
    }
    return GenerationContext(
        now=case.ordered_at,
        region=oracle.region_of(case.store_id),
        categories=tuple(sorted(new_item_categories)),
    )


# -- training in a child process ----------------------------------------------------------


# The training child: only the models layer, as `upsell train` runs it. It reports its own
# peak memory as VmHWM (the high-water mark of its own address space): getrusage's ru_maxrss
# would include the parent's pages, which Linux carries across fork and exec.
_TRAIN_CHILD = """
import sys, time
from pathlib import Path
import orjson, polars as pl
from models.artifacts import save_artifacts
from models.training import train
lines, nodes, out, params = sys.argv[1:]
order_lines = pl.read_parquet(lines)
started = time.perf_counter()
artifacts = train(order_lines, nodes=pl.read_parquet(nodes), **orjson.loads(params))
seconds = time.perf_counter() - started
save_artifacts(artifacts, Path(out))
status = Path("/proc/self/status")
peak_kib = None
if status.is_file():
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kib = int(line.split()[1])
outcome = {"seconds": seconds, "version": artifacts.version, "peak_kib": peak_kib}
print(orjson.dumps(outcome).decode())
"""


def _train_in_child(
    order_lines: pl.DataFrame, nodes: pl.DataFrame, out: Path, params: dict[str, Any]
) -> TrainingRun:
    """Train in a fresh interpreter, as ``upsell train`` would run, so that its peak memory
    is the training's own (with the interpreter and the order lines) and not this process's.

    A subprocess rather than multiprocessing: ``spawn`` re-imports the caller's main module,
    which breaks any script without a ``__main__`` guard.
    """
    out.mkdir(parents=True, exist_ok=True)
    lines_path, nodes_path = out / "train_lines.parquet", out / "nodes.parquet"
    order_lines.write_parquet(lines_path)
    nodes.write_parquet(nodes_path)
    command = [sys.executable, "-c", _TRAIN_CHILD, str(lines_path), str(nodes_path), str(out)]
    command.append(orjson.dumps(params).decode())
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    lines_path.unlink()
    nodes_path.unlink()
    if finished.returncode != 0:
        raise InputError(f"training failed: {finished.stderr.strip()[-2000:]}")
    outcome = orjson.loads(finished.stdout.strip().splitlines()[-1])
    peak_kib = outcome["peak_kib"]
    return TrainingRun(
        seconds=float(outcome["seconds"]),
        peak_rss_mib=float(peak_kib) / 1024 if peak_kib is not None else math.nan,
        order_lines=order_lines.height,
        model_version=str(outcome["version"]),
    )


# -- output -------------------------------------------------------------------------------

_COLUMNS = ("hit_rate", "ndcg", "mrr", "coverage", "margin_per_1000")


def report_rows(report: DatasetReport) -> list[dict[str, object]]:
    """One flat row per strategy: what the CSV holds."""
    rows: list[dict[str, object]] = []
    for result in report.results:
        row: dict[str, object] = {"dataset": report.dataset, "strategy": result.strategy}
        for k in KS:
            metrics = result.metrics[k]
            for name in _COLUMNS:
                row[f"{name}@{k}"] = round(getattr(metrics, name), 6)
        row["violations"] = result.metrics[KS[-1]].violations
        row["cases"] = report.cases
        row["mean_request_us"] = round(result.mean_request_us, 1)
        rows.append(row)
    return rows


def report_csv(report: DatasetReport) -> str:
    rows = report_rows(report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report_markdown(report: DatasetReport) -> str:
    """The table as in the README, with the run's facts above it."""
    training = report.training
    lines = [
        f"### {report.dataset}",
        "",
        f"- channel `{report.channel}`; cutoff {report.cutoff}; {report.train_lines:,} "
        f"training lines; {report.cases:,} held-out cases from {report.test_orders:,} test "
        f"orders; {report.catalog_items:,} items in the model",
        f"- cost: {report.cost_assumption}",
        f"- hidden item showable at all (in stock at an eligible node, above the margin "
        f"floor): {report.showable_share:.1%} of cases, the ceiling of every hit rate",
        f"- training {training.seconds:.1f} s, peak RSS {training.peak_rss_mib:,.0f} MiB "
        f"({training.order_lines:,} lines); artifacts loaded memory-mapped: "
        f"{'yes' if report.artifacts_memory_mapped else 'no'}",
        "",
        "| strategy | HR@5 | HR@10 | NDCG@10 | MRR@10 | coverage@10 | margin/1k@5 "
        "| margin/1k@10 | violations | µs/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in report.results:
        at5, at10 = result.metrics[5], result.metrics[10]
        lines.append(
            f"| {result.strategy} | {at5.hit_rate:.4f} | {at10.hit_rate:.4f} | "
            f"{at10.ndcg:.4f} | {at10.mrr:.4f} | {at10.coverage:.3f} | "
            f"{at5.margin_per_1000:,.1f} | {at10.margin_per_1000:,.1f} | {at10.violations} | "
            f"{result.mean_request_us:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def report_json(report: DatasetReport) -> bytes:
    document = asdict(report)
    for result in document["results"]:
        result["metrics"] = {str(k): value for k, value in result["metrics"].items()}
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


def plot_tradeoff(report: DatasetReport, path: Path) -> bool:
    """Hit rate@10 against margin captured@10 per strategy; False when matplotlib (a dev
    dependency) is not installed."""
    try:
        import matplotlib  # noqa: PLC0415 - optional, and heavy: only this function needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(8, 5.5))
    families: dict[str, list[StrategyResult]] = {}
    for result in report.results:
        families.setdefault(result.family, []).append(result)
    for family, results in families.items():
        x = [result.metrics[10].hit_rate for result in results]
        y = [result.metrics[10].margin_per_1000 for result in results]
        if family == "margin":
            axes.plot(x, y, "-o", color="tab:red", label="hybrid, margin weight 0 -> 1")
        else:
            axes.plot(x, y, "o", color="tab:blue", label="relevance only")
        for result, x_at, y_at in zip(results, x, y, strict=True):
            axes.annotate(
                result.strategy.replace("hybrid, margin weight ", "w="),
                (x_at, y_at),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    axes.set_xlabel("hit rate@10")
    axes.set_ylabel("margin captured@10 per 1,000 baskets")
    axes.set_title(f"{report.dataset}: relevance vs margin ({report.cases:,} held-out baskets)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(report: DatasetReport, out_dir: Path) -> list[Path]:
    """``evaluation_<dataset>.csv/.md/.json/.png`` under ``out_dir``; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"evaluation_{report.dataset}"
    written = []
    for suffix, content in (
        (".csv", report_csv(report).encode()),
        (".md", report_markdown(report).encode()),
        (".json", report_json(report)),
    ):
        path = stem.with_suffix(suffix)
        path.write_bytes(content)
        written.append(path)
    if plot_tradeoff(report, stem.with_suffix(".png")):
        written.append(stem.with_suffix(".png"))
    return written


# -- command line -------------------------------------------------------------------------


def contract_dir_for(dataset: str, source: Path, scratch: Path) -> Path:
    """``source`` itself when it is an imported directory, else the raw public file imported
    into ``scratch`` with ``upsell import``'s importer (seed 7)."""
    if source.is_dir():
        return source
    importer = {"ta-feng": import_ta_feng, "online-retail": import_online_retail}.get(dataset)
    if importer is None:
        raise InputError(f"{dataset}: unknown dataset; expected one of {', '.join(DATASETS)}")
    out = scratch / dataset
    importer(source, out, seed=7)
    return out


def parse_dataset_arguments(values: Sequence[str]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` pairs; NAME is a dataset of ``upsell import`` (ta-feng, online-retail)."""
    pairs = []
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or name not in DATASETS or not path:
            raise InputError(
                f"dataset {value!r}: expected NAME=PATH with NAME one of {', '.join(DATASETS)}"
            )
        if not Path(path).exists():
            raise InputError(f"dataset {name}: {path} does not exist")
        pairs.append((name, Path(path)))
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``upsell evaluate`` arguments (also ``python -m service.evaluate``)."""
    parser.add_argument(
        "datasets",
        nargs="+",
        metavar="NAME=PATH",
        help="ta-feng=FILE_OR_DIR and/or online-retail=FILE_OR_DIR: the raw public file, or a "
        "directory written by `upsell import`",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--cases", type=int, default=10_000, help="held-out baskets per dataset (0: all)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument(
        "--margin-weights",
        default=",".join(f"{weight:g}" for weight in MARGIN_WEIGHTS),
        help="margin weights of the margin-aware rows, comma-separated (default %(default)s)",
    )
    parser.add_argument("--policy", type=Path, help="policy file (default: the packaged one)")
    parser.add_argument(
        "--channel",
        choices=CHANNELS,
        help="channel of every request (default: pos at the order's store when orders have "
        "stores, else cart)",
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_command(args: argparse.Namespace) -> None:
    """``upsell evaluate``: run, print each table and the files written."""
    # Every simulated request would log a decision record: tens of thousands of lines that
    # say nothing here. Warnings still show.
    configure_logging(level="warning", json=False)
    for path in run(args):
        print(f"wrote {path}", flush=True)


def run(args: argparse.Namespace) -> list[Path]:
    """Evaluate every dataset named in ``args``; returns the files written."""
    datasets = parse_dataset_arguments(args.datasets)
    try:
        margin_weights = [float(value) for value in args.margin_weights.split(",") if value]
    except ValueError as error:
        raise InputError(f"--margin-weights: {error}") from error
    policy = load_policy(args.policy)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="upsell-evaluate-data-") as scratch:
        for name, source in datasets:
            _progress(f"{name}: preparing {source}")
            contract_dir = contract_dir_for(name, source, Path(scratch))
            report = evaluate_dataset(
                contract_dir,
                dataset=name,
                strategies=default_strategies(name, margin_weights),
                channel=args.channel,
                max_cases=args.cases or None,
                seed=args.seed,
                test_fraction=args.test_fraction,
                policy=policy,
            )
            written += write_report(report, args.out)
            print(report_markdown(report), flush=True)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.evaluate", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_command(args)
    except InputError as error:
        print(f"upsell evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
