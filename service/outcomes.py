"""Outcomes: orders and returns, ingested for the ROI report.

Orders arrive by ``POST /v1/events/orders`` or ``upsell events import FILE``, as order
lines in the data contract (``orders``: order_id, customer_id, sku, quantity, unit_price,
ordered_at, store_id, channel; plus an optional ``session_id``), returns as a ``returns``
table (return_id, order_id, sku, quantity, returned_at). A batch is validated whole before
anything is stored; a failure names the row (or body path) and column.

Idempotent by id: an order id (a return id) is stored once. Sending it again with the same
content changes nothing (``duplicate``); with other content it is refused and counted
(``conflict``): the first version stays, nothing is overwritten. A return must name an
order already stored (or in the same batch) and one of its SKUs, and return at most the
units bought on that line.

Customer and session ids are replaced by their keyed hash (``service.exposures``) before
they are stored: the raw ids never reach Redis or the state dir.

Storage: two Redis hashes (``<prefix>:outcomes:orders`` / ``:returns``, id -> canonical
JSON; HSETNX makes "first writer wins" atomic) when Redis is configured, else two JSONL
files under ``<state_dir>/outcomes/`` appended under an exclusive file lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
import polars as pl
import redis.exceptions

from models.data.contract import merge_duplicate_order_lines, read_file, validate_table
from models.data.schema import ORDER_LINES, Column, TableSpec
from rules.errors import ContractError, StoreError
from service.exposures import AnyRedis, Pseudonymizer, open_redis_client
from service.settings import Settings

__all__ = [
    "OUTCOME_ORDER_LINES",
    "RETURNS",
    "FileOutcomeStore",
    "IngestReport",
    "Outcome",
    "OutcomeStore",
    "RedisOutcomeStore",
    "open_outcome_store",
    "order_records",
    "outcome_frames",
    "read_outcome_files",
    "return_records",
]

OUTCOME_ORDER_LINES: Final = TableSpec(
    name="orders",
    doc="Order lines as in the data contract, plus the session that placed a guest order.",
    key=ORDER_LINES.key,
    columns=(
        *ORDER_LINES.columns,
        Column(
            "session_id",
            pl.String(),
            required=False,
            nullable=True,
            doc="Session (device, visit) id; attributes a guest order to its exposures.",
        ),
    ),
)
RETURNS: Final = TableSpec(
    name="returns",
    doc="Units returned from an order line.",
    key=("return_id",),
    columns=(
        Column("return_id", pl.String(), doc="Unique id of the return (the idempotence key)."),
        Column("order_id", pl.String(), doc="The order the units were bought in."),
        Column("sku", pl.String(), doc="The item returned; a line of that order."),
        Column("quantity", pl.Int64(), exclusive_minimum=0, doc="Units returned (> 0)."),
        Column("returned_at", pl.Datetime("us"), doc="When (ISO 8601; naive = UTC)."),
    ),
)
# Per order, these come from the order's lines and must agree between them.
_ORDER_FIELDS: Final = ("customer_id", "session_id", "ordered_at", "channel", "store_id")
_CHUNK: Final = 1_000
_UNREACHABLE: Final = (redis.exceptions.RedisError, OSError)


class Outcome(Enum):
    ADDED = "added"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass
class IngestReport:
    """What a batch did, by id."""

    added: int = 0
    duplicate: int = 0
    conflict: int = 0
    not_added: list[tuple[str, Outcome]] = field(default_factory=list)

    def count(self, record_id: str, outcome: Outcome) -> None:
        setattr(self, outcome.value, getattr(self, outcome.value) + 1)
        if outcome is not Outcome.ADDED:
            self.not_added.append((record_id, outcome))


# -- validation: frames to canonical records ------------------------------------------------


def _iso(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds")


def order_records(
    lines: pl.DataFrame, pseudonymize: Pseudonymizer, *, source: str
) -> list[dict[str, Any]]:
    """Validated order lines grouped into one record per order, ids hashed.

    ``lines`` is raw (as read from a file, or flattened from a request body); rows in errors
    are its 1-based rows. Lines repeating (order_id, sku) are merged as in ``read_orders``.
    """
    valid = validate_table(lines, OUTCOME_ORDER_LINES, file=source, check_key=False)
    numbered = valid.with_row_index("row", offset=1)
    for name in _ORDER_FIELDS:
        disagreeing = (
            numbered.group_by("order_id")
            .agg(pl.col(name).n_unique().alias("values"), pl.col("row"))
            .filter(pl.col("values") > 1)
        )
        if disagreeing.height:
            rows = sorted(row for rows in disagreeing.get_column("row") for row in rows[1:])
            raise ContractError(
                file=source,
                row=rows[0],
                column=name,
                problem=f"differs from an earlier line of the same order: an order has one {name}",
            )
    merged = merge_duplicate_order_lines(valid)
    grouped = merged.group_by("order_id", maintain_order=True).agg(
        *[pl.col(name).first() for name in _ORDER_FIELDS],
        pl.struct("sku", "quantity", "unit_price").sort_by("sku").alias("lines"),
    )
    customers = pseudonymize.many(grouped.get_column("customer_id").to_list())
    sessions = pseudonymize.many(grouped.get_column("session_id").to_list())
    records = []
    for row, customer, session in zip(
        grouped.iter_rows(named=True), customers, sessions, strict=True
    ):
        records.append(
            {
                "order_id": row["order_id"],
                "customer": customer,
                "session": session,
                "ordered_at": _iso(row["ordered_at"]),
                "channel": row["channel"],
                "store_id": row["store_id"],
                "lines": row["lines"],
            }
        )
    return records


def return_records(frame: pl.DataFrame, *, source: str) -> list[dict[str, Any]]:
    """Validated returns, one record each (``return_id`` must be unique in the batch)."""
    valid = validate_table(frame, RETURNS, file=source)
    return [{**row, "returned_at": _iso(row["returned_at"])} for row in valid.iter_rows(named=True)]


def read_outcome_files(
    orders: Path | None, returns: Path | None, pseudonymize: Pseudonymizer
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Order records and return records from contract files (either may be absent)."""
    order_list = (
        order_records(read_file(orders), pseudonymize, source=orders.name) if orders else []
    )
    return_list = return_records(read_file(returns), source=returns.name) if returns else []
    return order_list, return_list


