"""Read contract files (CSV or Parquet) and validate them against the specs in ``schema``.

A file is accepted whole or refused whole: every failure is a ``ContractError`` naming the file,
the first offending row (1-based, header not counted) and the column. Validation is vectorised:
each check is one boolean mask over the column, and Python only looks at the first failing row.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from models.data.schema import (
    INVENTORY,
    ITEMS,
    NODES,
    ORDER_LINES,
    Column,
    SnapshotData,
    TableSpec,
)
from rules.errors import ContractError

__all__ = [
    "check_snapshot_references",
    "find_table_file",
    "merge_duplicate_order_lines",
    "read_file",
    "read_orders",
    "read_snapshot_dir",
    "read_table",
    "validate_table",
]

SUPPORTED_SUFFIXES = (".csv", ".parquet")

_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")

# ISO 8601 shapes accepted for datetime columns. A space separator is normalised to "T" and a
# trailing "Z" to "+00:00" before parsing, so these few formats cover the common spellings.
_NAIVE_DATETIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")
_OFFSET_DATETIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%z")


def find_table_file(directory: Path, spec: TableSpec) -> Path:
    """The file holding ``spec``'s table in ``directory``: ``<name>.csv`` or ``<name>.parquet``."""
    candidates = [directory / f"{spec.name}{suffix}" for suffix in SUPPORTED_SUFFIXES]
    present = [path for path in candidates if path.is_file()]
    if not present:
        raise ContractError(
            file=str(directory),
            problem=f"no {spec.name} table: expected {spec.name}.csv or {spec.name}.parquet",
        )
    if len(present) > 1:
        raise ContractError(
            file=str(directory),
            problem=(
                f"both {spec.name}.csv and {spec.name}.parquet exist: keep exactly one so it is "
                "clear which is current"
            ),
        )
    return present[0]


def read_table(path: Path, spec: TableSpec) -> pl.DataFrame:
    """Read a CSV or Parquet file and return it validated, in ``spec``'s columns and dtypes.

    Extra columns are ignored; absent optional columns are filled with their default (or null).
    Raises ``ContractError`` naming file, first offending row and column on any violation.
    """
    return validate_table(_read_file(path), spec, file=path.name)


def read_file(path: Path) -> pl.DataFrame:
    """A CSV (every column as text) or Parquet file as it is, for ``validate_table`` against
    a spec of the caller's (ContractError naming the file if it cannot be read)."""
    return _read_file(path)


def read_orders(path: Path) -> pl.DataFrame:
    """Read and validate an order-lines file, merging duplicate ``(order_id, sku)`` lines.

    Raw order exports legitimately repeat an item within an order (scanned twice, added to the
    cart twice), so duplicates are not refused here: they are merged into one line by
    ``merge_duplicate_order_lines`` (quantities summed, unit price the quantity-weighted mean).
    Every other contract check applies as in ``read_table``.
    """
    frame = validate_table(_read_file(path), ORDER_LINES, file=path.name, check_key=False)
    return merge_duplicate_order_lines(frame)


def merge_duplicate_order_lines(orders: pl.DataFrame) -> pl.DataFrame:
    """Merge order lines that repeat ``(order_id, sku)`` into one line each.

    Quantity is the sum; unit price is the quantity-weighted mean, which is the mean price per
    unit actually paid and so keeps the order's revenue unchanged. The other columns take the
    first line's value. Line order is that of each key's first occurrence.
    """
    key = list(ORDER_LINES.key)
    if not orders.select(pl.struct(key).is_duplicated().any()).item():
        return orders
    others = [name for name in orders.columns if name not in (*key, "quantity", "unit_price")]
    merged = orders.group_by(key, maintain_order=True).agg(
        pl.col("quantity").sum(),
        ((pl.col("quantity") * pl.col("unit_price")).sum() / pl.col("quantity").sum()).alias(
            "unit_price"
        ),
        *[pl.col(name).first() for name in others],
    )
    return merged.select(orders.columns)


