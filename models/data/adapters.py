"""Turn the two public retail datasets into contract files (orders, items, nodes, inventory).

Each importer reads the raw public file, drops the lines that are not sales of products
(counting every drop by reason), derives the item master from the kept lines, synthesizes the
ERP tables the sets lack (``erp_synth``), validates all four tables against the contract and
only then writes ``orders.parquet``, ``items.parquet``, ``nodes.parquet`` and
``inventory.parquet``: to temporary names in the output directory first, then renamed over the
old files, so a failed import leaves the previous files untouched.

UCI Online Retail (id 352; Chen, 2015; doi:10.24432/C5BW33; CC BY 4.0)
    * Dropped, first matching reason wins: ``cancellation`` (InvoiceNo starts with 'C'),
      ``non_product`` (StockCode, upper-cased, is not five digits optionally followed by
      letters - POST, DOT, M, D, C2, S, B, CRUK, PADS, AMAZONFEE, BANK CHARGES, DCGS...,
      gift_0001_... - or is one of ``ONLINE_RETAIL_SERVICE_CODES``), ``non_positive_quantity``,
      ``non_positive_price``.
    * StockCodes are upper-cased: the data spells 112 codes both ways ('85123a', '85123A').
    * Orders: order_id = InvoiceNo, customer_id = CustomerID as an integer string (null for
      guests), ordered_at = InvoiceDate, channel 'web', no store.
    * Items: name = most frequent description (ties: alphabetical first), unit_price = median
      UnitPrice of kept lines rounded to pence, category = first matching row of
      ``ONLINE_RETAIL_CATEGORIES`` on the name (else 'OTHER'), brand null.
    * **unit_cost is an assumption**: the set has no cost, so cost = unit_price * r with the
      ratio r = 0.35 + 0.45 * u in [0.35, 0.80], u = the first 8 bytes of
      blake2b('<seed>:<sku>') read as a fraction of 2**64 - stable across runs, platforms and
      library versions.
    * return_rate = units on cancellation lines / units on kept lines, per SKU, clipped to
      [0, 0.5].
    * Regions: Country 'United Kingdom' -> 'UK', EU member states of 2011 (and 'European
      Community') -> 'EU', everything else -> 'INTL'.

Ta-Feng grocery (2000-11 to 2001-02; no licence stated: evaluation only, never committed)
    * A basket is one customer's purchases on one day: order_id = '<CUSTOMER_ID>-<YYYY-MM-DD>'.
    * Dropped: ``non_positive_quantity`` (AMOUNT <= 0), ``non_positive_price``
      (SALES_PRICE <= 0), ``negative_cost`` (ASSET < 0).
    * Orders: sku = PRODUCT_ID, quantity = AMOUNT, unit_price = SALES_PRICE / AMOUNT,
      channel 'store', store_id = 'S-<PIN_CODE>' (assumption: a customer shops at the store of
      their residence area, the only location in the data).
    * Items: name 'Item <PRODUCT_ID>' (no names in the data), category = most frequent
      PRODUCT_SUBCLASS (ties: smallest), unit_cost = median ASSET / AMOUNT, unit_price =
      median SALES_PRICE / AMOUNT (real cost and price), return_rate 0 (no returns in the data).
    * Regions: PIN_CODE values.

Both: nodes and inventory come from ``erp_synth`` with the import's seed. Regions are passed
busiest first (most orders; ties by name), so DC-1 sits in the region with the most orders.
Inventory popularity is the number of orders containing each SKU. Its ``as_of`` is the
moment of the import (the stock is synthesized then, so a policy's staleness limit measures
from the import), unless ``stock_as_of`` is given (tests pin it to get identical files).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl

from models.data.contract import (
    check_snapshot_references,
    merge_duplicate_order_lines,
    validate_table,
)
from models.data.erp_synth import synthesize_inventory, synthesize_nodes
from models.data.schema import INVENTORY, ITEMS, NODES, ORDER_LINES, TableSpec
from rules.errors import ContractError

__all__ = [
    "EU_COUNTRIES",
    "ONLINE_RETAIL_CATEGORIES",
    "ONLINE_RETAIL_PRODUCT_CODE",
    "ONLINE_RETAIL_SERVICE_CODES",
    "ImportSummary",
    "import_online_retail",
    "import_ta_feng",
]

COST_RATIO_MIN = 0.35
COST_RATIO_MAX = 0.80
MAX_RETURN_RATE = 0.5

# Five-digit product codes that are services, not products.
ONLINE_RETAIL_SERVICE_CODES: tuple[str, ...] = (
    "23444",  # "Next Day Carriage"
    "23702",  # "High Resolution Image"
)
# A product's StockCode: five digits, optionally followed by letters (after upper-casing).
ONLINE_RETAIL_PRODUCT_CODE = r"^\d{5}[A-Z]*$"

# Category from the item name: the first row whose words match wins, so specific rows come
# before broad ones (a "HEART T-LIGHT HOLDER" is a candle item, not a heart decoration).
ONLINE_RETAIL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("CHRISTMAS", ("CHRISTMAS", "XMAS", "ADVENT", "SANTA", "REINDEER", "NATIVITY")),
    ("EASTER", ("EASTER",)),
    ("CANDLES", ("CANDLES?", "T-LIGHTS?", "TEA ?LIGHTS?", "INCENSE")),
    ("LIGHTING", ("LIGHTS?", "LANTERNS?", "LAMPS?", "LED")),
    (
        "JEWELLERY",
        ("NECKLACE", "EARRINGS", "BRACELET", "RINGS?", "CHARM", "BROOCH", "DIAMANTE", "HAIR"),
    ),
    ("BAGS", ("BAGS?", "HANDBAGS?", "WASHBAGS?", "SHOPPER", "TOTE", "PURSE")),
    ("CARDS_WRAP", ("CARDS?", "WRAP", "WRAPPING", "RIBBONS?", "TAGS?", "ENVELOPES?")),
    (
        "TEXTILES",
        ("CUSHION", "COVER", "TOWELS?", "BLANKET", "THROW", "DOORMAT", "HOT WATER", "CURTAIN"),
    ),
    ("MUGS_CUPS", ("MUGS?", "CUPS?", "TEACUPS?", "BEAKERS?")),
    (
        "KITCHEN",
        (
            "PLATES?",
            "BOWLS?",
            "TEAPOT",
            "TEA",
            "COFFEE",
            "CAKE",
            "CAKESTAND",
            "BAKING",
            "CUTLERY",
            "SPOONS?",
            "TRAY",
            "NAPKINS?",
            "JARS?",
            "BOTTLE",
            "LUNCH",
            "PANTRY",
            "KITCHEN",
            "APRON",
            "DISH",
            "DINNER",
            "GLASS",
            "JUG",
            "PAN",
            "COASTERS?",
        ),
    ),
    (
        "STORAGE",
        ("BOX", "BOXES", "TINS?", "BASKETS?", "DRAWERS?", "CABINET", "STORAGE", "CASES?"),
    ),
    ("SIGNS", ("SIGNS?", "PLAQUE")),
    (
        "STATIONERY",
        ("PENS?", "PENCILS?", "NOTEBOOKS?", "STICKERS?", "ERASERS?", "PAPER", "TAPE", "MAGNETS?"),
    ),
    (
        "TOYS_PARTY",
        (
            "PARTY",
            "TOYS?",
            "GAMES?",
            "DOLLY",
            "DOLLS?",
            "JIGSAW",
            "BALLOONS?",
            "CHILDRENS",
            "FELTCRAFT",
        ),
    ),
    ("GARDEN", ("GARDEN", "PLANTERS?", "WATERING", "BIRD")),
    ("HEARTS", ("HEARTS?",)),
    (
        "DECORATION",
        (
            "DECORATIONS?",
            "HANGING",
            "ORNAMENTS?",
            "GARLAND",
            "BUNTING",
            "FRAMES?",
            "CLOCK",
            "MIRROR",
            "HOOKS?",
            "WALL",
            "PHOTO",
            "DOORSTOP",
            "TILE",
        ),
    ),
)
_OTHER_CATEGORY = "OTHER"

EU_COUNTRIES: frozenset[str] = frozenset(
    {
        "Austria",
        "Belgium",
        "Cyprus",
        "Czech Republic",
        "Denmark",
        "EIRE",
        "European Community",
        "Finland",
        "France",
        "Germany",
        "Greece",
        "Italy",
        "Lithuania",
        "Malta",
        "Netherlands",
        "Poland",
        "Portugal",
        "Spain",
        "Sweden",
    }
)

_ONLINE_RETAIL_COLUMNS = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)
_TA_FENG_COLUMNS = (
    "TRANSACTION_DT",
    "CUSTOMER_ID",
    "PIN_CODE",
    "PRODUCT_SUBCLASS",
    "PRODUCT_ID",
    "AMOUNT",
    "ASSET",
    "SALES_PRICE",
)


@dataclass(frozen=True)
class ImportSummary:
    """What an import read, kept and dropped (by reason), and what it wrote where."""

    dataset: str
    source: Path
    lines_read: int
    lines_kept: int
    lines_dropped: Mapping[str, int]  # reason -> source lines; every reason listed, even 0
    order_lines: int  # rows in orders.parquet, after merging repeated (order, sku) lines
    orders: int
    customers: int
    items: int
    nodes: int
    inventory_rows: int
    outputs: Mapping[str, Path]  # table name -> file written


def import_online_retail(
    source: Path, out_dir: Path, *, seed: int = 7, stock_as_of: datetime | None = None
) -> ImportSummary:
    """Import UCI Online Retail (Parquet or CSV in the raw column format) into ``out_dir``.

    The mapping and its assumptions (notably the seeded unit-cost ratio) are in the module
    docstring and ``docs/data-contract.md``.
    """
    raw = _read_source(source, _ONLINE_RETAIL_COLUMNS)
    file = source.name
    lines = _cast_or_refuse(
        raw.select(_ONLINE_RETAIL_COLUMNS),
        {"Quantity": pl.Int64(), "UnitPrice": pl.Float64(), "CustomerID": pl.Float64()},
        file=file,
    ).with_columns(
        pl.col("InvoiceNo").cast(pl.String).str.strip_chars(),
        # One item, two spellings ('85123a' and '85123A'): upper-case makes them one SKU.
        pl.col("StockCode").cast(pl.String).str.strip_chars().str.to_uppercase(),
        pl.col("Description").cast(pl.String).str.strip_chars(),
        _parse_invoice_date(raw.get_column("InvoiceDate")).alias("ordered_at"),
    )
    _refuse_nulls(lines, ("InvoiceNo", "StockCode", "Quantity", "UnitPrice"), file=file)
    _refuse_unparsed(lines, source_column="InvoiceDate", parsed_column="ordered_at", file=file)
    _refuse_fractional_customers(lines, file=file)

    is_cancellation = pl.col("InvoiceNo").str.starts_with("C")
    is_product = pl.col("StockCode").str.contains(ONLINE_RETAIL_PRODUCT_CODE) & ~pl.col(
        "StockCode"
    ).is_in(ONLINE_RETAIL_SERVICE_CODES)
    reasons = {
        "cancellation": is_cancellation,
        "non_product": ~is_product,
        "non_positive_quantity": pl.col("Quantity") <= 0,
        "non_positive_price": pl.col("UnitPrice") <= 0,
    }
    lines = lines.with_columns(_drop_reason(reasons))
    kept = lines.filter(pl.col("drop_reason").is_null())

    orders = kept.select(
        pl.col("InvoiceNo").alias("order_id"),
        pl.col("CustomerID").cast(pl.Int64).cast(pl.String).alias("customer_id"),
        pl.col("StockCode").alias("sku"),
        pl.col("Quantity").alias("quantity"),
        pl.col("UnitPrice").alias("unit_price"),
        "ordered_at",
        pl.lit(None, dtype=pl.String).alias("store_id"),
        pl.lit("web").alias("channel"),
    )

    cancelled_units = (
        lines.filter(is_cancellation & is_product)
        .group_by("StockCode")
        .agg((-pl.col("Quantity")).sum().alias("cancelled_units"))
    )
    items = (
        kept.group_by("StockCode")
        .agg(
            pl.col("UnitPrice").median().alias("median_price"),
            pl.col("Quantity").sum().alias("sold_units"),
        )
        .join(_most_frequent_description(kept), on="StockCode", how="left")
        .join(cancelled_units, on="StockCode", how="left")
        .sort("StockCode")
        .select(
            pl.col("StockCode").alias("sku"),
            pl.coalesce("name", pl.lit("Item ") + pl.col("StockCode")).alias("name"),
            # Pence, and never below one penny so that unit_price stays > 0.
            pl.col("median_price").round(2).clip(lower_bound=0.01).alias("unit_price"),
            (pl.col("cancelled_units").fill_null(0) / pl.col("sold_units"))
            .clip(0.0, MAX_RETURN_RATE)
            .alias("return_rate"),
        )
    )
    items = items.with_columns(
        _categorise(pl.col("name")).alias("category"),
        (pl.col("unit_price") * pl.Series(_cost_ratios(items.get_column("sku"), seed=seed)))
        .round(4)
        .alias("unit_cost"),
        pl.lit(None, dtype=pl.String).alias("brand"),
        pl.lit(False).alias("age_restricted"),
    )

    regions = _regions_busiest_first(
        kept.select(pl.col("InvoiceNo"), _region_of_country(pl.col("Country")).alias("region")),
        order_column="InvoiceNo",
    )
    return _finish_import(
        dataset="online_retail",
        source=source,
        out_dir=out_dir,
        seed=seed,
        lines=lines,
        reasons=tuple(reasons),
        orders=orders,
        items=items,
        regions=regions,
        stock_as_of=stock_as_of,
    )


def import_ta_feng(
    source: Path, out_dir: Path, *, seed: int = 7, stock_as_of: datetime | None = None
) -> ImportSummary:
    """Import Ta-Feng (the zipped CSV as published, or the unzipped CSV) into ``out_dir``.

    The mapping and its assumptions are in the module docstring and ``docs/data-contract.md``.
    """
    raw = _read_source(source, _TA_FENG_COLUMNS)
    file = source.name
    lines = _cast_or_refuse(
        raw.select(_TA_FENG_COLUMNS),
        {"AMOUNT": pl.Int64(), "ASSET": pl.Float64(), "SALES_PRICE": pl.Float64()},
        file=file,
    ).with_columns(
        pl.col("TRANSACTION_DT")
        .str.strip_chars()
        .str.strptime(pl.Datetime("us"), "%m/%d/%Y", strict=False)
        .alias("ordered_at"),
        pl.col("CUSTOMER_ID").str.strip_chars(),
        pl.col("PRODUCT_ID").str.strip_chars(),
        pl.col("PRODUCT_SUBCLASS").str.strip_chars(),
        pl.col("PIN_CODE").str.strip_chars().fill_null("Unknown"),
    )
    _refuse_nulls(lines, ("CUSTOMER_ID", "PRODUCT_ID", "AMOUNT", "SALES_PRICE"), file=file)
    _refuse_unparsed(lines, source_column="TRANSACTION_DT", parsed_column="ordered_at", file=file)

    reasons = {
        "non_positive_quantity": pl.col("AMOUNT") <= 0,
        "non_positive_price": pl.col("SALES_PRICE") <= 0,
        "negative_cost": pl.col("ASSET").fill_null(0) < 0,
    }
    lines = lines.with_columns(_drop_reason(reasons))
    kept = lines.filter(pl.col("drop_reason").is_null())

    orders = kept.select(
        (pl.col("CUSTOMER_ID") + "-" + pl.col("ordered_at").dt.strftime("%Y-%m-%d")).alias(
            "order_id"
        ),
        pl.col("CUSTOMER_ID").alias("customer_id"),
        pl.col("PRODUCT_ID").alias("sku"),
        pl.col("AMOUNT").alias("quantity"),
        (pl.col("SALES_PRICE") / pl.col("AMOUNT")).alias("unit_price"),
        "ordered_at",
        (pl.lit("S-") + pl.col("PIN_CODE")).alias("store_id"),
        pl.lit("store").alias("channel"),
    )
    subclass = (
        kept.filter(pl.col("PRODUCT_SUBCLASS").is_not_null())
        .group_by("PRODUCT_ID", "PRODUCT_SUBCLASS")
        .len()
        .sort(["PRODUCT_ID", "len", "PRODUCT_SUBCLASS"], descending=[False, True, False])
        .unique(subset="PRODUCT_ID", keep="first")
        .select("PRODUCT_ID", pl.col("PRODUCT_SUBCLASS").alias("category"))
    )
    items = (
        kept.group_by("PRODUCT_ID")
        .agg(
            (pl.col("ASSET") / pl.col("AMOUNT")).median().alias("unit_cost"),
            (pl.col("SALES_PRICE") / pl.col("AMOUNT")).median().alias("unit_price"),
        )
        .join(subclass, on="PRODUCT_ID", how="left")
        .sort("PRODUCT_ID")
        .select(
            pl.col("PRODUCT_ID").alias("sku"),
            (pl.lit("Item ") + pl.col("PRODUCT_ID")).alias("name"),
            pl.col("category").fill_null(_OTHER_CATEGORY),
            pl.col("unit_cost").fill_null(0.0),  # a null ASSET on every line: cost unknown
            "unit_price",
            pl.lit(None, dtype=pl.String).alias("brand"),
            pl.lit(False).alias("age_restricted"),
            pl.lit(0.0).alias("return_rate"),
        )
    )
    regions = _regions_busiest_first(
        orders.select("order_id", pl.col("store_id").str.strip_prefix("S-").alias("region")),
        order_column="order_id",
    )
    return _finish_import(
        dataset="ta_feng",
        source=source,
        out_dir=out_dir,
        seed=seed,
        lines=lines,
        reasons=tuple(reasons),
        orders=orders,
        items=items,
        regions=regions,
        stock_as_of=stock_as_of,
    )


# --- shared steps ----------------------------------------------------------------------------


def _finish_import(
    *,
    dataset: str,
    source: Path,
    out_dir: Path,
    seed: int,
    lines: pl.DataFrame,
    reasons: Sequence[str],
    orders: pl.DataFrame,
    items: pl.DataFrame,
    regions: Sequence[str],
    stock_as_of: datetime | None,
) -> ImportSummary:
    """Synthesize ERP tables, validate all four tables, then publish them to ``out_dir``."""
    orders = merge_duplicate_order_lines(orders)
    popularity = orders.group_by("sku").agg(pl.col("order_id").n_unique().alias("orders"))
    if orders.is_empty():
        raise ContractError(file=source.name, problem="no order lines left after filtering")
    as_of = stock_as_of or datetime.now(UTC).replace(tzinfo=None, microsecond=0)

    nodes = synthesize_nodes(regions, seed=seed)
    inventory = synthesize_inventory(items, nodes, popularity=popularity, seed=seed, as_of=as_of)

    tables = {
        spec.name: validate_table(frame, spec, file=f"{spec.name}.parquet")
        for spec, frame in _pairs(orders, items, nodes, inventory)
    }
    check_snapshot_references(
        tables[ITEMS.name], tables[NODES.name], tables[INVENTORY.name], file="inventory.parquet"
    )
    outputs = _publish(out_dir, tables)

    dropped_counts = dict(
        lines.filter(pl.col("drop_reason").is_not_null()).group_by("drop_reason").len().iter_rows()
    )
    final_orders = tables[ORDER_LINES.name]
    return ImportSummary(
        dataset=dataset,
        source=source,
        lines_read=lines.height,
        lines_kept=lines.height - sum(dropped_counts.values()),
        lines_dropped={reason: int(dropped_counts.get(reason, 0)) for reason in reasons},
        order_lines=final_orders.height,
        orders=final_orders.get_column("order_id").n_unique(),
        customers=final_orders.get_column("customer_id").drop_nulls().n_unique(),
        items=tables[ITEMS.name].height,
        nodes=tables[NODES.name].height,
        inventory_rows=tables[INVENTORY.name].height,
        outputs=outputs,
    )


def _pairs(
    orders: pl.DataFrame, items: pl.DataFrame, nodes: pl.DataFrame, inventory: pl.DataFrame
) -> tuple[tuple[TableSpec, pl.DataFrame], ...]:
    return ((ORDER_LINES, orders), (ITEMS, items), (NODES, nodes), (INVENTORY, inventory))


def _publish(out_dir: Path, tables: Mapping[str, pl.DataFrame]) -> dict[str, Path]:
    """Write every table to a temporary file in ``out_dir``, then rename each into place.

    The temporary files live in ``out_dir`` itself so that ``os.replace`` is a same-filesystem
    atomic rename; if any write fails, no final file has been touched. Each rename is atomic,
    the four together are not: a crash between renames could mix old and new tables, which
    the snapshot's cross-table checks would then refuse rather than serve.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    temporaries: dict[str, Path] = {}
    try:
        for name, frame in tables.items():
            handle, temporary_name = tempfile.mkstemp(
                dir=out_dir, prefix=f".{name}.", suffix=".parquet.tmp"
            )
            os.close(handle)
            temporaries[name] = Path(temporary_name)
            frame.write_parquet(temporaries[name], compression="zstd")
        outputs: dict[str, Path] = {}
        for name, temporary in temporaries.items():
            final = out_dir / f"{name}.parquet"
            os.replace(temporary, final)
            outputs[name] = final
        return outputs
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)


