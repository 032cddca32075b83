"""The in-process snapshot store: the embedded default when no Redis URL is configured.

Without a ``state_dir`` everything lives in this process and dies with it. With one, every
published version is written to disk so that a CLI process can publish and a separate
server process picks the new version up::

    <state_dir>/snapshots/
        CURRENT                 the version readers use (one line), replaced atomically
        <version>/
            meta.json           SnapshotMeta as JSON (service.store.codec)
            items.parquet
            nodes.parquet
            inventory.parquet
        .tmp-<random>/          a version being written; renamed to <version>/ once whole
        deltas/
            <arrival>-<uuid>.parquet  one applied batch of inventory deltas (the delta log)

A version directory appears whole (by rename) or not at all, and ``CURRENT`` only ever names
a whole version. History order is ``published_at`` order, newest first; a republish of the
same content rewrites ``meta.json`` with a new ``published_at`` and so moves to the front.
A version's files never change: loaded versions are cached in memory, and
``current_version()`` re-reads ``CURRENT`` only when its inode or mtime changed.

Inventory deltas (``service.store.deltas``) go to a log shared by every version: a list in
memory, or ``deltas/`` files written by rename, so that a CLI process applies and a server
process sees them at its next stock read (one ``stat`` of the directory per read). Each
loaded version merges every batch of the log it has not merged yet before answering; since a
delta only applies over an older figure by (as_of, delta_id), merging is idempotent and
order-free, and a version published or rolled back to after a delta arrived gets it too when
the delta is at least as new as its rows. Batches no retained version could still take
(every delta older than the oldest retained version's ``as_of``) are pruned with the
versions, and past 64 batches the log is folded into one, so that a read checks a handful of
names at most.

The ledger of delta ids is the log itself: an id is known while a logged batch holds it, and
only deltas whose id is new are logged. With a state dir, two processes applying the same id
at the same moment may both log it; the cell order then makes the second a duplicate.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import repeat
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
import polars as pl
import structlog

from models.data.schema import SnapshotData
from rules.errors import SnapshotNotFoundError, StoreError
from rules.staleness import epoch_us
from service.store.base import DeltaReport, SnapshotMaster, SnapshotMeta, StockMatrix
from service.store.codec import (
    build_meta,
    check_publishable,
    decode_frame,
    decode_meta,
    encode_frame,
    encode_meta,
    previous_version,
    snapshot_version,
    versions_to_prune,
)
from service.store.deltas import DeltaBatch, DeltaOutcome, check_delta_references

__all__ = ["InProcessStore"]

_log = structlog.get_logger(__name__)

_POINTER_FILE: Final = "CURRENT"
_META_FILE: Final = "meta.json"
_TABLE_FILES: Final = ("items", "nodes", "inventory")
_TMP_PREFIX: Final = ".tmp-"
_STALE_TMP_SECONDS: Final = 3600.0  # a publish older than this that left its temp dir crashed
_ONE_TICK: Final = timedelta(microseconds=1)
_DELTAS_DIR: Final = "deltas"
_DELTAS_SUFFIX: Final = ".parquet"
# A directory changed this recently may change again within the same mtime tick unseen by
# its stamp; until it is this old, every look lists it (git's "racy" entries, the same idea).
_RACY_NS: Final = 1_000_000_000
_DELTA_BATCHES_BEFORE_COMPACTION: Final = 64


_CODE_BITS: Final = 32  # cell key = node code << 32 | SKU code: stable as codes are added
_NEVER: Final = np.iinfo(np.int64).min  # as_of of a cell that does not exist yet
_ROW_ID: Final = ""  # the delta id of a snapshot row's figure: before every real id


class _StockIndex:
    """A version's stock as sorted integer cell keys and parallel value arrays.

    One ``searchsorted`` answers a whole (skus x nodes) request, with no per-cell Python.
    Deltas change values in place (the event loop is the only writer, and ``read`` does not
    await, so a read never sees half a batch); a delta that ranges a new cell rebuilds the
    arrays, which is rare. ``delta_ids`` holds, per cell, the id of the delta that set its
    figure ("" for a snapshot row): with ``as_of_us`` it is the cell's place in the
    (as_of, delta_id) order of ``service.store.deltas``.
    """

    def __init__(
        self,
        *,
        sku_codes: dict[str, int],
        node_codes: dict[str, int],
        cell_keys: npt.NDArray[np.int64],
        values: dict[str, npt.NDArray[np.int64]],
        delta_ids: npt.NDArray[np.object_],
        base_as_of_us: int,
    ) -> None:
        self.sku_codes = sku_codes
        self.node_codes = node_codes
        self.cell_keys = cell_keys  # sorted ascending
        self.values = values  # atp, safety_stock, inbound, as_of_us; aligned with cell_keys
        self.delta_ids = delta_ids  # str per cell, aligned with cell_keys
        self.base_as_of_us = base_as_of_us

    @classmethod
    def build(cls, inventory: pl.DataFrame, *, base_as_of_us: int) -> _StockIndex:
        skus = inventory.get_column("sku").unique().sort()
        nodes = inventory.get_column("node_id").unique().sort()
        sku_code = skus.search_sorted(inventory.get_column("sku")).to_numpy().astype(np.int64)
        node_code = nodes.search_sorted(inventory.get_column("node_id")).to_numpy()
        cell_keys = (node_code.astype(np.int64) << _CODE_BITS) | sku_code
        order = np.argsort(cell_keys, kind="stable")
        row_as_of = (
            inventory.get_column("as_of").dt.epoch("us").fill_null(base_as_of_us)
            if "as_of" in inventory.columns
            else pl.repeat(base_as_of_us, inventory.height, eager=True, dtype=pl.Int64)
        )
        columns = {
            "atp": inventory.get_column("atp"),
            "safety_stock": inventory.get_column("safety_stock"),
            "inbound": inventory.get_column("inbound"),
            "as_of_us": row_as_of,
        }
        return cls(
            sku_codes={sku: code for code, sku in enumerate(skus.to_list())},
            node_codes={node: code for code, node in enumerate(nodes.to_list())},
            cell_keys=np.ascontiguousarray(cell_keys[order]),
            values={
                name: np.ascontiguousarray(column.to_numpy().astype(np.int64, copy=False)[order])
                for name, column in columns.items()
            },
            delta_ids=np.full(inventory.height, _ROW_ID, dtype=object),
            base_as_of_us=base_as_of_us,
        )

    def read(self, skus: Sequence[str], node_ids: Sequence[str]) -> StockMatrix:
        shape = (len(skus), len(node_ids))
        # map() over dict.get runs in C: a generator expression was a Python frame per SKU.
        sku_code = np.fromiter(map(self.sku_codes.get, skus, repeat(-1)), np.int64, len(skus))
        node_code = np.fromiter(
            map(self.node_codes.get, node_ids, repeat(-1)), np.int64, len(node_ids)
        )
        known = (sku_code[:, None] >= 0) & (node_code[None, :] >= 0)
        if not self.cell_keys.size or not known.any():
            return StockMatrix(
                skus=tuple(skus),
                node_ids=tuple(node_ids),
                atp=np.zeros(shape, np.int64),
                safety_stock=np.zeros(shape, np.int64),
                inbound=np.zeros(shape, np.int64),
                ranged=np.zeros(shape, np.bool_),
                as_of_us=np.full(shape, self.base_as_of_us, np.int64),
            )
        wanted = (node_code[None, :] << _CODE_BITS) | sku_code[:, None]
        position = np.minimum(np.searchsorted(self.cell_keys, wanted), self.cell_keys.size - 1)
        ranged = known & (self.cell_keys[position] == wanted)
        values = self.values
        return StockMatrix(
            skus=tuple(skus),
            node_ids=tuple(node_ids),
            atp=np.where(ranged, values["atp"][position], 0),
            safety_stock=np.where(ranged, values["safety_stock"][position], 0),
            inbound=np.where(ranged, values["inbound"][position], 0),
            ranged=ranged,
            as_of_us=np.where(ranged, values["as_of_us"][position], self.base_as_of_us),
        )

    def apply(self, deltas: pl.DataFrame) -> npt.NDArray[np.int8]:
        """Apply deltas (log columns, any order); per delta an outcome code (_OUTCOME_CODES).

        Each delta is placed against its cell as it was before this batch, by (as_of,
        delta_id) (``service.store.deltas``); a batch never holds two deltas for one cell at
        one as_of, so the newest applied delta of each cell is its figure now, and an empty
        safety stock / inbound takes the value of the latest applied delta that gave one,
        else the cell's, else 0.
        """
        if not deltas.height:
            return np.empty(0, np.int8)
        for name, codes in (("sku", self.sku_codes), ("node_id", self.node_codes)):
            for value in deltas.get_column(name).unique().to_list():
                codes.setdefault(value, len(codes))
        sku_code = np.fromiter(
            (self.sku_codes[s] for s in deltas.get_column("sku").to_list()), np.int64
        )
        node_code = np.fromiter(
            (self.node_codes[n] for n in deltas.get_column("node_id").to_list()), np.int64
        )
        keys = (node_code << _CODE_BITS) | sku_code
        size = self.cell_keys.size
        position = np.searchsorted(self.cell_keys, keys)
        exists = position < size
        exists[exists] = self.cell_keys[position[exists]] == keys[exists]
        safe_position = np.where(exists, position, 0)
        current_as_of = np.where(
            exists, self.values["as_of_us"][safe_position] if size else _NEVER, _NEVER
        )
        current_id = np.where(exists, self.delta_ids[safe_position] if size else _ROW_ID, _ROW_ID)
        delta_as_of = deltas.get_column("as_of_us").to_numpy()
        delta_id = deltas.get_column("delta_id").to_numpy().astype(object)
        same_instant = delta_as_of == current_as_of
        outcome = np.select(
            [
                (delta_as_of > current_as_of) | (same_instant & (delta_id > current_id)),
                same_instant & (delta_id == current_id),
                same_instant,
            ],
            [
                _OUTCOME_CODES[DeltaOutcome.APPLIED],
                _OUTCOME_CODES[DeltaOutcome.DUPLICATE],
                _OUTCOME_CODES[DeltaOutcome.CONFLICT],
            ],
            _OUTCOME_CODES[DeltaOutcome.STALE],
        ).astype(np.int8)
        applied = outcome == _OUTCOME_CODES[DeltaOutcome.APPLIED]
        if not applied.any():
            return outcome

        def current(name: str) -> npt.NDArray[np.int64]:
            stored = self.values[name][safe_position] if size else 0
            return np.where(exists, stored, 0)

        latest = (
            deltas.select("delta_id", "atp", "safety_stock", "inbound", "as_of_us")
            .with_columns(
                key=pl.Series(keys),
                exists=pl.Series(exists),
                position=pl.Series(position),
                current_safety_stock=pl.Series(current("safety_stock")),
                current_inbound=pl.Series(current("inbound")),
            )
            .filter(pl.Series(applied))
            .sort("key", "as_of_us")
            .group_by("key", maintain_order=True)
            .agg(
                pl.col("delta_id").last(),
                pl.col("atp").last(),
                pl.col("as_of_us").last(),
                pl.col("safety_stock").drop_nulls().last(),
                pl.col("inbound").drop_nulls().last(),
                pl.col("current_safety_stock").first(),
                pl.col("current_inbound").first(),
                pl.col("exists").first(),
                pl.col("position").first(),
            )
            .with_columns(
                pl.col("safety_stock").fill_null(pl.col("current_safety_stock")),
                pl.col("inbound").fill_null(pl.col("current_inbound")),
            )
        )
        names = ("atp", "safety_stock", "inbound", "as_of_us")
        updates = latest.filter(pl.col("exists"))
        if updates.height:
            at = updates.get_column("position").to_numpy()
            for name in names:
                self.values[name][at] = updates.get_column(name).to_numpy()
            self.delta_ids[at] = updates.get_column("delta_id").to_numpy()
        additions = latest.filter(~pl.col("exists"))
        if additions.height:
            cell_keys = np.concatenate([self.cell_keys, additions.get_column("key").to_numpy()])
            order = np.argsort(cell_keys, kind="stable")
            self.cell_keys = np.ascontiguousarray(cell_keys[order])
            self.values = {
                name: np.ascontiguousarray(
                    np.concatenate([self.values[name], additions.get_column(name).to_numpy()])[
                        order
                    ]
                )
                for name in names
            }
            added_ids = additions.get_column("delta_id").to_numpy().astype(object)
            self.delta_ids = np.concatenate([self.delta_ids, added_ids])[order]
        return outcome


_OUTCOME_CODES: Final = {outcome: code for code, outcome in enumerate(DeltaOutcome)}
_OUTCOMES_BY_CODE: Final = tuple(DeltaOutcome)
_LOG_SCHEMA: Final = {
    "delta_id": pl.String(),
    "sku": pl.String(),
    "node_id": pl.String(),
    "atp": pl.Int64(),
    "safety_stock": pl.Int64(),
    "inbound": pl.Int64(),
    "as_of_us": pl.Int64(),
}
_FIGURES: Final = tuple(name for name in _LOG_SCHEMA if name != "delta_id")


def _against_ledger(
    deltas: pl.DataFrame, ledger: pl.DataFrame
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.bool_]]:
    """Per delta an outcome code for ids the ledger holds (duplicate with the same figures,
    conflict with others), and the mask of the new ids, whose outcome is for the cell to say."""
    joined = deltas.join(ledger, on="delta_id", how="left", suffix="_taken", maintain_order="left")
    flags = joined.select(
        pl.col("as_of_us_taken").is_not_null().alias("taken"),
        pl.all_horizontal(
            pl.col(name).eq_missing(pl.col(f"{name}_taken")) for name in _FIGURES
        ).alias("same"),
    )
    taken = flags.get_column("taken").to_numpy()
    same = flags.get_column("same").to_numpy()
    codes = np.where(
        same, _OUTCOME_CODES[DeltaOutcome.DUPLICATE], _OUTCOME_CODES[DeltaOutcome.CONFLICT]
    ).astype(np.int8)
    return codes, ~taken


@dataclass(eq=False)
class _LoadedVersion:
    """A version as served: master frames, the stock lookup, and which delta batches it has.

    Every loaded version merges every logged delta batch (in log order) before it answers,
    so a version published, rolled back to or reloaded after deltas arrived has them too.
    """

    items: pl.DataFrame
    nodes: pl.DataFrame
    stock: _StockIndex
    merged: set[str] = field(default_factory=set)

    @classmethod
    def build(
        cls,
        *,
        items: pl.DataFrame,
        nodes: pl.DataFrame,
        inventory: pl.DataFrame,
        as_of: datetime,
    ) -> _LoadedVersion:
        return cls(
            items=items,
            nodes=nodes,
            stock=_StockIndex.build(inventory, base_as_of_us=epoch_us(as_of)),
        )

    def merge(self, batch: _LoggedBatch) -> npt.NDArray[np.int8]:
        """Apply ``batch`` (not merged yet); per delta an outcome code. Deltas for SKUs or
        nodes this version does not know are skipped (they were checked against another)."""
        deltas = batch.deltas
        known = pl.col("sku").is_in(self.items.get_column("sku").implode()) & pl.col(
            "node_id"
        ).is_in(self.nodes.get_column("node_id").implode())
        known_mask = deltas.select(known.alias("known")).get_column("known").to_numpy()
        outcome = np.full(deltas.height, _OUTCOME_CODES[DeltaOutcome.SKIPPED], np.int8)
        outcome[known_mask] = self.stock.apply(deltas.filter(pl.Series(known_mask)))
        self.merged.add(batch.name)
        return outcome


@dataclass(frozen=True, eq=False)
class _LoggedBatch:
    """One applied delta batch as logged: its name sorts in arrival order."""

    name: str
    deltas: pl.DataFrame  # service.store.deltas log columns (delta_id ... as_of_us)

    @property
    def newest_as_of_us(self) -> int:
        newest = self.deltas.get_column("as_of_us").max()
        return int(newest) if isinstance(newest, int) else _NEVER


class _Shelf(Protocol):
    """Where an InProcessStore keeps versions: this process's memory or a directory."""

    def read_pointer(self) -> str | None: ...

    def write_pointer(self, version: str) -> None: ...

    def metas(self) -> list[SnapshotMeta]: ...

    def read_meta(self, version: str) -> SnapshotMeta | None: ...

    def write_meta(self, meta: SnapshotMeta) -> None:
        """Replace the meta of a version that is already whole (a republish)."""
        ...

    def write_version(self, meta: SnapshotMeta, snapshot: SnapshotData) -> None:
        """Store a version whole, or raise and leave nothing behind."""
        ...

    def cached(self, version: str) -> _LoadedVersion | None:
        """The version if it is in memory already (no I/O)."""
        ...

    def load(self, version: str) -> _LoadedVersion: ...

    def delete_version(self, version: str) -> None: ...

    def delta_batches(self) -> Sequence[_LoggedBatch]:
        """Every logged delta batch, in arrival order."""
        ...

    def log_deltas(self, batch: _LoggedBatch) -> None:
        """Add a batch to the log, whole or not at all."""
        ...

    def remove_deltas(self, names: Iterable[str]) -> None:
        """Drop these batches from the log (pruned, or compacted into another)."""
        ...


