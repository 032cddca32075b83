"""``upsell simulate``: replay historical orders through a policy before going live.

Each replayed order becomes the request its basket would have made just before checkout
(``EXPOSURE_LEAD`` earlier): its lines as the basket, its store (POS) or none (web), its
customer (the experiment unit; a guest's order id stands in for a session). The request goes
through the real ``Recommender`` under the policy's experiment, so the arms, constraints and
ranking are the service's own. Two read-outs:

1. **Expected impact** (before any outcome exists): per arm, the expected gross margin per
   order the items shown would add, sum over items of p(accept) x (unit margin - expected
   return cost - incremental fulfilment cost), with p(accept) the model's calibration; the
   difference to the control arm with a unit-level bootstrap interval. The page lists the
   assumptions this rests on.
2. **A rehearsal of the ROI report** (``write_events``): the replay's exposures are recorded
   through the service's ``ExposureRecorder``, and each historical order is ingested as an
   outcome through ``service.outcomes``, plus, in ``inject_arm`` only, an *injected*
   purchase: with probability ``inject_attach_rate`` the top item shown is bought,
   ``inject_quantity`` units, returned whole with probability ``inject_return_rate``. The
   injected uplift in margin per order is known exactly (``SimulationResult.truth``), so
   ``upsell roi report`` can be checked against it; with no injection (or an A/A
   experiment) the truth is zero.

The models are trained on the orders before the replayed ones (no look-ahead) unless
artifacts are given.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl

from models.calibration import AcceptanceCalibration, fit_acceptance, load_calibration
from models.data.contract import find_table_file, read_orders, read_snapshot_dir
from models.data.schema import ORDER_LINES
from models.interfaces import ModelArtifacts
from models.training import train
from rules.errors import InputError
from rules.policy import Channel, Experiment, Policy
from service.exposures import ExposureRecorder, Pseudonymizer
from service.mirror import SnapshotMirror
from service.outcomes import OutcomeStore
from service.pipeline import BasketLine, RecommendationQuery, RecommendedItem, Recommender
from service.roi.render import BarGroup, ForestRow, bars_svg, figure, forest_svg, page, table
from service.roi.stats import bootstrap_sums, minimum_detectable_effect
from service.store.memory import InProcessStore

__all__ = ["EXPOSURE_LEAD", "SimulationResult", "simulate", "simulation_html"]

EXPOSURE_LEAD: Final = timedelta(minutes=5)
MAX_BASKET_LINES: Final = 200
_ID_PREFIX: Final = "sim-"


@dataclass
class ArmEstimate:
    arm: str
    strategy: str
    units: int
    orders: int
    items_shown: int
    expected_margin_per_order: float
    expected_revenue_per_order: float
    incremental: float | None = None
    low: float | None = None
    high: float | None = None
    mde: float | None = None


@dataclass
class SimulationResult:
    experiment: Experiment
    replayed_orders: int
    out_of_scope: int
    arms: list[ArmEstimate]
    assumptions: list[str]
    # Injected uplift in gross margin per order, arm -> truth (0 for arms without injection).
    truth: dict[str, float] = field(default_factory=dict)
    injected_orders: int = 0
    period: tuple[str, str] = ("", "")


def _query(
    order: dict[str, Any], *, channel: Channel, store_ids: set[str], limit: int, consent: bool
) -> RecommendationQuery:
    customer = order["customer_id"]
    store = order["store_id"] if channel == "pos" and order["store_id"] in store_ids else None
    return RecommendationQuery(
        request_id=f"{_ID_PREFIX}{order['order_id']}",
        channel=channel,
        basket=tuple(
            BasketLine(sku=sku, quantity=int(quantity))
            for sku, quantity in list(zip(order["sku"], order["quantity"], strict=True))[
                :MAX_BASKET_LINES
            ]
        ),
        customer_id=customer,
        consent=consent and customer is not None,
        session_id=None if customer is not None else f"{_ID_PREFIX}{order['order_id']}",
        store_id=store,
        limit=limit,
    )


async def simulate(
    contract_dir: Path,
    policy: Policy,
    experiment_name: str | None,
    *,
    replay_orders: int,
    artifacts: ModelArtifacts | None = None,
    calibration: AcceptanceCalibration | None = None,
    artifacts_dir: Path | None = None,
    channel: Channel | None = None,
    limit: int = 5,
    consent: bool = False,
    seed: int = 7,
    replicates: int = 2000,
    recorder: ExposureRecorder | None = None,
    outcomes: OutcomeStore | None = None,
    pseudonymize: Pseudonymizer | None = None,
    inject_arm: str | None = None,
    inject_attach_rate: float = 0.0,
    inject_quantity: int = 1,
    inject_return_rate: float = 0.0,
    train_iterations: int = 15,
) -> SimulationResult:
    """Replay the newest ``replay_orders`` orders of ``contract_dir`` under the experiment."""
    experiment = _experiment(policy, experiment_name)
    if inject_arm is not None and inject_arm not in [arm.name for arm in experiment.arms]:
        raise InputError(f"--inject-arm: {inject_arm!r} is not an arm of {experiment.name}")
    if not 0 <= inject_attach_rate <= 1 or not 0 <= inject_return_rate <= 1:
        raise InputError("--inject-attach-rate and --inject-return-rate: between 0 and 1")
    if (recorder is None) != (outcomes is None):
        raise InputError("write_events needs both an exposure recorder and an outcome store")
    # Only this experiment runs, so no earlier one in the file takes its requests.
    policy = policy.model_copy(
        update={"experiments": policy.experiments.model_copy(update={"running": (experiment,)})}
    )
    lines = read_orders(find_table_file(contract_dir, ORDER_LINES))
    snapshot = read_snapshot_dir(contract_dir)
    orders = (
        lines.group_by("order_id")
        .agg(
            pl.col("customer_id").first(),
            pl.col("store_id").first(),
            pl.col("ordered_at").min(),
            pl.col("sku"),
            pl.col("quantity"),
            pl.col("unit_price"),
        )
        .sort(["ordered_at", "order_id"])
    )
    if orders.height < 2:
        raise InputError(f"{contract_dir}: too few orders to replay")
    replayed = orders.tail(min(replay_orders, orders.height - 1))
    cutoff = replayed.get_column("ordered_at").min()
    if artifacts is None:
        history = lines.filter(pl.col("ordered_at") < cutoff)
        if history.height == 0:
            raise InputError(f"{contract_dir}: no orders before the replayed ones to train on")
        artifacts = train(history, iterations=train_iterations, seed=seed, nodes=snapshot.nodes)
        calibration = fit_acceptance(history, iterations=train_iterations, seed=seed)
    elif calibration is None and artifacts_dir is not None:
        calibration = load_calibration(artifacts_dir / artifacts.version)
    has_stores = replayed.get_column("store_id").null_count() < replayed.height
    channel = channel or ("pos" if has_stores else "cart")
    store_ids = set(
        snapshot.nodes.filter(pl.col("kind") == "store").get_column("node_id").to_list()
    )

    store = InProcessStore(state_dir=None, keep=2)
    await store.publish(snapshot)
    mirror = SnapshotMirror(store=store, artifacts=artifacts, policy=policy, refresh_seconds=1e9)
    await mirror.refresh()
    recommender = Recommender(
        mirror=mirror,
        store=store,
        artifacts=artifacts,
        calibration=calibration,
        exposures=recorder,
    )
    rng = np.random.default_rng(seed)
    handling = policy.ranking.return_handling_cost
    unit_of: dict[str, str] = {}
    per_order: list[tuple[str, str, float, float, int]] = []  # unit, arm, margin, revenue, items
    injected_value: dict[str, list[float]] = {arm.name: [] for arm in experiment.arms}
    outcome_orders: list[dict[str, Any]] = []
    outcome_returns: list[dict[str, Any]] = []
    out_of_scope = 0
    injected = 0
    try:
        for order in replayed.iter_rows(named=True):
            query = _query(
                order, channel=channel, store_ids=store_ids, limit=limit, consent=consent
            )
            shown_at = order["ordered_at"] - EXPOSURE_LEAD
            result = await recommender.recommend(query, now=shown_at)
            if result.experiment is None:
                out_of_scope += 1
                continue
            arm = result.experiment.arm
            unit = query.customer_id or query.session_id or ""
            unit_of[unit] = arm
            margin = sum(
                item.score_parts.p_accept
                * (
                    item.unit_margin
                    - item.score_parts.return_cost
                    - item.score_parts.fulfilment_cost
                )
                for item in result.items
            )
            revenue = sum(item.score_parts.p_accept * item.unit_price for item in result.items)
            per_order.append((unit, arm, margin, revenue, len(result.items)))
            if outcomes is None:
                continue
            record, returned, value = _outcome(
                order,
                result.items[0] if result.items and arm == inject_arm else None,
                rng=rng,
                attach_rate=inject_attach_rate,
                quantity=inject_quantity,
                return_rate=inject_return_rate,
                handling=handling,
                pseudonymize=pseudonymize,
                session=query.session_id,
            )
            injected_value[arm].append(value)
            injected += int(len(record["lines"]) > len(order["sku"]))
            outcome_orders.append(record)
            if returned is not None:
                outcome_returns.append(returned)
            if recorder is not None and recorder.pending >= 1000:
                await recorder.flush()
    finally:
        await store.close()
    if outcomes is not None and recorder is not None:
        await recorder.flush()
        await outcomes.add(outcome_orders, outcome_returns, source="simulation")
    if not per_order:
        raise InputError(
            f"no replayed request fell in experiment {experiment.name}'s scope on channel "
            f"{channel}: check its scope or pass --channel"
        )
    estimates = _estimates(experiment, per_order, replicates=replicates, seed=seed)
    truth = {
        arm: (float(np.mean(values)) if values else 0.0) for arm, values in injected_value.items()
    }
    control_truth = truth.get(experiment.control_arm.name, 0.0)
    return SimulationResult(
        experiment=experiment,
        replayed_orders=replayed.height,
        out_of_scope=out_of_scope,
        arms=estimates,
        assumptions=_assumptions(
            channel=channel,
            consent=consent,
            replayed=replayed.height,
            cutoff=str(cutoff),
            trained=artifacts_dir is None,
            limit=limit,
        ),
        truth={arm: value - control_truth for arm, value in truth.items()},
        injected_orders=injected,
        period=(
            str(replayed.get_column("ordered_at").min()),
            str(replayed.get_column("ordered_at").max()),
        ),
    )


def _experiment(policy: Policy, name: str | None) -> Experiment:
    running = policy.experiments.running
    if not running:
        raise InputError(
            "the policy runs no experiment: add one under experiments.running (docs/experiments.md)"
        )
    if name is None:
        return running[0]
    found = policy.experiments.find(name)
    if found is None:
        names = ", ".join(experiment.name for experiment in running)
        raise InputError(f"--experiment: no experiment {name!r} in the policy (running: {names})")
    return found


def _outcome(
    order: dict[str, Any],
    top_item: RecommendedItem | None,
    *,
    rng: np.random.Generator,
    attach_rate: float,
    quantity: int,
    return_rate: float,
    handling: float,
    pseudonymize: Pseudonymizer | None,
    session: str | None,
) -> tuple[dict[str, Any], dict[str, Any] | None, float]:
    """The historical order as an outcome record, with the injected purchase if drawn, and
    the injection's expected margin for this order (the truth, before the draws)."""
    hash_id = pseudonymize or (lambda value: value)
    order_id = f"{_ID_PREFIX}{order['order_id']}"
    bought = [
        {"sku": sku, "quantity": int(units), "unit_price": float(price)}
        for sku, units, price in zip(
            order["sku"], order["quantity"], order["unit_price"], strict=True
        )
    ]
    expected = 0.0
    returned = None
    if top_item is not None:
        kept_margin = top_item.unit_margin * quantity * (1 - return_rate)
        expected = attach_rate * (
            kept_margin - handling * quantity * return_rate - top_item.score_parts.fulfilment_cost
        )
        if rng.random() < attach_rate:
            bought.append(
                {"sku": top_item.sku, "quantity": quantity, "unit_price": top_item.unit_price}
            )
            if rng.random() < return_rate:
                returned = {
                    "return_id": f"{order_id}-r",
                    "order_id": order_id,
                    "sku": top_item.sku,
                    "quantity": quantity,
                    "returned_at": (order["ordered_at"] + timedelta(days=3)).isoformat(
                        timespec="microseconds"
                    ),
                }
    record = {
        "order_id": order_id,
        "customer": None if order["customer_id"] is None else hash_id(order["customer_id"]),
        "session": None if session is None else hash_id(session),
        "ordered_at": order["ordered_at"].isoformat(timespec="microseconds"),
        "channel": None,
        "store_id": order["store_id"],
        "lines": sorted(bought, key=lambda line: line["sku"]),
    }
    return record, returned, expected


