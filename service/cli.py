"""The ``upsell`` command line: import, train, snapshot, inventory, policy, evaluate, explain,
events, roi, simulate, keys, serve, demo.

Every verb has ``--help``. Errors the user can fix exit with status 2 and one line that names
the file, row and column (or field) at fault; other failures exit with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from rules.errors import InputError, UpsellError
from rules.policy import CHANNELS
from service.cli_roi import add_roi_parsers
from service.evaluate_cli import add_evaluate_parser
from service.explain.base import WARM_KINDS
from service.settings import Settings, load_settings
from service.store.cli_inventory import add_inventory_parser

if TYPE_CHECKING:
    import polars as pl

    from models.data.schema import TableSpec

SAMPLE_DATASET = "online-retail-sample"


def _sample_path() -> Path:
    return Path(str(resources.files("models").joinpath("sample/online_retail_sample.parquet")))


def _print(message: str) -> None:
    print(message, flush=True)


# --- verbs -------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace, settings: Settings) -> None:
    from models.data.adapters import import_online_retail, import_ta_feng

    importer = {"online-retail": import_online_retail, "ta-feng": import_ta_feng}[args.dataset]
    out_dir: Path = args.out or settings.data_dir / args.dataset
    started = time.perf_counter()
    summary = importer(Path(args.file), out_dir, seed=args.seed)
    dropped = ", ".join(f"{count} {reason}" for reason, count in summary.lines_dropped.items())
    _print(
        f"imported {args.dataset} into {out_dir} in {time.perf_counter() - started:.1f}s: "
        f"{summary.lines_kept}/{summary.lines_read} lines kept ({dropped or 'none dropped'}); "
        f"{summary.orders} orders, {summary.customers} customers, {summary.items} items, "
        f"{summary.nodes} nodes, {summary.inventory_rows} stock rows"
    )


def cmd_train(args: argparse.Namespace, settings: Settings) -> None:
    from models.artifacts import save_artifacts
    from models.calibration import fit_acceptance, save_calibration
    from models.data.contract import find_table_file, read_orders
    from models.data.schema import ITEMS, NODES, ORDER_LINES
    from models.training import train

    source = Path(args.orders)
    orders_path = find_table_file(source, ORDER_LINES) if source.is_dir() else source
    started = time.perf_counter()
    order_lines = read_orders(orders_path)
    # An imported directory also holds the nodes (an order's store gives its region, for
    # regional popularity) and the items (the calibration's upgrade and category generators).
    nodes = _optional_table(source, NODES)
    items = _optional_table(source, ITEMS)
    artifacts = train(
        order_lines,
        factors=args.factors,
        iterations=args.iterations,
        neighbours=args.neighbours,
        seed=args.seed,
        nodes=nodes,
    )
    out_dir: Path = args.out or settings.artifacts_dir
    path = save_artifacts(artifacts, out_dir)
    _print(
        f"trained model {artifacts.version} on {order_lines.height} order lines "
        f"({len(artifacts.item_skus)} items, {len(artifacts.user_ids)} customers) "
        f"in {time.perf_counter() - started:.1f}s -> {path}"
    )
    if args.no_calibration:
        return
    started = time.perf_counter()
    calibration = fit_acceptance(
        order_lines,
        items=items,
        nodes=nodes,
        factors=args.factors,
        iterations=args.iterations,
        seed=args.seed,
    )
    save_calibration(calibration, path)
    _print(
        f"calibrated p(accept) on {calibration.holdout_baskets} held-out baskets "
        f"(base rate {calibration.base_rate:.4f}) in {time.perf_counter() - started:.1f}s"
    )


def _optional_table(source: Path, spec: TableSpec) -> pl.DataFrame | None:
    """``spec``'s table when ``source`` is a directory holding it, else None."""
    from models.data.contract import SUPPORTED_SUFFIXES, find_table_file, read_table

    present = (source / f"{spec.name}{suffix}" for suffix in SUPPORTED_SUFFIXES)
    if not source.is_dir() or not any(path.is_file() for path in present):
        return None
    return read_table(find_table_file(source, spec), spec)


def cmd_snapshot(args: argparse.Namespace, settings: Settings) -> None:
    asyncio.run(_snapshot(args, settings))


