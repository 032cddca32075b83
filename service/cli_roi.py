"""Verbs of experiments and their read-out: ``upsell exposures export``, ``upsell events
import``, ``upsell roi report`` and ``upsell simulate``.

Kept apart from ``service.cli`` (which adds them with ``add_roi_parsers``); heavy imports
wait until a verb runs, so ``upsell --help`` stays instant.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from rules.errors import InputError
from service.settings import Settings

__all__ = ["add_roi_parsers"]

_IDS_SHOWN = 10


def _print(message: str) -> None:
    print(message, flush=True)


def add_roi_parsers(verbs: Any, settings: Settings) -> None:
    """Add the verbs to ``verbs``, what ``ArgumentParser.add_subparsers()`` returned."""
    where = (
        "Redis (UPSELL_REDIS_URL)"
        if settings.redis_url
        else f"files under UPSELL_STATE_DIR ({settings.state_dir})"
    )
    exposures = verbs.add_parser(
        "exposures",
        help="what every response showed, for the ROI report",
        description=f"Exposures are recorded by the running service to {where}.",
    )
    exposure_actions = exposures.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = exposure_actions.add_parser(
        "export", help="write every stored exposure to a Parquet file"
    )
    export.add_argument("file", type=Path, help="output .parquet (written whole, by rename)")
    exposures.set_defaults(handler=cmd_exposures)

    events = verbs.add_parser(
        "events",
        help="ingest outcomes (orders and returns) for the ROI report",
        description=f"Outcomes are stored in {where}, idempotently by order id and return id.",
    )
    event_actions = events.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = event_actions.add_parser(
        "import",
        help="import order lines (the orders contract) and returns from CSV or Parquet",
        description="ORDERS has the columns of the orders contract table (order_id, "
        "customer_id, sku, quantity, unit_price, ordered_at, store_id, channel) and optionally "
        "session_id; --returns has return_id, order_id, sku, quantity, returned_at. Both are "
        "validated whole (a bad row is named, nothing is stored). An id stored before is a "
        "duplicate (same content: no change) or a conflict (other content: refused, the first "
        "version stays).",
    )
    imp.add_argument("orders", nargs="?", type=Path, help="order lines, .csv or .parquet")
    imp.add_argument("--returns", type=Path, help="returns, .csv or .parquet")
    events.set_defaults(handler=cmd_events)

    roi = verbs.add_parser(
        "roi",
        help="the ROI report of a holdout experiment",
        description="Incremental gross margin per order, net of returns and incremental "
        "fulfilment cost, with 95%% bootstrap intervals, per arm, channel and category.",
    )
    roi_actions = roi.add_subparsers(dest="action", required=True, metavar="ACTION")
    report = roi_actions.add_parser(
        "report",
        help="write roi_<experiment>.html and .csv",
        description="Reads the stored exposures and outcomes, item costs from the current "
        "snapshot (or --items), and the experiment from the policy (UPSELL_POLICY_PATH or "
        "--policy). See docs/experiments.md.",
    )
    report.add_argument("--experiment", required=True, help="experiment name in the policy")
    report.add_argument("--policy", type=Path, help="the policy file the experiment ran under")
    report.add_argument("--items", type=Path, help="items file (contract) for unit costs")
    report.add_argument("--out", type=Path, default=Path("var/reports"), help="output directory")
    report.add_argument("--replicates", type=int, default=2000, help="bootstrap resamples")
    report.add_argument("--seed", type=int, default=7, help="bootstrap seed")
    report.add_argument("--categories", type=int, default=8, help="categories broken out")
    report.add_argument("--currency", default="", help="currency label of prices (e.g. GBP)")
    report.add_argument(
        "--llm-accounting",
        type=Path,
        help="JSON with tokens_in and tokens_out (the explanation accounting snapshot), when "
        "exposures carry no token counts",
    )
    report.add_argument(
        "--currency-per-usd", type=float, default=1.0, help="to convert LLM prices (USD)"
    )
    roi.set_defaults(handler=cmd_roi)

    sim = verbs.add_parser(
        "simulate",
        help="replay historical orders through a policy's experiment before going live",
        description="Replays the newest orders of a contract directory (from `upsell "
        "import`) through the real pipeline under the policy's experiment and estimates each "
        "arm's margin impact, assumptions stated on the page. With --write-events it also "
        "records the replay's exposures and the orders as outcomes (plus an injected, known "
        "uplift in --inject-arm), so that `upsell roi report` can be rehearsed on them.",
    )
    sim.add_argument("data", type=Path, help="contract directory: orders, items, nodes, inventory")
    sim.add_argument("--policy", type=Path, help="policy file (default UPSELL_POLICY_PATH)")
    sim.add_argument("--experiment", help="experiment name (default: the first running)")
    sim.add_argument("--orders", type=int, default=5000, help="newest orders replayed")
    sim.add_argument(
        "--artifacts",
        type=Path,
        help="trained artifacts (default: train on the orders before the replayed ones)",
    )
    sim.add_argument("--channel", choices=["cart", "pdp", "pos", "contact_center"])
    sim.add_argument("--limit", type=int, default=5, help="items asked per request")
    sim.add_argument("--consent", action="store_true", help="assume every customer consented")
    sim.add_argument("--seed", type=int, default=7)
    sim.add_argument("--replicates", type=int, default=2000)
    sim.add_argument("--out", type=Path, default=Path("var/reports"), help="output directory")
    sim.add_argument("--currency", default="")
    sim.add_argument(
        "--write-events",
        action="store_true",
        help="record exposures and ingest the orders as outcomes",
    )
    sim.add_argument("--inject-arm", help="arm whose customers buy the injected item")
    sim.add_argument("--inject-attach-rate", type=float, default=0.0)
    sim.add_argument("--inject-quantity", type=int, default=1)
    sim.add_argument("--inject-return-rate", type=float, default=0.0)
    sim.set_defaults(handler=cmd_simulate)


def cmd_exposures(args: argparse.Namespace, settings: Settings) -> None:
    from service.exposures import export_exposures, open_exposure_sink  # noqa: PLC0415

    async def run() -> int:
        sink = open_exposure_sink(settings)
        try:
            return await export_exposures(sink, args.file)
        finally:
            await sink.close()

    _print(f"exported {asyncio.run(run()):,} exposures to {args.file}")


def cmd_events(args: argparse.Namespace, settings: Settings) -> None:
    from service.exposures import pseudonymizer_for  # noqa: PLC0415
    from service.outcomes import IngestReport, open_outcome_store, read_outcome_files  # noqa: PLC0415

    if args.orders is None and args.returns is None:
        raise InputError("events import: give an orders file, --returns FILE, or both")
    orders, returns = read_outcome_files(args.orders, args.returns, pseudonymizer_for(settings))

    async def run() -> tuple[IngestReport, IngestReport]:
        store = open_outcome_store(settings)
        try:
            return await store.add(
                orders, returns, source=args.returns.name if args.returns else "returns"
            )
        finally:
            await store.close()

    order_report, return_report = asyncio.run(run())
    for name, report in (("orders", order_report), ("returns", return_report)):
        line = (
            f"{name}: {report.added:,} added, {report.duplicate:,} duplicate, "
            f"{report.conflict:,} conflict"
        )
        conflicts = [
            record_id for record_id, outcome in report.not_added if outcome.value == "conflict"
        ]
        if conflicts:
            more = f" and {len(conflicts) - _IDS_SHOWN} more" if len(conflicts) > _IDS_SHOWN else ""
            line += (
                f" (refused, stored with other content: {', '.join(conflicts[:_IDS_SHOWN])}{more})"
            )
        _print(line)


def cmd_roi(args: argparse.Namespace, settings: Settings) -> None:
    from service.roi.render import write_report  # noqa: PLC0415
    from service.roi.report import build_report  # noqa: PLC0415

    started = time.perf_counter()
    report = asyncio.run(
        build_report(
            settings,
            experiment_name=args.experiment,
            policy_path=args.policy,
            items_path=args.items,
            replicates=args.replicates,
            seed=args.seed,
            top_categories=args.categories,
            llm_accounting=args.llm_accounting,
            currency_per_usd=args.currency_per_usd,
        )
    )
    paths = write_report(report, args.out, currency=args.currency)
    _print(f"ROI report of {report.experiment.name} in {time.perf_counter() - started:.1f}s:")
    for row in report.rows:
        if row["channel"] != "all" or row["category"] != "all":
            continue
        if row["arm"] == report.control:
            _print(f"  {row['arm']} (control): {row['orders']:,} orders")
            continue
        interval = (
            f"[{row['incremental_margin_per_order_low']}, "
            f"{row['incremental_margin_per_order_high']}]"
        )
        _print(
            f"  {row['arm']}: {row['orders']:,} orders, incremental margin/order "
            f"{row['incremental_margin_per_order']} {interval}, significant "
            f"{row['significant']}, underpowered {row['underpowered']} "
            f"(MDE {row['mde_margin_per_order']})"
        )
    for path in paths:
        _print(f"  -> {path}")


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> None:
    from models.artifacts import load_artifacts  # noqa: PLC0415
    from rules.policy import load_policy  # noqa: PLC0415
    from service.exposures import ExposureRecorder, open_exposure_sink, pseudonymizer_for  # noqa: PLC0415
    from service.outcomes import open_outcome_store  # noqa: PLC0415
    from service.roi.simulate import simulate, simulation_html  # noqa: PLC0415

    policy = load_policy(args.policy or settings.policy_path)
    artifacts = load_artifacts(args.artifacts) if args.artifacts else None

    async def run() -> Any:
        recorder = outcomes = None
        pseudonymize = pseudonymizer_for(settings)
        if args.write_events:
            recorder = ExposureRecorder(
                open_exposure_sink(settings), pseudonymize, capacity=1_000_000
            )
            outcomes = open_outcome_store(settings)
        try:
            return await simulate(
                args.data,
                policy,
                args.experiment,
                replay_orders=args.orders,
                artifacts=artifacts,
                artifacts_dir=args.artifacts,
                channel=args.channel,
                limit=args.limit,
                consent=args.consent,
                seed=args.seed,
                replicates=args.replicates,
                recorder=recorder,
                outcomes=outcomes,
                pseudonymize=pseudonymize,
                inject_arm=args.inject_arm,
                inject_attach_rate=args.inject_attach_rate,
                inject_quantity=args.inject_quantity,
                inject_return_rate=args.inject_return_rate,
            )
        finally:
            if recorder is not None:
                await recorder.close()
            if outcomes is not None:
                await outcomes.close()

    started = time.perf_counter()
    result = asyncio.run(run())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"simulation_{result.experiment.name}"
    stem.with_suffix(".html").write_text(simulation_html(result, currency=args.currency), "utf-8")
    stem.with_suffix(".json").write_bytes(
        orjson.dumps(
            {
                "experiment": result.experiment.name,
                "replayed_orders": result.replayed_orders,
                "out_of_scope": result.out_of_scope,
                "injected_orders": result.injected_orders,
                "truth_incremental_margin_per_order": result.truth,
                "arms": [vars(estimate) for estimate in result.arms],
                "assumptions": result.assumptions,
            },
            option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
        )
    )
    _print(
        f"replayed {result.replayed_orders:,} orders through {result.experiment.name} in "
        f"{time.perf_counter() - started:.1f}s ({result.out_of_scope:,} out of scope)"
    )
    for estimate in result.arms:
        _print(
            f"  {estimate.arm}: expected margin/order {estimate.expected_margin_per_order:.4f}"
            + (
                ""
                if estimate.incremental is None
                else f", vs control {estimate.incremental:+.4f} [{estimate.low}, {estimate.high}]"
            )
        )
    if args.write_events:
        _print(
            f"  wrote exposures and {result.replayed_orders - result.out_of_scope:,} orders "
            f"({result.injected_orders:,} with an injected purchase); injected uplift in margin "
            f"per order (the truth): {result.truth}"
        )
    _print(f"  -> {stem.with_suffix('.html')}")
