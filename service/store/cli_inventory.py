"""``upsell inventory apply FILE``: apply a CSV or Parquet file of inventory deltas.

Kept apart from ``service.cli`` so that the store owns its verbs; ``service.cli`` adds the
parser with ``add_inventory_parser(verbs, settings)``. Heavy imports (polars, the stores) wait
until the verb runs, so ``upsell --help`` stays instant.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from service.settings import Settings

__all__ = ["add_inventory_parser", "cmd_inventory"]

_IDS_SHOWN: Final = 10


def add_inventory_parser(verbs: Any, settings: Settings) -> None:
    """Add ``inventory apply FILE`` to the subparsers ``verbs`` of the ``upsell`` parser.

    ``verbs`` is what ``ArgumentParser.add_subparsers()`` returned (argparse does not export
    its type).
    """
    inventory = verbs.add_parser(
        "inventory",
        help="apply inventory deltas (stock changes between snapshots)",
        description="Inventory deltas change the current snapshot's stock in place. They go "
        "to Redis when UPSELL_REDIS_URL is set, else to the in-process store under "
        f"UPSELL_STATE_DIR ({settings.state_dir}).",
    )
    actions = inventory.add_subparsers(dest="action", required=True, metavar="ACTION")
    apply = actions.add_parser(
        "apply",
        help="validate a file of deltas as one batch and apply it",
        description="Columns: delta_id, sku, node_id, atp (absolute units after the change, "
        "not a difference), safety_stock and inbound (optional; empty keeps the stored value), "
        "as_of (ISO 8601; naive = UTC). The file is refused whole, naming row and column, if "
        "any row is invalid or names a SKU or node the current snapshot does not know. The "
        "delta_id is the idempotence key: applying a file twice changes nothing (duplicate); "
        "a new delta applies only when newer than the stock figure it replaces (else stale), "
        "and one contradicting a stored figure (another id at the same as_of, or its id taken "
        "before with other figures) is refused (conflict).",
    )
    apply.add_argument("file", type=Path, help="deltas as .csv or .parquet")
    inventory.set_defaults(handler=cmd_inventory)


def cmd_inventory(args: argparse.Namespace, settings: Settings) -> None:
    """Run ``upsell inventory apply``; errors propagate to ``service.cli.main`` (exit 2 / 1)."""
    print(asyncio.run(_apply(Path(args.file), settings)), flush=True)


async def _apply(path: Path, settings: Settings) -> str:
    # Deferred imports: polars and the store clients load only when the verb runs.
    from service.store.deltas import DeltaOutcome, read_delta_file  # noqa: PLC0415
    from service.store.factory import open_configured_store  # noqa: PLC0415

    batch = read_delta_file(path, now=datetime.now(UTC))
    store = await open_configured_store(settings)
    try:
        report = await store.apply_deltas(batch)
    finally:
        await store.close()
    summary = (
        f"{path.name}: {len(batch)} deltas to snapshot {report.version}: "
        f"{report.applied} applied, {report.duplicate} duplicate, {report.stale} stale, "
        f"{report.conflict} conflict"
    )
    if report.skipped:
        summary += f", {report.skipped} skipped (a new snapshot flipped in meanwhile)"
    ids = batch.frame.get_column("delta_id").to_list()
    for outcome, why in (
        (DeltaOutcome.STALE, "older than the stored figure"),
        (DeltaOutcome.CONFLICT, "contradict a stored figure; resend under a new id"),
    ):
        named = [ids[i] for i, each in enumerate(report.outcomes) if each is outcome]
        if named:
            more = f" and {len(named) - _IDS_SHOWN} more" if len(named) > _IDS_SHOWN else ""
            summary += f"\n{outcome.value} ({why}): {', '.join(named[:_IDS_SHOWN])}{more}"
    return summary
