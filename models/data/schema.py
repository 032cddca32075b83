"""The data contract: which tables a retailer provides, their columns and canonical types.

This module only *describes* the contract; ``models.data.contract`` reads and validates files
against it. ``docs/data-contract.md`` documents the same tables for people and a test keeps the
two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl


@dataclass(frozen=True)
class Column:
    """One column of a contract table.

    ``required`` columns must be present in the file; optional ones are filled with
    ``default`` when absent. ``nullable`` says whether a present column may hold nulls.
    ``minimum`` is an inclusive lower bound for numeric columns (e.g. stock is never negative).
    ``choices`` restricts a string column to a fixed set.
    """

    name: str
    dtype: pl.DataType
    required: bool = True
    nullable: bool = False
    default: object = None
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""


@dataclass(frozen=True)
class TableSpec:
    """A contract table: its name (also the file stem), columns and unique key."""

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    doc: str = ""

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)


ORDER_LINES = TableSpec(
    name="orders",
    doc="One row per order line: what was bought, by whom (if known), when, at what price.",
    key=("order_id", "sku"),
    columns=(
        Column("order_id", pl.String(), doc="Order (receipt, basket) id."),
        Column(
            "customer_id",
            pl.String(),
            nullable=True,
            doc="Customer id; null for guest orders. Never logged or sent to an LLM.",
        ),
        Column("sku", pl.String(), doc="Item id; should exist in the item master."),
        Column("quantity", pl.Int64(), exclusive_minimum=0, doc="Units bought (> 0)."),
        Column("unit_price", pl.Float64(), minimum=0, doc="Price paid per unit."),
        Column("ordered_at", pl.Datetime("us"), doc="When the order was placed (ISO 8601)."),
        Column(
            "store_id", pl.String(), required=False, nullable=True, doc="Store, for in-store sales."
        ),
        Column(
            "channel",
            pl.String(),
            required=False,
            nullable=True,
            doc="Sales channel (e.g. web, store).",
        ),
    ),
)

ITEMS = TableSpec(
    name="items",
    doc="The item master: one row per SKU.",
    key=("sku",),
    columns=(
        Column("sku", pl.String(), doc="Item id, unique."),
        Column("name", pl.String(), doc="Display name."),
        Column("category", pl.String(), doc="Merchandise category (margin floors apply per one)."),
        Column("brand", pl.String(), required=False, nullable=True, doc="Brand or vendor."),
        Column("unit_cost", pl.Float64(), minimum=0, doc="Landed cost per unit; never missing."),
        Column("unit_price", pl.Float64(), exclusive_minimum=0, doc="Regular price per unit."),
        Column(
            "promo_price",
            pl.Float64(),
            required=False,
            nullable=True,
            exclusive_minimum=0,
            doc="Promotional price, valid from promo_start to promo_end.",
        ),
        Column(
            "promo_start",
            pl.Datetime("us"),
            required=False,
            nullable=True,
            doc="Start of the promotion (inclusive).",
        ),
        Column(
            "promo_end",
            pl.Datetime("us"),
            required=False,
            nullable=True,
            doc="End of the promotion (exclusive).",
        ),
        Column(
            "age_restricted",
            pl.Boolean(),
            required=False,
            default=False,
            doc="Needs age verification at sale.",
        ),
        Column(
            "ship_to_home",
            pl.Boolean(),
            required=False,
            default=False,
            doc="A store may sell it from a distribution centre for delivery (endless aisle).",
        ),
        Column(
            "return_rate",
            pl.Float64(),
            required=False,
            default=0.0,
            minimum=0,
            maximum=1,
            doc="Share of units returned (0..1).",
        ),
        Column(
            "weight_kg", pl.Float64(), required=False, nullable=True, minimum=0, doc="Unit weight."
        ),
    ),
)

NODES = TableSpec(
    name="nodes",
    doc="Fulfillment nodes: stores and distribution centres.",
    key=("node_id",),
    columns=(
        Column("node_id", pl.String(), doc="Node id, unique; a store's node id is its store id."),
        Column("kind", pl.String(), choices=("store", "dc"), doc="`store` or `dc`."),
        Column("region", pl.String(), doc="Region the node serves."),
        Column(
            "fulfillment_cost",
            pl.Float64(),
            required=False,
            default=0.0,
            minimum=0,
            doc="Cost of one extra shipment from this node (split-shipment economics).",
        ),
    ),
)

INVENTORY = TableSpec(
    name="inventory",
    doc="Stock per SKU and node. A SKU absent at a node is not ranged there.",
    key=("sku", "node_id"),
    columns=(
        Column("sku", pl.String(), doc="Item id; must exist in the item master."),
        Column("node_id", pl.String(), doc="Node id; must exist in the nodes table."),
        Column("atp", pl.Int64(), minimum=0, doc="Available to promise, in units (>= 0)."),
        Column(
            "safety_stock",
            pl.Int64(),
            required=False,
            default=0,
            minimum=0,
            doc="Units held back; only atp - safety_stock can be recommended.",
        ),
        Column(
            "inbound",
            pl.Int64(),
            required=False,
            default=0,
            minimum=0,
            doc="Units arriving within the lead time.",
        ),
        Column(
            "as_of",
            pl.Datetime("us"),
            required=False,
            nullable=True,
            doc="When this stock figure was true; the snapshot's as_of is the oldest.",
        ),
    ),
)

SNAPSHOT_TABLES: tuple[TableSpec, ...] = (ITEMS, NODES, INVENTORY)
ALL_TABLES: tuple[TableSpec, ...] = (ORDER_LINES, ITEMS, NODES, INVENTORY)


@dataclass(frozen=True)
class SnapshotData:
    """Validated ERP tables, in the canonical columns and dtypes of the specs above.

    ``as_of`` is when the stock figures were true: the oldest ``inventory.as_of`` when the
    file has that column, else the time the snapshot was read.
    """

    items: pl.DataFrame
    nodes: pl.DataFrame
    inventory: pl.DataFrame
    as_of: datetime