def read_snapshot_dir(directory: Path, *, now: datetime | None = None) -> SnapshotData:
    """Read and validate items, nodes and inventory from ``directory`` as one snapshot.

    Besides each table's own checks, every inventory SKU must be in the item master and every
    inventory node in the nodes table. ``as_of`` is the oldest non-null ``inventory.as_of``, else
    ``now`` (default: the current time), as a naive UTC datetime. Nothing is returned unless all
    three tables pass.
    """
    items_path = find_table_file(directory, ITEMS)
    nodes_path = find_table_file(directory, NODES)
    inventory_path = find_table_file(directory, INVENTORY)
    items = read_table(items_path, ITEMS)
    nodes = read_table(nodes_path, NODES)
    inventory = read_table(inventory_path, INVENTORY)
    check_snapshot_references(items, nodes, inventory, file=inventory_path.name)

    oldest = inventory.get_column("as_of").min()
    if isinstance(oldest, datetime):
        as_of = oldest
    elif now is not None:
        as_of = _naive_utc(now)
    else:
        as_of = datetime.now(UTC).replace(tzinfo=None)
    return SnapshotData(items=items, nodes=nodes, inventory=inventory, as_of=as_of)


def check_snapshot_references(
    items: pl.DataFrame, nodes: pl.DataFrame, inventory: pl.DataFrame, *, file: str
) -> None:
    """Refuse inventory rows whose SKU is not in ``items`` or whose node is not in ``nodes``.

    ``file`` is the inventory file's name, used in the error with the row and column.
    """
    known_skus = items.get_column("sku").implode()
    known_nodes = nodes.get_column("node_id").implode()
    firsts = inventory.select(
        (~pl.col("sku").is_in(known_skus)).arg_true().first().alias("sku"),
        (~pl.col("node_id").is_in(known_nodes)).arg_true().first().alias("node_id"),
    ).row(0, named=True)
    failing = [
        (index, order, name)
        for order, (name, index) in enumerate(firsts.items())
        if index is not None
    ]
    if not failing:
        return
    index, _order, name = min(failing)  # earliest row; on a tie the sku is reported first
    value = inventory.get_column(name)[index]
    table = "item master" if name == "sku" else "nodes table"
    raise ContractError(
        file=file,
        row=index + 1,
        column=name,
        problem=f"unknown {name} {value!r}: not in the {table}",
    )


def validate_table(
    frame: pl.DataFrame, spec: TableSpec, *, file: str, check_key: bool = True
) -> pl.DataFrame:
    """Validate an in-memory frame against ``spec`` and return it in canonical columns/dtypes.

    String columns (as read from CSV) are parsed strictly; typed columns (as read from Parquet)
    are cast, refusing lossy casts. ``file`` names the source in errors. ``check_key=False``
    skips the unique-key check for callers that merge duplicates themselves.
    """
    _check_columns_present(frame, spec, file=file)
    present = [column for column in spec.columns if column.name in frame.columns]

    sources: dict[str, pl.Series] = {}
    parsed: dict[str, pl.Series] = {}
    checks: list[_Check] = []
    for column in present:
        source = _normalised_source(frame.get_column(column.name))
        sources[column.name] = source
        parsed[column.name] = _convert(source, column)
        checks.extend(_checks_for(column, source, parsed[column.name]))

    if checks:
        masks = pl.DataFrame([check.mask.alias(str(i)) for i, check in enumerate(checks)])
        firsts = masks.select(pl.all().arg_true().first()).row(0)
        failing = [(index, order) for order, index in enumerate(firsts) if index is not None]
        if failing:
            index, order = min(failing)  # first row; on a tie the leftmost column's check
            check = checks[order]
            raise ContractError(
                file=file,
                row=index + 1,
                column=check.column,
                problem=check.problem(
                    _value_at(sources[check.column], index), _value_at(parsed[check.column], index)
                ),
            )

    height = frame.height
    columns = [
        parsed[column.name]
        if column.name in parsed
        else pl.Series(column.name, [column.default], dtype=column.dtype).new_from_index(0, height)
        for column in spec.columns
    ]
    result = pl.DataFrame(columns)
    if check_key:
        _check_unique_key(result, spec, file=file)
    return result


