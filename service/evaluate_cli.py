"""``upsell evaluate``: its arguments and handler, apart from ``service.evaluate``.

``service.cli`` adds the verb with ``add_evaluate_parser(verbs)`` (as the store adds its
``inventory`` verb): the evaluation pulls in polars, the models and the pipeline, which load
only when the verb runs, so ``upsell --help`` stays instant. ``python -m service.evaluate``
takes the same arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rules.policy import CHANNELS
from service.settings import Settings

__all__ = ["DATASETS", "MARGIN_WEIGHTS", "add_arguments", "add_evaluate_parser", "cmd_evaluate"]

DATASETS = ("ta-feng", "online-retail")
# The knob settings of the margin-aware rows of the table; the tuning script
# (benchmarks/tune_hybrid.py) searches a finer grid on the validation split.
MARGIN_WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)

DESCRIPTION = (
    "Offline evaluation on real baskets: temporal split, one item of each test basket hidden, "
    "every strategy (single generators, popularity baselines, the hybrid, the margin-aware "
    "hybrid at several knob settings) answering through the real request path with its "
    "constraints; hit rate, NDCG, MRR, coverage and margin captured at k = 5 and 10, and "
    "constraint violations (checked again independently). Writes evaluation_<dataset>.csv, "
    ".md, .json and the trade-off plot .png under --out."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``upsell evaluate`` arguments (also ``python -m service.evaluate``)."""
    parser.add_argument(
        "datasets",
        nargs="+",
        metavar="NAME=PATH",
        help="ta-feng=FILE_OR_DIR and/or online-retail=FILE_OR_DIR: the raw public file, or a "
        "directory written by `upsell import`",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="(default %(default)s)"
    )
    parser.add_argument(
        "--cases",
        type=int,
        default=10_000,
        help="held-out baskets per dataset, a seeded sample (0: all; default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=7, help="(default %(default)s)")
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="newest share of orders held out for test (default %(default)s)",
    )
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
    parser.add_argument(
        "--period",
        choices=("test", "validation"),
        default="test",
        help="test: train before the cutoff, score the test orders; validation: split the "
        "training period again and score its newest orders, never touching the test orders "
        "(what tuning uses; default %(default)s)",
    )


def add_evaluate_parser(verbs: Any, settings: Settings) -> None:
    """Add ``evaluate`` to the subparsers ``verbs`` of the ``upsell`` parser."""
    evaluate = verbs.add_parser(
        "evaluate",
        help="compare the strategies offline on real baskets (tables and plot)",
        description=DESCRIPTION,
    )
    add_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> None:
    """Run ``upsell evaluate``; input errors propagate to ``service.cli.main`` (exit 2)."""
    from service.evaluate import run_command  # noqa: PLC0415 - heavy: only this verb needs it

    run_command(args)