def _read_source(source: Path, required: Sequence[str]) -> pl.DataFrame:
    """The raw public file as a frame: Parquet, CSV, or a zip holding exactly one CSV."""
    if not source.is_file():
        raise ContractError(file=source.name, problem=f"source file not found: {source}")
    suffix = source.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pl.read_parquet(source)
        elif suffix == ".csv":
            frame = pl.read_csv(source, infer_schema=False)
        elif suffix == ".zip":
            frame = pl.read_csv(io.BytesIO(_single_csv_in_zip(source)), infer_schema=False)
        else:
            raise ContractError(
                file=source.name,
                problem=f"unsupported source type {suffix!r}: use .parquet, .csv or .zip",
            )
    except (pl.exceptions.PolarsError, OSError, zipfile.BadZipFile) as error:
        raise ContractError(
            file=source.name, problem=f"unreadable source: {str(error).splitlines()[0]}"
        ) from error
    missing = [name for name in required if name not in frame.columns]
    if missing:
        raise ContractError(
            file=source.name,
            column=missing[0],
            problem=f"not in the expected format: missing column(s) {', '.join(missing)}",
        )
    return frame


def _single_csv_in_zip(source: Path) -> bytes:
    with zipfile.ZipFile(source) as archive:
        members = [
            info
            for info in archive.infolist()
            if info.filename.lower().endswith(".csv") and not info.is_dir()
        ]
        if len(members) != 1:
            raise ContractError(
                file=source.name,
                problem=f"expected exactly one .csv in the zip, found {len(members)}",
            )
        # polars strips the UTF-8 byte-order mark the Ta-Feng file starts with.
        return archive.read(members[0])


