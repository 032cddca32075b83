"""An in-process copy of the serving version's stock, kept current from Redis's change streams.

Off unless ``UPSELL_STOCK_MIRROR=on`` (single Redis only). Without it, every request reads its
candidates' stock from Redis in one round trip (``RedisSnapshotStore.read_stock``): on the
bundled sample about half a millisecond of the worker's CPU and as much again of Redis's, the
largest single cost of a recommendation on a loaded box (benchmarks/README.md). With it, each
worker holds every cell of the version it serves in arrays and a request reads them there:
the same figures, with no round trip.

How it stays exact
    Every delta applied to a stock hash also appends the new cell to that hash's change
    stream, in the same script (``service.store.redis_store``): what a stream says is what
    the hash holds, in the order it came to hold it. Loading reads each stream's last entry
    id, then scans each hash in small steps; following reads each stream from those ids (one
    blocking XREAD for every node) and overwrites the cells it names. A cell the scan read
    before a change is overwritten by the change's entry, one read after it is overwritten
    with the same figure: the copy is the hashes' content as of the last reply, whatever
    order deltas arrived in, retries and replays at a flip included (they write through the
    same script). The copy is used only once its first follow after the load answered.

How fresh it is, and when it is not used
    A request uses the copy only while it is of the version the request serves and Redis
    answered the follower within ``UPSELL_STOCK_MIRROR_MAX_LAG_SECONDS`` (a blocking read
    returns at least every ``block_ms``, news or not). Otherwise the request reads Redis as
    it would without a mirror: a new version not loaded yet, a follower that lost Redis (the
    read then fails as before, and the policy's ``stock.on_unavailable`` applies; under
    ``last_known`` the copy is what this replica knew last). An applied delta reaches the
    copy a round trip after Redis has it: a request that arrives in between still sees the
    figure before it, as it would had it read Redis a moment earlier. Staleness of the
    figures themselves (``stock.max_age_seconds``) is judged on their ``as_of`` as always.

Memory: 33 bytes a cell (four 8-byte figures and a flag): 50 MiB a worker for 100,000 SKUs
at 16 nodes. Loading those 1.6 million cells took 2.3-2.8 s on the project box, in 2,000-cell
HSCAN steps: the event loop's longest stall was 42 ms (p99 3.3 ms; 272 ms in a process whose
compiled parser was not warm yet), where one read of every hash had stalled it for 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import structlog

from rules.errors import NotReadyError, StoreError
from rules.staleness import epoch_us
from service.mirror import ServingSnapshot, SnapshotMirror
from service.store.base import StockFigures, StockMatrix
from service.store.redis_store import RedisSnapshotStore
from service.store.stock_cells import parse_stock_cells

__all__ = ["StockMirror"]

log = structlog.get_logger(__name__)

_SEPARATOR: Final = b"\x00"
_RETRY_SECONDS: Final = 0.5  # after a failed load or read, before trying again
_CHANGES_PER_READ: Final = 1_000  # change stream entries a node per follower read
_ATP, _SAFETY, _INBOUND, _AS_OF = range(4)


@dataclass(eq=False)
class _Copy:
    """One version's cells: figures (items, nodes, 4: atp, safety stock, inbound, as_of_us)
    and ranged (items, nodes), rows by catalog position, columns by node position."""

    serving: ServingSnapshot
    figures: npt.NDArray[np.int64]
    ranged: npt.NDArray[np.bool_]
    last_change: list[bytes]  # per node: the last change stream entry applied
    answered_at: float  # monotonic: when Redis last answered for this copy
    following: bool = True  # False once a read failed: reload before trusting it again

    @property
    def version(self) -> str:
        return self.serving.meta.version

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(self.serving.nodes.node_ids)


class StockMirror:
    """``read(serving, catalog_pos, node_positions, skus)``: the stock arrays when the copy
    can vouch for them, else None (read Redis). ``start()`` runs the follower task."""

    def __init__(
        self,
        *,
        store: RedisSnapshotStore,
        snapshots: SnapshotMirror,
        max_lag_seconds: float = 1.0,
        block_ms: int = 250,
        cells_per_scan: int = 2_000,
    ) -> None:
        if not store.follows_stock_changes:
            raise ValueError("a stock mirror needs a single Redis (not Redis Cluster)")
        if max_lag_seconds * 1000 <= block_ms:
            raise ValueError(
                f"max_lag_seconds ({max_lag_seconds}) must exceed the blocking read "
                f"({block_ms} ms): an idle follower answers once per block"
            )
        self._store = store
        self._snapshots = snapshots
        self._max_lag = max_lag_seconds
        self._block_ms = block_ms
        self._cells_per_scan = cells_per_scan
        self._copy: _Copy | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.loads = 0  # copies loaded (a metric of churn, and what tests wait on)
        self.changes_applied = 0  # cells overwritten from the change streams

    @property
    def version(self) -> str | None:
        """The version of the copy held (fresh or not)."""
        return self._copy.version if self._copy is not None else None

    def is_fresh(self, version: str) -> bool:
        copy = self._copy
        return (
            copy is not None
            and copy.version == version
            and copy.following
            and time.monotonic() - copy.answered_at <= self._max_lag
        )

    def read(
        self,
        version: str,
        catalog_pos: npt.NDArray[np.int64],
        node_positions: npt.NDArray[np.int64],
        skus: tuple[str, ...],
        *,
        stale_ok: bool = False,
    ) -> StockMatrix | None:
        """Stock of the catalog positions at the node positions, as ``read_stock`` answers it;
        None unless the copy is of ``version`` and fresh (``stale_ok``: of ``version`` at all,
        for the last-known fallback)."""
        whole = self.whole_figures(version, stale_ok=stale_ok)
        copy = self._copy
        if whole is None or copy is None:
            return None
        rows = catalog_pos[:, np.newaxis]
        columns = node_positions[np.newaxis, :]
        node_ids = copy.node_ids
        return StockMatrix(
            skus=skus,
            node_ids=tuple(node_ids[column] for column in node_positions.tolist()),
            atp=whole.atp[rows, columns],
            safety_stock=whole.safety_stock[rows, columns],
            inbound=whole.inbound[rows, columns],
            ranged=whole.ranged[rows, columns],
            as_of_us=whole.as_of_us[rows, columns],
        )

    def whole_figures(self, version: str, *, stale_ok: bool = False) -> StockFigures | None:
        """Every cell of the copy (rows: catalog positions, columns: node positions), as views
        of it, under ``read``'s conditions: for a request that picks its cells as it judges
        them (``rules.staleness.trusted_stock_units``), without gathering them first. Valid
        until the copy is replaced, which the event loop does between requests."""
        copy = self._copy
        if copy is None or copy.version != version:
            return None
        if not stale_ok and not self.is_fresh(version):
            return None
        figures = copy.figures
        return StockFigures(
            atp=figures[:, :, _ATP],
            safety_stock=figures[:, :, _SAFETY],
            inbound=figures[:, :, _INBOUND],
            ranged=copy.ranged,
            as_of_us=figures[:, :, _AS_OF],
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stock-mirror")

    async def close(self) -> None:
        """Stop the follower. A cancellation that lands while redis-py's socket timeout fires
        can come out as a timeout error, which the loop would survive: so the loop also
        checks ``_closing``, and the cancel is repeated until the task is done."""
        self._closing = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout=1.0)

    async def _run(self) -> None:
        failing = False
        while not self._closing:
            # Follows the pointer between requests too, so an idle worker's copy is of the
            # version its next request serves.
            with contextlib.suppress(NotReadyError):
                await self._snapshots.current()
            serving = self._snapshots.loaded
            if serving is None:
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            copy = self._copy
            try:
                if copy is None or copy.version != serving.meta.version or not copy.following:
                    self._copy = await self._load(serving)
                else:
                    await self._follow(copy)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the follower must outlive any one failure
                current = asyncio.current_task()
                if self._closing or (current is not None and current.cancelling()):
                    raise asyncio.CancelledError from exc
                if copy is not None:
                    copy.following = False
                if not failing:
                    log.warning(
                        "stock_mirror_failing",
                        error=f"{type(exc).__name__}: {str(exc)[:400]}",
                        effect="requests read stock from Redis until the mirror reloads",
                    )
                failing = True
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            if failing:
                log.info("stock_mirror_back", snapshot_version=self.version)
                failing = False

    async def _load(self, serving: ServingSnapshot) -> _Copy:
        """Every cell of the serving version: the change streams' last ids first, then each
        node's hash in small HSCAN steps (the event loop serves requests between them; they
        read Redis meanwhile), then the follower replays what changed since those ids."""
        version = serving.meta.version
        node_ids = tuple(serving.nodes.node_ids)
        started = time.perf_counter()
        last_change = await self._store.stock_change_ids(version, node_ids)
        base_as_of_us = epoch_us(serving.meta.as_of)
        figures = np.zeros((len(serving.catalog), len(node_ids), 4), np.int64)
        figures[:, :, _AS_OF] = base_as_of_us
        ranged = np.zeros((len(serving.catalog), len(node_ids)), np.bool_)
        copy = _Copy(
            serving=serving,
            figures=figures,
            ranged=ranged,
            last_change=last_change,
            answered_at=0.0,  # not fresh before the load is whole (and followed once)
        )
        for column, node_id in enumerate(node_ids):
            cursor = 0
            while True:
                cursor, cells = await self._store.scan_stock_cells(
                    version, node_id, cursor, count=self._cells_per_scan
                )
                _overwrite(copy, column, list(cells), list(cells.values()))
                if cursor == 0:
                    break
        self.loads += 1
        log.info(
            "stock_mirror_loaded",
            snapshot_version=version,
            cells=int(ranged.sum()),
            nodes=len(node_ids),
            seconds=round(time.perf_counter() - started, 3),
        )
        return copy

    async def _follow(self, copy: _Copy) -> None:
        news = await self._store.stock_changes(
            copy.version,
            copy.node_ids,
            copy.last_change,
            block_ms=self._block_ms,
            count=_CHANGES_PER_READ,
        )
        for column, last_change, payloads in news:
            for payload in payloads:
                parts = payload.split(_SEPARATOR)
                if len(parts) % 2:
                    raise StoreError(
                        f"stock change of {copy.version} at node {copy.node_ids[column]!r} "
                        f"has an odd number of fields ({len(parts)})"
                    )
                _overwrite(copy, column, parts[0::2], parts[1::2])
                self.changes_applied += len(parts) // 2
            copy.last_change[column] = last_change
        # A full reply may have more behind it: the copy vouches for "now" only once a
        # reply held everything there was (after a load, the scan's changes replayed).
        if all(len(payloads) < _CHANGES_PER_READ for _, _, payloads in news):
            copy.answered_at = time.monotonic()


def _overwrite(copy: _Copy, column: int, skus: list[bytes], cells: list[bytes]) -> None:
    """Cells as stored (``atp,ss,inbound[,as_of_us[,delta_id]]``) into the copy's column;
    SKUs the version's item master lacks are not the request path's (the store keeps them)."""
    if not skus:
        return
    parsed = parse_stock_cells(
        _SEPARATOR.join(cells) + _SEPARATOR,
        len(cells),
        base_as_of_us=epoch_us(copy.serving.meta.as_of),
    )
    if parsed is None:
        raise StoreError(
            f"stock cells of {copy.version} at node {copy.node_ids[column]!r} do not decode"
        )
    values, ranged = parsed
    positions = copy.serving.catalog.positions(sku.decode("utf-8", "replace") for sku in skus)
    known = positions >= 0
    copy.figures[positions[known], column] = values[known]
    copy.ranged[positions[known], column] = ranged[known]