def _estimates(
    experiment: Experiment,
    per_order: Sequence[tuple[str, str, float, float, int]],
    *,
    replicates: int,
    seed: int,
) -> list[ArmEstimate]:
    frame = pl.DataFrame(
        per_order, schema=["unit", "arm", "margin", "revenue", "items"], orient="row"
    )
    rng = np.random.default_rng(seed)
    sums: dict[str, Any] = {}
    replicated: dict[str, Any] = {}
    estimates: dict[str, ArmEstimate] = {}
    for arm in experiment.arms:
        units = (
            frame.filter(pl.col("arm") == arm.name)
            .group_by("unit")
            .agg(
                pl.len().cast(pl.Float64).alias("orders"),
                pl.col("margin").sum(),
                pl.col("revenue").sum(),
                pl.col("items").sum().cast(pl.Float64),
            )
        )
        matrix = units.select("orders", "margin", "revenue", "items").to_numpy().astype(np.float64)
        sums[arm.name] = matrix.sum(axis=0) if matrix.size else np.zeros(4)
        replicated[arm.name] = bootstrap_sums(matrix, replicates=replicates, rng=rng)
        orders = int(sums[arm.name][0])
        estimates[arm.name] = ArmEstimate(
            arm=arm.name,
            strategy=arm.strategy,
            units=units.height,
            orders=orders,
            items_shown=int(sums[arm.name][3]),
            expected_margin_per_order=float(sums[arm.name][1] / orders) if orders else math.nan,
            expected_revenue_per_order=float(sums[arm.name][2] / orders) if orders else math.nan,
        )
    control = experiment.control_arm.name
    for arm in experiment.arms:
        if arm.name == control:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            spread = (
                replicated[arm.name][:, 1] / replicated[arm.name][:, 0]
                - replicated[control][:, 1] / replicated[control][:, 0]
            )
        spread = spread[np.isfinite(spread)]
        estimate = estimates[arm.name]
        estimate.incremental = (
            estimate.expected_margin_per_order - estimates[control].expected_margin_per_order
        )
        if spread.size > 1:
            estimate.low = float(np.quantile(spread, 0.025))
            estimate.high = float(np.quantile(spread, 0.975))
            estimate.mde = minimum_detectable_effect(float(np.std(spread, ddof=1)))
    return list(estimates.values())