class _MemoryShelf:
    """Versions held by this process only."""

    def __init__(self) -> None:
        self._pointer: str | None = None
        self._metas: dict[str, SnapshotMeta] = {}
        self._loaded: dict[str, _LoadedVersion] = {}
        self._deltas: list[_LoggedBatch] = []

    def read_pointer(self) -> str | None:
        return self._pointer

    def write_pointer(self, version: str) -> None:
        self._pointer = version

    def metas(self) -> list[SnapshotMeta]:
        return list(self._metas.values())

    def read_meta(self, version: str) -> SnapshotMeta | None:
        return self._metas.get(version)

    def write_meta(self, meta: SnapshotMeta) -> None:
        self._metas[meta.version] = meta

    def write_version(self, meta: SnapshotMeta, snapshot: SnapshotData) -> None:
        # clone(): polars frames can be mutated in place (df[col] = ...); a published version
        # must not change under its readers if the publisher keeps using its frames.
        loaded = _LoadedVersion.build(
            items=snapshot.items.clone(),
            nodes=snapshot.nodes.clone(),
            inventory=snapshot.inventory,
            as_of=snapshot.as_of,
        )
        self._loaded[meta.version] = loaded
        self._metas[meta.version] = meta

    def cached(self, version: str) -> _LoadedVersion | None:
        return self._loaded.get(version)

    def load(self, version: str) -> _LoadedVersion:
        loaded = self._loaded.get(version)
        if loaded is None:
            raise SnapshotNotFoundError(f"snapshot version {version} is not in this process")
        return loaded

    def delete_version(self, version: str) -> None:
        self._metas.pop(version, None)
        self._loaded.pop(version, None)

    def delta_batches(self) -> Sequence[_LoggedBatch]:
        return self._deltas

    def log_deltas(self, batch: _LoggedBatch) -> None:
        self._deltas.append(batch)

    def remove_deltas(self, names: Iterable[str]) -> None:
        gone = set(names)
        self._deltas = [batch for batch in self._deltas if batch.name not in gone]


