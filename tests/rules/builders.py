"""Small hand-built catalogs, node tables and policies for the rules tests."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl

from models.data.contract import validate_table
from models.data.schema import ITEMS, NODES
from rules.catalog import Catalog, NodeTable, catalog_from_items, node_table_from_nodes
from rules.constraints import (
    CONSTRAINTS,
    KEPT,
    CandidateFacts,
    CompiledPolicy,
    RequestFacts,
    apply_constraints,
    candidate_facts,
    with_fulfilment,
)
from rules.policy import Channel, Policy
from rules.reasons import DropReason

NOW = datetime(2011, 10, 1, 12, 0)


def catalog(rows: list[dict[str, object]]) -> Catalog:
    """A catalog from item rows holding only the columns a test cares about."""
    frame = pl.DataFrame(rows, infer_schema_length=None)
    defaults = [
        pl.col(column.name).fill_null(column.default)
        for column in ITEMS.columns
        if column.name in frame.columns and column.default is not None
    ]
    return catalog_from_items(validate_table(frame.with_columns(defaults), ITEMS, file="items"))


def nodes(rows: list[dict[str, object]]) -> NodeTable:
    return node_table_from_nodes(validate_table(pl.DataFrame(rows), NODES, file="nodes (test)"))


def item(
    sku: str, *, cost: float = 1.0, price: float = 2.0, category: str = "HOME", **extra: object
) -> dict[str, object]:
    return {
        "sku": sku,
        "name": f"Item {sku}",
        "category": category,
        "unit_cost": cost,
        "unit_price": price,
        **extra,
    }


def policy(**overrides: object) -> Policy:
    document: dict[str, object] = {
        "name": "test",
        "version": 1,
        "margin_floors": [{"absolute": 0.10, "percent": 0.15}],
    }
    document.update(overrides)
    return Policy.model_validate(document)


def facts(
    cat: Catalog,
    skus: list[str | None],
    *,
    available: list[list[int]] | None = None,
    uses_history: list[bool] | None = None,
    ranged_at_store: list[bool] | None = None,
    compiled: CompiledPolicy,
    channel: Channel = "cart",
    now: datetime = NOW,
) -> CandidateFacts:
    """Facts as the pipeline builds them, with ``available`` as the stock read (one row per
    SKU; None: no eligible node). ``ranged_at_store`` defaults to "has a row at node 0"."""
    positions = np.array([cat.index[sku] if sku else -1 for sku in skus], dtype=np.int64)
    stock = np.array(available if available is not None else [[] for _ in skus], dtype=np.int64)
    stock = stock.reshape(len(skus), -1)
    master = candidate_facts(
        cat,
        compiled,
        positions,
        uses_history=np.array(uses_history or [False] * len(skus), dtype=np.bool_),
        channel=channel,
        now=now,
    )
    if ranged_at_store is None:
        at_store = stock[:, 0] >= 0 if stock.shape[1] else np.zeros(len(skus), np.bool_)
    else:
        at_store = np.array(ranged_at_store, dtype=np.bool_)
    return master.with_stock(
        np.arange(len(skus)),
        available=np.ascontiguousarray(stock),
        inbound=np.zeros_like(stock),
        ranged_at_store=at_store,
    )


def request(
    cat: Catalog,
    *,
    channel: Channel = "cart",
    basket: tuple[str, ...] = (),
    quantity: int = 1,
    consent: bool = False,
    node_cost: list[float] | None = None,
    basket_node: list[bool] | None = None,
    now: datetime = NOW,
) -> RequestFacts:
    excluded = np.array([cat.index[sku] for sku in basket], dtype=np.int64)
    cost = np.array(node_cost or [], dtype=np.float64)
    return RequestFacts(
        channel=channel,
        excluded_pos=excluded,
        basket_category_codes=cat.category_code[excluded].astype(np.int64),
        quantity=quantity,
        now=now,
        consent=consent,
        node_cost=cost,
        basket_node=np.array(basket_node or [False] * len(cost), dtype=np.bool_),
    )


def reasons(drops: np.ndarray) -> list[str]:
    return ["KEPT" if drop == KEPT else DropReason(int(drop)).code for drop in drops]


def judge(
    candidate_facts: CandidateFacts, request_facts: RequestFacts, compiled: CompiledPolicy
) -> tuple[list[str], list[int], list[float]]:
    """Reason per candidate, chosen node column and incremental cost (-1 / nan if none)."""
    candidate_facts, column = with_fulfilment(candidate_facts, request_facts, compiled)
    drops = apply_constraints(candidate_facts, request_facts, compiled, CONSTRAINTS)
    return reasons(drops), column.tolist(), candidate_facts.fulfilment_cost.tolist()