# --- reading files ---------------------------------------------------------------------------


def _read_file(path: Path) -> pl.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ContractError(
            file=path.name, problem=f"unsupported file type {suffix!r}: use .csv or .parquet"
        )
    if not path.is_file():
        raise ContractError(file=path.name, problem=f"file not found: {path}")
    if suffix == ".parquet":
        try:
            return pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError) as error:
            raise ContractError(
                file=path.name, problem=f"unreadable Parquet file: {_first_line(error)}"
            ) from error
    return _read_csv(path)


def _read_csv(path: Path) -> pl.DataFrame:
    try:
        # Everything as text: our own strict casts then find the exact row that does not parse.
        return pl.read_csv(path, infer_schema=False)
    except pl.exceptions.NoDataError as error:
        raise ContractError(file=path.name, problem="empty file: no header row") from error
    except (pl.exceptions.PolarsError, OSError) as error:
        row, problem = _locate_malformed_csv_row(path)
        raise ContractError(
            file=path.name,
            row=row,
            problem=problem or f"malformed CSV: {_first_line(error)}",
        ) from error


def _locate_malformed_csv_row(path: Path) -> tuple[int | None, str | None]:
    """Find the first malformed data row; runs only after polars refused the file.

    A per-row Python loop is acceptable here: it runs once, on a file already known to be bad.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return None, None
            for number, fields in enumerate(reader, start=1):
                if any(_has_undecodable_bytes(field) for field in fields):
                    return number, "malformed CSV: not valid UTF-8 text"
                if fields and len(fields) > len(header):
                    return number, (
                        f"malformed CSV: {len(fields)} fields where the header has {len(header)}"
                    )
    except csv.Error as error:
        return None, f"malformed CSV: {error}"
    return None, None


def _has_undecodable_bytes(text: str) -> bool:
    # surrogateescape maps each undecodable byte to a lone surrogate in U+DC80..U+DCFF.
    return any("\udc80" <= character <= "\udcff" for character in text)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- column checks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Check:
    """One failure kind on one column: a mask (True = the row fails) and how to word it."""

    column: str
    mask: pl.Series
    problem: Callable[[object, object], str]  # (source value, parsed value) -> problem text


def _check_columns_present(frame: pl.DataFrame, spec: TableSpec, *, file: str) -> None:
    missing = [c.name for c in spec.columns if c.required and c.name not in frame.columns]
    if missing:
        listed = ", ".join(repr(name) for name in missing)
        raise ContractError(
            file=file,
            column=missing[0],
            problem=f"missing required column{'s' if len(missing) > 1 else ''} {listed}",
        )
    # polars renames a repeated CSV header to '<name>_duplicated_<n>'; refuse rather than
    # silently using whichever copy came first.
    for name in spec.column_names:
        if any(other.startswith(f"{name}_duplicated_") for other in frame.columns):
            raise ContractError(
                file=file, column=name, problem=f"column {name!r} appears more than once"
            )


def _normalised_source(series: pl.Series) -> pl.Series:
    """Text trimmed, with empty text as null (a blank CSV cell means 'no value')."""
    if isinstance(series.dtype, pl.Categorical | pl.Enum):
        series = series.cast(pl.String)
    if series.dtype != pl.String:
        return series
    stripped = series.str.strip_chars()
    return pl.select(
        pl.when(stripped.str.len_bytes() == 0).then(None).otherwise(stripped).alias(series.name)
    ).to_series()


def _convert(source: pl.Series, column: Column) -> pl.Series:
    """``source`` in ``column``'s dtype; values that do not convert become null."""
    target = column.dtype
    dtype = source.dtype
    if dtype == pl.Null:
        return source.cast(target)
    if target == pl.String:
        return source.cast(pl.String)
    if target == pl.Int64:
        return _to_int(source)
    if target == pl.Float64:
        return _to_float(source)
    if target == pl.Boolean:
        return _to_bool(source)
    if isinstance(target, pl.Datetime):
        return _to_datetime(source)
    raise TypeError(f"no conversion to {target} for contract column {column.name!r}")


