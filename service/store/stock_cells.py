"""Stock cells as the Redis read script returns them, parsed in one compiled pass.

A cell is empty (not ranged) or ``atp,safety_stock,inbound[,as_of_us[,delta_id]]``; each
cell is followed by a NUL. A request reads a few thousand cells: numpy needed some thirty
whole-array calls to split, check and convert them, a compiled loop reads each byte once.

What a number may be: blanks (ASCII whitespace) before it, an optional sign right before
its digits, and only digits, within int64. Anything else, or a cell count other than the
expected one, and the parse fails (the store then names the key and SKU that do not
decode). The delta id is not read: any text without a comma or NUL.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from rules.compiled import compiled, register_warm_up

__all__ = ["parse_stock_cells"]

_NUL = 0
_COMMA = 44
_PLUS = 43
_MINUS = 45
_ZERO = 48
_NINE = 57
_INT64_MAX = 9223372036854775807


@compiled
def _is_blank(byte: np.uint8) -> bool:
    return bool(byte == 32 or 9 <= byte <= 13)


@compiled
def _parse(
    text: npt.NDArray[np.uint8],
    values: npt.NDArray[np.int64],
    ranged: npt.NDArray[np.bool_],
) -> bool:
    """Fill ``values`` (cells x 4) and ``ranged`` from ``text``; False where it is malformed
    (``values`` then holds a partial parse)."""
    cell_count = values.shape[0]
    size = text.shape[0]
    cell = 0
    at = 0
    while at < size:
        if cell >= cell_count:
            return False
        if text[at] == _NUL:  # an empty cell: not ranged
            at += 1
            cell += 1
            continue
        ranged[cell] = True
        field = 0
        while True:
            if field == 4:  # the delta id: skipped to the cell's end
                while at < size and text[at] != _NUL:
                    if text[at] == _COMMA:
                        return False
                    at += 1
                if at >= size:
                    return False
                break
            while at < size and _is_blank(text[at]):
                at += 1
            negative = False
            if at < size and (text[at] == _PLUS or text[at] == _MINUS):
                negative = text[at] == _MINUS
                at += 1
            digits = 0
            number = 0
            while at < size and _ZERO <= text[at] <= _NINE:
                digit = int(text[at]) - _ZERO
                if number > (_INT64_MAX - digit) // 10:
                    return False  # past int64: corrupt, not a stock figure
                number = number * 10 + digit
                digits += 1
                at += 1
            if digits == 0 or at >= size:
                return False
            values[cell, field] = -number if negative else number
            field += 1
            if text[at] == _NUL:
                if field < 3:
                    return False
                break
            if text[at] != _COMMA:
                return False
            at += 1
        at += 1  # past the cell's NUL
        cell += 1
    return bool(cell == cell_count)


def parse_stock_cells(
    packed: bytes, cell_count: int, *, base_as_of_us: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]] | None:
    """``cell_count`` cells, each followed by a NUL, as (cell_count, 4) figures (atp, safety
    stock, inbound, as_of_us: ``base_as_of_us`` where the cell has none) and whether each
    cell is ranged; None when the text is malformed."""
    values = np.zeros((cell_count, 4), np.int64)
    values[:, 3] = base_as_of_us
    ranged = np.zeros(cell_count, np.bool_)
    if not _parse(np.frombuffer(packed, np.uint8), values, ranged):
        return None
    return values, ranged


def _warm_up() -> None:
    parse_stock_cells(b"1,2,3\x00\x004,5,6,7,x\x00", 3, base_as_of_us=0)


register_warm_up(_warm_up)