def _assumptions(
    *, channel: str, consent: bool, replayed: int, cutoff: str, trained: bool, limit: int
) -> list[str]:
    return [
        f"The {replayed:,} newest orders are replayed; each is the request its basket would "
        f"have made {int(EXPOSURE_LEAD.total_seconds() // 60)} minutes before checkout, on "
        f"channel {channel}, asking for {limit} items, with the order's store and customer.",
        "Customers consented to personalization."
        if consent
        else "No customer consented to personalization (the service's default).",
        (
            f"The models were trained on the orders before {cutoff} only (no look-ahead)."
            if trained
            else "The models are the given artifacts (they may have seen the replayed orders)."
        ),
        "Stock, prices and costs are the data set's snapshot as of now, not as of each order.",
        "A shown item is bought with its calibrated p(accept), learnt from co-purchases in "
        "past baskets: a recommendation is assumed to convert as often as an organic "
        "co-purchase, no more.",
        "Every purchase it causes is incremental: none would have happened anyway, and none "
        "displaces another item of the basket (no cannibalisation). A live holdout test "
        "measures both; this estimate cannot.",
        "Returns cost each unit's margin plus the policy's return handling cost, at the item's "
        "return rate; an item shipped apart from the basket costs its node's fulfilment cost.",
        "Intervals are sampling intervals (a bootstrap of customers); they do not include the "
        "error of the acceptance model itself.",
    ]


