"""Make the bundled demo sample of UCI Online Retail and its attribution file.

The sample keeps the raw Online Retail columns, so ``import_online_retail`` runs on it exactly
as on the full set. It is a deterministic subset that keeps real baskets and co-purchases:

* invoices dated ``START_DATE`` or later (a contiguous period, so repeat customers stay),
* of those, every line of the ``TOP_PRODUCTS`` products on the most invoices in that period
  (ties broken by StockCode), including their cancellation lines,
* and every non-product line of the period (postage, manual adjustments, fees...), so that
  the adapter's dropping rules are exercised.

Usage (from the repository root)::

    .venv/bin/python scripts/make_sample.py
    .venv/bin/python scripts/make_sample.py --source PATH --out-dir models/sample
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import polars as pl

from models.data.adapters import ONLINE_RETAIL_PRODUCT_CODE, ONLINE_RETAIL_SERVICE_CODES

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "online-retail" / "online_retail.parquet"
DEFAULT_OUT_DIR = REPO_ROOT / "models" / "sample"
SAMPLE_NAME = "online_retail_sample.parquet"
ATTRIBUTION_NAME = "ATTRIBUTION.md"

START_DATE = "2011-06-01"  # InvoiceDate is 'YYYY-mm-dd HH:MM:SS' text: compares as a string
TOP_PRODUCTS = 500


def make_sample(source: Path) -> pl.DataFrame:
    """The sample's rows, in source order and with the source's columns and dtypes."""
    raw = pl.read_parquet(source)
    code = pl.col("StockCode").str.strip_chars().str.to_uppercase()
    is_product = code.str.contains(ONLINE_RETAIL_PRODUCT_CODE) & ~code.is_in(
        ONLINE_RETAIL_SERVICE_CODES
    )
    in_period = raw.filter(pl.col("InvoiceDate") >= START_DATE)
    is_sale = (
        ~pl.col("InvoiceNo").str.starts_with("C")
        & is_product
        & (pl.col("Quantity") > 0)
        & (pl.col("UnitPrice") > 0)
    )
    top_products = (
        in_period.filter(is_sale)
        .group_by(code.alias("code"))
        .agg(pl.col("InvoiceNo").n_unique().alias("invoices"))
        .sort(["invoices", "code"], descending=[True, False])
        .head(TOP_PRODUCTS)
        .get_column("code")
    )
    return in_period.filter(code.is_in(top_products.implode()) | ~is_product)


def describe(sample: pl.DataFrame) -> dict[str, int]:
    """Counts quoted in ATTRIBUTION.md and the final report."""
    invoices_per_customer = (
        sample.filter(pl.col("CustomerID").is_not_null())
        .group_by("CustomerID")
        .agg(pl.col("InvoiceNo").n_unique().alias("invoices"))
    )
    return {
        "lines": sample.height,
        "invoices": sample.get_column("InvoiceNo").n_unique(),
        "cancellation_lines": sample.filter(pl.col("InvoiceNo").str.starts_with("C")).height,
        "customers": invoices_per_customer.height,
        "repeat_customers": invoices_per_customer.filter(pl.col("invoices") >= 2).height,
        "stock_codes": sample.get_column("StockCode").str.to_uppercase().n_unique(),
    }


def attribution_text(
    *, source_sha256: str, sample_sha256: str, sample_bytes: int, counts: dict[str, int]
) -> str:
    return f"""# Attribution: models/sample/{SAMPLE_NAME}

This file is a subset of the **UCI Machine Learning Repository "Online Retail" dataset**
(id 352): Chen, D. (2015). Online Retail [Dataset]. UCI Machine Learning Repository.
https://doi.org/10.24432/C5BW33. Licensed under **Creative Commons Attribution 4.0
International (CC BY 4.0)**, https://creativecommons.org/licenses/by/4.0/. Changes: rows
were selected as described below; no value was altered.

## What the subset is

- Source file: `online_retail.parquet` (541,909 rows, the raw UCI data with the original
  columns), sha256 `{source_sha256}`.
- Invoices dated {START_DATE} or later (a contiguous period, to keep repeat customers).
- Every line, including cancellation lines, of the {TOP_PRODUCTS} products that appear on the
  most invoices in that period (ties broken by StockCode, compared upper-cased), plus every
  non-product line of the period (postage, manual adjustments, fees, vouchers), so the
  importer's dropping rules have something to drop.
- Same columns and types as the source: `InvoiceNo`, `StockCode`, `Description`, `Quantity`,
  `InvoiceDate`, `UnitPrice`, `CustomerID`, `Country`.

| | |
| --- | --- |
| lines | {counts["lines"]:,} |
| invoices | {counts["invoices"]:,} |
| cancellation lines | {counts["cancellation_lines"]:,} |
| customers | {counts["customers"]:,} ({counts["repeat_customers"]:,} with two or more invoices) |
| stock codes | {counts["stock_codes"]:,} |
| file size | {sample_bytes:,} bytes |
| sha256 | `{sample_sha256}` |

## How it was made

```
.venv/bin/python scripts/make_sample.py
```

The script is deterministic: the same source gives the same rows. Unit costs and stock are not
in the data; the importer derives them (see `docs/data-contract.md`).
"""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    arguments = parser.parse_args()

    sample = make_sample(arguments.source)
    out_dir: Path = arguments.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    sample_path = out_dir / SAMPLE_NAME
    # Highest zstd level: the file is committed, written rarely and read often.
    sample.write_parquet(sample_path, compression="zstd", compression_level=22)
    counts = describe(sample)
    (out_dir / ATTRIBUTION_NAME).write_text(
        attribution_text(
            source_sha256=sha256_of(arguments.source),
            sample_sha256=sha256_of(sample_path),
            sample_bytes=sample_path.stat().st_size,
            counts=counts,
        ),
        encoding="utf-8",
    )
    print(f"wrote {sample_path} ({sample_path.stat().st_size:,} bytes): {counts}")


if __name__ == "__main__":
    main()
