"""Gather what ``upsell roi report`` reads: the policy's experiment, stored exposures and
outcomes, item costs, and the system's own cost; then analyse (``service.roi.analysis``)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import orjson
import polars as pl

from models.data.contract import read_table
from models.data.schema import ITEMS
from rules.errors import InputError, NotReadyError
from rules.policy import Experiment, Policy, load_policy
from service.exposures import exposures_frame, open_exposure_sink
from service.outcomes import open_outcome_store, outcome_frames
from service.roi.analysis import RoiReport, analyse, system_cost_from
from service.settings import Settings
from service.store.factory import open_configured_store

__all__ = ["build_report", "find_experiment", "item_costs"]


def find_experiment(policy: Policy, name: str) -> Experiment:
    experiment = policy.experiments.find(name)
    if experiment is None:
        running = ", ".join(e.name for e in policy.experiments.running) or "none"
        raise InputError(
            f"--experiment: no experiment {name!r} in the policy (running: {running}); pass "
            "--policy FILE for the policy it ran under"
        )
    return experiment


async def item_costs(settings: Settings, items_path: Path | None) -> pl.DataFrame:
    """sku, category, unit_cost: from a contract items file, else the current snapshot."""
    if items_path is not None:
        return read_table(items_path, ITEMS).select("sku", "category", "unit_cost")
    store = await open_configured_store(settings)
    try:
        version = await store.current_version()
        if version is None:
            raise NotReadyError("no snapshot published to read item costs from: pass --items FILE")
        master = await store.load_master(version)
    finally:
        await store.close()
    return master.items.select("sku", "category", "unit_cost")


def _accounting(path: Path | None) -> dict[str, object] | None:
    if path is None:
        return None
    try:
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON accounting file: {exc}") from exc
    if not isinstance(document, dict) or not {"tokens_in", "tokens_out"} <= document.keys():
        raise InputError(f"{path}: an accounting file has tokens_in and tokens_out")
    return document


async def build_report(
    settings: Settings,
    *,
    experiment_name: str,
    policy_path: Path | None = None,
    items_path: Path | None = None,
    replicates: int = 2000,
    seed: int = 7,
    top_categories: int = 8,
    llm_accounting: Path | None = None,
    currency_per_usd: float = 1.0,
) -> RoiReport:
    if replicates < 100:
        raise InputError("--replicates: at least 100 for a 95% interval")
    policy = load_policy(policy_path or settings.policy_path)
    experiment = find_experiment(policy, experiment_name)
    accounting = _accounting(llm_accounting)
    sink = open_exposure_sink(settings)
    try:
        exposures = await exposures_frame(sink)
    finally:
        await sink.close()
    outcomes = open_outcome_store(settings)
    try:
        orders, returns = await outcomes.load()
    finally:
        await outcomes.close()
    order_lines, returned = outcome_frames(orders, returns)
    items = await item_costs(settings, items_path)
    return analyse(
        experiment,
        exposures=exposures,
        order_lines=order_lines,
        returns=returned,
        items=items,
        window=timedelta(hours=policy.experiments.attribution_window_hours),
        return_handling_cost=policy.ranking.return_handling_cost,
        system_cost=system_cost_from(
            exposures,
            experiment=experiment.name,
            accounting=accounting,
            price_input_per_mtok=settings.llm_price_input_per_mtok,
            price_output_per_mtok=settings.llm_price_output_per_mtok,
            currency_per_usd=currency_per_usd,
        ),
        replicates=replicates,
        seed=seed,
        top_categories=top_categories,
    )
