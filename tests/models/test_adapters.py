"""Dataset adapters and ERP synthesis: public data in, valid contract files out, repeatably."""

from __future__ import annotations

import csv
import io
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from models.data.adapters import (
    COST_RATIO_MAX,
    COST_RATIO_MIN,
    ONLINE_RETAIL_PRODUCT_CODE,
    ONLINE_RETAIL_SERVICE_CODES,
    ImportSummary,
    import_online_retail,
    import_ta_feng,
)
from models.data.contract import read_orders, read_snapshot_dir, validate_table
from models.data.erp_synth import synthesize_inventory, synthesize_nodes
from models.data.schema import INVENTORY
from rules.errors import ContractError

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "models" / "sample" / "online_retail_sample.parquet"
SHARED_DATA = REPO.parent / "shared" / "data"
TABLES = ("orders", "items", "nodes", "inventory")

ONLINE_RETAIL_HEADER = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)
TA_FENG_HEADER = (
    "TRANSACTION_DT",
    "CUSTOMER_ID",
    "AGE_GROUP",
    "PIN_CODE",
    "PRODUCT_SUBCLASS",
    "PRODUCT_ID",
    "AMOUNT",
    "ASSET",
    "SALES_PRICE",
)


STOCK_AS_OF = datetime(2011, 12, 10)


@pytest.fixture(scope="module")
def sample_import(tmp_path_factory: pytest.TempPathFactory) -> ImportSummary:
    return import_online_retail(SAMPLE, tmp_path_factory.mktemp("sample"), stock_as_of=STOCK_AS_OF)


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / f"{name}.parquet").read_bytes() for name in TABLES}


