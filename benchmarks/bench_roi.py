"""The ROI report on real order lines: does it recover a known uplift, and stay quiet on A/A?

Ta-Feng (``../shared/data``) when present, else the bundled Online Retail sample:

1. import the data set; take its newest ``--orders`` orders;
2. ``service.roi.simulate``: train on the orders before them, replay each through the real
   ``Recommender`` under a three-arm experiment (``control`` relevance-only, ``aa`` the same
   strategy again, ``treatment`` the policy's margin-aware knobs), recording exposures and
   ingesting the orders as outcomes, with an injected purchase of the top item shown in the
   treatment arm (known uplift in margin per order: the truth);
3. ``upsell roi report``'s code on the stored exposures and outcomes: is the truth inside the
   treatment's 95% interval, is the A/A arm's effect insignificant;
4. ``--aa-reshuffles`` A/A read-outs of the same control and ``aa`` units, re-split by new
   salts: the share found significant is the empirical false-positive rate (5% expected);
5. the page opened in headless Chromium for a screenshot.

Writes ``benchmarks/results/roi.json``, ``roi_<dataset>.html`` / ``.csv``,
``simulation_<dataset>.html`` and ``roi_report.png``.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_roi.py [--orders 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from models.data.adapters import import_online_retail, import_ta_feng
from rules.experiments import Assignment, arm_indexes
from rules.policy import Experiment, Policy, load_policy
from service.exposures import (
    ExposureRecorder,
    exposures_frame,
    open_exposure_sink,
    pseudonymizer_for,
)
from service.logging import configure_logging
from service.outcomes import open_outcome_store, outcome_frames
from service.pipeline import (
    Recommendation,
    RecommendationQuery,
    RecommendedItem,
    ScoreTrace,
    Versions,
)
from service.roi.analysis import ALL, analyse, system_cost_from
from service.roi.render import write_report
from service.roi.report import build_report
from service.roi.simulate import SimulationResult, simulate, simulation_html
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TA_FENG = REPO.parent / "shared" / "data" / "ta-feng" / "ta_feng.csv.zip"
SAMPLE = Path(str(resources.files("models").joinpath("sample/online_retail_sample.parquet")))
# Margin per order worth detecting, in the data set's currency (TWD on Ta-Feng, where an
# order's gross margin averages about 105): about a fifth of it.
TARGET_EFFECT = 20.0
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def experiment_policy() -> Policy:
    document = load_policy().model_dump(mode="json")
    document["experiments"] = {
        "attribution_window_hours": 168,
        "running": [
            {
                "name": "margin-aware-vs-relevance",
                "salt": "bench-1",
                "control": "control",
                "target_effect": TARGET_EFFECT,
                "arms": [
                    {"name": "control", "share": 0.34, "strategy": "relevance"},
                    {"name": "aa", "share": 0.33, "strategy": "relevance"},
                    {"name": "treatment", "share": 0.33, "strategy": "policy"},
                ],
            }
        ],
    }
    return Policy.model_validate(document)


def overall(rows: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    return next(r for r in rows if (r["arm"], r["channel"], r["category"]) == (arm, ALL, ALL))


def aa_reshuffles(
    settings: Settings, policy: Policy, items: pl.DataFrame, count: int, replicates: int
) -> list[dict[str, Any]]:
    """Re-split the units of two arms with one strategy by new salts; read each out as A/A."""

    async def load() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        sink = open_exposure_sink(settings)
        store = open_outcome_store(settings)
        orders, returns = await store.load()
        lines, returned = outcome_frames(orders, returns)
        return await exposures_frame(sink), lines, returned

    exposures, lines, returned = asyncio.run(load())
    same_strategy = exposures.filter(pl.col("arm").is_in(["control", "aa"]))
    units = (
        same_strategy.select(
            pl.when(pl.col("unit") == "customer")
            .then(pl.col("customer"))
            .otherwise(pl.col("session"))
            .alias("unit_key")
        )
        .get_column("unit_key")
        .to_list()
    )
    outcomes = []
    for number in range(count):
        split = Experiment.model_validate(
            {
                "name": "aa-reshuffle",
                "salt": f"reshuffle-{number}",
                "arms": [
                    {"name": "a", "share": 0.5, "strategy": "relevance"},
                    {"name": "b", "share": 0.5, "strategy": "relevance"},
                ],
            }
        )
        arms = np.array(["a", "b"])[arm_indexes(split, units)]
        relabelled = same_strategy.with_columns(
            pl.lit("aa-reshuffle").alias("experiment"), pl.Series("arm", arms)
        )
        report = analyse(
            split,
            exposures=relabelled,
            order_lines=lines,
            returns=returned,
            items=items,
            window=timedelta(hours=policy.experiments.attribution_window_hours),
            return_handling_cost=policy.ranking.return_handling_cost,
            system_cost=system_cost_from(
                relabelled,
                experiment="aa-reshuffle",
                accounting=None,
                price_input_per_mtok=1.0,
                price_output_per_mtok=5.0,
                currency_per_usd=1.0,
            ),
            replicates=replicates,
            seed=number,
            top_categories=0,
        )
        row = overall(report.rows, "b")
        outcomes.append(
            {
                "salt": split.salt,
                "incremental_margin_per_order": row["incremental_margin_per_order"],
                "low": row["incremental_margin_per_order_low"],
                "high": row["incremental_margin_per_order_high"],
                "significant": row["significant"],
            }
        )
    return outcomes


def recording_cost(settings: Settings, count: int = 20_000) -> dict[str, float]:
    """What recording costs a response (the request path's part: build the exposure, hash
    the ids, append), and how fast the background task writes them to the JSONL file."""
    items = tuple(
        RecommendedItem(
            sku=f"SKU{n}",
            name=f"Item {n}",
            kind="cross_sell",
            score=0.5,
            unit_price=12.5,
            unit_margin=4.25,
            fulfillment_node="DC-1",
            reason_codes=("BOUGHT_TOGETHER",),
            explanation="",
            explanation_source="template",
            score_parts=ScoreTrace(0.5, 0.1, 4.25, 0.2, 0.0, 0.4, 0.3, 0.5),
            category="CAT",
        )
        for n in range(5)
    )
    result = Recommendation(
        request_id="r",
        channel="cart",
        items=items,
        unknown_skus=(),
        degraded=(),
        versions=Versions(model="m", snapshot="s", policy="p"),
        candidates_considered=300,
        experiment=Assignment("e", "treatment", "policy", None, "customer"),
    )
    query = RecommendationQuery(request_id="r", channel="cart", customer_id="17850")
    now = datetime(2025, 3, 1)

    async def run() -> tuple[list[float], float]:
        recorder = ExposureRecorder(
            open_exposure_sink(settings), pseudonymizer_for(settings), capacity=count
        )
        timings = []
        for _ in range(count):
            began = time.perf_counter_ns()
            recorder.record(query, result, now=now)
            timings.append((time.perf_counter_ns() - began) / 1000)
        began = time.perf_counter()
        await recorder.close()
        return timings, time.perf_counter() - began

    timings, flushed_s = asyncio.run(run())
    return {
        "record_p50_us": round(float(np.percentile(timings, 50)), 1),
        "record_p99_us": round(float(np.percentile(timings, 99)), 1),
        "written_per_second_jsonl": round(count / flushed_s),
    }


def screenshot(page: Path, out: Path) -> bool:
    binary = shutil.which("chromium")
    if binary is None:
        print("no chromium on PATH: screenshot skipped (apt-get install -y chromium)")
        return False
    with tempfile.TemporaryDirectory(prefix="upsell-shot-") as profile:
        subprocess.run(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--window-size=1200,1900",
                f"--screenshot={out}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return out.exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dataset", choices=["ta-feng", "online-retail-sample"])
    parser.add_argument("--orders", type=int, default=20_000, help="newest orders replayed")
    parser.add_argument("--attach-rate", type=float, default=0.3)
    parser.add_argument("--quantity", type=int, default=1)
    parser.add_argument("--return-rate", type=float, default=0.1)
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--aa-reshuffles", type=int, default=20)
    args = parser.parse_args()
    dataset = args.dataset or ("ta-feng" if TA_FENG.exists() else "online-retail-sample")
    currency = "TWD" if dataset == "ta-feng" else "GBP"
    configure_logging(level="warning", json=True)
    RESULTS.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="upsell-bench-roi-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        if dataset == "ta-feng":
            import_ta_feng(TA_FENG, root / "data", seed=7)
        else:
            import_online_retail(SAMPLE, root / "data", seed=7)
        imported_s = time.perf_counter() - started
        settings = Settings(state_dir=root / "state", log_level="warning")
        policy = experiment_policy()

        async def rehearse() -> tuple[SimulationResult, float]:
            pseudonym = pseudonymizer_for(settings)
            recorder = ExposureRecorder(
                open_exposure_sink(settings), pseudonym, capacity=10_000_000
            )
            outcomes = open_outcome_store(settings)
            began = time.perf_counter()
            try:
                result = await simulate(
                    root / "data",
                    policy,
                    None,
                    replay_orders=args.orders,
                    recorder=recorder,
                    outcomes=outcomes,
                    pseudonymize=pseudonym,
                    inject_arm="treatment",
                    inject_attach_rate=args.attach_rate,
                    inject_quantity=args.quantity,
                    inject_return_rate=args.return_rate,
                    replicates=args.replicates,
                )
            finally:
                await recorder.close()
                await outcomes.close()
            return result, time.perf_counter() - began

        result, simulated_s = asyncio.run(rehearse())
        items_path = root / "data" / "items.parquet"
        policy_path = root / "policy.yaml"
        policy_path.write_text(json.dumps(policy.model_dump(mode="json")))  # JSON is YAML
        started = time.perf_counter()
        report = asyncio.run(
            build_report(
                settings,
                experiment_name="margin-aware-vs-relevance",
                policy_path=policy_path,
                items_path=items_path,
                replicates=args.replicates,
            )
        )
        report_s = time.perf_counter() - started
        html_path, csv_path = write_report(report, RESULTS, currency=currency)
        html_path = html_path.rename(RESULTS / f"roi_{dataset}.html")
        csv_path.rename(RESULTS / f"roi_{dataset}.csv")
        (RESULTS / f"simulation_{dataset}.html").write_text(
            simulation_html(result, currency=currency), "utf-8"
        )
        items = pl.read_parquet(items_path).select("sku", "category", "unit_cost")
        started = time.perf_counter()
        reshuffles = aa_reshuffles(settings, policy, items, args.aa_reshuffles, args.replicates)
        reshuffle_s = time.perf_counter() - started
        recording = recording_cost(Settings(state_dir=root / "recording"))

    shot = RESULTS / "roi_report.png"
    shot_taken = screenshot(html_path, shot)
    treatment, aa = overall(report.rows, "treatment"), overall(report.rows, "aa")
    truth = result.truth["treatment"]
    figures = {
        "run_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, Python {platform.python_version()})",
        "dataset": dataset,
        "currency": currency,
        "replayed_orders": result.replayed_orders,
        "period": result.period,
        "injection": {
            "arm": "treatment",
            "attach_rate": args.attach_rate,
            "quantity": args.quantity,
            "return_rate": args.return_rate,
            "orders_with_injected_purchase": result.injected_orders,
        },
        "truth_incremental_margin_per_order": truth,
        "treatment": {
            key: treatment[key]
            for key in (
                "orders",
                "units",
                "incremental_margin_per_order",
                "incremental_margin_per_order_low",
                "incremental_margin_per_order_high",
                "significant",
                "mde_margin_per_order",
                "target_effect",
                "underpowered",
                "attachment_rate",
                "incremental_net_revenue_per_order",
                "incremental_return_rate",
            )
        },
        "truth_inside_interval": bool(
            treatment["incremental_margin_per_order_low"]
            <= truth
            <= treatment["incremental_margin_per_order_high"]
        ),
        "aa": {
            key: aa[key]
            for key in (
                "orders",
                "incremental_margin_per_order",
                "incremental_margin_per_order_low",
                "incremental_margin_per_order_high",
                "significant",
                "mde_margin_per_order",
            )
        },
        "aa_reshuffles": {
            "count": len(reshuffles),
            "significant": sum(bool(r["significant"]) for r in reshuffles),
            "false_positive_rate": (
                sum(bool(r["significant"]) for r in reshuffles) / len(reshuffles)
                if reshuffles
                else None
            ),
            "read_outs": reshuffles,
        },
        "pre_launch_estimate": [vars(estimate) for estimate in result.arms],
        "seconds": {
            "import": round(imported_s, 1),
            "train_and_replay": round(simulated_s, 1),
            "replay_per_order_ms": round(simulated_s * 1000 / result.replayed_orders, 2),
            "report": round(report_s, 1),
            "aa_reshuffles": round(reshuffle_s, 1),
        },
        "recording": recording,
        "bootstrap_replicates": args.replicates,
        "screenshot": str(shot.relative_to(REPO)) if shot_taken else None,
    }
    (RESULTS / "roi.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(
        json.dumps(
            {
                k: figures[k]
                for k in (
                    "truth_incremental_margin_per_order",
                    "truth_inside_interval",
                    "treatment",
                    "aa",
                    "seconds",
                )
            },
            indent=2,
            default=str,
        )
    )
    print(
        f"A/A reshuffles significant: {figures['aa_reshuffles']['significant']} of "
        f"{len(reshuffles)}"
    )


if __name__ == "__main__":
    main()