async def _snapshot(args: argparse.Namespace, settings: Settings) -> None:
    from models.data.contract import read_snapshot_dir
    from service.store.factory import open_configured_store

    snapshot = read_snapshot_dir(Path(args.dir)) if args.action == "publish" else None
    store = await open_configured_store(settings)
    try:
        if snapshot is not None:
            meta = await store.publish(snapshot)
            _print(
                f"published snapshot {meta.version} ({meta.item_count} items, "
                f"{meta.node_count} nodes, {meta.inventory_rows} stock rows, "
                f"as of {meta.as_of.isoformat()}) to {_store_name(settings)}"
            )
        elif args.action == "rollback":
            meta = await store.rollback()
            _print(f"rolled back: current snapshot is now {meta.version}")
        else:
            current = await store.current_version()
            for meta in await store.versions():
                marker = "*" if meta.version == current else " "
                _print(
                    f"{marker} {meta.version}  as of {meta.as_of.isoformat()}  "
                    f"published {meta.published_at.isoformat()}  {meta.item_count} items"
                )
    finally:
        await store.close()


def _store_name(settings: Settings) -> str:
    return "Redis" if settings.redis_url else f"the in-process store ({settings.state_dir})"


def cmd_policy(args: argparse.Namespace, settings: Settings) -> None:
    from rules.policy import load_policy

    if args.action == "reload":
        _reload_policy(args.url or f"http://{settings.host}:{settings.port}", settings)
        return
    policy = load_policy(Path(args.file))
    _print(
        f"{args.file}: valid policy '{policy.name}' v{policy.version}, hash {policy.content_hash}"
    )