def _to_int(source: pl.Series) -> pl.Series:
    dtype = source.dtype
    if dtype == pl.String or dtype.is_integer() or dtype == pl.Boolean:
        return source.cast(pl.Int64, strict=False)
    if dtype.is_float():
        # Only whole, finite floats are integers; 2.5 would otherwise truncate silently.
        whole = source.is_finite() & (source == source.floor())
        return pl.select(
            pl.when(whole).then(source.cast(pl.Int64, strict=False)).alias(source.name)
        ).to_series()
    return pl.Series(source.name, [None] * source.len(), dtype=pl.Int64)


def _to_float(source: pl.Series) -> pl.Series:
    dtype = source.dtype
    if dtype == pl.String or dtype.is_numeric():
        converted = source.cast(pl.Float64, strict=False)
        # 'nan' and 'inf' parse as floats but are never valid money or stock figures.
        return pl.select(
            pl.when(converted.is_finite()).then(converted).alias(source.name)
        ).to_series()
    return pl.Series(source.name, [None] * source.len(), dtype=pl.Float64)


def _to_bool(source: pl.Series) -> pl.Series:
    dtype = source.dtype
    if dtype == pl.Boolean:
        return source
    if dtype == pl.String:
        lowered = source.str.to_lowercase()
        return pl.select(
            pl.when(lowered.is_in(_TRUE_WORDS))
            .then(True)
            .when(lowered.is_in(_FALSE_WORDS))
            .then(False)
            .alias(source.name)
        ).to_series()
    if dtype.is_integer():
        return pl.select(
            pl.when(source == 1).then(True).when(source == 0).then(False).alias(source.name)
        ).to_series()
    return pl.Series(source.name, [None] * source.len(), dtype=pl.Boolean)


def _to_datetime(source: pl.Series) -> pl.Series:
    dtype = source.dtype
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            source = source.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return source.cast(pl.Datetime("us"))
    if dtype == pl.Date:
        return source.cast(pl.Datetime("us"))
    if dtype == pl.String:
        return _parse_iso_datetimes(source)
    return pl.Series(source.name, [None] * source.len(), dtype=pl.Datetime("us"))


def _parse_iso_datetimes(source: pl.Series) -> pl.Series:
    """Parse ISO 8601 dates/datetimes to naive UTC; offsets are converted, 'Z' means UTC.

    Most files use one format throughout, so the whole column is parsed with the format of its
    first value and only the leftovers (usually none) are tried against every format: one pass
    instead of one per format.
    """
    text = source.str.replace(" ", "T", literal=True, n=1).str.replace(r"[Zz]$", "+00:00")
    first = text.drop_nulls().head(1)
    primary = next(
        (fmt for fmt in _ALL_DATETIME_FORMATS if _parse_with(first, fmt).null_count() == 0),
        _NAIVE_DATETIME_FORMATS[0],
    )
    parsed = _parse_with(text, primary)
    leftover = parsed.is_null() & text.is_not_null()
    if not leftover.any():
        return parsed.alias(source.name)
    positions = leftover.arg_true()
    rest = text.gather(positions)
    rest_parsed = pl.select(
        pl.coalesce([_parse_with(rest, fmt) for fmt in _ALL_DATETIME_FORMATS])
    ).to_series()
    return parsed.scatter(positions, rest_parsed).alias(source.name)


_ALL_DATETIME_FORMATS = _NAIVE_DATETIME_FORMATS + _OFFSET_DATETIME_FORMATS


def _parse_with(text: pl.Series, fmt: str) -> pl.Series:
    if fmt.endswith("%z"):
        aware = text.str.strptime(pl.Datetime("us", "UTC"), fmt, strict=False, exact=True)
        return aware.dt.replace_time_zone(None)
    return text.str.strptime(pl.Datetime("us"), fmt, strict=False, exact=True)


