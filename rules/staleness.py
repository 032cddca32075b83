"""Staleness: which stock figures are recent enough to promise from.

Every stock figure carries the moment it was true (``as_of``, from its snapshot row or from
the inventory delta that set it), as int64 microseconds since the Unix epoch, UTC. A figure
older than the policy's limit is not trusted: the pipeline treats that cell as if the item
were not ranged there (fail closed), so nothing is recommended on it, and says so in the
response's ``degraded`` reasons.

Pure functions over arrays; the same instant conventions as the data contract (naive
datetimes are UTC).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt

from rules.compiled import compiled, register_warm_up

__all__ = ["epoch_us", "fresh_stock_mask", "trusted_stock_units"]

_EPOCH = datetime(1970, 1, 1)
_ONE_MICROSECOND = timedelta(microseconds=1)


def epoch_us(moment: datetime) -> int:
    """``moment`` as microseconds since the Unix epoch; a naive datetime is taken as UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return (moment - _EPOCH) // _ONE_MICROSECOND


def fresh_stock_mask(
    as_of_us: npt.NDArray[np.int64], *, now_us: int, max_age_seconds: float
) -> npt.NDArray[np.bool_]:
    """True where a stock figure is at most ``max_age_seconds`` old at ``now_us``.

    A figure from the future (a source clock a little ahead of ours) counts as fresh: it is
    as new as anything we have. ``as_of_us <= 0`` means "when is unknown" and is never
    fresh. ``max_age_seconds`` may be ``inf`` (no limit); it may not be negative or NaN.
    """
    if math.isnan(max_age_seconds) or max_age_seconds < 0:
        raise ValueError(f"max_age_seconds must be >= 0, got {max_age_seconds}")
    known = as_of_us > 0
    if math.isinf(max_age_seconds):
        return np.asarray(known, dtype=np.bool_)
    # Integer microseconds: comparing in float64 would lose the last digits of an epoch time.
    oldest_trusted = now_us - round(max_age_seconds * 1_000_000)
    return np.asarray(known & (as_of_us >= oldest_trusted), dtype=np.bool_)


# How ``trusted_stock_units`` judges a figure's age.
_TRUST_RANGED = 0  # no age limit: every ranged figure
_TRUST_KNOWN = 1  # an infinite limit: every figure whose as_of is known
_TRUST_RECENT = 2  # a figure known and at least as new as the oldest trusted instant


def trusted_stock_units(
    atp: npt.NDArray[np.int64],
    safety_stock: npt.NDArray[np.int64],
    inbound: npt.NDArray[np.int64],
    ranged: npt.NDArray[np.bool_],
    as_of_us: npt.NDArray[np.int64],
    *,
    now_us: int,
    max_age_seconds: float | None,
    rows: npt.NDArray[np.int64] | None = None,
    columns: npt.NDArray[np.int64] | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_], bool]:
    """Units that may be promised and inbound units, of the cells trusted: ranged, and with
    ``max_age_seconds`` also fresh (``fresh_stock_mask``); ATP minus safety stock, or -1,
    and inbound, or 0, where a cell is not trusted. Also ``ranged`` itself and whether some
    ranged cell was too old to trust.

    The figures are (items, nodes) arrays of any layout; ``rows`` and ``columns`` pick the
    cells judged (default: all), so that a whole in-process copy is read without gathering
    it first. One pass over the cells: the numpy form was a dozen calls on a few hundred."""
    if max_age_seconds is None:
        mode, oldest_trusted = _TRUST_RANGED, 0
    elif math.isnan(max_age_seconds) or max_age_seconds < 0:
        raise ValueError(f"max_age_seconds must be >= 0, got {max_age_seconds}")
    elif math.isinf(max_age_seconds):
        mode, oldest_trusted = _TRUST_KNOWN, 0
    else:
        mode, oldest_trusted = _TRUST_RECENT, now_us - round(max_age_seconds * 1_000_000)
    if rows is None:
        rows = np.arange(atp.shape[0], dtype=np.int64)
    if columns is None:
        columns = np.arange(atp.shape[1], dtype=np.int64)
    return _trusted_units(
        atp, safety_stock, inbound, ranged, as_of_us, rows, columns, mode, oldest_trusted
    )


@compiled
def _trusted_units(  # noqa: PLR0917 (a compiled loop: no keyword-only arguments)
    atp: npt.NDArray[np.int64],
    safety_stock: npt.NDArray[np.int64],
    inbound: npt.NDArray[np.int64],
    ranged: npt.NDArray[np.bool_],
    as_of_us: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64],
    columns: npt.NDArray[np.int64],
    mode: int,
    oldest_trusted: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_], bool]:
    shape = (rows.shape[0], columns.shape[0])
    available = np.empty(shape, np.int64)
    trusted_inbound = np.empty(shape, np.int64)
    ranged_cells = np.empty(shape, np.bool_)
    any_stale = False
    for out_row in range(shape[0]):
        row = rows[out_row]
        for out_column in range(shape[1]):
            column = columns[out_column]
            trusted = ranged[row, column]
            ranged_cells[out_row, out_column] = trusted
            if trusted and mode != _TRUST_RANGED:
                as_of = as_of_us[row, column]
                fresh = as_of > 0 and (mode == _TRUST_KNOWN or as_of >= oldest_trusted)
                if not fresh:
                    any_stale = True
                    trusted = False
            if trusted:
                available[out_row, out_column] = atp[row, column] - safety_stock[row, column]
                trusted_inbound[out_row, out_column] = inbound[row, column]
            else:
                available[out_row, out_column] = -1
                trusted_inbound[out_row, out_column] = 0
    return available, trusted_inbound, ranged_cells, any_stale


def _warm_up() -> None:
    # The store reads row-major figures; the stock mirror's are strided views of one
    # (items, nodes, figures) array.
    cells = np.zeros((2, 2), dtype=np.int64)
    figures = np.zeros((2, 2, 4), dtype=np.int64)
    ranged = np.ones((2, 2), dtype=np.bool_)
    for max_age in (None, math.inf, 60.0):
        trusted_stock_units(cells, cells, cells, ranged, cells, now_us=1, max_age_seconds=max_age)
        trusted_stock_units(
            figures[:, :, 0],
            figures[:, :, 1],
            figures[:, :, 2],
            ranged,
            figures[:, :, 3],
            now_us=1,
            max_age_seconds=max_age,
        )


register_warm_up(_warm_up)