def _reload_policy(base_url: str, settings: Settings) -> None:
    import json
    import urllib.error
    import urllib.request

    credential = settings.client_key or settings.admin_token
    if credential is None:
        raise InputError(
            "UPSELL_CLIENT_KEY: set it to an admin-scoped key of the running service "
            "(or UPSELL_ADMIN_TOKEN to its admin token)"
        )
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/v1/admin/policy/reload",
        method="POST",
        headers={"Authorization": f"Bearer {credential.get_secret_value()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("detail", exc.reason)
        raise InputError(f"policy reload refused ({exc.code}): {detail}") from exc
    except urllib.error.URLError as exc:
        raise UpsellError(f"cannot reach {base_url}: {exc.reason}") from exc
    _print(f"serving policy '{body['name']}' v{body['version']}, hash {body['policy_version']}")


def cmd_explain(args: argparse.Namespace, settings: Settings) -> None:
    from service.explain.warm import warm

    report = asyncio.run(
        warm(
            settings,
            pairs=args.pairs,
            per_anchor=args.per_anchor,
            channels=tuple(dict.fromkeys(args.channel or CHANNELS)),
            locales=tuple(dict.fromkeys(args.locale or [settings.explain_locale])),
            kinds=tuple(dict.fromkeys(args.kind or WARM_KINDS)),
        )
    )
    outcomes = dict(report.outcomes)
    counted = ", ".join(
        f"{outcomes.pop(name, 0)} {name}" for name in ("cached", "generated", "failed")
    )
    others = "".join(f", {count} {name}" for name, count in sorted(outcomes.items()))
    stats = report.stats
    _print(
        f"warmed {report.pairs} pairs x {len(report.channels)} channels "
        f"({', '.join(report.channels)}) x {len(report.locales)} locales "
        f"({', '.join(report.locales)}) = {report.explanations} explanations in "
        f"{report.seconds:.1f}s: {counted}{others}; {stats['llm_calls']} LLM calls, "
        f"{stats['tokens_in']} tokens in, {stats['tokens_out']} out, "
        f"est. ${stats['cost_usd']}; breaker {stats['breaker_state']}"
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from service.app import create_app

    settings = settings.model_copy(
        update={"host": args.host or settings.host, "port": args.port or settings.port}
    )
    workers = getattr(args, "workers", 1)
    if workers > 1:
        _serve_workers(settings, workers)
        return
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
    )


def _serve_workers(settings: Settings, workers: int) -> None:
    """Several worker processes on one socket, each building the app from the environment.

    Workers memory-map the same model artifacts (the page cache holds one copy); their
    metrics meet in PROMETHEUS_MULTIPROC_DIR, a fresh directory unless one is given.
    """
    import os
    import tempfile

    import uvicorn

    from service.api_keys import load_key_ring
    from service.metrics import MULTIPROC_ENV

    load_key_ring(settings.api_keys_file)  # a bad keys file fails here, once, not per worker
    with tempfile.TemporaryDirectory(prefix="upsell-metrics-") as scratch:
        if not os.environ.get(MULTIPROC_ENV):
            os.environ[MULTIPROC_ENV] = scratch  # read by prometheus_client in each worker
        uvicorn.run(
            "service.app:app_from_environment",
            factory=True,
            workers=workers,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
        )


def cmd_demo(args: argparse.Namespace, settings: Settings) -> None:
    data_dir = settings.data_dir / SAMPLE_DATASET
    for verb in (
        ["import", "online-retail", str(_sample_path()), "--out", str(data_dir)],
        ["train", "--orders", str(data_dir)],
        ["snapshot", "publish", str(data_dir)],
    ):
        _print(f"$ upsell {' '.join(verb)}")
        run(verb, settings)
    if args.no_serve:
        return
    _print(f"serving the demo on http://{args.host or settings.host}:{args.port or settings.port}")
    _print("the demo runs with UPSELL_AUTH=off: recommendations need no API key")
    args.workers = 1
    cmd_serve(args, settings.model_copy(update={"auth": "off"}))


def cmd_keys(args: argparse.Namespace, settings: Settings) -> None:
    from service.api_keys import new_key

    scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
    raw, entry = new_key(name=args.name, scopes=scopes)
    print(
        f"upsell: the new key for {args.name!r} is printed once, on stdout; keep it secret. "
        "Add the entry below to UPSELL_API_KEYS_FILE (it holds the key's hash only):",
        file=sys.stderr,
    )
    print(entry.removeprefix("keys:\n").rstrip(), file=sys.stderr)
    print(raw, flush=True)


# --- parser ------------------------------------------------------------------------------


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _locale(value: str) -> str:
    if not re.fullmatch(r"[a-z]{2}(-[A-Z]{2})?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a locale such as en or de-DE")
    return value


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upsell",
        description="Margin-aware upsell and cross-sell recommendations. "
        "Configuration comes from UPSELL_* environment variables (see the README).",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    imp = verbs.add_parser(
        "import",
        help="turn a public dataset into the data contract (orders, items, nodes, inventory)",
        description="Read a public retail dataset and write contract files into a directory. "
        "ERP fields the data lacks (nodes, stock) are generated deterministically from --seed.",
    )
    imp.add_argument("dataset", choices=["online-retail", "ta-feng"])
    imp.add_argument(
        "file", help="the dataset file (.parquet for online-retail, .csv.zip for ta-feng)"
    )
    imp.add_argument(
        "--out", type=Path, help=f"output directory (default {settings.data_dir}/DATASET)"
    )
    imp.add_argument("--seed", type=int, default=7, help="seed for the generated ERP fields")
    imp.set_defaults(handler=cmd_import)

    trn = verbs.add_parser(
        "train",
        help="fit ALS, item-item neighbours and popularity from order lines",
        description="Fit the candidate models on contract order lines and save versioned "
        "artifacts (npy + JSON) that the service loads at start.",
    )
    trn.add_argument(
        "--orders",
        default=str(settings.data_dir / "online-retail"),
        help="orders file, or a directory holding orders.csv/orders.parquet (default %(default)s)",
    )
    trn.add_argument("--out", type=Path, help=f"artifact root (default {settings.artifacts_dir})")
    trn.add_argument("--factors", type=int, default=64)
    trn.add_argument("--iterations", type=int, default=15)
    trn.add_argument("--neighbours", type=int, default=50)
    trn.add_argument("--seed", type=int, default=42)
    trn.add_argument(
        "--no-calibration",
        action="store_true",
        help="skip fitting p(accept) on held-out orders (ranking then uses raw relevance)",
    )
    trn.set_defaults(handler=cmd_train)

    snap = verbs.add_parser(
        "snapshot",
        help="publish, list or roll back ERP snapshots",
        description="Snapshots go to Redis when UPSELL_REDIS_URL is set, else to the "
        "in-process store persisted under UPSELL_STATE_DIR.",
    )
    snap_actions = snap.add_subparsers(dest="action", required=True, metavar="ACTION")
    pub = snap_actions.add_parser(
        "publish",
        help="validate a directory of items/nodes/inventory files and publish it",
        description="Validate items, nodes and inventory (CSV or Parquet) as one batch; a bad "
        "file is refused whole, naming file, row and column, and the current version keeps "
        "serving. Then write the new version and flip the pointer atomically.",
    )
    pub.add_argument("dir", help="directory with items, nodes and inventory files")
    snap_actions.add_parser("rollback", help="point back at the previous retained version")
    snap_actions.add_parser("list", help="list retained versions; * marks the current one")
    snap.set_defaults(handler=cmd_snapshot)
    add_inventory_parser(verbs, settings)
    add_roi_parsers(verbs, settings)

    pol = verbs.add_parser("policy", help="policy files", description="Policy file tools.")
    pol_actions = pol.add_subparsers(dest="action", required=True, metavar="ACTION")
    chk = pol_actions.add_parser("check", help="validate a policy file offline")
    chk.add_argument("file")
    rld = pol_actions.add_parser(
        "reload",
        help="make a running service re-read its policy file (needs UPSELL_ADMIN_TOKEN)",
        description="POST /v1/admin/policy/reload: the service validates UPSELL_POLICY_PATH and "
        "serves it; an invalid file is refused and the old policy keeps serving.",
    )
    rld.add_argument("--url", help="service base URL (default http://UPSELL_HOST:UPSELL_PORT)")
    pol.set_defaults(handler=cmd_policy)
    add_evaluate_parser(verbs, settings)

    exp = verbs.add_parser("explain", help="LLM explanations", description="LLM explanation tools.")
    exp_actions = exp.add_subparsers(dest="action", required=True, metavar="ACTION")
    wrm = exp_actions.add_parser(
        "warm",
        help="pre-generate LLM explanations for the top pairs into the Redis cache",
        description="Generate LLM text for the pairs most requests ask for (the model's most "
        "popular items on their own, then as anchors with their top neighbours and bundle "
        "partners) for each channel and locale, and store it in the explanation cache in "
        "Redis, where every replica finds it. Needs UPSELL_ANTHROPIC_API_KEY, UPSELL_REDIS_URL, "
        "a trained model and a published snapshot. Text already cached is not paid for again.",
    )
    wrm.add_argument(
        "--pairs", type=_positive, default=500, help="pairs at most (default %(default)s)"
    )
    wrm.add_argument(
        "--per-anchor",
        type=_positive,
        default=5,
        help="partners per anchor and kind, and popular items on their own (default %(default)s)",
    )
    wrm.add_argument(
        "--channel",
        action="append",
        choices=CHANNELS,
        help="a channel to warm (repeatable; default all four)",
    )
    wrm.add_argument(
        "--locale",
        action="append",
        type=_locale,
        help=f"a locale to warm, e.g. de (repeatable; default {settings.explain_locale})",
    )
    wrm.add_argument(
        "--kind",
        action="append",
        choices=WARM_KINDS,
        help="a kind of pair to warm (repeatable; default all)",
    )
    exp.set_defaults(handler=cmd_explain)

    for name, handler, text in (
        ("serve", cmd_serve, "run the HTTP API"),
        ("demo", cmd_demo, "import the bundled sample, train, publish, then serve"),
    ):
        verb = verbs.add_parser(name, help=text, description=text)
        verb.add_argument("--host", help=f"bind address (default {settings.host})")
        verb.add_argument("--port", type=int, help=f"port (default {settings.port})")
        if name == "demo":
            verb.add_argument("--no-serve", action="store_true", help="stop before serving")
        else:
            verb.add_argument(
                "--workers",
                type=_positive,
                default=1,
                help="worker processes sharing the socket and the memory-mapped model "
                "(default 1; see docs/operations.md)",
            )
        verb.set_defaults(handler=handler)

    keys = verbs.add_parser(
        "keys", help="API keys", description="API keys for UPSELL_API_KEYS_FILE."
    )
    keys_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = keys_actions.add_parser(
        "new",
        help="make a key: the key on stdout (once), its keys-file entry on stderr",
        description="Print a fresh random key once on stdout, and on stderr the YAML entry "
        "(its sha256, never the key) to add to UPSELL_API_KEYS_FILE.",
    )
    new.add_argument("--name", required=True, help="the caller's name, shown in logs and metrics")
    new.add_argument(
        "--scopes",
        required=True,
        help="comma-separated: cart, pdp, pos, contact_center, events, admin",
    )
    keys.set_defaults(handler=cmd_keys)
    return parser


def run(argv: Sequence[str], settings: Settings) -> None:
    args = build_parser(settings).parse_args(list(argv))
    args.handler(args, settings)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings()
    from service.logging import configure_logging

    configure_logging(level=settings.log_level, json=settings.log_json)
    try:
        run(sys.argv[1:] if argv is None else argv, settings)
    except InputError as exc:
        print(f"upsell: error: {exc}", file=sys.stderr)
        return 2
    except UpsellError as exc:
        print(f"upsell: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