def _cast_or_refuse(
    frame: pl.DataFrame, dtypes: Mapping[str, pl.DataType], *, file: str
) -> pl.DataFrame:
    """Cast columns (text is trimmed first); a value that does not cast is a ContractError."""
    converted = frame.with_columns(
        (
            pl.col(name).str.strip_chars().cast(dtype, strict=False)
            if frame.schema[name] == pl.String
            else pl.col(name).cast(dtype, strict=False)
        )
        for name, dtype in dtypes.items()
    )
    for name in dtypes:
        failed = frame.get_column(name).is_not_null() & converted.get_column(name).is_null()
        index = _first_true(failed)
        if index is not None:
            value = frame.get_column(name)[index]
            raise ContractError(
                file=file,
                row=index + 1,
                column=name,
                problem=f"{value!r} is not a {dtypes[name]} value",
            )
    return converted


def _refuse_nulls(frame: pl.DataFrame, columns: Sequence[str], *, file: str) -> None:
    for name in columns:
        index = _first_true(frame.get_column(name).is_null())
        if index is not None:
            raise ContractError(file=file, row=index + 1, column=name, problem=f"missing {name}")


def _refuse_unparsed(
    frame: pl.DataFrame, *, source_column: str, parsed_column: str, file: str
) -> None:
    index = _first_true(frame.get_column(parsed_column).is_null())
    if index is not None:
        value = frame.get_column(source_column)[index]
        raise ContractError(
            file=file,
            row=index + 1,
            column=source_column,
            problem=f"{value!r} is not a date in the dataset's format",
        )


