"""What every snapshot store shares: version ids, the meta and frame encodings, history rules.

Both stores (in-process and Redis) go through these functions so that the same snapshot gets
the same version id everywhere and a version's meta reads the same from a file or a key.

Version id
    The first 16 hex characters of a sha256 over the snapshot's content: for each table
    (items, nodes, inventory) its column names and dtypes, then its rows as CSV after sorting
    by every column, then ``as_of``. Row order is therefore not content (two files listing the
    same rows in another order publish as one version), column order and dtypes are. CSV is
    used as the canonical form because polars writes it deterministically and losslessly for
    our dtypes (shortest round-trip floats, microsecond datetimes, ``""`` apart from null).

History
    A list of version ids, newest publish first. Publishing moves the version to the front
    (a republish never duplicates it); rollback walks towards the back, relative to current.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Final, cast

import orjson
import polars as pl

from models.data.schema import SnapshotData
from rules.errors import StoreError
from service.store.base import SnapshotMeta

__all__ = [
    "build_meta",
    "check_publishable",
    "decode_frame",
    "decode_meta",
    "encode_frame",
    "encode_meta",
    "previous_version",
    "snapshot_version",
    "versions_to_prune",
]

VERSION_HEX_CHARS: Final = 16
_META_FORMAT: Final = 1  # bump when the meta JSON changes shape; decode_meta checks it
_STOCK_COLUMNS: Final = ("atp", "safety_stock", "inbound")
_CSV_DATETIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S%.6f"


class _HashWriter:
    """A write-only file object that feeds sha256, so CSV is hashed without being held whole."""

    def __init__(self, digest: hashlib._Hash) -> None:
        self._digest = digest

    def write(self, chunk: bytes) -> int:
        self._digest.update(chunk)
        return len(chunk)

    def flush(self) -> None:
        """Nothing buffered; polars calls it."""


def snapshot_version(snapshot: SnapshotData) -> str:
    """The content hash that names a snapshot; see the module docstring for what counts."""
    digest = hashlib.sha256()
    # polars only calls write() and flush() on a file object, which _HashWriter provides.
    writer = cast(IO[bytes], _HashWriter(digest))
    for table, frame in (
        ("items", snapshot.items),
        ("nodes", snapshot.nodes),
        ("inventory", snapshot.inventory),
    ):
        schema = ";".join(f"{name}:{dtype}" for name, dtype in frame.schema.items())
        digest.update(f"\x00table={table}\x00schema={schema}\x00rows=".encode())
        try:
            canonical = frame.sort(frame.columns, nulls_last=True) if frame.width else frame
            canonical.write_csv(
                writer,
                include_header=False,
                datetime_format=_CSV_DATETIME_FORMAT,
            )
        except pl.exceptions.PolarsError as exc:
            raise StoreError(f"cannot hash snapshot table {table}: {exc}") from exc
    digest.update(f"\x00as_of={snapshot.as_of.isoformat()}".encode())
    return digest.hexdigest()[:VERSION_HEX_CHARS]


def check_publishable(snapshot: SnapshotData) -> None:
    """Refuse, before anything is written, a snapshot the stores cannot hold whole.

    ``SnapshotData`` is validated against the contract upstream; these are the few properties
    the stores themselves rely on: key columns present, stock integers without nulls, and every
    inventory node listed in ``nodes`` (stores find a version's stock keys through it).
    """
    required = {
        "items": (snapshot.items, ("sku",)),
        "nodes": (snapshot.nodes, ("node_id",)),
        "inventory": (snapshot.inventory, ("sku", "node_id", *_STOCK_COLUMNS)),
    }
    for table, (frame, columns) in required.items():
        for column in columns:
            if column not in frame.columns:
                raise StoreError(f"cannot publish: {table} has no column '{column}'")
            nulls = frame[column].null_count()
            if nulls:
                raise StoreError(f"cannot publish: {table}.{column} has {nulls} null values")
    for column in _STOCK_COLUMNS:
        if not snapshot.inventory.schema[column].is_integer():
            dtype = snapshot.inventory.schema[column]
            raise StoreError(f"cannot publish: inventory.{column} is {dtype}, not an integer")
    unknown_nodes = (
        snapshot.inventory.select(pl.col("node_id").unique())
        .join(snapshot.nodes.select("node_id"), on="node_id", how="anti")
        .get_column("node_id")
    )
    if unknown_nodes.len():
        listed = ", ".join(sorted(unknown_nodes.head(5).to_list()))
        raise StoreError(
            f"cannot publish: inventory names {unknown_nodes.len()} node ids missing from "
            f"nodes (e.g. {listed})"
        )


def build_meta(snapshot: SnapshotData, *, version: str, published_at: datetime) -> SnapshotMeta:
    """The meta of ``snapshot`` published as ``version`` at ``published_at``."""
    return SnapshotMeta(
        version=version,
        as_of=snapshot.as_of,
        published_at=published_at,
        item_count=snapshot.items.height,
        node_count=snapshot.nodes.height,
        inventory_rows=snapshot.inventory.height,
    )


def encode_meta(meta: SnapshotMeta) -> bytes:
    """Meta as JSON; datetimes as ISO 8601 (with their offset when they carry one)."""
    return orjson.dumps(
        {
            "format": _META_FORMAT,
            "version": meta.version,
            "as_of": meta.as_of.isoformat(),
            "published_at": meta.published_at.isoformat(),
            "item_count": meta.item_count,
            "node_count": meta.node_count,
            "inventory_rows": meta.inventory_rows,
        }
    )


def decode_meta(payload: bytes, *, source: str) -> SnapshotMeta:
    """Meta from ``encode_meta`` bytes; StoreError naming ``source`` (key, file) otherwise."""
    try:
        fields = orjson.loads(payload)
        if not isinstance(fields, dict):
            raise TypeError(f"expected a JSON object, got {type(fields).__name__}")
        if fields.get("format") != _META_FORMAT:
            raise ValueError(f"format {fields.get('format')!r}, expected {_META_FORMAT}")
        counts = {name: fields[name] for name in ("item_count", "node_count", "inventory_rows")}
        for name, count in counts.items():
            if not isinstance(count, int):
                raise TypeError(f"{name} is {type(count).__name__}, not an integer")
        version = fields["version"]
        if not isinstance(version, str):
            raise TypeError(f"version is {type(version).__name__}, not a string")
        return SnapshotMeta(
            version=version,
            as_of=datetime.fromisoformat(fields["as_of"]),
            published_at=datetime.fromisoformat(fields["published_at"]),
            **counts,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"snapshot meta at {source} does not decode: {exc!r}") from exc


def encode_frame(frame: pl.DataFrame, *, table: str) -> bytes:
    """A frame as Parquet bytes (dtypes round-trip exactly); StoreError naming the table."""
    buffer = io.BytesIO()
    try:
        frame.write_parquet(buffer)
    except (pl.exceptions.PolarsError, TypeError, ValueError) as exc:
        raise StoreError(f"cannot encode snapshot table {table} as Parquet: {exc}") from exc
    return buffer.getvalue()


def decode_frame(payload: bytes, *, source: str) -> pl.DataFrame:
    """A frame from ``encode_frame`` bytes; StoreError naming ``source`` (key, file) otherwise."""
    try:
        return pl.read_parquet(io.BytesIO(payload))
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise StoreError(f"snapshot table at {source} does not decode: {exc}") from exc


def previous_version(history: Sequence[str], current: str | None) -> str | None:
    """The version a rollback from ``current`` goes to: the next older one in history."""
    if current is None or current not in history:
        return None
    position = history.index(current)
    return history[position + 1] if position + 1 < len(history) else None


def versions_to_prune(history: Sequence[str], *, current: str | None, keep: int) -> list[str]:
    """Versions past the ``keep`` newest, sparing current and the one a rollback would reach."""
    spared = {current, previous_version(history, current)}
    return [version for version in history[keep:] if version not in spared]
