"""Tune the evaluation's hybrid weights and margin-aware setting on a validation split.

Everything runs on ``--period validation`` of ``service.evaluate``: the training period
(orders before the test cutoff) split again, its newest 20% of orders scored, so the test
orders are never seen. Every figure goes through the real request path, constraints and
calibration included, as ``upsell evaluate`` runs it.

1. Generator weights, for hit rate@10 by relevance alone (margin weight 0): coordinate
   ascent from ``UNTUNED_HYBRID``; each pass tries, per generator in turn, 0, half and double
   its weight (0.25 and 1 when it is 0; popularity, the backfill, never 0) and keeps a change
   only when it finds more hidden items.
2. The margin-aware setting: for each candidate setting (the tuned weights with the
   policy's pool, with a pool of 1,200, and with upgrades weighted up and that deeper pool),
   the margin knob from 0 to 1 in 0.05 steps, each ranked with a calibration fitted for its
   weights. The choice: the (setting, knob) capturing most margin@10 among rows that keep
   90% of the tuned hybrid's hit rate@10; the setting goes to ``MARGIN_AWARE``.

Writes ``benchmarks/results/tuning_<dataset>.{json,md}`` and prints the constants to copy
into ``service/evaluate.py`` (``TUNED_HYBRID``, ``MARGIN_AWARE``). Heavy: about 40 minutes
for Ta-Feng on 2 shared cores with the defaults.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/tune_hybrid.py \\
        ta-feng=../shared/data/ta-feng/ta_feng.csv.zip
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import orjson

from models.generators import HybridWeights
from rules.errors import InputError
from service.evaluate import (
    MIN_KEPT_HIT_RATE,
    UNTUNED_HYBRID,
    MarginAwareSetting,
    PreparedDataset,
    Strategy,
    StrategyResult,
    contract_dir_for,
    margin_knob,
    margin_strategies,
    parse_dataset_arguments,
    prepared_dataset,
)
from service.logging import configure_logging

RESULTS = Path(__file__).resolve().parent / "results"
KNOB_GRID = tuple(round(step * 0.05, 2) for step in range(21))
DEEP_POOL = 1200
UPGRADE_BOOST = 10.0  # the upgrade weight of the third candidate setting, times the tuned one


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _figures(result: StrategyResult) -> dict[str, float]:
    at10 = result.metrics[10]
    return {
        "hit_rate@10": round(at10.hit_rate, 6),
        "margin_per_1000@10": round(at10.margin_per_1000, 3),
        "violations": at10.violations,
    }


def _alternatives(name: str, weight: float) -> list[float]:
    if weight == 0:
        return [0.25, 1.0]
    options = [weight / 2, weight * 2]
    return options if name == "popular" else [0.0, *options]


async def tune_weights(
    prepared: PreparedDataset, *, passes: int
) -> tuple[HybridWeights, list[dict[str, object]]]:
    """Coordinate ascent on hit rate@10 at margin weight 0; returns the weights and every
    trial."""
    relevance_only = margin_knob(0.0)
    trials: list[dict[str, object]] = []

    async def hit_rate(weights: HybridWeights) -> float:
        started = time.perf_counter()
        result = await prepared.run(Strategy("trial", weights, relevance_only))
        figures = _figures(result)
        trials.append({"weights": weights.as_dict(), **figures})
        _progress(
            f"  {weights.as_dict()}: hit rate@10 {figures['hit_rate@10']:.4f} "
            f"({time.perf_counter() - started:.0f} s)"
        )
        return float(figures["hit_rate@10"])

    best = UNTUNED_HYBRID
    best_rate = await hit_rate(best)
    for round_number in range(passes):
        _progress(f"pass {round_number + 1}")
        improved = False
        for name in (field.name for field in fields(HybridWeights)):
            for value in _alternatives(name, getattr(best, name)):
                trial = replace(best, **{name: value})
                rate = await hit_rate(trial)
                if rate > best_rate:
                    best, best_rate, improved = trial, rate, True
        if not improved:
            break
    return best, trials


def candidate_settings(tuned: HybridWeights) -> dict[str, MarginAwareSetting]:
    upgrade = tuned.upgrade * UPGRADE_BOOST if tuned.upgrade else 0.5
    return {
        "tuned weights, policy pool": MarginAwareSetting(tuned),
        f"tuned weights, pool {DEEP_POOL}": MarginAwareSetting(tuned, DEEP_POOL),
        f"upgrades x{UPGRADE_BOOST:g}, pool {DEEP_POOL}": MarginAwareSetting(
            replace(tuned, upgrade=upgrade), DEEP_POOL
        ),
    }


async def tune_margin(
    prepared: PreparedDataset, settings: dict[str, MarginAwareSetting]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every setting at every knob; returns the rows and the choice (the reference itself
    keeps its own hit rate, so there always is one)."""
    rows: list[dict[str, Any]] = []
    for label, setting in settings.items():
        strategies = margin_strategies(setting, KNOB_GRID, prefix=label)
        for margin_weight, strategy in zip(KNOB_GRID, strategies, strict=True):
            started = time.perf_counter()
            result = await prepared.run(strategy)
            figures = _figures(result)
            rows.append(
                {
                    "setting": label,
                    "margin_weight": margin_weight,
                    "weights": setting.weights.as_dict(),
                    "candidate_pool": setting.candidate_pool,
                    "calibrated": result.calibrated,
                    **figures,
                }
            )
            _progress(
                f"  {strategy.name}: hit rate@10 {figures['hit_rate@10']:.4f}, margin@10 "
                f"{figures['margin_per_1000@10']:,.1f} ({time.perf_counter() - started:.0f} s)"
            )
    reference = rows[0]  # the tuned weights, policy pool, margin weight 0
    floor = MIN_KEPT_HIT_RATE * reference["hit_rate@10"]
    keeping = [row for row in rows if row["hit_rate@10"] >= floor]
    choice = max(keeping, key=lambda row: row["margin_per_1000@10"])
    reference_margin = reference["margin_per_1000@10"]
    lift = choice["margin_per_1000@10"] / reference_margin if reference_margin else 0.0
    return rows, {**choice, "margin_lift": round(lift, 4), "hit_rate_floor": round(floor, 6)}