class _DirectoryShelf:
    """Versions as files under ``<state_dir>/snapshots``, shared between processes."""

    def __init__(self, root: Path, *, cache_size: int) -> None:
        self._root = root
        self._cache_size = cache_size
        self._loaded: OrderedDict[str, _LoadedVersion] = OrderedDict()  # LRU, newest last
        self._pointer_stamp: tuple[int, int, int] | None = None  # (inode, mtime_ns, size)
        self._pointer: str | None = None
        self._deltas_stamp: tuple[int, int] | None = None  # deltas dir (inode, mtime_ns)
        self._deltas: dict[str, _LoggedBatch] = {}  # by file name, in name (arrival) order

    @property
    def _pointer_path(self) -> Path:
        return self._root / _POINTER_FILE

    def read_pointer(self) -> str | None:
        try:
            stat = self._pointer_path.stat()
        except FileNotFoundError:
            self._pointer_stamp, self._pointer = None, None
            return None
        # Writers replace CURRENT by rename, so a new pointer always means a new inode.
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._pointer_stamp:
            version = self._pointer_path.read_text(encoding="utf-8").strip()
            self._pointer_stamp, self._pointer = stamp, version or None
        return self._pointer

    def write_pointer(self, version: str) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        _write_atomically(self._pointer_path, f"{version}\n".encode())

    def metas(self) -> list[SnapshotMeta]:
        if not self._root.is_dir():
            return []
        metas = []
        for entry in self._root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                metas.append(self._decode_meta_file(entry / _META_FILE))
            except FileNotFoundError:
                continue  # pruned by another process while we listed, or not a version dir
        return metas

    def read_meta(self, version: str) -> SnapshotMeta | None:
        path = self._root / version / _META_FILE
        return self._decode_meta_file(path) if path.is_file() else None

    def write_meta(self, meta: SnapshotMeta) -> None:
        _write_atomically(self._root / meta.version / _META_FILE, encode_meta(meta))

    def write_version(self, meta: SnapshotMeta, snapshot: SnapshotData) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        staging = self._root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        final = self._root / meta.version
        try:
            staging.mkdir()
            for table, frame in zip(
                _TABLE_FILES, (snapshot.items, snapshot.nodes, snapshot.inventory), strict=True
            ):
                _write_durably(staging / f"{table}.parquet", encode_frame(frame, table=table))
            _write_durably(staging / _META_FILE, encode_meta(meta))
            try:
                staging.rename(final)
            except OSError:
                # Another publisher of the same content won the rename: its copy is as good.
                if not (final / _META_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def cached(self, version: str) -> _LoadedVersion | None:
        loaded = self._loaded.get(version)
        if loaded is not None:
            self._loaded.move_to_end(version)
        return loaded

    def load(self, version: str) -> _LoadedVersion:
        loaded = self.cached(version)
        if loaded is not None:
            return loaded
        directory = self._root / version
        if not (directory / _META_FILE).is_file():
            raise SnapshotNotFoundError(f"snapshot version {version} is not in {self._root}")
        frames = {}
        for table in _TABLE_FILES:
            path = directory / f"{table}.parquet"
            try:
                payload = path.read_bytes()
            except FileNotFoundError as exc:
                if not directory.is_dir():  # pruned by another process since the check above
                    raise SnapshotNotFoundError(f"snapshot version {version} was pruned") from exc
                raise StoreError(f"snapshot table file {path} is missing") from exc
            frames[table] = decode_frame(payload, source=str(path))
        meta = self._decode_meta_file(directory / _META_FILE)
        loaded = _LoadedVersion.build(
            items=frames["items"],
            nodes=frames["nodes"],
            inventory=frames["inventory"],
            as_of=meta.as_of,
        )
        self._loaded[version] = loaded
        while len(self._loaded) > self._cache_size:
            self._loaded.popitem(last=False)
        return loaded

    def delete_version(self, version: str) -> None:
        self._loaded.pop(version, None)
        shutil.rmtree(self._root / version)

    @property
    def _deltas_dir(self) -> Path:
        return self._root / _DELTAS_DIR

    def delta_batches(self) -> Sequence[_LoggedBatch]:
        """Re-lists the deltas directory only when it changed (one stat per call otherwise)."""
        try:
            stat = self._deltas_dir.stat()
        except FileNotFoundError:
            self._deltas_stamp, self._deltas = None, {}
            return ()
        # Files appear by rename and go by unlink: either changes the directory's mtime.
        stamp = (stat.st_ino, stat.st_mtime_ns)
        racy = time.time_ns() - stat.st_mtime_ns < _RACY_NS
        if stamp != self._deltas_stamp or racy:
            names = sorted(
                entry.name
                for entry in self._deltas_dir.iterdir()
                if entry.name.endswith(_DELTAS_SUFFIX) and not entry.name.startswith(".")
            )
            batches = {}
            for name in names:
                batch = self._deltas.get(name)
                if batch is None:
                    try:
                        payload = (self._deltas_dir / name).read_bytes()
                    except FileNotFoundError:
                        continue  # pruned by another process while we listed
                    source = str(self._deltas_dir / name)
                    batch = _LoggedBatch(name=name, deltas=decode_frame(payload, source=source))
                batches[name] = batch
            self._deltas_stamp, self._deltas = stamp, batches
        return tuple(self._deltas.values())

    def log_deltas(self, batch: _LoggedBatch) -> None:
        self._deltas_dir.mkdir(parents=True, exist_ok=True)
        payload = encode_frame(batch.deltas, table="inventory deltas")
        _write_atomically(self._deltas_dir / batch.name, payload)

    def remove_deltas(self, names: Iterable[str]) -> None:
        for name in names:
            (self._deltas_dir / name).unlink(missing_ok=True)

    def remove_stale_staging(self) -> None:
        """Delete temp dirs that crashed publishers left behind (best effort)."""
        if not self._root.is_dir():
            return
        cutoff = time.time() - _STALE_TMP_SECONDS
        for entry in self._root.glob(f"{_TMP_PREFIX}*"):
            try:
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry)
            except OSError as exc:
                _log.warning("snapshot_staging_cleanup_failed", path=str(entry), error=str(exc))

    @staticmethod
    def _decode_meta_file(path: Path) -> SnapshotMeta:
        return decode_meta(path.read_bytes(), source=str(path))


