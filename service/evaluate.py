"""``upsell evaluate``: strategies compared on real baskets through the real request path.

For each dataset (a raw public file, imported on the fly, or a directory already imported
with ``upsell import``):

1. temporal split of the order lines (``models.evaluation``); with ``--period validation``
   the training period is split again and its newest orders are scored instead, so that
   tuning never sees the test orders;
2. the models are trained on the past in a child process, as ``upsell train`` trains them,
   acceptance calibration included (fitted for the generator weights of the margin-aware
   rows, since weights set the scale of the scores), so that training time and *peak
   memory* are measured apart from the rest of the run; the artifacts are saved and loaded
   back memory-mapped, as served;
3. the dataset's snapshot (items, nodes, stock) is published to an in-process store;
4. every strategy (generator weights + policy overrides) answers every held-out case through
   ``service.pipeline.Recommender`` with the model's calibration, as served: constraints
   really run, and every item shown is checked again by ``ConstraintOracle``, written from
   the contract tables alone, so a rule bug cannot hide itself;
5. metrics at k = 5 and 10, the run's settings and the issue's targets go to
   ``evaluation_<dataset>.{csv,md,json}`` and the trade-off plot (hit rate@10 against margin
   captured@10) to ``evaluation_<dataset>.png``.

The request is the rest of the basket with the order's customer (consent assumed, so that
personal generators can be measured), its store (POS) or no region (web), its time as
``now``, and limit 10.

The pipeline is the served one (``service.pipeline.Recommender``, calibrated p(accept)
included); ``ContextBinding`` hands each case's context to the generator and keeps the
generators' own kinds, so that hits can be attributed to them.
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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
import polars as pl

from models.artifacts import load_artifacts
from models.calibration import AcceptanceCalibration, load_calibration
from models.candidates import empty_candidates
from models.data.adapters import import_online_retail, import_ta_feng
from models.data.contract import find_table_file, read_orders, read_snapshot_dir
from models.data.schema import ORDER_LINES, SnapshotData
from models.evaluation import (
    HeldOutCase,
    RankingMetrics,
    Split,
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
from rules.policy import Channel, Policy, load_policy
from service import pipeline
from service.evaluate_cli import DATASETS, DESCRIPTION, MARGIN_WEIGHTS, add_arguments
from service.logging import configure_logging
from service.mirror import SnapshotMirror
from service.pipeline import BasketLine, RecommendationQuery, Recommender
from service.store.memory import InProcessStore

KS = (5, 10)
Period = Literal["test", "validation"]
COST_ASSUMPTION = {
    "ta-feng": "real: unit cost = median ASSET / AMOUNT per item, unit price = median "
    "SALES_PRICE / AMOUNT (models/data/adapters.py)",
    "online-retail": "assumed: the set has no cost; unit cost = unit price x r, r in "
    "[0.35, 0.80] drawn per SKU from blake2b(seed:sku) (models/data/adapters.py), so margins "
    "are 20-65% of price and uncorrelated with anything a model can learn",
}
# The policy field the margin-aware strategies override (rules.policy.RankingPolicy.knobs):
# one default knob, so every category and channel gets the same weight.
MARGIN_KNOB_PATH = "ranking.knobs"
# The targets (issue 4), checked on every run and written with the table.
MIN_HIT_RATE_LIFT_OVER_POPULARITY = 1.3
MIN_MARGIN_LIFT = 1.15
MIN_KEPT_HIT_RATE = 0.9


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
    family: str = "baseline"  # "reference" (relevance-only hybrid), "margin", "baseline"


@dataclass(frozen=True)
class MarginAwareSetting:
    """What the margin-aware rows change besides the knob: the generator weights and the
    candidate pool (None: the policy's)."""

    weights: HybridWeights
    candidate_pool: int | None = None
    chosen_margin_weight: float | None = None  # the tuned knob: always a row of the table

    def policy_overrides(self, margin_weight: float) -> dict[str, object]:
        overrides = margin_knob(margin_weight)
        if self.candidate_pool is not None:
            overrides["candidate_pool"] = self.candidate_pool
        return overrides


def margin_knob(weight: float) -> dict[str, object]:
    """Policy overrides that set the margin weight of every category and channel."""
    return {MARGIN_KNOB_PATH: [{"objective": "margin", "margin_weight": weight}]}


# The service's hybrid before issue 4 (models.candidates.HybridGenerator.from_artifacts).
SERVICE_HYBRID = HybridWeights()
# Every generator, weighted per dataset for hit rate@10 by relevance alone: the output of
# `benchmarks/tune_hybrid.py` (coordinate ascent through the real request path on a
# validation split inside the training period, never the test orders; figures in
# benchmarks/results/tuning_<dataset>.json; see "Offline evaluation" in benchmarks/README.md).
TUNED_HYBRID: dict[str, HybridWeights] = {
    "ta-feng": HybridWeights(
        cross_sell=0.5,
        personal=2.0,
        popular=0.2,
        factor_cross_sell=0.125,
        bundle=0.25,
        upgrade=0.2,
        replenish=2.0,
        segment_popular=0.4,
    ),
    "online-retail": HybridWeights(
        cross_sell=1.0,
        personal=0.25,
        popular=0.2,
        factor_cross_sell=1.0,
        bundle=0.25,
        upgrade=0.2,
        replenish=1.0,
        segment_popular=0.4,
    ),
}
# The margin-aware rows' generator, pool and knob per dataset, chosen by the same script on
# the same validation split: the (setting, knob) capturing most margin@10 while keeping 90%
# of the relevance-only hybrid's hit rate@10. Ta-Feng: a deeper pool (1,200) at 0.2
# (+7.1% margin at 92.9% of the hit rate on validation); Online Retail: the policy's pool at
# 0.55 (+13.0% at 91.2%).
MARGIN_AWARE: dict[str, MarginAwareSetting] = {
    "ta-feng": MarginAwareSetting(
        TUNED_HYBRID["ta-feng"], candidate_pool=1200, chosen_margin_weight=0.2
    ),
    "online-retail": MarginAwareSetting(TUNED_HYBRID["online-retail"], chosen_margin_weight=0.55),
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
REFERENCE = "hybrid (tuned), relevance only"

# The single generators of the table, each alone (relevance only).
_SINGLES = (
    ("popularity", "popular"),
    ("popularity by category and region", "segment_popular"),
    ("item-item (co-occurrence)", "cross_sell"),
    ("item-item (ALS factors)", "factor_cross_sell"),
    ("ALS (personal)", "personal"),
    ("bundles (lift)", "bundle"),
    ("upgrades", "upgrade"),
    ("replenishment", "replenish"),
)


def margin_strategies(
    setting: MarginAwareSetting, margin_weights: Sequence[float], *, prefix: str = "margin-aware"
) -> list[Strategy]:
    """One row per knob setting of a margin-aware setting."""
    return [
        Strategy(
            f"{prefix}, margin weight {weight:g}",
            setting.weights,
            setting.policy_overrides(weight),
            "margin",
        )
        for weight in margin_weights
    ]


def default_strategies(
    dataset: str, margin_weights: Sequence[float] = MARGIN_WEIGHTS
) -> list[Strategy]:
    """Single generators and popularity baselines, the service's default hybrid and the
    dataset's tuned hybrid by relevance alone (the reference of the margin rows), then the
    margin-aware setting at each margin weight (0: the setting's own relevance order)."""
    relevance_only = margin_knob(0.0)
    strategies = [
        Strategy(name, HybridWeights.only(weight), relevance_only) for name, weight in _SINGLES
    ]
    strategies.append(Strategy("hybrid (service default)", SERVICE_HYBRID, relevance_only))
    tuned = TUNED_HYBRID.get(dataset, UNTUNED_HYBRID)
    strategies.append(Strategy(REFERENCE, tuned, relevance_only, "reference"))
    setting = MARGIN_AWARE.get(dataset, MarginAwareSetting(tuned))
    same_as_reference = setting.weights == tuned and setting.candidate_pool is None
    chosen = setting.chosen_margin_weight
    grid = sorted({*margin_weights, *([] if chosen is None else [chosen])})
    weights = [w for w in grid if not (same_as_reference and w == 0)]
    return strategies + margin_strategies(setting, weights)


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


# -- the generator and the ranking as served ----------------------------------------------

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

    def own_kinds(
        self, item_idx: npt.NDArray[np.int32], shown: npt.NDArray[np.int8]
    ) -> npt.NDArray[np.int8]:
        """The generators' own kinds of items of the last answer (a deeper round of the
        pipeline asks again with a larger count, so the last answer holds every round); the
        ``shown`` kind of an item it lacks."""
        last = self.last.item_idx
        if last.size == 0:
            return shown
        order = np.argsort(last, kind="stable")
        found = np.minimum(np.searchsorted(last, item_idx, sorter=order), last.size - 1)
        at = order[found]
        return np.where(last[at] == item_idx, self.last.kind[at], shown).astype(np.int8)


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
    seconds: float  # fitting the model (ALS, neighbours, bundles, popularity, tables)
    calibration_seconds: float  # fitting p(accept), for every weight set calibrated
    peak_rss_mib: float  # the training child process's peak resident memory, both included
    order_lines: int
    model_version: str


@dataclass(frozen=True)
class CalibrationFacts:
    weights: dict[str, float]
    holdout_baskets: int
    base_rate: float


@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    family: str
    weights: dict[str, float]
    policy_overrides: dict[str, object]
    calibrated: bool  # p(accept) from the model's calibration (else relevance)
    metrics: dict[int, RankingMetrics]
    hits_by_kind: dict[str, int]  # hits@10 by the generator that proposed the item
    mean_request_us: float


@dataclass(frozen=True)
class Target:
    name: str
    met: bool
    detail: str


@dataclass(frozen=True)
class DatasetReport:
    dataset: str
    period: Period
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
    settings: dict[str, object]  # everything needed to run it again
    results: list[StrategyResult]
    targets: list[Target] = field(default_factory=list)


@dataclass
class PreparedDataset:
    """A dataset split, its model trained and loaded, its cases built and its snapshot
    published: every strategy then runs against the same state (``run``)."""

    dataset: str
    period: Period
    channel: Channel
    split: Split
    policy: Policy
    snapshot: SnapshotData
    artifacts: ModelArtifacts
    facts: ItemFacts
    store: InProcessStore
    cases: list[HeldOutCase]
    queries: list[RecommendationQuery]
    contexts: list[GenerationContext]
    training: TrainingRun
    calibrations: dict[HybridWeights, AcceptanceCalibration]
    memory_mapped: bool
    showable: int
    # Per strategy run: the margin each case captured at k = 10 (0 on a miss), in case order,
    # for paired confidence intervals between rows.
    case_margins: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)

    async def recommender_for(
        self, strategy: Strategy
    ) -> tuple[Recommender, ContextBinding, Policy, AcceptanceCalibration | None]:
        """The request path ``strategy`` runs: its recommender (with the calibration of its
        weights, applied as served), its generator binding and its policy."""
        strategy_policy = apply_policy_overrides(self.policy, strategy.policy_overrides)
        mirror = SnapshotMirror(
            store=self.store,
            artifacts=self.artifacts,
            policy=strategy_policy,
            refresh_seconds=math.inf,
        )
        await mirror.refresh()
        generator = ContextBinding(
            build_generator(self.artifacts, strategy.weights, facts=self.facts)
        )
        calibration = self.calibrations.get(strategy.weights)
        recommender = Recommender(
            mirror=mirror,
            store=self.store,
            artifacts=self.artifacts,
            generator=generator,
            calibration=calibration,
        )
        return recommender, generator, strategy_policy, calibration

    async def run(self, strategy: Strategy) -> StrategyResult:
        """Every case through the request path under ``strategy``."""
        recommender, generator, strategy_policy, calibration = await self.recommender_for(strategy)
        oracle = ConstraintOracle(self.snapshot, strategy_policy)
        item_row = {sku: row for row, sku in enumerate(self.artifacts.item_skus)}
        recommended: list[list[str]] = []
        violations = 0
        hits_by_kind: Counter[str] = Counter()
        elapsed = 0.0
        for case, query, context in zip(self.cases, self.queries, self.contexts, strict=True):
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
        margins = {
            case.hidden: oracle.unit_margin(case.hidden, case.ordered_at) for case in self.cases
        }
        hidden = [case.hidden for case in self.cases]
        self.case_margins[strategy.name] = np.array(
            [
                margins[case.hidden] if case.hidden in skus[: max(KS)] else 0.0
                for case, skus in zip(self.cases, recommended, strict=True)
            ]
        )
        metrics = {
            k: ranking_metrics(
                recommended,
                hidden,
                k=k,
                unit_margin=margins,
                catalog_size=len(self.artifacts.item_skus),
                violations=violations,
            )
            for k in KS
        }
        return StrategyResult(
            strategy=strategy.name,
            family=strategy.family,
            weights={name: w for name, w in strategy.weights.as_dict().items() if w},
            policy_overrides=dict(strategy.policy_overrides),
            calibrated=calibration is not None,
            metrics=metrics,
            hits_by_kind=dict(sorted(hits_by_kind.items())),
            mean_request_us=elapsed / len(self.cases) * 1e6,
        )


def split_for(orders: pl.DataFrame, *, period: Period, test_fraction: float) -> Split:
    """The test split, or for ``validation`` the training period split again the same way
    (its newest ``test_fraction`` of orders), so that nothing of the test period is seen."""
    split = temporal_split(orders, test_fraction=test_fraction)
    if period == "validation":
        return temporal_split(split.train, test_fraction=test_fraction)
    return split


@asynccontextmanager
async def prepared_dataset(
    contract_dir: Path,
    *,
    dataset: str,
    calibrate_for: Sequence[HybridWeights] = (),
    channel: Channel | None = None,
    max_cases: int | None = 10_000,
    seed: int = 7,
    test_fraction: float = 0.2,
    period: Period = "test",
    train_params: Mapping[str, Any] | None = None,
    policy: Policy | None = None,
) -> AsyncIterator[PreparedDataset]:
    """Split, train (with a calibration per weight set of ``calibrate_for``), build the
    cases and publish the snapshot; the store and the model files go when the block ends."""
    policy = policy or load_policy()
    orders = read_orders(find_table_file(contract_dir, ORDER_LINES))
    snapshot = read_snapshot_dir(contract_dir)
    has_stores = "store_id" in orders.columns and orders["store_id"].null_count() < orders.height
    channel = channel or ("pos" if has_stores else "cart")
    split = split_for(orders, period=period, test_fraction=test_fraction)
    weight_sets = list(dict.fromkeys(calibrate_for))

    with tempfile.TemporaryDirectory(prefix="upsell-evaluate-") as scratch:
        out = Path(scratch) / "artifacts"
        training = _train_in_child(
            split.train,
            snapshot,
            out,
            params=dict(train_params or {}),
            calibrate_for=weight_sets,
        )
        artifacts = load_artifacts(out)  # memory-mapped, as served
        calibrations = {}
        for index, weights in enumerate(weight_sets):
            calibration = load_calibration(out / f"calibration-{index}")
            if calibration is None:
                raise InputError(f"training did not write calibration {index} for {weights}")
            calibrations[weights] = calibration
        cases = leave_one_out(
            split.test, known_skus=artifacts.item_skus, seed=seed, max_cases=max_cases
        )
        if not cases:
            raise InputError(f"{contract_dir}: no test order has two items the model knows")
        if channel == "pos" and any(case.store_id is None for case in cases):
            raise InputError(f"{contract_dir}: channel pos needs every order's store_id")
        store = InProcessStore(state_dir=None, keep=2)
        try:
            await store.publish(snapshot)
            oracle = ConstraintOracle(snapshot, policy)
            queries = [_query(case, channel) for case in cases]
            known = frozenset(artifacts.item_skus)
            showable = sum(
                oracle.showable(query, case.hidden, case.ordered_at)
                for query, case in zip(queries, cases, strict=True)
            )
            yield PreparedDataset(
                dataset=dataset,
                period=period,
                channel=channel,
                split=split,
                policy=policy,
                snapshot=snapshot,
                artifacts=artifacts,
                facts=ItemFacts.from_items(artifacts.item_skus, snapshot.items),
                store=store,
                cases=cases,
                queries=queries,
                contexts=[_context(case, oracle, known) for case in cases],
                training=training,
                calibrations=calibrations,
                memory_mapped=isinstance(artifacts.item_factors.base, np.memmap),
                showable=showable,
            )
        finally:
            await store.close()


def evaluate_dataset(
    contract_dir: Path,
    *,
    dataset: str,
    strategies: Sequence[Strategy],
    channel: Channel | None = None,
    max_cases: int | None = 10_000,
    seed: int = 7,
    test_fraction: float = 0.2,
    period: Period = "test",
    train_params: Mapping[str, Any] | None = None,
    policy: Policy | None = None,
    command: str | None = None,
) -> DatasetReport:
    """Run every strategy on one imported dataset (see the module docstring). The
    margin-aware rows (family ``margin``) are ranked with a calibration fitted for their
    weights, as ``upsell train`` would fit it for the served generator."""
    return asyncio.run(
        _evaluate_dataset(
            contract_dir,
            dataset=dataset,
            strategies=strategies,
            channel=channel,
            max_cases=max_cases,
            seed=seed,
            test_fraction=test_fraction,
            period=period,
            train_params=dict(train_params or {}),
            policy=policy or load_policy(),
            command=command,
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
    period: Period,
    train_params: dict[str, Any],
    policy: Policy,
    command: str | None,
) -> DatasetReport:
    calibrate_for = [s.weights for s in strategies if s.family == "margin"]
    async with prepared_dataset(
        contract_dir,
        dataset=dataset,
        calibrate_for=calibrate_for,
        channel=channel,
        max_cases=max_cases,
        seed=seed,
        test_fraction=test_fraction,
        period=period,
        train_params=train_params,
        policy=policy,
    ) as prepared:
        results = []
        for strategy in strategies:
            started = time.perf_counter()
            results.append(await prepared.run(strategy))
            _progress(
                f"{dataset}: {strategy.name}: hit rate@10 "
                f"{results[-1].metrics[10].hit_rate:.4f}, margin@10 "
                f"{results[-1].metrics[10].margin_per_1000:,.1f} in "
                f"{time.perf_counter() - started:.0f} s"
            )
        settings: dict[str, object] = {
            "command": command,
            "period": period,
            "cases_requested": max_cases or "all",
            "seed": seed,
            "test_fraction": test_fraction,
            "policy": f"{policy.name} v{policy.version} ({policy.content_hash})",
            "candidate_pool": policy.candidate_pool,
            "train_params": train_params or "defaults of models.training.train",
            "calibrations": [
                asdict(
                    CalibrationFacts(
                        weights=calibration.weights,
                        holdout_baskets=calibration.holdout_baskets,
                        base_rate=calibration.base_rate,
                    )
                )
                for calibration in prepared.calibrations.values()
            ],
            "calibration_applied_by": "service.pipeline",
        }
        split = prepared.split
        return DatasetReport(
            dataset=dataset,
            period=period,
            channel=prepared.channel,
            cost_assumption=COST_ASSUMPTION.get(dataset, "as imported"),
            cutoff=split.cutoff.isoformat(),
            train_lines=split.train.height,
            test_orders=split.test["order_id"].n_unique(),
            cases=len(prepared.cases),
            catalog_items=len(prepared.artifacts.item_skus),
            showable_share=prepared.showable / len(prepared.cases),
            training=prepared.training,
            artifacts_memory_mapped=prepared.memory_mapped,
            settings=settings,
            results=results,
            targets=check_targets(results, prepared.case_margins),
        )


def check_targets(
    results: Sequence[StrategyResult],
    case_margins: Mapping[str, npt.NDArray[np.float64]] | None = None,
) -> list[Target]:
    """The issue's targets, against the rows present (a row missing leaves its target out).

    - the relevance-only hybrid beats each popularity baseline on hit rate@10 by 30%;
    - a margin-aware row captures 15% more margin@10 than the relevance-only hybrid while
      keeping 90% of its hit rate@10.

    With ``case_margins`` (per row, the margin each case captured), the margin target also
    states how uncertain the best row's lift is (``margin_lift_interval``) and how much of
    the reference's margin its richest tenth of hits brings: margin captured is a sum over
    few hits with a long tail of unit margins, so a handful of cases can move it.
    """
    by_name = {result.strategy: result for result in results}
    reference = by_name.get(REFERENCE)
    if reference is None:
        return []
    hit_rate = reference.metrics[10].hit_rate
    margin = reference.metrics[10].margin_per_1000
    targets = []
    for baseline in ("popularity", "popularity by category and region"):
        if baseline in by_name:
            theirs = by_name[baseline].metrics[10].hit_rate
            lift = hit_rate / theirs if theirs > 0 else math.inf
            targets.append(
                Target(
                    name=f"hybrid hit rate@10 >= {MIN_HIT_RATE_LIFT_OVER_POPULARITY:g}x {baseline}",
                    met=lift >= MIN_HIT_RATE_LIFT_OVER_POPULARITY,
                    detail=f"{hit_rate:.4f} vs {theirs:.4f}: {lift:.2f}x",
                )
            )
    keeping = [
        result
        for result in results
        if result.family == "margin" and result.metrics[10].hit_rate >= MIN_KEPT_HIT_RATE * hit_rate
    ]
    if keeping and margin > 0:
        best = max(keeping, key=lambda result: result.metrics[10].margin_per_1000)
        lift = best.metrics[10].margin_per_1000 / margin
        kept = best.metrics[10].hit_rate / hit_rate if hit_rate > 0 else math.nan
        detail = (
            f"best such row: {best.strategy}: {best.metrics[10].margin_per_1000:,.1f}"
            f" vs {margin:,.1f} ({lift - 1:+.1%}) at {kept:.1%} of the hit rate"
        )
        best_cases = (case_margins or {}).get(best.strategy)
        reference_cases = (case_margins or {}).get(REFERENCE)
        if (
            best_cases is not None
            and reference_cases is not None
            and len(best_cases) == len(reference_cases)
        ):
            low, high = margin_lift_interval(best_cases, reference_cases)
            hits = np.sort(reference_cases[reference_cases != 0])[::-1]
            richest = hits[: max(1, len(hits) // 10)].sum() / hits.sum() if hits.size else 0.0
            detail += (
                f"; 90% interval of the lift {low - 1:+.1%} to {high - 1:+.1%} (paired "
                f"bootstrap over cases); the richest 10% of the reference's {len(hits):,} hits "
                f"bring {richest:.0%} of its margin"
            )
        targets.append(
            Target(
                name=f"margin@10 >= {MIN_MARGIN_LIFT:g}x the relevance-only hybrid's, keeping "
                f">= {MIN_KEPT_HIT_RATE:.0%} of its hit rate@10",
                met=lift >= MIN_MARGIN_LIFT,
                detail=detail,
            )
        )
    return targets


def margin_lift_interval(
    ours: npt.NDArray[np.float64],
    theirs: npt.NDArray[np.float64],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """5th and 95th percentiles of sum(ours) / sum(theirs) over cases resampled with
    replacement, the same cases for both (the rows answered the same baskets)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(ours), size=(resamples, len(ours)))
    ratios = ours[draws].sum(axis=1) / np.maximum(theirs[draws].sum(axis=1), 1e-12)
    low, high = np.percentile(ratios, [5, 95])
    return float(low), float(high)


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


# The training child: only the models layer, as `upsell train` runs it (fit, then calibrate,
# here once per weight set). It reports its own peak memory as VmHWM (the high-water mark of
# its own address space): getrusage's ru_maxrss would include the parent's pages, which Linux
# carries across fork and exec.
_TRAIN_CHILD = """
import sys, time
from pathlib import Path
import orjson, polars as pl
from models.artifacts import save_artifacts
from models.calibration import fit_acceptance, save_calibration
from models.generators import HybridWeights
from models.training import train
lines, nodes, items, out, params, weight_sets = sys.argv[1:]
order_lines = pl.read_parquet(lines)
node_table = pl.read_parquet(nodes)
params = orjson.loads(params)
started = time.perf_counter()
artifacts = train(order_lines, nodes=node_table, **params)
seconds = time.perf_counter() - started
save_artifacts(artifacts, Path(out))
started = time.perf_counter()
item_table = pl.read_parquet(items)
shared = {name: params[name] for name in ("factors", "iterations", "seed") if name in params}
for index, weights in enumerate(orjson.loads(weight_sets)):
    calibration = fit_acceptance(
        order_lines, weights=HybridWeights(**weights), items=item_table, nodes=node_table,
        **shared,
    )
    directory = Path(out) / f"calibration-{index}"
    directory.mkdir()
    save_calibration(calibration, directory)
calibration_seconds = time.perf_counter() - started
status = Path("/proc/self/status")
peak_kib = None
if status.is_file():
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kib = int(line.split()[1])
outcome = {
    "seconds": seconds,
    "calibration_seconds": calibration_seconds,
    "version": artifacts.version,
    "peak_kib": peak_kib,
}
print(orjson.dumps(outcome).decode())
"""


def _train_in_child(
    order_lines: pl.DataFrame,
    snapshot: SnapshotData,
    out: Path,
    *,
    params: dict[str, Any],
    calibrate_for: Sequence[HybridWeights],
) -> TrainingRun:
    """Train in a fresh interpreter, as ``upsell train`` would run, so that its peak memory
    is the training's own (with the interpreter and the order lines) and not this process's.
    Calibrations go to ``out/calibration-<i>``, one per weight set in ``calibrate_for``.

    A subprocess rather than multiprocessing: ``spawn`` re-imports the caller's main module,
    which breaks any script without a ``__main__`` guard.
    """
    out.mkdir(parents=True, exist_ok=True)
    inputs = {
        "train_lines": order_lines,
        "nodes": snapshot.nodes,
        "items": snapshot.items,
    }
    paths = []
    for name, frame in inputs.items():
        path = out / f"{name}.parquet"
        frame.write_parquet(path)
        paths.append(path)
    weight_sets = [weights.as_dict() for weights in calibrate_for]
    command = [sys.executable, "-c", _TRAIN_CHILD, *map(str, paths), str(out)]
    command += [orjson.dumps(params).decode(), orjson.dumps(weight_sets).decode()]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    for path in paths:
        path.unlink()
    if finished.returncode != 0:
        raise InputError(f"training failed: {finished.stderr.strip()[-2000:]}")
    outcome = orjson.loads(finished.stdout.strip().splitlines()[-1])
    peak_kib = outcome["peak_kib"]
    return TrainingRun(
        seconds=float(outcome["seconds"]),
        calibration_seconds=float(outcome["calibration_seconds"]),
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
        row["period"] = report.period
        row["calibrated"] = result.calibrated
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
    """The table as in the README, with the run's facts and settings above it and the
    targets below."""
    training = report.training
    settings = report.settings
    lines = [
        f"### {report.dataset} ({report.period} period)",
        "",
        f"- command: `{settings.get('command')}`",
        f"- channel `{report.channel}`; cutoff {report.cutoff}; {report.train_lines:,} "
        f"training lines; {report.cases:,} held-out cases (asked for "
        f"{settings.get('cases_requested')}) from {report.test_orders:,} "
        f"{report.period} orders; {report.catalog_items:,} items in the model; seed "
        f"{settings.get('seed')}; policy {settings.get('policy')}",
        f"- cost: {report.cost_assumption}",
        f"- hidden item showable at all (in stock at an eligible node, above the margin "
        f"floor): {report.showable_share:.1%} of cases, the ceiling of every hit rate",
        f"- training {training.seconds:.1f} s + calibration {training.calibration_seconds:.1f}"
        f" s, peak RSS {training.peak_rss_mib:,.0f} MiB ({training.order_lines:,} lines); "
        f"artifacts loaded memory-mapped: {'yes' if report.artifacts_memory_mapped else 'no'}",
        f"- margin-aware rows: p(accept) from the calibration fitted for their weights, "
        f"applied by {settings.get('calibration_applied_by')}",
        "",
        "| strategy | HR@5 | HR@10 | NDCG@10 | MRR@10 | coverage@10 | margin/1k@5 "
        "| margin/1k@10 | violations | µs/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in report.results:
        at5, at10 = result.metrics[5], result.metrics[10]
        name = f"**{result.strategy}**" if result.family == "reference" else result.strategy
        lines.append(
            f"| {name} | {at5.hit_rate:.4f} | {at10.hit_rate:.4f} | "
            f"{at10.ndcg:.4f} | {at10.mrr:.4f} | {at10.coverage:.3f} | "
            f"{at5.margin_per_1000:,.1f} | {at10.margin_per_1000:,.1f} | {at10.violations} | "
            f"{result.mean_request_us:,.0f} |"
        )
    if report.targets:
        lines += ["", "Targets (issue 4):", ""]
        lines += [
            f"- {'met' if target.met else '**missed**'}: {target.name}: {target.detail}"
            for target in report.targets
        ]
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
    figure, axes = plt.subplots(figsize=(8.5, 5.5))
    families: dict[str, list[StrategyResult]] = {}
    for result in report.results:
        families.setdefault(result.family, []).append(result)
    style = {
        "margin": ("-o", "tab:red", "margin-aware, margin weight 0 -> 1"),
        "reference": ("*", "black", "hybrid (tuned), relevance only"),
        "baseline": ("o", "tab:blue", "baselines, relevance only"),
    }
    for family, results in families.items():
        x = [result.metrics[10].hit_rate for result in results]
        y = [result.metrics[10].margin_per_1000 for result in results]
        marker, color, label = style.get(family, style["baseline"])
        axes.plot(x, y, marker, color=color, label=label, markersize=10 if marker == "*" else 5)
        for result, x_at, y_at in zip(results, x, y, strict=True):
            axes.annotate(
                result.strategy.replace("margin-aware, margin weight ", "w="),
                (x_at, y_at),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    reference = next((r for r in report.results if r.family == "reference"), None)
    if reference is not None:
        at10 = reference.metrics[10]
        # The target region: 90% of the reference's hit rate or more, 15% more margin or more.
        axes.axvline(MIN_KEPT_HIT_RATE * at10.hit_rate, color="grey", linestyle=":", lw=1)
        axes.axhline(MIN_MARGIN_LIFT * at10.margin_per_1000, color="grey", linestyle=":", lw=1)
    axes.set_xlabel("hit rate@10")
    axes.set_ylabel("margin captured@10 per 1,000 baskets")
    axes.set_title(
        f"{report.dataset}: relevance vs margin ({report.cases:,} held-out baskets, "
        f"{report.period}); dotted: the target's corner"
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(report: DatasetReport, out_dir: Path) -> list[Path]:
    """``evaluation_<dataset>.csv/.md/.json/.png`` under ``out_dir`` (``-validation`` added
    to the stem for the validation period); the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if report.period == "test" else f"-{report.period}"
    stem = out_dir / f"evaluation_{report.dataset}{suffix}"
    written = []
    for extension, content in (
        (".csv", report_csv(report).encode()),
        (".md", report_markdown(report).encode()),
        (".json", report_json(report)),
    ):
        path = stem.with_suffix(extension)
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


def parse_margin_weights(text: str) -> list[float]:
    """Comma-separated margin weights, each in [0, 1]; an InputError names a bad one."""
    weights = []
    for value in text.split(","):
        if not value.strip():
            continue
        try:
            weight = float(value)
        except ValueError as error:
            raise InputError(f"--margin-weights: {value!r} is not a number") from error
        if not 0.0 <= weight <= 1.0:
            raise InputError(f"--margin-weights: {value!r} is outside [0, 1]")
        weights.append(weight)
    if not weights:
        raise InputError("--margin-weights: give at least one weight")
    return weights


def command_line(args: argparse.Namespace) -> str:
    """The ``upsell evaluate`` command that reproduces a run with these arguments."""
    parts = ["upsell evaluate", *args.datasets]
    parts += ["--cases", str(args.cases), "--seed", str(args.seed)]
    parts += ["--test-fraction", f"{args.test_fraction:g}", "--margin-weights", args.margin_weights]
    parts += ["--period", args.period]
    if args.channel:
        parts += ["--channel", args.channel]
    if args.policy:
        parts += ["--policy", str(args.policy)]
    return " ".join(parts)


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
    margin_weights = parse_margin_weights(args.margin_weights)
    if args.cases < 0:
        raise InputError(f"--cases: must be 0 (all) or more, got {args.cases}")
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
                period=args.period,
                policy=policy,
                command=command_line(args),
            )
            written += write_report(report, args.out)
            print(report_markdown(report), flush=True)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.evaluate", description=DESCRIPTION)
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
