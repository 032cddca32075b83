"""The ROI read-out of one experiment: incremental gross margin per order, with intervals.

Who counts (a *triggered* analysis): an order joins the experiment when its customer (or,
for a guest, its session) had an exposure in the experiment at most the attribution window
before it; it takes that exposure's arm and channel. A holdout arm still records exposures
(with nothing shown), so both arms are triggered alike and the comparison stays randomised.

Per order (all in the retailer's currency):

* revenue: units x price paid; net revenue takes refunds of returned units off;
* gross margin net of returns and incremental fulfilment: (price - unit cost) x units kept,
  minus the policy's ``return_handling_cost`` per returned unit, minus the fulfilment cost
  of every node an *attached* item shipped from apart from the basket (the exposure's
  incremental cost, once per node and order);
* attached: a line whose item was shown to that unit in the experiment within the window
  before the order; *would have bought anyway*: a line a holdout arm withheld.

Each metric is a ratio of sums over units; intervals come from a unit-level bootstrap
(``service.roi.stats``): incremental = arm - control, 95% percentile interval, minimum
detectable effect at the observed variance (alpha 0.05, power 0.8). A test is flagged
underpowered while that effect is larger than the experiment's ``target_effect`` (default
2% of the control arm's margin per order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

from rules.policy import Experiment
from service.roi.stats import bootstrap_sums, minimum_detectable_effect

__all__ = [
    "ALL",
    "ArmSummary",
    "RoiReport",
    "SystemCost",
    "analyse",
    "system_cost_from",
]

ALL: Final = "all"
DEFAULT_TARGET_SHARE: Final = 0.02
UNKNOWN_CATEGORY: Final = "(unknown)"
# Per unit and group, the sums every metric is a ratio of.
SUMS: Final = (
    "orders",
    "revenue",
    "net_revenue",
    "margin",
    "units",
    "returned",
    "attached",
    "would_have",
    "split",
)
# metric -> (numerator, denominator) among SUMS.
RATIOS: Final[dict[str, tuple[str, str]]] = {
    "attachment_rate": ("attached", "orders"),
    "would_have_bought_rate": ("would_have", "orders"),
    "aov": ("revenue", "orders"),
    "net_revenue_per_order": ("net_revenue", "orders"),
    "margin_per_order": ("margin", "orders"),
    "units_per_order": ("units", "orders"),
    "return_rate": ("returned", "units"),
    "split_shipment_rate": ("split", "orders"),
}
# Differences against control reported with an interval.
WITH_INTERVAL: Final = ("net_revenue_per_order", "margin_per_order", "return_rate")


@dataclass(frozen=True)
class SystemCost:
    """What the system itself cost per arm (LLM tokens), in the report's currency."""

    by_arm_channel: Mapping[tuple[str, str], float]  # (arm, channel or ALL) -> total cost
    source: str  # where the figures came from, said on the page


@dataclass(frozen=True)
class ArmSummary:
    arm: str
    strategy: str
    share: float
    units: int
    exposures: int
    items_shown: int


@dataclass
class RoiReport:
    experiment: Experiment
    control: str
    rows: list[dict[str, object]]
    arms: list[ArmSummary]
    period: tuple[datetime | None, datetime | None]
    window: timedelta
    replicates: int
    seed: int
    notes: list[str] = field(default_factory=list)
    system_cost_source: str = ""


# The hashed id the arm was drawn for: the customer's, else the session's.
_UNIT_KEY: Final = (
    pl.when(pl.col("unit") == "customer").then(pl.col("customer")).otherwise(pl.col("session"))
)


def _trigger(orders: pl.DataFrame, exposures: pl.DataFrame, window: timedelta) -> pl.DataFrame:
    """Each order with the arm and channel of its unit's latest exposure within the window."""
    matched = []
    for unit, order_key in (("customer", "customer"), ("session", "session")):
        left = (
            orders.filter(pl.col(order_key).is_not_null())
            .with_columns(pl.col(order_key).alias("unit_key"))
            .sort("ordered_at")
        )
        right = (
            exposures.filter(pl.col("unit") == unit)
            .select("unit_key", "at", "arm", pl.col("channel").alias("exposure_channel"))
            .sort("at")
        )
        if not left.height or not right.height:
            continue
        joined = left.join_asof(
            right,
            left_on="ordered_at",
            right_on="at",
            by="unit_key",
            strategy="backward",
            tolerance=window,
            check_sortedness=False,  # sorted by time above; polars cannot check within groups
        ).filter(pl.col("arm").is_not_null())
        matched.append(joined.with_columns(pl.lit(unit).alias("unit_kind")))
    if not matched:
        return orders.head(0).with_columns(
            pl.lit(None, pl.String).alias("unit_key"),
            pl.lit(None, pl.String).alias("arm"),
            pl.lit(None, pl.String).alias("exposure_channel"),
        )
    # A customer match wins over a session match of the same order.
    return (
        pl.concat(matched, how="diagonal_relaxed")
        .sort("unit_kind")
        .unique(subset="order_id", keep="first")
        .select("order_id", "unit_key", "arm", "exposure_channel")
    )