def _write_durably(path: Path, payload: bytes) -> None:
    """Write and fsync, so a rename that makes the file visible never exposes a torn file."""
    with path.open("wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _write_atomically(path: Path, payload: bytes) -> None:
    """Replace ``path`` by rename: readers see the old content or the new, never a mix."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write_durably(staging, payload)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _batch_name() -> str:
    """A log file name that sorts in arrival order (then at random within one nanosecond)."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{_DELTAS_SUFFIX}"


def _history(metas: Sequence[SnapshotMeta]) -> list[SnapshotMeta]:
    """Newest publish first; the version id breaks (unlikely) ties so the order is stable."""
    return sorted(metas, key=lambda meta: (meta.published_at, meta.version), reverse=True)


class InProcessStore:
    """A SnapshotStore in this process, optionally persisted under ``state_dir``.

    ``keep`` newest versions are retained (never fewer than current and the one before it).
    """

    def __init__(self, *, state_dir: Path | None = None, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self._keep = keep
        self._state_dir = state_dir
        self._directory: _DirectoryShelf | None = None
        self._shelf: _Shelf
        if state_dir is None:
            self._shelf = _MemoryShelf()
        else:
            # keep + 1: a server holds current and previous while the next one loads.
            self._directory = _DirectoryShelf(state_dir / "snapshots", cache_size=keep + 1)
            self._shelf = self._directory
        # Publish and rollback read, then write the history; one at a time per instance.
        self._writer_lock = asyncio.Lock()
        self._ledger_names: tuple[str, ...] = ()
        self._ledger_frame = pl.DataFrame(schema=_LOG_SCHEMA)

    def __repr__(self) -> str:
        return f"InProcessStore(state_dir={self._state_dir!r}, keep={self._keep})"

    async def publish(self, snapshot: SnapshotData) -> SnapshotMeta:
        """Write a new version whole, then point ``current`` at it; keep older versions."""
        check_publishable(snapshot)
        version = await asyncio.to_thread(snapshot_version, snapshot)
        async with self._writer_lock:
            with self._os_errors("publish"):
                history = _history(self._shelf.metas())
                published_at = datetime.now(UTC)
                if history and history[0].published_at >= published_at:
                    # History order is publish time: never let a clock step reorder it.
                    published_at = history[0].published_at + _ONE_TICK
                meta = build_meta(snapshot, version=version, published_at=published_at)
                if self._shelf.read_meta(version) is None:
                    await asyncio.to_thread(self._shelf.write_version, meta, snapshot)
                else:
                    self._shelf.write_meta(meta)  # identical content: move it to the front
                self._shelf.write_pointer(version)
                self._prune(current=version)
        return meta

    async def current_version(self) -> str | None:
        """The version readers should use, or None when nothing was ever published."""
        with self._os_errors("current_version"):
            return self._shelf.read_pointer()

    async def versions(self) -> list[SnapshotMeta]:
        """Retained versions, newest publish first."""
        with self._os_errors("versions"):
            return _history(self._shelf.metas())

    async def rollback(self) -> SnapshotMeta:
        """Point ``current`` at the version published before it; SnapshotNotFoundError if none."""
        async with self._writer_lock:
            with self._os_errors("rollback"):
                history = _history(self._shelf.metas())
                current = self._shelf.read_pointer()
                target = previous_version([meta.version for meta in history], current)
                if target is None:
                    raise SnapshotNotFoundError(
                        f"nothing to roll back to: current is {current}, retained versions "
                        f"are {[meta.version for meta in history]}"
                    )
                self._shelf.write_pointer(target)
                return next(meta for meta in history if meta.version == target)

    async def load_master(self, version: str) -> SnapshotMaster:
        """Items and nodes of a version, for mirroring in process."""
        with self._os_errors("load_master"):
            meta = self._shelf.read_meta(version)
            if meta is None:
                raise SnapshotNotFoundError(f"snapshot version {version} does not exist")
            loaded = await self._loaded(version)
        return SnapshotMaster(meta=meta, items=loaded.items, nodes=loaded.nodes)

    async def read_stock(
        self, version: str, skus: Sequence[str], node_ids: Sequence[str]
    ) -> StockMatrix:
        """Stock of ``skus`` at ``node_ids``; a lookup in memory once the version is loaded."""
        with self._os_errors("read_stock"):
            loaded = await self._loaded(version)
            self._merge_logged_deltas(loaded)
        return loaded.stock.read(skus, node_ids)

    async def apply_deltas(self, batch: DeltaBatch) -> DeltaReport:
        """Check the batch against the current version and the ledger, log the deltas whose
        id is new, then merge them into that version.

        The new deltas are logged whole before they are merged, so other versions (and other
        processes sharing the state dir) pick them up at their next read.
        """
        deltas = batch.with_as_of_us().select(*_LOG_SCHEMA)
        async with self._writer_lock:
            with self._os_errors("apply_deltas"):
                version = self._shelf.read_pointer()
                if version is None:
                    raise SnapshotNotFoundError(
                        "no snapshot is published: deltas change a snapshot's stock, so publish "
                        "one first"
                    )
                loaded = await self._loaded(version)
                self._merge_logged_deltas(loaded)
                check_delta_references(
                    batch,
                    known_skus=loaded.items.get_column("sku"),
                    known_node_ids=loaded.nodes.get_column("node_id"),
                )
                codes, fresh = _against_ledger(deltas, self._ledger())
                if fresh.any():
                    logged = _LoggedBatch(name=_batch_name(), deltas=deltas.filter(fresh))
                    self._shelf.log_deltas(logged)
                    codes[fresh] = loaded.merge(logged)
                    self._compact_delta_log()
        return DeltaReport(
            version=version, outcomes=tuple(_OUTCOMES_BY_CODE[code] for code in codes)
        )

    async def ping(self) -> bool:
        """Always True in memory; with a state dir, True when the directory is usable."""
        if self._state_dir is None:
            return True
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)  # a fresh install has none yet
        except OSError:
            return False
        return os.access(self._state_dir, os.R_OK | os.W_OK | os.X_OK)

    async def close(self) -> None:
        """Nothing to release: files are opened and closed per operation."""

    async def _loaded(self, version: str) -> _LoadedVersion:
        cached = self._shelf.cached(version)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self._shelf.load, version)

    def _ledger(self) -> pl.DataFrame:
        """Every delta id the log holds, with the figures it was first taken with."""
        batches = self._shelf.delta_batches()
        names = tuple(batch.name for batch in batches)
        if names != self._ledger_names:
            known = len(self._ledger_names)
            if names[:known] == self._ledger_names:  # the log only grew: add the new batches
                frames = [
                    self._ledger_frame,
                    *(batch.deltas.select(*_LOG_SCHEMA) for batch in batches[known:]),
                ]
            else:  # pruned or folded: rebuild from what it holds now
                frames = [batch.deltas.select(*_LOG_SCHEMA) for batch in batches]
            self._ledger_frame = (
                pl.concat(frames).unique("delta_id", keep="first", maintain_order=True)
                if frames
                else pl.DataFrame(schema=_LOG_SCHEMA)
            )
            self._ledger_names = names
        return self._ledger_frame

    def _merge_logged_deltas(self, loaded: _LoadedVersion) -> None:
        for logged in self._shelf.delta_batches():
            if logged.name not in loaded.merged:
                loaded.merge(logged)

    def _prune(self, *, current: str) -> None:
        history = [meta.version for meta in _history(self._shelf.metas())]
        for version in versions_to_prune(history, current=current, keep=self._keep):
            try:
                self._shelf.delete_version(version)
            except OSError as exc:
                # A leftover old version costs disk, not correctness: the next publish retries.
                _log.warning("snapshot_prune_failed", version=version, error=str(exc))
        oldest_us = self._oldest_retained_as_of_us()
        try:
            self._shelf.remove_deltas(
                batch.name
                for batch in self._shelf.delta_batches()
                if batch.newest_as_of_us < oldest_us
            )
        except (OSError, StoreError) as exc:
            _log.warning("delta_log_prune_failed", error=str(exc))

    def _oldest_retained_as_of_us(self) -> int:
        """Deltas older than this can beat no row of any retained version (one as old can:
        a delta stamped at a snapshot's instant supersedes its row)."""
        retained = self._shelf.metas()
        return min((epoch_us(meta.as_of) for meta in retained), default=_NEVER)

    def _compact_delta_log(self) -> None:
        """Fold the log into one batch once it holds many, so reads stay one cheap check.

        Every loaded version merges the folded batch once more; deltas it has already are
        duplicates then, so nothing changes. The folded batch is logged before the ones it
        replaces go, so a crash in between leaves duplicates, never a gap.
        """
        batches = list(self._shelf.delta_batches())
        if len(batches) <= _DELTA_BATCHES_BEFORE_COMPACTION:
            return
        oldest_us = self._oldest_retained_as_of_us()
        folded = pl.concat([batch.deltas for batch in batches]).filter(
            pl.col("as_of_us") >= oldest_us
        )
        if folded.height:
            self._shelf.log_deltas(_LoggedBatch(name=_batch_name(), deltas=folded))
        self._shelf.remove_deltas(batch.name for batch in batches)
        if self._directory is not None:
            self._directory.remove_stale_staging()

    def _os_errors(self, operation: str) -> AbstractContextManager[None]:
        return _os_errors_as_store_error(operation, self._state_dir)


@contextmanager
def _os_errors_as_store_error(operation: str, state_dir: Path | None) -> Iterator[None]:
    """File system errors become StoreError naming the operation and the directory."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"snapshot store {operation} failed under {state_dir}: {exc}") from exc
