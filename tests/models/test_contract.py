"""Reading and validating contract files: every failure names file, row and column."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from models.data.contract import (
    find_table_file,
    read_orders,
    read_snapshot_dir,
    read_table,
)
from models.data.schema import INVENTORY, ITEMS, NODES, ORDER_LINES, TableSpec
from rules.errors import ContractError

Row = dict[str, str | None]

GOOD_ORDERS: list[Row] = [
    {
        "order_id": "A1",
        "customer_id": "C9",
        "sku": "S1",
        "quantity": "2",
        "unit_price": "3.5",
        "ordered_at": "2024-03-01T10:00:00",
    },
    {
        "order_id": "A1",
        "customer_id": "C9",
        "sku": "S2",
        "quantity": "1",
        "unit_price": "10",
        "ordered_at": "2024-03-01T10:00:00",
    },
    {
        "order_id": "A2",
        "customer_id": None,
        "sku": "S1",
        "quantity": "5",
        "unit_price": "3.25",
        "ordered_at": "2024-03-02",
    },
]
GOOD_ITEMS: list[Row] = [
    {
        "sku": "S1",
        "name": "Mug",
        "category": "KITCHEN",
        "unit_cost": "1.2",
        "unit_price": "3.5",
        "age_restricted": "no",
    },
    {
        "sku": "S2",
        "name": "Wine",
        "category": "DRINK",
        "unit_cost": "4",
        "unit_price": "10",
        "age_restricted": "YES",
    },
    {
        "sku": "S3",
        "name": "Card",
        "category": "CARDS",
        "unit_cost": "0",
        "unit_price": "1.5",
        "age_restricted": "0",
    },
]
GOOD_NODES: list[Row] = [
    {"node_id": "DC-1", "kind": "dc", "region": "UK", "fulfillment_cost": "4"},
    {"node_id": "S-UK", "kind": "store", "region": "UK", "fulfillment_cost": "6.5"},
]
GOOD_INVENTORY: list[Row] = [
    {"sku": "S1", "node_id": "DC-1", "atp": "10", "safety_stock": "2", "as_of": "2024-03-05"},
    {"sku": "S2", "node_id": "DC-1", "atp": "0", "safety_stock": "0", "as_of": "2024-03-04"},
    {"sku": "S1", "node_id": "S-UK", "atp": "3", "safety_stock": "3", "as_of": None},
]
GOOD_ROWS: dict[str, list[Row]] = {
    "orders": GOOD_ORDERS,
    "items": GOOD_ITEMS,
    "nodes": GOOD_NODES,
    "inventory": GOOD_INVENTORY,
}
SPECS: dict[str, TableSpec] = {spec.name: spec for spec in (ORDER_LINES, ITEMS, NODES, INVENTORY)}


def write_rows(path: Path, rows: list[Row]) -> Path:
    """Write rows as text: CSV with empty cells for None, or Parquet with all-string columns."""
    columns = list(rows[0])
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows([["" if row[c] is None else row[c] for c in columns] for row in rows])
    else:
        frame = pl.DataFrame(
            {c: [row[c] for row in rows] for c in columns}, schema=dict.fromkeys(columns, pl.String)
        )
        frame.write_parquet(path)
    return path


def with_change(rows: list[Row], index: int, **changes: str | None) -> list[Row]:
    """A copy of rows with row ``index`` (0-based) changed."""
    copied = [dict(row) for row in rows]
    copied[index].update(changes)
    return copied


def with_return_rates(*rates: str) -> list[Row]:
    """GOOD_ITEMS with a return_rate column holding ``rates``."""
    return [{**row, "return_rate": rate} for row, rate in zip(GOOD_ITEMS, rates, strict=True)]


@dataclass(frozen=True)
class Failure:
    """One failure kind: the table and its rows, then the row, column and words the error names."""

    table: str
    rows: list[Row]
    row: int
    column: str
    problem: str


FAILURES = [
    pytest.param(
        Failure(
            "orders",
            with_change(GOOD_ORDERS, 1, quantity="abc"),
            2,
            "quantity",
            "'abc' is not a whole number",
        ),
        id="quantity-not-int",
    ),
    pytest.param(
        Failure(
            "orders",
            with_change(GOOD_ORDERS, 2, quantity="2.5"),
            3,
            "quantity",
            "not a whole number",
        ),
        id="quantity-fraction",
    ),
    pytest.param(
        Failure("orders", with_change(GOOD_ORDERS, 0, quantity="0"), 1, "quantity", "must be > 0"),
        id="quantity-zero",
    ),
    pytest.param(
        Failure(
            "orders",
            with_change(GOOD_ORDERS, 2, unit_price="-1"),
            3,
            "unit_price",
            "negative unit price",
        ),
        id="price-negative",
    ),
    pytest.param(
        Failure(
            "orders",
            with_change(GOOD_ORDERS, 1, ordered_at="2024-02-30"),
            2,
            "ordered_at",
            "not an ISO 8601 date or datetime",
        ),
        id="bad-datetime",
    ),
    pytest.param(
        Failure(
            "orders",
            with_change(GOOD_ORDERS, 0, ordered_at="yesterday"),
            1,
            "ordered_at",
            "'yesterday'",
        ),
        id="text-datetime",
    ),
    pytest.param(
        Failure(
            "orders", with_change(GOOD_ORDERS, 2, order_id=" "), 3, "order_id", "missing order id"
        ),
        id="blank-order-id",
    ),
    pytest.param(
        Failure(
            "items", with_change(GOOD_ITEMS, 1, unit_cost=None), 2, "unit_cost", "missing unit cost"
        ),
        id="missing-unit-cost",
    ),
    pytest.param(
        Failure(
            "items",
            with_change(GOOD_ITEMS, 2, unit_cost="nan"),
            3,
            "unit_cost",
            "not a finite number",
        ),
        id="cost-nan",
    ),
    pytest.param(
        Failure(
            "items", with_change(GOOD_ITEMS, 0, unit_price="0"), 1, "unit_price", "must be > 0"
        ),
        id="price-zero",
    ),
    pytest.param(
        Failure(
            "items",
            with_change(GOOD_ITEMS, 2, age_restricted="maybe"),
            3,
            "age_restricted",
            "not true/false",
        ),
        id="bad-boolean",
    ),
    pytest.param(
        Failure(
            "items", with_return_rates("0.1", "0", "1.5"), 3, "return_rate", "above the maximum 1"
        ),
        id="return-rate-high",
    ),
    pytest.param(
        Failure(
            "items",
            with_change(GOOD_ITEMS, 2, sku="S1"),
            3,
            "sku",
            "duplicate key (sku='S1'): already on row 1",
        ),
        id="duplicate-sku",
    ),
    pytest.param(
        Failure(
            "nodes",
            with_change(GOOD_NODES, 1, kind="warehouse"),
            2,
            "kind",
            "'warehouse' is not one of 'store', 'dc'",
        ),
        id="bad-kind",
    ),
    pytest.param(
        Failure(
            "nodes",
            with_change(GOOD_NODES, 0, fulfillment_cost="-2"),
            1,
            "fulfillment_cost",
            "negative fulfillment cost",
        ),
        id="negative-fulfillment-cost",
    ),
    pytest.param(
        Failure(
            "inventory", with_change(GOOD_INVENTORY, 2, atp="-3"), 3, "atp", "negative atp: -3"
        ),
        id="negative-stock",
    ),
    pytest.param(
        Failure(
            "inventory",
            with_change(GOOD_INVENTORY, 0, safety_stock="-1"),
            1,
            "safety_stock",
            "negative safety stock",
        ),
        id="negative-safety-stock",
    ),
    pytest.param(
        Failure(
            "inventory",
            with_change(GOOD_INVENTORY, 2, node_id="DC-1"),
            3,
            "sku, node_id",
            "already on row 1",
        ),
        id="duplicate-stock-key",
    ),
    pytest.param(
        Failure(
            "orders",
            with_change(with_change(GOOD_ORDERS, 2, quantity="x"), 1, unit_price="y"),
            2,
            "unit_price",
            "'y'",
        ),
        id="earliest-row-wins",
    ),
]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("failure", FAILURES)
def test_failure_names_file_row_and_column(tmp_path: Path, suffix: str, failure: Failure) -> None:
    """Each kind of bad value is refused naming the file, first bad row, column and problem."""
    path = write_rows(tmp_path / f"{failure.table}{suffix}", failure.rows)
    with pytest.raises(ContractError) as caught:
        read_table(path, SPECS[failure.table])
    error = caught.value
    assert (error.file, error.row, error.column) == (path.name, failure.row, failure.column)
    assert failure.problem in error.problem
    assert str(error).startswith(f"{path.name}, row {failure.row}, column '{failure.column}': ")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_required_column_is_refused(tmp_path: Path, suffix: str) -> None:
    """A file without a required column is refused as a whole (no row), naming the column."""
    rows = [{k: v for k, v in row.items() if k != "unit_cost"} for row in GOOD_ITEMS]
    path = write_rows(tmp_path / f"items{suffix}", rows)
    with pytest.raises(ContractError) as caught:
        read_table(path, ITEMS)
    assert (caught.value.row, caught.value.column) == (None, "unit_cost")
    assert "missing required column 'unit_cost'" in caught.value.problem


@pytest.mark.parametrize("table", sorted(GOOD_ROWS))
def test_good_files_round_trip_identically_from_csv_and_parquet(tmp_path: Path, table: str) -> None:
    """A good table reads to the same canonical frame from CSV and from Parquet."""
    spec = SPECS[table]
    from_csv = read_table(write_rows(tmp_path / f"{table}.csv", GOOD_ROWS[table]), spec)
    from_parquet = read_table(write_rows(tmp_path / f"{table}.parquet", GOOD_ROWS[table]), spec)
    assert from_csv.columns == list(spec.column_names)
    assert from_csv.schema == pl.Schema({c.name: c.dtype for c in spec.columns})
    assert_frame_equal(from_csv, from_parquet)
    written = tmp_path / "again" / f"{table}.parquet"
    written.parent.mkdir()
    from_csv.write_parquet(written)
    assert_frame_equal(read_table(written, spec), from_csv)


def test_values_are_parsed_to_canonical_types(tmp_path: Path) -> None:
    """Booleans, dates, offsets and defaults of absent optional columns come out canonical."""
    items = read_table(write_rows(tmp_path / "items.csv", GOOD_ITEMS), ITEMS)
    assert items.get_column("age_restricted").to_list() == [False, True, False]
    assert items.get_column("return_rate").to_list() == [0.0, 0.0, 0.0]
    assert items.get_column("promo_price").null_count() == 3
    rows = [
        with_change(GOOD_ORDERS, 0, ordered_at=text)[0]
        | {"order_id": f"O{index}", "customer_id": None}
        for index, text in enumerate(
            [
                "2024-03-01",
                "2024-03-01 10:30",
                "2024-03-01T10:30:15.25Z",
                "2024-03-01T12:30:00+02:00",
            ]
        )
    ]
    orders = read_table(write_rows(tmp_path / "orders.csv", rows), ORDER_LINES)
    assert orders.get_column("ordered_at").to_list() == [
        datetime(2024, 3, 1),
        datetime(2024, 3, 1, 10, 30),
        datetime(2024, 3, 1, 10, 30, 15, 250000),
        datetime(2024, 3, 1, 10, 30),
    ]
    assert orders.get_column("channel").null_count() == 4
    inventory = read_table(
        write_rows(tmp_path / "inventory.csv", [{"sku": "S1", "node_id": "N", "atp": "4"}]),
        INVENTORY,
    )
    assert inventory.row(0, named=True) == {
        "sku": "S1", "node_id": "N", "atp": 4, "safety_stock": 0, "inbound": 0, "as_of": None,
    }  # fmt: skip


def test_extra_columns_are_ignored(tmp_path: Path) -> None:
    """Columns the contract does not name are dropped, not refused."""
    rows = [{**row, "colour": "red"} for row in GOOD_NODES]
    nodes = read_table(write_rows(tmp_path / "nodes.csv", rows), NODES)
    assert nodes.columns == list(NODES.column_names)


def test_typed_parquet_is_cast_and_lossy_values_refused(tmp_path: Path) -> None:
    """Typed Parquet columns are cast; a fractional float in an integer column is refused."""
    frame = pl.DataFrame(
        {
            "sku": ["S1", "S2"],
            "node_id": ["N", "N"],
            "atp": [3.0, 2.5],
            "as_of": pl.Series(
                [datetime(2024, 1, 1, 12), datetime(2024, 1, 2, 12)], dtype=pl.Datetime("ns")
            ).dt.replace_time_zone("Europe/Paris"),
        }
    )
    path = tmp_path / "inventory.parquet"
    frame.write_parquet(path)
    with pytest.raises(ContractError) as caught:
        read_table(path, INVENTORY)
    assert (caught.value.row, caught.value.column) == (2, "atp")
    frame.with_columns(pl.col("atp").cast(pl.Int32).abs()).write_parquet(path)
    good = read_table(path, INVENTORY)
    assert good.schema["atp"] == pl.Int64
    assert good.get_column("as_of").to_list()[0] == datetime(2024, 1, 1, 11)  # 12:00 CET as UTC


@pytest.mark.parametrize(
    ("content", "row", "words"),
    [
        (b"sku,node_id,atp\nS1,N,1\nS2,N,1,9\n", 2, "4 fields where the header has 3"),
        (b"sku,node_id,atp\nS1,N,1\nS2,\xff,1\n", 2, "not valid UTF-8"),
        (b"", None, "empty file"),
    ],
    ids=["ragged", "not-utf8", "empty"],
)
def test_malformed_csv_is_refused(
    tmp_path: Path, content: bytes, row: int | None, words: str
) -> None:
    """A CSV polars cannot read is refused, with the bad row where it can be found."""
    path = tmp_path / "inventory.csv"
    path.write_bytes(content)
    with pytest.raises(ContractError) as caught:
        read_table(path, INVENTORY)
    assert caught.value.file == "inventory.csv"
    assert caught.value.row == row
    assert words in caught.value.problem


def test_unreadable_parquet_and_unknown_suffix_are_refused(tmp_path: Path) -> None:
    """A corrupt Parquet file and a file that is neither CSV nor Parquet are refused."""
    corrupt = tmp_path / "items.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet PAR1")
    with pytest.raises(ContractError, match="unreadable Parquet"):
        read_table(corrupt, ITEMS)
    other = tmp_path / "items.xlsx"
    other.write_bytes(b"")
    with pytest.raises(ContractError, match="unsupported file type"):
        read_table(other, ITEMS)


def test_repeated_header_is_refused(tmp_path: Path) -> None:
    """A CSV with the same contract column twice is refused rather than guessing which is right."""
    path = tmp_path / "nodes.csv"
    path.write_text("node_id,kind,region,kind\nN,dc,UK,store\n")
    with pytest.raises(ContractError, match="appears more than once"):
        read_table(path, NODES)


def test_find_table_file_wants_exactly_one_file(tmp_path: Path) -> None:
    """find_table_file returns the one CSV or Parquet file, and refuses none or both."""
    with pytest.raises(ContractError, match=r"expected items\.csv or items\.parquet"):
        find_table_file(tmp_path, ITEMS)
    csv_path = write_rows(tmp_path / "items.csv", GOOD_ITEMS)
    assert find_table_file(tmp_path, ITEMS) == csv_path
    write_rows(tmp_path / "items.parquet", GOOD_ITEMS)
    with pytest.raises(ContractError, match=r"both items\.csv and items\.parquet"):
        find_table_file(tmp_path, ITEMS)


def test_read_table_refuses_duplicate_order_lines_but_read_orders_merges_them(
    tmp_path: Path,
) -> None:
    """read_orders merges repeated (order_id, sku) lines: quantities add, price unit-weighted."""
    rows = [*GOOD_ORDERS, with_change(GOOD_ORDERS, 0, quantity="6", unit_price="1.5")[0]]
    path = write_rows(tmp_path / "orders.csv", rows)
    with pytest.raises(ContractError) as caught:
        read_table(path, ORDER_LINES)
    assert (caught.value.row, caught.value.column) == (4, "order_id, sku")
    orders = read_orders(path)
    assert orders.height == 3
    merged = orders.row(0, named=True)
    assert (merged["order_id"], merged["sku"], merged["quantity"]) == ("A1", "S1", 8)
    assert merged["unit_price"] == pytest.approx((2 * 3.5 + 6 * 1.5) / 8)


def test_read_orders_still_checks_values(tmp_path: Path) -> None:
    """read_orders merges duplicates but refuses bad values like read_table does."""
    path = write_rows(tmp_path / "orders.csv", with_change(GOOD_ORDERS, 2, quantity="-1"))
    with pytest.raises(ContractError) as caught:
        read_orders(path)
    assert (caught.value.row, caught.value.column) == (3, "quantity")


def write_snapshot(directory: Path, suffix: str = ".csv", **tables: list[Row]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("items", "nodes", "inventory"):
        write_rows(directory / f"{name}{suffix}", tables.get(name, GOOD_ROWS[name]))
    return directory


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_snapshot_dir_reads_all_tables_and_oldest_as_of(tmp_path: Path, suffix: str) -> None:
    """A good snapshot directory gives all three tables and the oldest inventory as_of."""
    snapshot = read_snapshot_dir(write_snapshot(tmp_path / "snap", suffix))
    assert (snapshot.items.height, snapshot.nodes.height, snapshot.inventory.height) == (3, 2, 3)
    assert snapshot.as_of == datetime(2024, 3, 4)


def test_snapshot_as_of_falls_back_to_now(tmp_path: Path) -> None:
    """Without inventory as_of values the snapshot's as_of is the given now, as naive UTC."""
    rows = [{k: v for k, v in row.items() if k != "as_of"} for row in GOOD_INVENTORY]
    directory = write_snapshot(tmp_path / "snap", inventory=rows)
    now = datetime.fromisoformat("2024-05-01T12:00:00+02:00")
    assert read_snapshot_dir(directory, now=now).as_of == datetime(2024, 5, 1, 10)
    before = datetime.now(UTC).replace(tzinfo=None)
    assert read_snapshot_dir(directory).as_of >= before.replace(microsecond=0)


