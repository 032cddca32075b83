"""Known-answer order lines shared by the model tests (in the style of implicit's tests)."""

from __future__ import annotations

import polars as pl

Basket = tuple[str, str | None, list[str]]


def order_lines(baskets: list[Basket]) -> pl.DataFrame:
    """Order lines in the ORDER_LINES columns from (order_id, customer_id, skus) baskets."""
    rows = [(order_id, customer, sku) for order_id, customer, skus in baskets for sku in skus]
    frame = pl.DataFrame(
        rows,
        schema={"order_id": pl.String, "customer_id": pl.String, "sku": pl.String},
        orient="row",
    )
    return frame.with_columns(
        quantity=pl.lit(1, pl.Int64),
        unit_price=pl.lit(9.99),
        ordered_at=pl.lit("2024-03-01T10:00:00").str.to_datetime(time_unit="us"),
        store_id=pl.lit(None, pl.String),
        channel=pl.lit("web"),
    )


def checkerboard() -> pl.DataFrame:
    """Customers c00-c09 buy block A (items 0-4), c10-c19 block B (items 5-9), 3 orders each;
    c00 never bought A4. Guests: 5 orders of B0 alone, 2 of A0 alone, 1 of Z (item 10) alone.

    Orders containing each item: A0 32, A1-A3 30, A4 27, B0 35, B1-B4 30, Z 1; 68 orders.
    """
    block_a = [f"A{i}" for i in range(5)]
    block_b = [f"B{i}" for i in range(5)]
    baskets: list[Basket] = []
    for customer in range(20):
        block = block_a if customer < 10 else block_b
        for order in range(3):
            skus = block[:4] if customer == 0 else block
            baskets.append((f"o{customer:02d}{order}", f"c{customer:02d}", skus))
    baskets += [(f"g-b{n}", None, ["B0"]) for n in range(5)]
    baskets += [(f"g-a{n}", None, ["A0"]) for n in range(2)]
    baskets.append(("g-z", None, ["Z"]))
    return order_lines(baskets)
