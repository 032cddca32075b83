"""Staleness: which stock figures are recent enough to promise from.

Every stock figure carries the moment it was true (``as_of``, from its snapshot row or from
the inventory delta that set it), as int64 microseconds since the Unix epoch, UTC. A figure
older than the policy's limit is not trusted: the pipeline treats that cell as if the item
were not ranged there (fail closed), so nothing is recommended on it, and says so in the
response's ``degraded`` reasons.

Pure numpy; the same instant conventions as the data contract (naive datetimes are UTC).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt

__all__ = ["epoch_us", "fresh_stock_mask"]

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
