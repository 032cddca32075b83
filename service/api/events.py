"""Outcome events: ``POST /v1/events/orders`` (orders with their lines, and returns).

Validated whole, then stored idempotently by order id and return id (``service.outcomes``):
a replay changes nothing (``duplicate``), an id sent again with other content is refused and
counted (``conflict``). A bad field, a repeated id, or a return naming an unknown order or
line is a 422 naming ``orders[i].lines[j].field`` or ``returns[i].field``, and nothing is
stored. Customer and session ids are hashed before anything is stored.

Needs a key with the ``events`` (or ``admin``) scope (``service.api.auth``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

import polars as pl
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rules.errors import ContractError, InputError
from service.api.auth import EventsDep
from service.api.routes import get_runtime
from service.api.schemas import Problem
from service.exposures import pseudonymizer_for
from service.outcomes import IngestReport, open_outcome_store, order_records, return_records
from service.runtime import Runtime
from service.store.deltas import DELTA_ID_PATTERN

__all__ = ["OrderEventsRequest", "OrderEventsResponse", "router"]

MAX_ORDERS_PER_REQUEST: Final = 5_000
MAX_LINES_PER_ORDER: Final = 1_000
_LINE_FIELDS: Final = ("sku", "quantity", "unit_price")

router = APIRouter(prefix="/v1/events", tags=["events"])


class OrderLineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(ge=1, le=1_000_000)
    unit_price: float = Field(ge=0, description="Price paid per unit.")


class OrderIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_id: str = Field(pattern=DELTA_ID_PATTERN, description="Unique id: the idempotence key.")
    customer_id: str | None = Field(default=None, min_length=1, max_length=128)
    session_id: str | None = Field(default=None, min_length=1, max_length=128)
    ordered_at: datetime = Field(description="ISO 8601; naive = UTC.")
    channel: str | None = Field(default=None, max_length=64)
    store_id: str | None = Field(default=None, max_length=64)
    lines: list[OrderLineIn] = Field(min_length=1, max_length=MAX_LINES_PER_ORDER)


class ReturnIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    return_id: str = Field(pattern=DELTA_ID_PATTERN, description="Unique id: the idempotence key.")
    order_id: str = Field(pattern=DELTA_ID_PATTERN)
    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(ge=1, le=1_000_000)
    returned_at: datetime = Field(description="ISO 8601; naive = UTC.")


class OrderEventsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "orders": [
                        {
                            "order_id": "web-100231",
                            "customer_id": "17850",
                            "ordered_at": "2025-03-01T10:20:00Z",
                            "channel": "web",
                            "lines": [
                                {"sku": "85123A", "quantity": 2, "unit_price": 2.55},
                                {"sku": "21733", "quantity": 1, "unit_price": 2.95},
                            ],
                        }
                    ],
                    "returns": [
                        {
                            "return_id": "rma-5531",
                            "order_id": "web-100231",
                            "sku": "21733",
                            "quantity": 1,
                            "returned_at": "2025-03-09T09:00:00Z",
                        }
                    ],
                }
            ]
        },
    )

    orders: list[OrderIn] = Field(default_factory=list, max_length=MAX_ORDERS_PER_REQUEST)
    returns: list[ReturnIn] = Field(default_factory=list, max_length=MAX_ORDERS_PER_REQUEST)

    @model_validator(mode="after")
    def _something_and_unique(self) -> OrderEventsRequest:
        if not self.orders and not self.returns:
            raise ValueError("orders: send at least one order or return")
        for name, ids in (
            ("orders", [order.order_id for order in self.orders]),
            ("returns", [entry.return_id for entry in self.returns]),
        ):
            seen: set[str] = set()
            for position, record_id in enumerate(ids):
                if record_id in seen:
                    raise ValueError(f"{name}[{position}]: id {record_id!r} repeated in the batch")
                seen.add(record_id)
        for position, order in enumerate(self.orders):
            skus = [line.sku for line in order.lines]
            if len(set(skus)) != len(skus):
                raise ValueError(f"orders[{position}].lines: one line per sku (quantities summed)")
        return self


class NotAddedOut(BaseModel):
    id: str
    outcome: Literal["duplicate", "conflict"]


class IngestOut(BaseModel):
    added: int = Field(description="New ids: stored.")
    duplicate: int = Field(description="Ids stored before with the same content: no change.")
    conflict: int = Field(
        description="Ids stored before with other content: refused, the first version stays."
    )
    not_added: list[NotAddedOut]


class OrderEventsResponse(BaseModel):
    orders: IngestOut
    returns: IngestOut


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _out(report: IngestReport) -> IngestOut:
    return IngestOut(
        added=report.added,
        duplicate=report.duplicate,
        conflict=report.conflict,
        not_added=[
            NotAddedOut(id=record_id, outcome=outcome.value)
            for record_id, outcome in report.not_added
        ],
    )


@router.post(
    "/orders",
    response_model=OrderEventsResponse,
    responses={
        401: {"model": Problem, "description": "API key missing or unknown."},
        403: {"model": Problem, "description": "The key lacks the events (or admin) scope."},
        413: {"model": Problem, "description": "Body larger than UPSELL_MAX_BATCH_BODY_BYTES."},
        429: {"model": Problem, "description": "The key's rate limit is reached."},
        422: {"model": Problem, "description": "Invalid batch; `errors` names the field."},
        503: {"model": Problem, "description": "The outcome store is down."},
    },
)
async def ingest_orders(
    body: OrderEventsRequest, runtime: RuntimeDep, _: EventsDep
) -> OrderEventsResponse:
    """Store orders and returns for the ROI report, idempotently by id."""
    flat = [
        (position, number, order, line)
        for position, order in enumerate(body.orders)
        for number, line in enumerate(order.lines)
    ]
    lines = pl.DataFrame(
        {
            "order_id": [order.order_id for _, _, order, _ in flat],
            "customer_id": [order.customer_id for _, _, order, _ in flat],
            "session_id": [order.session_id for _, _, order, _ in flat],
            "sku": [line.sku for *_, line in flat],
            "quantity": [line.quantity for *_, line in flat],
            "unit_price": [line.unit_price for *_, line in flat],
            "ordered_at": [order.ordered_at.isoformat() for _, _, order, _ in flat],
            "store_id": [order.store_id for _, _, order, _ in flat],
            "channel": [order.channel for _, _, order, _ in flat],
        },
        schema_overrides={name: pl.String() for name in ("customer_id", "session_id")},
    )
    returns = pl.DataFrame(
        {
            "return_id": [entry.return_id for entry in body.returns],
            "order_id": [entry.order_id for entry in body.returns],
            "sku": [entry.sku for entry in body.returns],
            "quantity": [entry.quantity for entry in body.returns],
            "returned_at": [entry.returned_at.isoformat() for entry in body.returns],
        },
        schema_overrides={"quantity": pl.Int64()},
    )
    pseudonymize = pseudonymizer_for(runtime.settings)
    store = open_outcome_store(runtime.settings)
    try:
        orders = order_records(lines, pseudonymize, source="orders") if flat else []
        entries = return_records(returns, source="returns") if body.returns else []
        order_report, return_report = await store.add(orders, entries, source="returns")
    except ContractError as exc:
        raise InputError(_body_path(exc, flat)) from exc
    finally:
        await store.close()
    return OrderEventsResponse(orders=_out(order_report), returns=_out(return_report))


def _body_path(exc: ContractError, flat: list[tuple[int, int, OrderIn, OrderLineIn]]) -> str:
    """The error with its place in the body, as a client addresses it."""
    if exc.row is None or exc.column is None:
        return str(exc)
    if exc.file == "returns":
        return f"returns[{exc.row - 1}].{exc.column}: {exc.problem}"
    position, number, _, _ = flat[exc.row - 1]
    if exc.column in _LINE_FIELDS:
        return f"orders[{position}].lines[{number}].{exc.column}: {exc.problem}"
    return f"orders[{position}].{exc.column}: {exc.problem}"
