"""Inventory deltas: stock changes between full snapshots, validated as one batch.

A delta says "at ``as_of`` the stock of ``sku`` at ``node_id`` was ``atp``" (optionally with
``safety_stock`` and ``inbound``). Figures are absolute, never increments: applying the same
delta twice, or an old delta after a newer one, must change nothing, and with increments a
replay would count a sale twice. A missing ``safety_stock`` / ``inbound`` keeps the stored
value (0 for a cell the delta ranges for the first time).

Idempotence: the delta id
    ``delta_id`` is the idempotence key. Every store keeps a ledger of the ids it has taken
    (with a fingerprint of each delta's figures): an id seen before with the same figures is
    a replay and changes nothing (``duplicate``); an id seen before with other figures is
    refused (``conflict``: an id names one change, so a corrected delta needs a new id).
    The ledger keeps an id as long as the delta log keeps the delta (see the stores: until
    every retained snapshot is newer than it). Past that a replay is judged by its cell
    alone, by the order below, so it is ``duplicate`` or ``stale`` and is never applied over
    a newer figure: the ledger makes the report exact, the order keeps stock right.

Order per stock cell: (as_of, delta_id)
    Every stock cell (sku x node) remembers the ``as_of`` of its figure and the id of the
    delta that set it (none for a snapshot row). A new delta applies when it is newer:
    its ``as_of`` is later than the cell's, or equal and the cell's figure is a snapshot
    row's (a change event stamped at the export's instant supersedes the exported row), or
    equal and its id sorts after the cell's delta id (byte order). Otherwise it changes
    nothing: ``duplicate`` when the cell holds this very delta, ``conflict`` when another
    delta set the cell at the same ``as_of`` (which figure is true cannot be told; the
    greater id stands whichever arrived first), ``stale`` when the cell's figure is newer.
    Because the order is total and does not depend on arrival, replicas, retries and the
    replays at a snapshot flip all end with the same figure. Within one batch two deltas
    for one cell at one ``as_of`` are refused as bad input.

At a snapshot flip
    A full snapshot supersedes every delta older than its rows; deltas as new as the new
    version's rows or newer are applied to it from the delta log before (and just after) the
    pointer flips, so a snapshot exported before a late change cannot undo it. See the
    stores.

This module is pure: it validates and encodes; the stores apply.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Final

import polars as pl

from models.data.contract import read_table, validate_table
from models.data.schema import Column, TableSpec
from rules.errors import ContractError, StoreError

__all__ = [
    "INVENTORY_DELTAS",
    "MAX_FUTURE_SKEW",
    "DeltaBatch",
    "DeltaOutcome",
    "check_delta_references",
    "decode_log_payload",
    "deltas_from_frame",
    "deltas_from_records",
    "encode_log_payload",
    "read_delta_file",
]

# A source clock may run a little ahead of ours; an as_of further ahead than this is refused,
# because a cell stamped in the future would ignore every real update until that time.
MAX_FUTURE_SKEW: Final = timedelta(minutes=5)
DELTA_ID_PATTERN: Final = r"^[A-Za-z0-9._:/-]{1,64}$"
_DELTA_ID = re.compile(DELTA_ID_PATTERN)
# Encoded deltas are fields separated by NUL (Lua scripts split on it): no id may hold one.
FIELD_SEPARATOR: Final = "\x00"
_LOG_FIELDS: Final = ("delta_id", "sku", "node_id", "atp", "safety_stock", "inbound", "as_of_us")

INVENTORY_DELTAS = TableSpec(
    name="inventory_deltas",
    doc="Stock changes between snapshots; absolute figures, one row per delta.",
    key=("delta_id",),
    columns=(
        Column("delta_id", pl.String(), doc="Unique id of the change, e.g. the ERP event id."),
        Column("sku", pl.String(), doc="Item id; must be in the current item master."),
        Column("node_id", pl.String(), doc="Node id; must be in the current nodes table."),
        Column(
            "atp",
            pl.Int64(),
            minimum=0,
            doc="Available to promise after the change, in units (absolute, not a difference).",
        ),
        Column(
            "safety_stock",
            pl.Int64(),
            required=False,
            nullable=True,
            minimum=0,
            doc="Safety stock after the change; empty keeps the stored value.",
        ),
        Column(
            "inbound",
            pl.Int64(),
            required=False,
            nullable=True,
            minimum=0,
            doc="Inbound units after the change; empty keeps the stored value.",
        ),
        Column("as_of", pl.Datetime("us"), doc="When the figure was true (naive = UTC)."),
    ),
)


class DeltaOutcome(StrEnum):
    """What applying one delta did; see the module docstring for the order."""

    APPLIED = "applied"  # newer than the stored figure: it is the figure now
    DUPLICATE = "duplicate"  # this delta id was taken before (a replay): nothing changed
    STALE = "stale"  # the stored figure is newer: the delta arrived late, nothing changed
    # Contradicts what is stored: another delta id set the cell at the same as_of, or this
    # delta id was taken before with other figures. Nothing changed; resend under a new id.
    CONFLICT = "conflict"
    # Its node or SKU is not in the snapshot the delta reached (a snapshot flipped between
    # validation and writing); nothing changed.
    SKIPPED = "skipped"


@dataclass(frozen=True, eq=False)
class DeltaBatch:
    """Validated deltas in ``INVENTORY_DELTAS`` columns, in the order of their source.

    ``source`` names where they came from ("deltas.csv", "request body") for error messages;
    ``row_offset`` is added to 0-based row positions to number rows as the source does.
    """

    source: str
    frame: pl.DataFrame
    row_offset: int = 1

    def __len__(self) -> int:
        return self.frame.height

    def error(self, position: int, column: str, problem: str) -> ContractError:
        """A ContractError naming this batch's source, the row at ``position`` and ``column``."""
        return ContractError(
            file=self.source, row=position + self.row_offset, column=column, problem=problem
        )

    def with_as_of_us(self) -> pl.DataFrame:
        """The frame plus ``as_of_us`` (int64 microseconds) and its row ``position``."""
        return self.frame.with_columns(
            as_of_us=pl.col("as_of").dt.epoch("us"),
            position=pl.int_range(pl.len(), dtype=pl.Int64),
        )