def write_online_retail_csv(path: Path, rows: Sequence[tuple[str, ...]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(ONLINE_RETAIL_HEADER)
        writer.writerows(rows)
    return path


def ta_feng_csv_bytes(rows: Sequence[tuple[str, ...]]) -> bytes:
    """Rows in the published Ta-Feng format: UTF-8 with a BOM, every value quoted."""
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(TA_FENG_HEADER)
    writer.writerows(rows)
    return text.getvalue().encode("utf-8-sig")


TA_FENG_ROWS = [
    ("11/1/2000", "01104905", "45-49", "115", "110411", "4710199010372", "2", "24", "30"),
    # The same item again in the same basket: merged into one order line.
    ("11/1/2000", "01104905", "45-49", "115", "110411", "4710199010372", "1", "12", "14"),
    # Sold below cost: a real loss leader, kept.
    ("11/1/2000", "00418683", "30-34", "221", "120107", "4710857472535", "1", "48", "46"),
    ("11/2/2000", "01104905", "45-49", "115", "110411", "4710199010372", "3", "36", "45"),
    ("11/2/2000", "00418683", "30-34", "221", "999999", "4710199010372", "1", "12", "15"),
    ("11/3/2000", "00418683", "30-34", "221", "120107", "4710857472535", "0", "0", "0"),
    ("11/3/2000", "00418683", "30-34", "221", "120107", "4710857472535", "2", "96", "0"),
    ("12/31/2000", "02000001", "", "Unknown", "500101", "20000000001", "4", "10", "20"),
]


def test_sample_import_accounts_for_every_line(sample_import: ImportSummary) -> None:
    """Every sample line is kept or dropped for a named reason, and every reason occurs."""
    summary = sample_import
    assert summary.lines_read == summary.lines_kept + sum(summary.lines_dropped.values())
    assert set(summary.lines_dropped) == {
        "cancellation",
        "non_product",
        "non_positive_quantity",
        "non_positive_price",
    }
    assert all(count > 0 for count in summary.lines_dropped.values())
    assert summary.items == 500
    assert summary.nodes == 5  # stores in UK, EU, INTL and two DCs
    assert summary.orders > 10_000
    assert summary.customers > 3_000
    assert summary.order_lines <= summary.lines_kept  # repeated lines merged


def test_sample_outputs_pass_the_contract(sample_import: ImportSummary) -> None:
    """The four written files read back through the contract readers unchanged in size."""
    out_dir = sample_import.outputs["orders"].parent
    assert set(sample_import.outputs) == set(TABLES)
    assert read_orders(sample_import.outputs["orders"]).height == sample_import.order_lines
    snapshot = read_snapshot_dir(out_dir)
    assert snapshot.items.height == sample_import.items
    assert snapshot.nodes.height == sample_import.nodes
    assert snapshot.inventory.height == sample_import.inventory_rows
    assert snapshot.as_of == STOCK_AS_OF
    assert not list(out_dir.glob(".*.tmp"))


def test_sample_drops_cancellations_and_non_products(sample_import: ImportSummary) -> None:
    """No cancellation invoice and no postage, fee or voucher code reaches the orders."""
    orders = pl.read_parquet(sample_import.outputs["orders"])
    assert orders.filter(pl.col("order_id").str.starts_with("C")).height == 0
    skus = orders.get_column("sku").unique()
    assert skus.str.contains(ONLINE_RETAIL_PRODUCT_CODE).all()
    assert not skus.is_in(list(ONLINE_RETAIL_SERVICE_CODES)).any()
    assert (orders.get_column("quantity") > 0).all()
    assert (orders.get_column("unit_price") > 0).all()
    assert set(orders.get_column("channel").unique()) == {"web"}


def test_sample_items_follow_the_stated_assumptions(sample_import: ImportSummary) -> None:
    """Costs are 35-80% of price, return rates lie in [0, 0.5], categories come from names."""
    items = pl.read_parquet(sample_import.outputs["items"])
    ratio = items.get_column("unit_cost") / items.get_column("unit_price")
    assert ratio.min() >= COST_RATIO_MIN - 1e-3  # type: ignore[operator]
    assert ratio.max() <= COST_RATIO_MAX + 1e-3  # type: ignore[operator]
    assert ratio.std() > 0.05  # type: ignore[operator]
    returns = items.get_column("return_rate")
    assert returns.min() >= 0.0  # type: ignore[operator]
    assert returns.max() <= 0.5  # type: ignore[operator]
    assert (returns > 0).sum() > 50
    categories = items.get_column("category")
    assert categories.n_unique() > 10
    assert (categories == "OTHER").mean() < 0.3  # type: ignore[operator]
    by_name = dict(zip(items["name"], items["category"], strict=True))
    assert by_name["WHITE HANGING HEART T-LIGHT HOLDER"] == "CANDLES"
    assert by_name["JUMBO BAG RED RETROSPOT"] == "BAGS"


def test_stock_is_as_of_the_import_by_default(tmp_path: Path) -> None:
    """Synthesized stock is stamped with the time of the import unless a time is given."""
    before = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    import_online_retail(SAMPLE, tmp_path / "now")
    as_of = read_snapshot_dir(tmp_path / "now").as_of
    assert before <= as_of <= datetime.now(UTC).replace(tzinfo=None)


def test_import_is_deterministic(tmp_path: Path, sample_import: ImportSummary) -> None:
    """Importing the same source with the same seed twice writes byte-identical files."""
    again = import_online_retail(SAMPLE, tmp_path / "again", stock_as_of=STOCK_AS_OF)
    assert again == ImportSummary(**{**sample_import.__dict__, "outputs": again.outputs})
    assert file_bytes(tmp_path / "again") == file_bytes(sample_import.outputs["orders"].parent)


def test_seed_changes_only_the_synthetic_parts(tmp_path: Path) -> None:
    """Another seed changes costs and stock but not the orders taken from the data."""
    first = import_online_retail(SAMPLE, tmp_path / "seed7", seed=7)
    second = import_online_retail(SAMPLE, tmp_path / "seed8", seed=8)
    assert first.outputs["orders"].read_bytes() == second.outputs["orders"].read_bytes()
    assert first.outputs["items"].read_bytes() != second.outputs["items"].read_bytes()
    assert first.outputs["inventory"].read_bytes() != second.outputs["inventory"].read_bytes()


def test_online_retail_mapping_on_a_tiny_csv(tmp_path: Path) -> None:
    """Customer ids, SKU case, names, prices, return rates and regions map as documented."""
    holder, stand = "WHITE HANGING HEART T-LIGHT HOLDER", "REGENCY CAKESTAND 3 TIER"
    day1, day2, day3 = "2010-12-01 08:26:00", "2010-12-02 10:00:00", "2010-12-03 10:00:00"
    uk = "United Kingdom"
    rows = [
        ("536365", "85123A", holder, "6", day1, "2.55", "17850.0", uk),
        ("536366", "85123a", f"{holder} ", "4", day1, "2.95", "", "France"),
        ("536366", "85123A", "HANGING HEART", "2", day1, "2.95", "", "France"),
        ("536367", "22423", stand, "1", day2, "12.75", "13047", "Japan"),
        ("536367", "POST", "POSTAGE", "1", day2, "18", "13047", "Japan"),
        ("C536368", "85123A", holder, "-3", day3, "2.55", "17850", uk),
        ("536369", "22423", "?", "-5", day3, "0", "", uk),
        ("536370", "22423", stand, "2", day3, "0", "", uk),
    ]
    source = write_online_retail_csv(tmp_path / "online_retail.csv", rows)
    summary = import_online_retail(source, tmp_path / "out")
    assert dict(summary.lines_dropped) == {
        "cancellation": 1,
        "non_product": 1,
        "non_positive_quantity": 1,
        "non_positive_price": 1,
    }
    orders = pl.read_parquet(summary.outputs["orders"])
    assert orders.select("order_id", "customer_id", "sku", "quantity").rows() == [
        ("536365", "17850", "85123A", 6),
        ("536366", None, "85123A", 6),  # '85123a' and '85123A' are one item, lines merged
        ("536367", "13047", "22423", 1),
    ]
    items = pl.read_parquet(summary.outputs["items"]).sort("sku")
    assert items.select("sku", "name", "unit_price", "return_rate").rows() == [
        ("22423", stand, 12.75, 0.0),
        ("85123A", holder, 2.95, 3 / 12),
    ]
    nodes = pl.read_parquet(summary.outputs["nodes"])
    assert sorted(nodes.get_column("node_id")) == ["DC-1", "DC-2", "S-EU", "S-INTL", "S-UK"]


def test_bad_source_value_names_row_and_column(tmp_path: Path) -> None:
    """A raw value that does not parse is refused with the source file, row and column."""
    rows = [
        ("536365", "85123A", "HOLDER", "6", "2010-12-01 08:26:00", "2.55", "17850", "EIRE"),
        ("536366", "85123A", "HOLDER", "six", "2010-12-01 08:26:00", "2.55", "17850", "EIRE"),
    ]
    source = write_online_retail_csv(tmp_path / "raw.csv", rows)
    with pytest.raises(ContractError) as caught:
        import_online_retail(source, tmp_path / "out")
    assert (caught.value.file, caught.value.row, caught.value.column) == ("raw.csv", 2, "Quantity")


def test_failed_import_leaves_previous_files_untouched(tmp_path: Path) -> None:
    """An import that fails keeps the last good files byte for byte and leaves no temp files."""
    out_dir = tmp_path / "out"
    import_online_retail(SAMPLE, out_dir)
    before = file_bytes(out_dir)
    only_cancellations = write_online_retail_csv(
        tmp_path / "cancelled.csv",
        [("C1", "85123A", "HOLDER", "-1", "2010-12-01 08:26:00", "2.55", "", "EIRE")],
    )
    with pytest.raises(ContractError, match="no order lines left"):
        import_online_retail(only_cancellations, out_dir)
    assert file_bytes(out_dir) == before
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(f"{t}.parquet" for t in TABLES)


def test_ta_feng_zip_in_the_published_format(tmp_path: Path) -> None:
    """A zipped, BOM-prefixed, fully quoted Ta-Feng CSV imports with the documented mapping."""
    source = tmp_path / "ta_feng.csv.zip"
    with zipfile.ZipFile(source, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ta_feng_all_months_merged.csv", ta_feng_csv_bytes(TA_FENG_ROWS))
    summary = import_ta_feng(source, tmp_path / "out", stock_as_of=STOCK_AS_OF)

    assert summary.lines_read == 8
    assert dict(summary.lines_dropped) == {
        "non_positive_quantity": 1,
        "non_positive_price": 1,
        "negative_cost": 0,
    }
    assert (summary.orders, summary.customers, summary.items, summary.order_lines) == (5, 3, 3, 5)
    orders = pl.read_parquet(summary.outputs["orders"])
    first = orders.row(0, named=True)
    assert first["order_id"] == "01104905-2000-11-01"
    assert first["customer_id"] == "01104905"  # leading zeros kept: ids are text
    assert first["quantity"] == 3
    assert first["unit_price"] == pytest.approx(44 / 3)
    assert first["ordered_at"] == datetime(2000, 11, 1)
    assert first["store_id"] == "S-115"
    items = {
        row["sku"]: row for row in pl.read_parquet(summary.outputs["items"]).iter_rows(named=True)
    }
    assert items["4710199010372"]["category"] == "110411"  # the most frequent subclass
    assert items["4710199010372"]["unit_cost"] == 12.0
    assert items["4710199010372"]["unit_price"] == 15.0
    assert items["4710857472535"]["unit_cost"] > items["4710857472535"]["unit_price"]
    assert items["20000000001"]["name"] == "Item 20000000001"
    nodes = pl.read_parquet(summary.outputs["nodes"])
    assert set(nodes.get_column("node_id")) >= {"S-115", "S-221", "S-Unknown"}
    assert read_snapshot_dir(tmp_path / "out").items.height == 3

    unzipped = tmp_path / "ta_feng.csv"
    unzipped.write_bytes(ta_feng_csv_bytes(TA_FENG_ROWS))
    import_ta_feng(unzipped, tmp_path / "from_csv", stock_as_of=STOCK_AS_OF)
    assert file_bytes(tmp_path / "from_csv") == file_bytes(tmp_path / "out")


def test_ta_feng_zip_must_hold_one_csv(tmp_path: Path) -> None:
    """A zip without exactly one CSV is refused rather than guessed at."""
    source = tmp_path / "two.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("a.csv", ta_feng_csv_bytes(TA_FENG_ROWS))
        archive.writestr("b.csv", ta_feng_csv_bytes(TA_FENG_ROWS))
    with pytest.raises(ContractError, match=r"exactly one \.csv"):
        import_ta_feng(source, tmp_path / "out")


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("importer", "relative", "lines"),
    [
        (import_online_retail, "online-retail/online_retail.parquet", 541_909),
        (import_ta_feng, "ta-feng/ta_feng.csv.zip", 817_741),
    ],
    ids=["online-retail", "ta-feng"],
)
def test_full_dataset_imports(
    tmp_path: Path, importer: Callable[..., ImportSummary], relative: str, lines: int
) -> None:
    """The full public datasets import within a minute and pass the contract."""
    source = SHARED_DATA / relative
    if not source.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the shared datasets, and {source} is missing")
        pytest.skip(f"{source} not present")
    started = time.perf_counter()
    summary = importer(source, tmp_path / "out")
    elapsed = time.perf_counter() - started
    assert summary.lines_read == lines
    assert elapsed < 60.0, f"import took {elapsed:.1f}s"
    assert read_orders(summary.outputs["orders"]).height == summary.order_lines
    assert read_snapshot_dir(tmp_path / "out").items.height == summary.items


def synthetic_grid(seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Nodes for three regions and inventory for 2,000 SKUs with a popularity ramp."""
    skus = [f"SKU{index:05d}" for index in range(2_000)]
    items = pl.DataFrame({"sku": skus})
    popularity = pl.DataFrame({"sku": skus, "orders": list(range(2_000))})
    nodes = synthesize_nodes(["UK", "EU", "INTL", "UK"], seed=seed)
    inventory = synthesize_inventory(
        items, nodes, popularity=popularity, seed=seed, as_of=datetime(2024, 1, 1)
    )
    return nodes, inventory


def test_erp_synthesis_is_deterministic_and_order_independent() -> None:
    """Same seed, same rows, whatever the input row order; another seed, other stock."""
    nodes, inventory = synthetic_grid(seed=3)
    again_nodes, again = synthetic_grid(seed=3)
    assert nodes.equals(again_nodes)
    assert inventory.equals(again)
    items = pl.DataFrame({"sku": inventory.get_column("sku").unique().sort(descending=True)})
    shuffled = synthesize_inventory(
        items, nodes.reverse(), popularity=None, seed=3, as_of=datetime(2024, 1, 1)
    )
    unshuffled = synthesize_inventory(
        items.reverse(), nodes, popularity=None, seed=3, as_of=datetime(2024, 1, 1)
    )
    assert shuffled.equals(unshuffled)
    assert not synthetic_grid(seed=4)[1].equals(inventory)


def test_erp_synthesis_follows_the_documented_rule() -> None:
    """DCs range everything, stores ~70%; ~12% of cells are out of stock; DC-1 is busiest."""
    nodes, inventory = synthetic_grid(seed=7)
    assert nodes.select("node_id", "kind", "region").rows() == [
        ("DC-1", "dc", "UK"),
        ("DC-2", "dc", "EU"),
        ("S-UK", "store", "UK"),
        ("S-EU", "store", "EU"),
        ("S-INTL", "store", "INTL"),
    ]
    stock = inventory.join(nodes, on="node_id")
    per_kind = dict(stock.group_by("kind").len().iter_rows())
    assert per_kind["dc"] == 2 * 2_000
    assert 0.6 < per_kind["store"] / (3 * 2_000) < 0.8
    zero_share = (stock.get_column("atp") == 0).mean()
    assert 0.10 < zero_share < 0.16  # type: ignore[operator]
    assert (stock.get_column("atp") == stock.get_column("safety_stock")).sum() > 0
    assert stock.get_column("safety_stock").is_between(0, 5).all()
    assert (stock.get_column("inbound") > 0).mean() > 0.1  # type: ignore[operator]
    assert read_table_ok(inventory)


def read_table_ok(inventory: pl.DataFrame) -> bool:
    """The synthesized frame passes the INVENTORY contract unchanged."""
    return validate_table(inventory, INVENTORY, file="inventory").equals(inventory)