def _canonical(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def _check_returns(
    returns: Sequence[Mapping[str, Any]],
    orders: Mapping[str, Mapping[str, Any]],
    *,
    source: str,
    row_offset: int,
) -> None:
    """Each return names a known order and one of its lines, and at most its units."""
    for position, record in enumerate(returns):
        row = position + row_offset
        order = orders.get(record["order_id"])
        if order is None:
            raise ContractError(
                file=source,
                row=row,
                column="order_id",
                problem=f"unknown order {record['order_id']!r}: ingest the order first",
            )
        bought = {line["sku"]: line["quantity"] for line in order["lines"]}
        if record["sku"] not in bought:
            raise ContractError(
                file=source,
                row=row,
                column="sku",
                problem=f"{record['sku']!r} is not a line of order {record['order_id']!r}",
            )
        if record["quantity"] > bought[record["sku"]]:
            raise ContractError(
                file=source,
                row=row,
                column="quantity",
                problem=f"{record['quantity']} returned, {bought[record['sku']]} bought",
            )


# -- stores ---------------------------------------------------------------------------------


class OutcomeStore(Protocol):
    async def add(
        self,
        orders: Sequence[dict[str, Any]],
        returns: Sequence[dict[str, Any]],
        *,
        source: str,
        returns_row_offset: int = 1,
    ) -> tuple[IngestReport, IngestReport]:
        """Store new orders, then returns (checked against stored and batch orders)."""

    async def load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every stored order and return."""

    async def close(self) -> None: ...


class FileOutcomeStore:
    """``orders.jsonl`` and ``returns.jsonl`` under one directory, appended under a lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def _read(self, name: str) -> dict[str, bytes]:
        path = self.directory / name
        if not path.exists():
            return {}
        stored: dict[str, bytes] = {}
        key = "order_id" if name == "orders.jsonl" else "return_id"
        with path.open("rb") as handle:
            for line in handle:
                if line.endswith(b"\n") and len(line) > 1:  # skip a write cut short
                    payload = line[:-1]
                    stored.setdefault(orjson.loads(payload)[key], payload)
        return stored

    def _append(self, name: str, payloads: Sequence[bytes]) -> None:
        if not payloads:
            return
        descriptor = os.open(self.directory / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, b"".join(payload + b"\n" for payload in payloads))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def _add(
        self,
        orders: Sequence[dict[str, Any]],
        returns: Sequence[dict[str, Any]],
        source: str,
        returns_row_offset: int,
    ) -> tuple[IngestReport, IngestReport]:
        with self._locked():
            stored_orders = self._read("orders.jsonl")
            known = {order_id: orjson.loads(payload) for order_id, payload in stored_orders.items()}
            for order in orders:
                known.setdefault(order["order_id"], order)
            _check_returns(returns, known, source=source, row_offset=returns_row_offset)
            order_report, new_orders = _sort_out(orders, stored_orders, "order_id")
            return_report, new_returns = _sort_out(
                returns, self._read("returns.jsonl") if returns else {}, "return_id"
            )
            self._append("orders.jsonl", new_orders)
            self._append("returns.jsonl", new_returns)
        return order_report, return_report

    async def add(
        self,
        orders: Sequence[dict[str, Any]],
        returns: Sequence[dict[str, Any]],
        *,
        source: str,
        returns_row_offset: int = 1,
    ) -> tuple[IngestReport, IngestReport]:
        try:
            return await asyncio.to_thread(self._add, orders, returns, source, returns_row_offset)
        except OSError as exc:
            raise StoreError(f"{self.directory}: cannot store outcomes: {exc}") from exc

    async def load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            return (
                [orjson.loads(p) for p in self._read("orders.jsonl").values()],
                [orjson.loads(p) for p in self._read("returns.jsonl").values()],
            )

        return await asyncio.to_thread(read)

    async def close(self) -> None:
        return None


def _sort_out(
    records: Sequence[dict[str, Any]], stored: Mapping[str, bytes], key: str
) -> tuple[IngestReport, list[bytes]]:
    """Which records are new, duplicates or conflicts; the payloads to append."""
    report, new = IngestReport(), []
    seen: dict[str, bytes] = {}
    for record in records:
        record_id, payload = record[key], _canonical(record)
        earlier = stored.get(record_id, seen.get(record_id))
        if earlier is None:
            report.count(record_id, Outcome.ADDED)
            seen[record_id] = payload
            new.append(payload)
        elif earlier == payload:
            report.count(record_id, Outcome.DUPLICATE)
        else:
            report.count(record_id, Outcome.CONFLICT)
    return report, new


class RedisOutcomeStore:
    """Two Redis hashes; HSETNX decides which version of an id is kept."""

    def __init__(self, client: AnyRedis, *, prefix: str) -> None:
        self._client = client
        self.orders_key = f"{prefix}:outcomes:orders"
        self.returns_key = f"{prefix}:outcomes:returns"

    async def _put(self, key: str, records: Sequence[dict[str, Any]], id_key: str) -> IngestReport:
        report = IngestReport()
        for start in range(0, len(records), _CHUNK):
            chunk = records[start : start + _CHUNK]
            payloads = [_canonical(record) for record in chunk]
            async with self._client.pipeline(transaction=False) as pipe:
                for record, payload in zip(chunk, payloads, strict=True):
                    pipe.hsetnx(key, record[id_key], payload)
                created = await pipe.execute()
            taken = [i for i, flag in enumerate(created) if not flag]
            existing = (
                await self._client.hmget(key, [chunk[i][id_key] for i in taken]) if taken else []
            )
            earlier = dict(zip(taken, existing, strict=True))
            for i, record in enumerate(chunk):
                if i not in earlier:
                    report.count(record[id_key], Outcome.ADDED)
                elif earlier[i] == payloads[i]:
                    report.count(record[id_key], Outcome.DUPLICATE)
                else:
                    report.count(record[id_key], Outcome.CONFLICT)
        return report

    async def add(
        self,
        orders: Sequence[dict[str, Any]],
        returns: Sequence[dict[str, Any]],
        *,
        source: str,
        returns_row_offset: int = 1,
    ) -> tuple[IngestReport, IngestReport]:
        try:
            if returns:
                wanted = sorted({record["order_id"] for record in returns})
                stored = await self._client.hmget(self.orders_key, wanted)
                known = {
                    order_id: orjson.loads(payload)
                    for order_id, payload in zip(wanted, stored, strict=True)
                    if payload is not None
                }
                for order in orders:
                    known.setdefault(order["order_id"], order)
                _check_returns(returns, known, source=source, row_offset=returns_row_offset)
            order_report = await self._put(self.orders_key, orders, "order_id")
            return_report = await self._put(self.returns_key, returns, "return_id")
        except _UNREACHABLE as exc:
            raise StoreError(f"Redis outcomes: {exc}") from exc
        return order_report, return_report

    async def load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        try:
            loaded = []
            for key in (self.orders_key, self.returns_key):
                records = []
                async for _, payload in self._client.hscan_iter(key, count=_CHUNK):
                    records.append(orjson.loads(payload))
                loaded.append(records)
        except _UNREACHABLE as exc:
            raise StoreError(f"Redis outcomes: {exc}") from exc
        return loaded[0], loaded[1]

    async def close(self) -> None:
        await self._client.aclose()


def open_outcome_store(settings: Settings) -> OutcomeStore:
    """Redis when ``UPSELL_REDIS_URL`` is set, else ``<state_dir>/outcomes/``."""
    if settings.redis_url:
        client = open_redis_client(settings.redis_url)
        return RedisOutcomeStore(client, prefix=settings.redis_prefix)
    return FileOutcomeStore(settings.state_dir / "outcomes")


# -- frames for the report ------------------------------------------------------------------

ORDER_LINE_SCHEMA: Final = pl.Schema(
    {
        "order_id": pl.String(),
        "customer": pl.String(),
        "session": pl.String(),
        "ordered_at": pl.Datetime("us"),
        "channel": pl.String(),
        "store_id": pl.String(),
        "sku": pl.String(),
        "quantity": pl.Int64(),
        "unit_price": pl.Float64(),
    }
)
RETURN_SCHEMA: Final = pl.Schema(
    {
        "return_id": pl.String(),
        "order_id": pl.String(),
        "sku": pl.String(),
        "quantity": pl.Int64(),
        "returned_at": pl.Datetime("us"),
    }
)


def outcome_frames(
    orders: Sequence[Mapping[str, Any]], returns: Sequence[Mapping[str, Any]]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Stored records as frames: one row per order line, one per return."""
    lines = [
        {
            **{name: order[name] for name in ORDER_LINE_SCHEMA if name in order},
            **line,
        }
        for order in orders
        for line in order["lines"]
    ]
    as_read = pl.Schema({**ORDER_LINE_SCHEMA, "ordered_at": pl.String()})
    order_lines = pl.DataFrame(
        [{name: line.get(name) for name in as_read} for line in lines], schema=as_read
    ).with_columns(pl.col("ordered_at").str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="us"))
    as_read = pl.Schema({**RETURN_SCHEMA, "returned_at": pl.String()})
    returned = pl.DataFrame(
        [{name: record.get(name) for name in as_read} for record in returns], schema=as_read
    ).with_columns(pl.col("returned_at").str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="us"))
    return order_lines, returned