def deltas_from_frame(
    frame: pl.DataFrame, *, source: str, now: datetime, row_offset: int = 1
) -> DeltaBatch:
    """Validate ``frame`` (as read from CSV/Parquet, or built from JSON) as one batch.

    Raises ContractError naming ``source``, the first offending row and its column: contract
    types and bounds, a repeated ``delta_id``, an id outside ``[A-Za-z0-9._:/-]{1,64}``, a
    NUL in an id, an ``as_of`` more than MAX_FUTURE_SKEW after ``now``, and two deltas for
    one (sku, node) at the same ``as_of`` (which of them is true cannot be told).
    """
    try:
        validated = validate_table(frame, INVENTORY_DELTAS, file=source)
    except ContractError as exc:
        if exc.row is None or row_offset == 1:
            raise
        # validate_table numbers rows from 1; this source numbers them from row_offset.
        raise ContractError(
            file=exc.file, row=exc.row - 1 + row_offset, column=exc.column, problem=exc.problem
        ) from exc
    batch = DeltaBatch(source=source, frame=validated, row_offset=row_offset)
    _check_batch(batch, now=now)
    return batch


def read_delta_file(path: Path, *, now: datetime) -> DeltaBatch:
    """Read and validate a CSV or Parquet file of deltas; ContractError names file, row, column."""
    validated = read_table(path, INVENTORY_DELTAS)
    batch = DeltaBatch(source=path.name, frame=validated)
    _check_batch(batch, now=now)
    return batch


def deltas_from_records(
    records: Sequence[Mapping[str, object]], *, source: str, now: datetime, row_offset: int = 1
) -> DeltaBatch:
    """Validate deltas given as mappings (e.g. a JSON body); naive datetimes are UTC."""
    schema = {column.name: column.dtype for column in INVENTORY_DELTAS.columns}
    rows = []
    for number, record in enumerate(records):
        row = {}
        for name, value in record.items():
            if not isinstance(value, datetime):
                row[name] = value
                continue
            try:
                row[name] = _naive_utc(value)
            except OverflowError:
                raise ContractError(
                    file=source,
                    row=number + row_offset,
                    column=name,
                    problem=f"{value.isoformat()} is out of range in UTC",
                ) from None
        rows.append(row)
    try:
        frame = pl.DataFrame(rows, schema=schema, orient="row")
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as exc:
        raise ContractError(file=source, problem=f"deltas do not form a table: {exc}") from exc
    return deltas_from_frame(frame, source=source, now=now, row_offset=row_offset)


def check_delta_references(
    batch: DeltaBatch, *, known_skus: pl.Series, known_node_ids: pl.Series
) -> None:
    """Refuse the batch if a delta names a SKU or node the current snapshot does not know.

    A delta may range a known SKU at a known node for the first time; it may not invent
    either, since nothing would ever read it (and a stock key for an unknown node would
    outlive its version's pruning).
    """
    frame = batch.frame
    firsts = frame.select(
        (~pl.col("sku").is_in(known_skus.implode())).arg_true().first().alias("sku"),
        (~pl.col("node_id").is_in(known_node_ids.implode())).arg_true().first().alias("node_id"),
    ).row(0, named=True)
    failing = [(index, name) for name, index in firsts.items() if index is not None]
    if not failing:
        return
    index, name = min(failing)
    table = "item master" if name == "sku" else "nodes table"
    value = frame.get_column(name)[index]
    raise batch.error(index, name, f"unknown {name} {value!r}: not in the current {table}")