def simulation_html(result: SimulationResult, *, currency: str) -> str:
    experiment = result.experiment
    control = experiment.control_arm.name
    bars = bars_svg(
        [
            BarGroup(
                label=estimate.arm,
                values=[
                    ("expected margin per order", estimate.expected_margin_per_order),
                    ("expected revenue per order", estimate.expected_revenue_per_order),
                ],
            )
            for estimate in result.arms
        ],
        title=f"Expected gross margin and revenue added per order ({currency})",
    )
    forest = forest_svg(
        [
            ForestRow(
                label=f"{estimate.arm} vs {control}",
                point=estimate.incremental,
                low=estimate.low,
                high=estimate.high,
            )
            for estimate in result.arms
            if estimate.arm != control
        ],
        title="Expected incremental gross margin per order, 95% interval",
        unit=currency,
    )
    rows = table(
        (
            [
                estimate.arm + (" (control)" if estimate.arm == control else ""),
                estimate.strategy,
                f"{estimate.units:,}",
                f"{estimate.orders:,}",
                f"{estimate.items_shown:,}",
                f"{estimate.expected_margin_per_order:,.4f}",
                f"{estimate.expected_revenue_per_order:,.4f}",
                "–" if estimate.incremental is None else f"{estimate.incremental:,.4f}",
                "–"
                if estimate.low is None or estimate.high is None
                else f"[{estimate.low:,.4f}, {estimate.high:,.4f}]",
                "–" if estimate.mde is None else f"{estimate.mde:,.4f}",
            ]
            for estimate in result.arms
        ),
        (
            "arm",
            "strategy",
            "customers",
            "orders",
            "items shown",
            "margin/order",
            "revenue/order",
            "Δ margin/order",
            "95% interval",
            "MDE",
        ),
    )
    body = (
        f"<h1>Simulation: {experiment.name}</h1>"
        f'<p class="meta">{result.replayed_orders:,} historical orders replayed '
        f"({result.period[0]} to {result.period[1]}), {result.out_of_scope:,} outside the "
        f"experiment's scope · control arm <b>{control}</b> · currency {currency}</p>"
        + figure(bars, name="expected-margin", caption="Sum over items shown of p(accept) x value.")
        + figure(
            forest,
            name="expected-incremental",
            caption="Arm minus control; an estimate before going live, not a measurement.",
        )
        + "<h2>Arms</h2>"
        + rows
        + '<h2>Assumptions</h2><ul class="notes">'
        + "".join(f"<li>{html.escape(assumption)}</li>" for assumption in result.assumptions)
        + "</ul>"
    )
    return page(f"Simulation: {experiment.name}", body)