def _attach(
    lines: pl.DataFrame, exposures: pl.DataFrame, column: str, window: timedelta
) -> pl.DataFrame:
    """Lines of triggered orders with the latest matching shown (or withheld) item."""
    shown = (
        exposures.select("unit_key", "at", column)
        .explode(column)
        .filter(pl.col(column).is_not_null())
        .unnest(column)
        .select("unit_key", "at", "sku", "fulfilment_cost", "node", "category")
        .sort("at")
    )
    if not shown.height:
        return lines.with_columns(
            pl.lit(False).alias("matched"),
            pl.lit(0.0).alias("shown_fulfilment_cost"),
            pl.lit(None, pl.String).alias("shown_node"),
            pl.lit(None, pl.String).alias("shown_category"),
        )
    joined = lines.sort("ordered_at").join_asof(
        shown.rename(
            {
                "fulfilment_cost": "shown_fulfilment_cost",
                "node": "shown_node",
                "category": "shown_category",
            }
        ),
        left_on="ordered_at",
        right_on="at",
        by=["unit_key", "sku"],
        strategy="backward",
        tolerance=window,
        check_sortedness=False,  # sorted by time above; polars cannot check within groups
    )
    return joined.with_columns(pl.col("at").is_not_null().alias("matched")).drop("at")