@pytest.mark.parametrize(
    ("change", "row", "column", "words"),
    [
        ({"sku": "S9"}, 2, "sku", "unknown sku 'S9': not in the item master"),
        ({"node_id": "S-FR"}, 2, "node_id", "unknown node_id 'S-FR': not in the nodes table"),
    ],
    ids=["unknown-sku", "unknown-node"],
)
def test_snapshot_refuses_dangling_inventory_references(
    tmp_path: Path, change: dict[str, str], row: int, column: str, words: str
) -> None:
    """Inventory rows must point at known items and nodes; the error names inventory's row."""
    directory = write_snapshot(
        tmp_path / "snap", inventory=with_change(GOOD_INVENTORY, 1, **change)
    )
    with pytest.raises(ContractError) as caught:
        read_snapshot_dir(directory)
    assert (caught.value.file, caught.value.row, caught.value.column) == (
        "inventory.csv",
        row,
        column,
    )
    assert words in caught.value.problem


def test_snapshot_is_all_or_nothing(tmp_path: Path) -> None:
    """One bad value in the last table's last row refuses the whole snapshot."""
    directory = write_snapshot(
        tmp_path / "snap", inventory=with_change(GOOD_INVENTORY, 2, atp="-1")
    )
    result: object = None
    with pytest.raises(ContractError, match="negative atp"):
        result = read_snapshot_dir(directory)
    assert result is None