def encode_log_payload(deltas: pl.DataFrame) -> bytes:
    """Deltas (with ``as_of_us``) as NUL-separated fields, 7 per delta, for Redis and logs.

    Empty ``safety_stock`` / ``inbound`` fields mean "keep the stored value".
    """
    if not deltas.height:
        return b""
    # Every field as text; empty for a null (only safety_stock and inbound may be null).
    fields = [pl.col(name).cast(pl.String).fill_null("") for name in _LOG_FIELDS]
    joined = deltas.select(
        pl.concat_str(fields, separator=FIELD_SEPARATOR).str.join(FIELD_SEPARATOR).alias("payload")
    ).item()
    return str(joined).encode()


def decode_log_payload(payload: bytes, *, source: str) -> pl.DataFrame:
    """The frame ``encode_log_payload`` encoded: delta_id, sku, node_id, atp, safety_stock,
    inbound (null = keep), as_of_us. StoreError naming ``source`` if it does not decode."""
    schema = {
        "delta_id": pl.String(),
        "sku": pl.String(),
        "node_id": pl.String(),
        "atp": pl.Int64(),
        "safety_stock": pl.Int64(),
        "inbound": pl.Int64(),
        "as_of_us": pl.Int64(),
    }
    if not payload:
        return pl.DataFrame(schema=schema)
    try:
        parts = payload.decode().split(FIELD_SEPARATOR)
    except UnicodeDecodeError as exc:
        raise StoreError(f"delta payload at {source} is not UTF-8: {exc}") from exc
    width = len(_LOG_FIELDS)
    if len(parts) % width:
        raise StoreError(f"delta payload at {source} has {len(parts)} fields, not 7 per delta")
    columns = {name: parts[offset::width] for offset, name in enumerate(_LOG_FIELDS)}
    try:
        return pl.DataFrame(columns, schema=dict.fromkeys(_LOG_FIELDS, pl.String)).select(
            pl.col("delta_id"),
            pl.col("sku"),
            pl.col("node_id"),
            *(
                pl.when(pl.col(name) == "")
                .then(None)
                .otherwise(pl.col(name))
                .cast(pl.Int64, strict=True)
                .alias(name)
                for name in ("atp", "safety_stock", "inbound", "as_of_us")
            ),
        )
    except pl.exceptions.PolarsError as exc:
        raise StoreError(f"delta payload at {source} does not decode: {exc}") from exc


def _check_batch(batch: DeltaBatch, *, now: datetime) -> None:
    frame = batch.frame
    bad_id = frame.select(
        (~pl.col("delta_id").str.contains(DELTA_ID_PATTERN)).arg_true().first()
    ).item()
    if bad_id is not None:
        value = frame.get_column("delta_id")[bad_id]
        raise batch.error(
            bad_id,
            "delta_id",
            f"{value!r} is not a delta id: use 1-64 of A-Z a-z 0-9 . _ : / -",
        )
    for column in ("sku", "node_id"):
        with_nul = frame.select(
            pl.col(column).str.contains("\x00", literal=True).arg_true().first()
        )
        if (position := with_nul.item()) is not None:
            raise batch.error(position, column, f"{column} contains a NUL character")
    latest_allowed = _naive_utc(now) + MAX_FUTURE_SKEW
    future = frame.select((pl.col("as_of") > latest_allowed).arg_true().first()).item()
    if future is not None:
        value = frame.get_column("as_of")[future]
        raise batch.error(
            future,
            "as_of",
            f"{value.isoformat()} is more than {MAX_FUTURE_SKEW} in the future (now "
            f"{_naive_utc(now).isoformat()} UTC): is the source clock right?",
        )
    cell_instant = ["sku", "node_id", "as_of"]
    repeated = frame.select((~pl.struct(cell_instant).is_first_distinct()).arg_true().first())
    if (second := repeated.item()) is not None:
        row = frame.row(second, named=True)
        first = frame.select(
            pl.all_horizontal([pl.col(name) == row[name] for name in cell_instant])
            .arg_true()
            .first()
        ).item()
        raise batch.error(
            second,
            "as_of",
            f"a second delta for sku {row['sku']!r} at node {row['node_id']!r} as of "
            f"{row['as_of'].isoformat()} (the first is row {first + batch.row_offset}): "
            "which figure is true cannot be told",
        )


def _naive_utc(moment: datetime) -> datetime:
    """Naive UTC, the convention of every datetime in the data contract."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)