def analyse(
    experiment: Experiment,
    *,
    exposures: pl.DataFrame,
    order_lines: pl.DataFrame,
    returns: pl.DataFrame,
    items: pl.DataFrame,
    window: timedelta,
    return_handling_cost: float,
    system_cost: SystemCost,
    replicates: int = 2000,
    seed: int = 7,
    top_categories: int = 8,
) -> RoiReport:
    """The read-out of ``experiment`` from stored exposures and outcomes.

    ``items`` gives each SKU's ``category`` and ``unit_cost`` (the item master).
    """
    control = experiment.control_arm.name
    notes: list[str] = []
    in_experiment = exposures.filter(pl.col("experiment") == experiment.name).with_columns(
        _UNIT_KEY.alias("unit_key")
    )
    unknown_arms = sorted(
        set(in_experiment.get_column("arm").drop_nulls().unique().to_list())
        - {arm.name for arm in experiment.arms}
    )
    if unknown_arms:
        notes.append(
            f"exposures of arm(s) {', '.join(unknown_arms)} that the policy no longer defines "
            "are left out"
        )
        in_experiment = in_experiment.filter(pl.col("arm").is_in([a.name for a in experiment.arms]))
    arm_names = [arm.name for arm in experiment.arms]
    arms = [
        ArmSummary(
            arm=arm.name,
            strategy=arm.strategy,
            share=arm.share,
            units=int(
                in_experiment.filter(pl.col("arm") == arm.name).get_column("unit_key").n_unique()
            ),
            exposures=int(in_experiment.filter(pl.col("arm") == arm.name).height),
            items_shown=int(
                in_experiment.filter(pl.col("arm") == arm.name)
                .select(pl.col("items").list.len().sum())
                .item()
                or 0
            ),
        )
        for arm in experiment.arms
    ]

    orders = order_lines.group_by("order_id").agg(
        pl.col("customer").first(), pl.col("session").first(), pl.col("ordered_at").first()
    )
    triggered = _trigger(orders, in_experiment, window)
    lines = order_lines.join(triggered, on="order_id", how="inner")
    if orders.height:
        notes.append(
            f"{triggered.height:,} of {orders.height:,} ingested orders had an exposure in this "
            f"experiment within {_hours(window)} before them and count; the others do not"
        )

    returned = returns.group_by("order_id", "sku").agg(pl.col("quantity").sum().alias("returned"))
    lines = (
        lines.join(returned, on=["order_id", "sku"], how="left")
        .join(items.select("sku", "category", "unit_cost"), on="sku", how="left")
        .with_columns(pl.col("returned").fill_null(0))
    )
    over_returned = lines.filter(pl.col("returned") > pl.col("quantity")).height
    if over_returned:
        notes.append(
            f"{over_returned} order line(s) have more units returned than bought: counted as "
            "all returned"
        )
    unknown_cost = lines.filter(pl.col("unit_cost").is_null()).height
    if unknown_cost:
        notes.append(
            f"{unknown_cost:,} order line(s) name SKUs the item master lacks: no cost, so their "
            "margin counts as 0 (revenue still counts)"
        )
    lines = _attach(lines, in_experiment, "items", window).rename(
        {
            "matched": "attached",
            "shown_fulfilment_cost": "fulfilment_cost",
            "shown_node": "node",
            "shown_category": "attached_category",
        }
    )
    lines = (
        _attach(lines, in_experiment, "withheld", window)
        .rename({"matched": "would_have"})
        .drop("shown_fulfilment_cost", "shown_node", "shown_category")
    )

    kept = pl.col("quantity") - pl.min_horizontal(pl.col("returned"), pl.col("quantity"))
    returned_units = pl.min_horizontal(pl.col("returned"), pl.col("quantity"))
    lines = lines.with_columns(
        pl.coalesce("category", "attached_category", pl.lit(UNKNOWN_CATEGORY)).alias("category"),
        (pl.col("quantity") * pl.col("unit_price")).alias("revenue"),
        (kept * pl.col("unit_price")).alias("net_revenue"),
        (
            (pl.col("unit_price") - pl.col("unit_cost")).fill_null(0.0) * kept
            - return_handling_cost * returned_units
        ).alias("gross_margin"),
        returned_units.alias("returned_units"),
        pl.when(pl.col("attached"))
        .then(pl.col("fulfilment_cost").fill_null(0.0))
        .otherwise(0.0)
        .alias("fulfilment_cost"),
    )
    # One extra shipment per node and order, however many attached items it carries: its
    # cost is shared between them (so category rows add up to the order's).
    ships_apart = pl.col("attached") & (pl.col("fulfilment_cost") > 0)
    lines = lines.with_columns(
        pl.when(ships_apart)
        .then(
            pl.when(ships_apart).then(pl.col("fulfilment_cost")).max().over("order_id", "node")
            / ships_apart.cast(pl.Int64).sum().over("order_id", "node")
        )
        .otherwise(0.0)
        .alias("shipment_cost")
    ).with_columns((pl.col("gross_margin") - pl.col("shipment_cost")).alias("margin"))

    categories = (
        lines.group_by("category")
        .agg(pl.col("revenue").sum())
        .sort(["revenue", "category"], descending=[True, False])
        .head(top_categories)
        .get_column("category")
        .to_list()
    )
    channels = sorted(triggered.get_column("exposure_channel").drop_nulls().unique().to_list())

    # Per (order, category) sums, and per order totals (category ALL).
    def per_order(frame: pl.DataFrame, category: pl.Expr) -> pl.DataFrame:
        return frame.group_by("order_id", "unit_key", "arm", "exposure_channel", category).agg(
            pl.col("revenue").sum(),
            pl.col("net_revenue").sum(),
            pl.col("margin").sum(),
            pl.col("quantity").sum().alias("units"),
            pl.col("returned_units").sum().alias("returned"),
            pl.col("attached").any().cast(pl.Float64).alias("attached"),
            pl.col("would_have").any().cast(pl.Float64).alias("would_have"),
            (pl.col("shipment_cost") > 0).any().cast(pl.Float64).alias("split"),
        )

    order_totals = per_order(lines, pl.lit(ALL).alias("category"))
    by_category = per_order(lines.filter(pl.col("category").is_in(categories)), pl.col("category"))
    cells = pl.concat([order_totals, by_category], how="vertical_relaxed")
    # Orders are counted per channel group, whatever the category: a category's revenue per
    # order is over every triggered order, including those without that category.
    cells = cells.with_columns(pl.lit(0.0).alias("orders"))
    order_rows = order_totals.select(
        "order_id", "unit_key", "arm", "exposure_channel", pl.lit(1.0).alias("orders")
    )
    order_counts = pl.concat(
        [
            order_rows.with_columns(pl.lit(category).alias("category"))
            for category in [ALL, *categories]
        ],
        how="vertical_relaxed",
    )

    group_keys = [
        (channel, category) for channel in [ALL, *channels] for category in [ALL, *categories]
    ]
    group_index = {key: position for position, key in enumerate(group_keys)}
    width = len(SUMS)

    def unit_matrix(arm: str) -> tuple[npt.NDArray[np.float64], int]:
        """(units x groups*sums) sums of the arm's units."""
        arm_cells = pl.concat(
            [
                cells.filter(pl.col("arm") == arm).drop("orders"),
                order_counts.filter(pl.col("arm") == arm),
            ],
            how="diagonal_relaxed",
        ).fill_null(0.0)
        units = arm_cells.get_column("unit_key").unique().sort()
        unit_of = {key: position for position, key in enumerate(units.to_list())}
        matrix = np.zeros((len(unit_of), len(group_keys) * width), dtype=np.float64)
        if not arm_cells.height:
            return matrix, 0
        for channel_group in (ALL, "own"):
            grouped = (
                arm_cells.with_columns(
                    (pl.lit(ALL) if channel_group == ALL else pl.col("exposure_channel")).alias(
                        "channel_group"
                    )
                )
                .group_by("unit_key", "channel_group", "category")
                .agg([pl.col(name).sum() for name in SUMS])
            )
            rows = np.fromiter(
                (unit_of[key] for key in grouped.get_column("unit_key")), dtype=np.int64
            )
            groups = np.fromiter(
                (
                    group_index[(channel, category)]
                    for channel, category in zip(
                        grouped.get_column("channel_group"),
                        grouped.get_column("category"),
                        strict=True,
                    )
                ),
                dtype=np.int64,
            )
            values = grouped.select(SUMS).to_numpy().astype(np.float64)
            for offset in range(width):
                np.add.at(matrix, (rows, groups * width + offset), values[:, offset])
        return matrix, len(unit_of)

    rng = np.random.default_rng(seed)
    observed: dict[str, npt.NDArray[np.float64]] = {}
    replicated: dict[str, npt.NDArray[np.float64]] = {}
    units_in_group: dict[str, npt.NDArray[np.int64]] = {}
    for arm in arm_names:
        matrix, _ = unit_matrix(arm)
        observed[arm] = matrix.sum(axis=0).reshape(len(group_keys), width)
        units_in_group[arm] = (
            (matrix[:, SUMS.index("orders") :: width] > 0).sum(axis=0).astype(np.int64)
        )
        replicated[arm] = bootstrap_sums(matrix, replicates=replicates, rng=rng).reshape(
            replicates, len(group_keys), width
        )

    def ratio(sums: npt.NDArray[np.float64], metric: str) -> npt.NDArray[np.float64]:
        numerator, denominator = RATIOS[metric]
        top, bottom = sums[..., SUMS.index(numerator)], sums[..., SUMS.index(denominator)]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)

    rows: list[dict[str, object]] = []
    for key, position in group_index.items():
        channel, category = key
        control_sums = observed[control][position]
        control_margin = float(ratio(control_sums, "margin_per_order"))
        target = experiment.target_effect or (
            abs(control_margin) * DEFAULT_TARGET_SHARE
            if math.isfinite(control_margin)
            else math.nan
        )
        for arm in arm_names:
            sums = observed[arm][position]
            orders_count = int(sums[SUMS.index("orders")])
            if orders_count == 0 and channel != ALL:
                continue
            row: dict[str, object] = {
                "experiment": experiment.name,
                "arm": arm,
                "control": control,
                "channel": channel,
                "category": category,
                "units": int(units_in_group[arm][position]),
                "orders": orders_count,
            }
            for metric in RATIOS:
                row[metric] = _round(float(ratio(sums, metric)))
            cost = system_cost.by_arm_channel.get((arm, channel)) if category == ALL else None
            row["system_cost_per_order"] = (
                _round(cost / orders_count) if cost is not None and orders_count else None
            )
            if arm == control:
                for metric in WITH_INTERVAL:
                    for suffix in ("", "_low", "_high"):
                        row[f"incremental_{metric}{suffix}"] = None
                row.update(
                    significant=None,
                    mde_margin_per_order=None,
                    target_effect=_round(target),
                    underpowered=None,
                    incremental_margin_after_system_cost=None,
                )
                rows.append(row)
                continue
            increments: dict[str, float] = {}
            for metric in WITH_INTERVAL:
                point = float(ratio(sums, metric)) - float(ratio(control_sums, metric))
                increments[metric] = point
                spread = ratio(replicated[arm][:, position], metric) - ratio(
                    replicated[control][:, position], metric
                )
                spread = spread[np.isfinite(spread)]
                low, high = (
                    (float(np.quantile(spread, 0.025)), float(np.quantile(spread, 0.975)))
                    if spread.size
                    else (math.nan, math.nan)
                )
                row[f"incremental_{metric}"] = _round(point)
                row[f"incremental_{metric}_low"] = _round(low)
                row[f"incremental_{metric}_high"] = _round(high)
                if metric == "margin_per_order":
                    standard_error = float(np.std(spread, ddof=1)) if spread.size > 1 else math.nan
                    mde = minimum_detectable_effect(standard_error)
                    row["significant"] = bool(math.isfinite(low) and (low > 0 or high < 0))
                    row["mde_margin_per_order"] = _round(mde)
                    row["target_effect"] = _round(target)
                    row["underpowered"] = bool(not math.isfinite(mde) or mde > target)
            control_cost = system_cost.by_arm_channel.get((control, channel))
            control_orders = int(control_sums[SUMS.index("orders")])
            if category == ALL and cost is not None and control_cost is not None and control_orders:
                row["incremental_margin_after_system_cost"] = _round(
                    increments["margin_per_order"]
                    - (cost / orders_count - control_cost / control_orders)
                )
            else:
                row["incremental_margin_after_system_cost"] = None
            rows.append(row)
    if triggered.height:
        period = (
            in_experiment.get_column("at").min(),
            lines.get_column("ordered_at").max() if lines.height else None,
        )
    else:
        period = (in_experiment.get_column("at").min() if in_experiment.height else None, None)
    return RoiReport(
        experiment=experiment,
        control=control,
        rows=rows,
        arms=arms,
        period=(_as_datetime(period[0]), _as_datetime(period[1])),
        window=window,
        replicates=replicates,
        seed=seed,
        notes=notes,
        system_cost_source=system_cost.source,
    )