def _refuse_fractional_customers(frame: pl.DataFrame, *, file: str) -> None:
    customer = frame.get_column("CustomerID")
    index = _first_true((customer != customer.floor()).fill_null(False))
    if index is not None:
        raise ContractError(
            file=file,
            row=index + 1,
            column="CustomerID",
            problem=f"{customer[index]!r} is not a whole customer number",
        )


def _first_true(mask: pl.Series) -> int | None:
    """Index of the first True in ``mask``, or None."""
    positions = mask.arg_true()
    return int(positions[0]) if positions.len() else None


def _parse_invoice_date(invoice_date: pl.Series) -> pl.Series:
    """InvoiceDate as published here ('2010-12-01 08:26:00') or in the UCI sheet export."""
    if isinstance(invoice_date.dtype, pl.Datetime):
        return invoice_date.dt.replace_time_zone(None).cast(pl.Datetime("us"))
    text = invoice_date.cast(pl.String).str.strip_chars()
    return pl.select(
        pl.coalesce(
            text.str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M:%S", strict=False),
            text.str.strptime(pl.Datetime("us"), "%m/%d/%Y %H:%M", strict=False),
        )
    ).to_series()


def _drop_reason(reasons: Mapping[str, pl.Expr]) -> pl.Expr:
    """The first matching reason for dropping a line, or null to keep it."""
    return pl.coalesce(
        pl.when(condition).then(pl.lit(name)) for name, condition in reasons.items()
    ).alias("drop_reason")


