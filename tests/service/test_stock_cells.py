"""The compiled stock-cell parser: what it reads, what it refuses, on its own (the Redis
store's read tests cover it through real replies)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from service.store.stock_cells import parse_stock_cells


@pytest.mark.parametrize(
    ("cell", "figures"),
    [
        ("5,1,2", [5, 1, 2, 99]),  # no as_of: the base one
        ("5,1,2,1700000000000000", [5, 1, 2, 1700000000000000]),
        ("5,1,2,17,delta-7", [5, 1, 2, 17]),  # the delta id is not read
        ("5,1,2,17,", [5, 1, 2, 17]),  # nor an empty one
        ("-3,+1, 2", [-3, 1, 2, 99]),  # signs, blanks before a number
        ("9223372036854775807,0,0", [9223372036854775807, 0, 0, 99]),
    ],
)
def test_reads_a_cell(cell: str, figures: list[int]) -> None:
    parsed = parse_stock_cells(cell.encode() + b"\x00", 1, base_as_of_us=99)
    assert parsed is not None
    assert parsed[0].tolist() == [figures]
    assert parsed[1].tolist() == [True]


@pytest.mark.parametrize(
    "cell",
    [
        "5,1",  # too few fields
        "5,1,2,3,id,more",  # too many
        "5,,2",  # an empty field
        "5,1,2,",  # an empty as_of
        "-,1,2",  # a lone sign
        "+ 5,1,2",  # a sign apart from its digits
        "5 ,1,2",  # a blank after a number
        "5x,1,2",
        "1-2,1,2",  # a minus inside a number
        "5,1,2.5",
        "9223372036854775808,0,0",  # past int64
    ],
)
def test_refuses_a_malformed_cell(cell: str) -> None:
    assert parse_stock_cells(cell.encode() + b"\x00", 1, base_as_of_us=0) is None


def test_refuses_a_wrong_cell_count_or_a_missing_terminator() -> None:
    assert parse_stock_cells(b"1,2,3\x00", 2, base_as_of_us=0) is None
    assert parse_stock_cells(b"1,2,3\x00\x00", 1, base_as_of_us=0) is None
    assert parse_stock_cells(b"1,2,3", 1, base_as_of_us=0) is None


def test_empty_cells_are_not_ranged_and_keep_the_base_as_of() -> None:
    parsed = parse_stock_cells(b"\x001,2,3\x00\x00", 3, base_as_of_us=42)
    assert parsed is not None
    values, ranged = parsed
    assert ranged.tolist() == [False, True, False]
    assert values.tolist() == [[0, 0, 0, 42], [1, 2, 3, 42], [0, 0, 0, 42]]


def test_round_trips_random_cells() -> None:
    rng = random.Random(5)
    expected, cells = [], []
    for _ in range(2000):
        if rng.random() < 0.2:
            cells.append("")
            expected.append(None)
            continue
        figures = [rng.randint(-(2**40), 2**62) for _ in range(4)]
        shape = rng.choice((3, 4, 5))
        text = ",".join(map(str, figures[: min(shape, 4)]))
        cells.append(text + (f",{rng.randint(0, 10**6)}-{rng.randint(0, 9)}" if shape == 5 else ""))
        expected.append(figures if shape > 3 else [*figures[:3], 7])
    parsed = parse_stock_cells("\x00".join(cells).encode() + b"\x00", len(cells), base_as_of_us=7)
    assert parsed is not None
    values, ranged = parsed
    assert ranged.tolist() == [figures is not None for figures in expected]
    assert np.array_equal(values[ranged], np.array([f for f in expected if f is not None]))