def _as_datetime(value: object) -> datetime | None:
    return value if isinstance(value, datetime) else None


def _round(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def _hours(window: timedelta) -> str:
    hours = window.total_seconds() / 3600
    return f"{hours / 24:g} days" if hours >= 48 else f"{hours:g} hours"


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def system_cost_from(
    exposures: pl.DataFrame,
    *,
    experiment: str,
    accounting: Mapping[str, object] | None,
    price_input_per_mtok: float,
    price_output_per_mtok: float,
    currency_per_usd: float,
) -> SystemCost:
    """LLM cost per (arm, channel): token counts of the exposures when they carry them, else
    an accounting snapshot (``ExplanationAccounting.snapshot()`` JSON) spread over the items
    shown, else zero (and the page says so)."""
    frame = exposures.filter(pl.col("experiment") == experiment)
    tokens_known = frame.filter(
        pl.col("llm_input_tokens").is_not_null() | pl.col("llm_output_tokens").is_not_null()
    )
    per_usd = currency_per_usd / 1_000_000
    if tokens_known.height:
        cost = frame.with_columns(
            (
                pl.col("llm_input_tokens").fill_null(0) * price_input_per_mtok
                + pl.col("llm_output_tokens").fill_null(0) * price_output_per_mtok
            ).alias("cost")
            * per_usd
        )
        source = (
            f"LLM tokens recorded with {tokens_known.height:,} of {frame.height:,} exposures, at "
            f"{price_input_per_mtok:g}/{price_output_per_mtok:g} USD per million input/output "
            f"tokens x {currency_per_usd:g} per USD"
        )
    elif accounting is not None:
        tokens_in = _number(accounting.get("tokens_in"))
        tokens_out = _number(accounting.get("tokens_out"))
        total = (tokens_in * price_input_per_mtok + tokens_out * price_output_per_mtok) * per_usd
        shown_everywhere = int(exposures.select(pl.col("items").list.len().sum()).item() or 0)
        per_item = total / shown_everywhere if shown_everywhere else 0.0
        cost = frame.with_columns((pl.col("items").list.len() * per_item).alias("cost"))
        source = (
            f"LLM accounting file: {tokens_in:,.0f} input and {tokens_out:,.0f} output tokens, "
            f"spread over the {shown_everywhere:,} items shown in all exposures"
        )
    else:
        cost = frame.with_columns(pl.lit(0.0).alias("cost"))
        source = (
            "no LLM token counts in the exposures and no accounting file given: system cost "
            "taken as 0 (pass --llm-accounting FILE)"
        )
    by_channel = cost.group_by("arm", "channel").agg(pl.col("cost").sum())
    by_arm = cost.group_by("arm").agg(pl.col("cost").sum())
    table: dict[tuple[str, str], float] = {
        (str(arm), str(channel)): float(value) for arm, channel, value in by_channel.iter_rows()
    }
    table.update({(str(arm), ALL): float(value) for arm, value in by_arm.iter_rows()})
    return SystemCost(by_arm_channel=table, source=source)