def _most_frequent_description(kept: pl.DataFrame) -> pl.DataFrame:
    return (
        kept.filter(pl.col("Description").is_not_null() & (pl.col("Description") != ""))
        .group_by("StockCode", "Description")
        .len()
        .sort(["StockCode", "len", "Description"], descending=[False, True, False])
        .unique(subset="StockCode", keep="first")
        .select("StockCode", pl.col("Description").alias("name"))
    )


def _categorise(name: pl.Expr) -> pl.Expr:
    """The first ``ONLINE_RETAIL_CATEGORIES`` row whose words occur in ``name``, else OTHER."""
    upper = name.str.to_uppercase()
    return pl.coalesce(
        *(
            pl.when(upper.str.contains(_word_pattern(words))).then(pl.lit(category))
            for category, words in ONLINE_RETAIL_CATEGORIES
        ),
        pl.lit(_OTHER_CATEGORY),
    )


def _word_pattern(words: Sequence[str]) -> str:
    return r"\b(?:" + "|".join(words) + r")\b"


def _cost_ratios(skus: pl.Series, *, seed: int) -> npt.NDArray[np.float64]:
    """The assumed cost/price ratio per SKU, in [COST_RATIO_MIN, COST_RATIO_MAX].

    blake2b rather than polars' hash: polars does not promise the same hash across versions,
    and this assumption must not drift. One hash per distinct SKU, so a few thousand calls.
    """
    fractions = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{sku}".encode(), digest_size=8).digest(), "big")
            / 2.0**64
            for sku in skus.to_list()
        ],
        dtype=np.float64,
    )
    return COST_RATIO_MIN + (COST_RATIO_MAX - COST_RATIO_MIN) * fractions


def _regions_busiest_first(lines: pl.DataFrame, *, order_column: str) -> list[str]:
    """Distinct regions by number of orders, most first (ties by name): DC-1 goes to the first."""
    return (
        lines.group_by("region")
        .agg(pl.col(order_column).n_unique().alias("orders"))
        .sort(["orders", "region"], descending=[True, False])
        .get_column("region")
        .to_list()
    )


def _region_of_country(country: pl.Expr) -> pl.Expr:
    return (
        pl.when(country == "United Kingdom")
        .then(pl.lit("UK"))
        .when(country.is_in(sorted(EU_COUNTRIES)))
        .then(pl.lit("EU"))
        .otherwise(pl.lit("INTL"))
    )