def markdown(dataset: str, document: dict[str, Any]) -> str:
    lines = [
        f"### Tuning on {dataset}, validation period",
        "",
        f"- command: `{document['command']}`",
        f"- {document['cases']:,} validation cases (cutoff {document['cutoff']}, "
        f"{document['train_lines']:,} training lines); weights tuned on "
        f"{document['weight_cases']:,} of them",
        f"- tuned weights: `{document['tuned_weights']}`",
        f"- chosen margin-aware setting: `{document['choice']}`",
        "",
        "| setting | margin weight | HR@10 | margin/1k@10 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in document["margin_rows"]:
        lines.append(
            f"| {row['setting']} | {row['margin_weight']:g} | {row['hit_rate@10']:.4f} | "
            f"{row['margin_per_1000@10']:,.1f} |"
        )
    return "\n".join(lines) + "\n"


async def tune(
    dataset: str, contract_dir: Path, *, weight_cases: int, margin_cases: int, passes: int
) -> dict[str, Any]:
    _progress(f"{dataset}: tuning generator weights on {weight_cases} validation cases")
    async with prepared_dataset(
        contract_dir, dataset=dataset, period="validation", max_cases=weight_cases
    ) as prepared:
        tuned, trials = await tune_weights(prepared, passes=passes)
        weight_cases = len(prepared.cases)  # fewer than asked when the period has fewer
    settings = candidate_settings(tuned)
    _progress(f"{dataset}: margin-aware settings on {margin_cases} validation cases")
    async with prepared_dataset(
        contract_dir,
        dataset=dataset,
        period="validation",
        max_cases=margin_cases,
        calibrate_for=[setting.weights for setting in settings.values()],
    ) as prepared:
        rows, choice = await tune_margin(prepared, settings)
        return {
            "dataset": dataset,
            "cutoff": prepared.split.cutoff.isoformat(),
            "train_lines": prepared.split.train.height,
            "cases": len(prepared.cases),
            "weight_cases": weight_cases,
            "tuned_weights": {k: v for k, v in tuned.as_dict().items() if v},
            "weight_trials": trials,
            "candidate_settings": {label: asdict(s) for label, s in settings.items()},
            "margin_rows": rows,
            "choice": choice,
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--weight-cases", type=int, default=4000)
    parser.add_argument("--margin-cases", type=int, default=8000)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    configure_logging(level="warning", json=False)
    command = " ".join(["benchmarks/tune_hybrid.py", *(argv or sys.argv[1:])])
    try:
        with tempfile.TemporaryDirectory(prefix="upsell-tune-") as scratch:
            for name, source in parse_dataset_arguments(args.datasets):
                contract_dir = contract_dir_for(name, source, Path(scratch))
                document = asyncio.run(
                    tune(
                        name,
                        contract_dir,
                        weight_cases=args.weight_cases,
                        margin_cases=args.margin_cases,
                        passes=args.passes,
                    )
                )
                document = {"command": command, **document}
                args.out.mkdir(parents=True, exist_ok=True)
                stem = args.out / f"tuning_{name}"
                stem.with_suffix(".json").write_bytes(
                    orjson.dumps(document, option=orjson.OPT_INDENT_2)
                )
                stem.with_suffix(".md").write_text(markdown(name, document))
                print(markdown(name, document), flush=True)
    except InputError as error:
        print(f"tune_hybrid: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
