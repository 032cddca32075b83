"""Inventory delta batches: validation names file, row and column; the log encoding round-trips."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rules.errors import ContractError, StoreError
from service.store.deltas import (
    INVENTORY_DELTAS,
    decode_log_payload,
    deltas_from_records,
    encode_log_payload,
    read_delta_file,
)

NOW = datetime(2025, 3, 1, 12, 0)
HEADER = "delta_id,sku,node_id,atp,safety_stock,inbound,as_of\n"


def write(path: Path, body: str, header: str = HEADER) -> Path:
    path.write_text(header + body, encoding="utf-8")
    return path


def test_csv_reads_with_optional_fields_empty_as_null(tmp_path: Path) -> None:
    """Empty safety_stock/inbound mean "keep"; absent optional columns are null too."""
    batch = read_delta_file(
        write(
            tmp_path / "deltas.csv",
            "d1,SKU-1,S001,5,,,2025-03-01T10:00:00\nd2,SKU-2,S001,0,2,7,2025-03-01 10:05\n",
        ),
        now=NOW,
    )
    assert batch.source == "deltas.csv"
    assert batch.frame.schema == {c.name: c.dtype for c in INVENTORY_DELTAS.columns}
    assert batch.frame.get_column("safety_stock").to_list() == [None, 2]
    assert batch.frame.get_column("as_of").to_list() == [
        datetime(2025, 3, 1, 10),
        datetime(2025, 3, 1, 10, 5),
    ]
    minimal = read_delta_file(
        write(
            tmp_path / "minimal.csv",
            "d1,SKU-1,S001,5,2025-03-01T10:00:00Z\n",
            header="delta_id,sku,node_id,atp,as_of\n",
        ),
        now=NOW,
    )
    assert minimal.frame.get_column("inbound").to_list() == [None]


def test_parquet_reads_like_csv(tmp_path: Path) -> None:
    """A Parquet file with typed columns (tz-aware as_of) gives the same batch."""
    path = tmp_path / "deltas.parquet"
    pl.DataFrame(
        {
            "delta_id": ["d1"],
            "sku": ["SKU-1"],
            "node_id": ["S001"],
            "atp": [5],
            "as_of": pl.Series([datetime(2025, 3, 1, 11, tzinfo=UTC)]).dt.convert_time_zone(
                "Europe/Berlin"
            ),
        }
    ).write_parquet(path)
    batch = read_delta_file(path, now=NOW)
    assert batch.frame.get_column("as_of").to_list() == [datetime(2025, 3, 1, 11)]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("d1,SKU-1,S001,5,,,2025-03-01\nd2,SKU-1,S001,-1,,,2025-03-01\n", "row 2, column 'atp'"),
        (
            "d1,SKU-1,S001,5,,,2025-03-01\nd1,SKU-2,S001,1,,,2025-03-01\n",
            "row 2, column 'delta_id'",
        ),
        ("d 1,SKU-1,S001,5,,,2025-03-01\n", "row 1, column 'delta_id'"),
        ("d1,SKU-1,S001,5,,,2025-03-02\n", "row 1, column 'as_of'"),
        ("d1,SKU-1,S001,5,,,yesterday\n", "row 1, column 'as_of'"),
        ("d1,SKU-1,,5,,,2025-03-01\n", "row 1, column 'node_id'"),
        (
            "d1,SKU-1,S001,5,,,2025-03-01T10:00\nd2,SKU-1,S001,6,,,2025-03-01T10:00\n",
            "row 2, column 'as_of'",
        ),
    ],
    ids=[
        "negative-atp",
        "repeated-id",
        "id-with-space",
        "future-as-of",
        "not-a-datetime",
        "missing-node",
        "one-cell-one-instant-twice",
    ],
)
def test_bad_rows_are_refused_naming_file_row_and_column(
    tmp_path: Path, body: str, where: str
) -> None:
    """Any bad row refuses the whole file with a ContractError that says where."""
    with pytest.raises(ContractError, match=f"deltas.csv, {where}"):
        read_delta_file(write(tmp_path / "deltas.csv", body), now=NOW)


def test_missing_required_column_is_named(tmp_path: Path) -> None:
    """A file without as_of is refused naming the column."""
    with pytest.raises(ContractError, match="column 'as_of'"):
        read_delta_file(
            write(tmp_path / "deltas.csv", "d1,SKU-1,S001,5\n", "delta_id,sku,node_id,atp\n"),
            now=NOW,
        )


def test_records_take_aware_datetimes_as_utc_and_count_rows_from_offset() -> None:
    """JSON-like records: aware as_of becomes naive UTC; row numbers start at row_offset."""
    cet = timezone(timedelta(hours=1))
    records = [
        {
            "delta_id": "d1",
            "sku": "A",
            "node_id": "N",
            "atp": 1,
            "as_of": datetime(2025, 3, 1, 11, tzinfo=cet),
        },
        {"delta_id": "d2", "sku": "A", "node_id": "N", "atp": -4, "as_of": datetime(2025, 3, 1)},
    ]
    with pytest.raises(ContractError, match=r"body, row 1, column 'atp'"):
        deltas_from_records(records, source="body", now=NOW, row_offset=0)
    batch = deltas_from_records(records[:1], source="body", now=NOW)
    assert batch.frame.get_column("as_of").to_list() == [datetime(2025, 3, 1, 10)]


def test_an_as_of_outside_utcs_range_is_refused_not_a_crash() -> None:
    """Found by schemathesis: year 1 at +01:00 has no UTC instant (OverflowError, a 500)."""
    records = [
        {"delta_id": "d1", "sku": "A", "node_id": "N", "atp": 1, "as_of": datetime(2025, 3, 1)},
        {
            "delta_id": "d2",
            "sku": "A",
            "node_id": "M",
            "atp": 0,
            "as_of": datetime(1, 1, 1, 0, 0, 11, tzinfo=timezone(timedelta(hours=1))),
        },
    ]
    with pytest.raises(ContractError, match=r"body, row 2, column 'as_of': 0001-01-01T00:00:11"):
        deltas_from_records(records, source="body", now=NOW)


def test_nul_in_a_sku_is_refused() -> None:
    """NUL separates fields in the stores' encodings, so no id may hold one."""
    with pytest.raises(ContractError, match="column 'sku': sku contains a NUL"):
        deltas_from_records(
            [{"delta_id": "d1", "sku": "A\x00B", "node_id": "N", "atp": 1, "as_of": NOW}],
            source="body",
            now=NOW,
        )


def test_log_payload_round_trips_with_empty_fields() -> None:
    """encode_log_payload / decode_log_payload keep every field, nulls included."""
    batch = deltas_from_records(
        [
            {"delta_id": "d1", "sku": "A,1", "node_id": "N", "atp": 1, "as_of": NOW},
            {
                "delta_id": "d2",
                "sku": "B",
                "node_id": "N:2",
                "atp": 0,
                "safety_stock": 3,
                "inbound": 4,
                "as_of": NOW - timedelta(microseconds=1),
            },
        ],
        source="body",
        now=NOW,
    )
    frame = batch.with_as_of_us().drop("as_of", "position")
    decoded = decode_log_payload(encode_log_payload(frame), source="test")
    assert_frame_equal(decoded, frame)
    assert decode_log_payload(b"", source="test").height == 0
    with pytest.raises(StoreError, match="not 7 per delta"):
        decode_log_payload(b"a\x00b", source="test")
