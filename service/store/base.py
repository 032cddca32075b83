"""The snapshot store protocol and the values it moves.

A snapshot is one validated, versioned copy of the ERP tables (item master, nodes,
inventory). Publishing writes every key of the new version first, then flips one pointer;
readers only ever follow the pointer, so they see the old version or the new one, never a mix.

Between snapshots, inventory deltas (``service.store.deltas``) change stock cells of the
current version in place, each cell keeping the ``as_of`` of its figure, so that a reader can
refuse figures that are too old (``rules.staleness``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np
import numpy.typing as npt
import polars as pl

from models.data.schema import SnapshotData
from service.store.deltas import DeltaBatch, DeltaOutcome

__all__ = [
    "DeltaReport",
    "SnapshotData",
    "SnapshotMaster",
    "SnapshotMeta",
    "SnapshotStore",
    "StockMatrix",
]


@dataclass(frozen=True)
class SnapshotMeta:
    """What is known about a published version without loading it."""

    version: str
    as_of: datetime
    published_at: datetime
    item_count: int
    node_count: int
    inventory_rows: int


@dataclass(frozen=True)
class SnapshotMaster:
    """The part of a snapshot each replica mirrors in process: items and nodes (no stock)."""

    meta: SnapshotMeta
    items: pl.DataFrame
    nodes: pl.DataFrame


@dataclass(frozen=True, eq=False)
class StockFigures:
    """The figures of a stock read, each of shape (items, nodes), without the SKUs and node
    ids they are of: what the request path needs (``StockMatrix`` has them too)."""

    atp: npt.NDArray[np.int64]
    safety_stock: npt.NDArray[np.int64]
    inbound: npt.NDArray[np.int64]
    ranged: npt.NDArray[np.bool_]
    as_of_us: npt.NDArray[np.int64]


@dataclass(frozen=True)
class StockMatrix:
    """Stock for some SKUs at some nodes, as dense arrays of shape (len(skus), len(nodes)).

    ``ranged`` is False where the SKU has no inventory row at the node; there ``atp``,
    ``safety_stock`` and ``inbound`` are 0. ``as_of_us`` is when each figure was true, in
    microseconds since the Unix epoch (UTC): the snapshot row's ``as_of`` (the snapshot's when
    the row has none) or that of the delta that last set the cell; for a cell that is not
    ranged it is the snapshot's (that is when "not ranged here" was true).
    """

    skus: tuple[str, ...]
    node_ids: tuple[str, ...]
    atp: npt.NDArray[np.int64]
    safety_stock: npt.NDArray[np.int64]
    inbound: npt.NDArray[np.int64]
    ranged: npt.NDArray[np.bool_]
    as_of_us: npt.NDArray[np.int64]


@dataclass(frozen=True)
class DeltaReport:
    """What ``apply_deltas`` did: one outcome per delta, in the batch's row order."""

    version: str  # the snapshot version whose stock the deltas were applied to
    outcomes: tuple[DeltaOutcome, ...]

    def count(self, outcome: DeltaOutcome) -> int:
        return sum(1 for each in self.outcomes if each is outcome)

    @property
    def applied(self) -> int:
        return self.count(DeltaOutcome.APPLIED)

    @property
    def duplicate(self) -> int:
        return self.count(DeltaOutcome.DUPLICATE)

    @property
    def stale(self) -> int:
        return self.count(DeltaOutcome.STALE)

    @property
    def conflict(self) -> int:
        return self.count(DeltaOutcome.CONFLICT)

    @property
    def skipped(self) -> int:
        return self.count(DeltaOutcome.SKIPPED)


class SnapshotStore(Protocol):
    """Publish, read and roll back snapshots. Every method may raise ``StoreError``."""

    async def publish(self, snapshot: SnapshotData) -> SnapshotMeta:
        """Write a new version whole, then point ``current`` at it; keep older versions."""
        ...

    async def current_version(self) -> str | None:
        """The version readers should use, or None when nothing was ever published."""
        ...

    async def versions(self) -> list[SnapshotMeta]:
        """Retained versions, newest publish first."""
        ...

    async def rollback(self) -> SnapshotMeta:
        """Point ``current`` at the version published before it; SnapshotNotFoundError if none."""
        ...

    async def load_master(self, version: str) -> SnapshotMaster:
        """Items and nodes of a version, for mirroring in process."""
        ...

    async def read_stock(
        self, version: str, skus: Sequence[str], node_ids: Sequence[str]
    ) -> StockMatrix:
        """Stock of ``skus`` at ``node_ids`` in one round trip."""
        ...

    async def apply_deltas(self, batch: DeltaBatch) -> DeltaReport:
        """Apply inventory deltas to the current version's stock; see ``service.store.deltas``.

        The whole batch is checked against the current snapshot first (ContractError naming
        the source row for an unknown SKU or node: nothing is applied); SnapshotNotFoundError
        when nothing is published. A delta id taken before is a duplicate (or a conflict,
        with other figures); a new one applies only when newer than its cell's figure by
        (as_of, delta_id).
        """
        ...

    async def ping(self) -> bool:
        """True when the backend answers."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