_TYPE_WORDS: dict[type[pl.DataType], str] = {
    pl.String: "text",
    pl.Int64: "a whole number",
    pl.Float64: "a finite number",
    pl.Boolean: "true/false (also 1/0, yes/no)",
    pl.Datetime: "an ISO 8601 date or datetime",
}


def _value_at(series: pl.Series, index: int) -> object:
    """One value for an error message; as text where Python cannot hold it (a year-0 stamp)."""
    try:
        return series[index]
    except (ValueError, OverflowError):
        return series.cast(pl.String)[index]


def _checks_for(column: Column, source: pl.Series, parsed: pl.Series) -> list[_Check]:
    """Every failure kind for one column, in the order they are reported within a row."""
    name = column.name
    label = name.replace("_", " ")
    type_word = _TYPE_WORDS.get(type(column.dtype), str(column.dtype))

    def not_parsed(value: object, _parsed: object) -> str:
        return f"{_show(value)} is not {type_word}"

    checks = [_Check(name, source.is_not_null() & parsed.is_null(), not_parsed)]

    if not column.nullable:

        def missing(_value: object, _parsed: object) -> str:
            return f"missing {label}: every row needs a value"

        checks.append(_Check(name, source.is_null(), missing))

    if isinstance(column.dtype, pl.Datetime):
        # An offset can move a valid stamp out of range (0001-01-01T00:00+01:00 is in year 0
        # in UTC): no Python datetime holds it, so reading the row back would fail later.
        def unrepresentable(_value: object, _parsed: object) -> str:
            return f"{label} is outside the years 1-9999 in UTC"

        years = parsed.dt.year()
        checks.append(
            _Check(name, ((years < 1) | (years > 9999)).fill_null(False), unrepresentable)
        )

    if column.minimum is not None:
        minimum = column.minimum

        def below(_value: object, value: object) -> str:
            if minimum == 0:  # "negative" is the word people search logs for
                return f"negative {label}: {_show(value)} (must be >= 0)"
            return f"{label} {_show(value)} is below the minimum {_show(minimum)}"

        checks.append(_Check(name, (parsed < minimum).fill_null(False), below))

    if column.exclusive_minimum is not None:
        floor = column.exclusive_minimum

        def not_above_floor(_value: object, value: object) -> str:
            return f"{label} must be > {_show(floor)}, got {_show(value)}"

        checks.append(_Check(name, (parsed <= floor).fill_null(False), not_above_floor))

    if column.maximum is not None:
        ceiling = column.maximum

        def above(_value: object, value: object) -> str:
            return f"{label} {_show(value)} is above the maximum {_show(ceiling)}"

        checks.append(_Check(name, (parsed > ceiling).fill_null(False), above))

    if column.choices is not None:
        choices = column.choices

        def not_a_choice(_value: object, value: object) -> str:
            allowed = ", ".join(repr(choice) for choice in choices)
            return f"{label} {_show(value)} is not one of {allowed}"

        checks.append(_Check(name, (~parsed.is_in(choices)).fill_null(False), not_a_choice))

    return checks


def _show(value: object) -> str:
    """A value as it should read in an error: numbers plainly, text quoted."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return repr(value)


def _check_unique_key(frame: pl.DataFrame, spec: TableSpec, *, file: str) -> None:
    key = list(spec.key)
    second = frame.select((~pl.struct(key).is_first_distinct()).arg_true().first()).item()
    if second is None:
        return
    values = frame.row(second, named=True)
    same_key = pl.all_horizontal([pl.col(name) == values[name] for name in key])
    first = frame.select(same_key.arg_true().first()).item()
    shown = ", ".join(f"{name}={values[name]!r}" for name in key)
    raise ContractError(
        file=file,
        row=second + 1,
        column=", ".join(key),
        problem=f"duplicate key ({shown}): already on row {first + 1}",
    )


def _naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)