def test_snapshot_dir_refuses_missing_table(tmp_path: Path) -> None:
    """A snapshot directory without a nodes file is refused, naming the missing table."""
    directory = write_snapshot(tmp_path / "snap")
    (directory / "nodes.csv").unlink()
    with pytest.raises(ContractError, match="no nodes table"):
        read_snapshot_dir(directory)


def test_million_row_file_reads_in_seconds(tmp_path: Path) -> None:
    """A 1M-line order CSV validates in a few seconds (bound kept loose for slow machines)."""
    count = 1_000_000
    rng = np.random.default_rng(0)
    stamps = np.datetime64("2024-01-01T00:00:00") + rng.integers(0, 10**7, count).astype(
        "timedelta64[s]"
    )
    frame = pl.DataFrame(
        {
            "order_id": (np.arange(count) // 4).astype(str),
            "customer_id": rng.integers(0, 50_000, count).astype(str),
            "sku": (np.arange(count) % 4).astype(str),
            "quantity": rng.integers(1, 9, count),
            "unit_price": np.round(rng.random(count) * 20, 2),
            "ordered_at": stamps.astype(str),
        }
    )
    path = tmp_path / "orders.csv"
    frame.write_csv(path)
    orders = read_table(path, ORDER_LINES)
    # Speed is a benchmark's job (a timed assertion flakes on a shared machine); this checks
    # that a large file validates whole and loses no row.
    assert orders.height == count
