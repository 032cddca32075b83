"""Admin routes: inventory deltas (``POST /v1/admin/inventory``).

Deltas are absolute stock figures with an ``as_of`` (see ``service.store.deltas``); the
``delta_id`` is the idempotence key: posting the same batch twice changes nothing (every
delta comes back ``duplicate``), a delta older than the stored figure is ignored and counted
(``stale``), and one that contradicts what is stored (another id at the same ``as_of`` that
sorts after it, or its id taken before with other figures) is refused and counted
(``conflict``). Every delta that changed nothing is listed with its outcome.

The batch is validated whole first: a bad field, a repeated ``delta_id``, or a SKU or node
the current snapshot does not know refuses it with 422 naming ``deltas[i].field``, and
nothing is applied. The store being down is 503, as everywhere.

Like every /v1/admin route it needs a key with the admin scope (``service.api.auth``).
``create_app`` includes the router.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from rules.errors import ContractError, InputError
from service.api.auth import AdminDep
from service.api.routes import get_runtime
from service.api.schemas import Problem
from service.runtime import Runtime
from service.store.deltas import DELTA_ID_PATTERN, DeltaOutcome, deltas_from_records

__all__ = ["InventoryDeltaIn", "InventoryDeltasRequest", "InventoryDeltasResponse", "router"]

MAX_DELTAS_PER_REQUEST: Final = 10_000
_MAX_UNITS: Final = 1_000_000_000_000  # far above any real stock; keeps figures in int64

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class InventoryDeltaIn(BaseModel):
    """One stock change: the figures after it, absolute, as of a moment."""

    model_config = ConfigDict(extra="forbid")

    delta_id: str = Field(
        pattern=DELTA_ID_PATTERN,
        description="Unique id of the change (e.g. the ERP event id): 1-64 of "
        "A-Z a-z 0-9 . _ : / -",
    )
    sku: str = Field(min_length=1, max_length=64, description="Item id in the item master.")
    node_id: str = Field(min_length=1, max_length=64, description="Node id in the nodes table.")
    atp: int = Field(
        ge=0,
        le=_MAX_UNITS,
        description="Available to promise after the change (absolute units, not a difference).",
    )
    safety_stock: int | None = Field(
        default=None, ge=0, le=_MAX_UNITS, description="After the change; omitted keeps it."
    )
    inbound: int | None = Field(
        default=None, ge=0, le=_MAX_UNITS, description="After the change; omitted keeps it."
    )
    as_of: datetime = Field(description="When the figures were true (ISO 8601; naive = UTC).")


class InventoryDeltasRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "deltas": [
                        {
                            "delta_id": "erp-20250301-000123",
                            "sku": "85123A",
                            "node_id": "S-UK",
                            "atp": 0,
                            "as_of": "2025-03-01T10:15:00Z",
                        }
                    ]
                }
            ]
        },
    )

    deltas: list[InventoryDeltaIn] = Field(min_length=1, max_length=MAX_DELTAS_PER_REQUEST)


class DeltaNotAppliedOut(BaseModel):
    delta_id: str
    outcome: Literal["duplicate", "stale", "conflict", "skipped"]


class InventoryDeltasResponse(BaseModel):
    snapshot_version: str = Field(description="The snapshot whose stock the deltas changed.")
    applied: int = Field(description="Deltas newer than the stored figure: they are it now.")
    duplicate: int = Field(description="Delta id taken before (a replay): no change.")
    stale: int = Field(description="Older than the stored figure (arrived late): no change.")
    conflict: int = Field(
        description="Contradicts a stored figure (another delta id at the same as_of sorts "
        "after it, or this id was taken with other figures): no change; resend under a new id."
    )
    skipped: int = Field(description="Their node or SKU left the snapshot as it flipped.")
    not_applied: list[DeltaNotAppliedOut] = Field(
        description="Every delta that changed nothing, and why."
    )


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@router.post(
    "/inventory",
    response_model=InventoryDeltasResponse,
    responses={
        401: {"model": Problem, "description": "API key missing or unknown."},
        403: {"model": Problem, "description": "The key lacks the admin scope."},
        413: {"model": Problem, "description": "Body larger than UPSELL_MAX_BATCH_BODY_BYTES."},
        429: {"model": Problem, "description": "The key's rate limit is reached."},
        422: {"model": Problem, "description": "Invalid batch; `errors` names deltas[i].field."},
        503: {"model": Problem, "description": "No snapshot published yet, or the store is down."},
    },
)
async def apply_inventory_deltas(
    body: InventoryDeltasRequest, runtime: RuntimeDep, _: AdminDep
) -> InventoryDeltasResponse:
    """Apply inventory deltas to the current snapshot's stock, idempotently."""
    try:
        batch = deltas_from_records(
            [delta.model_dump() for delta in body.deltas],
            source="deltas",
            now=datetime.now(UTC),
            row_offset=0,
        )
        report = await runtime.store.apply_deltas(batch)
    except ContractError as exc:
        # Rows of the body are list positions: name the field as a client would address it.
        if exc.row is None or exc.column is None:
            raise
        raise InputError(f"deltas[{exc.row}].{exc.column}: {exc.problem}") from exc
    ids = batch.frame.get_column("delta_id").to_list()
    return InventoryDeltasResponse(
        snapshot_version=report.version,
        applied=report.applied,
        duplicate=report.duplicate,
        stale=report.stale,
        conflict=report.conflict,
        skipped=report.skipped,
        not_applied=[
            DeltaNotAppliedOut(delta_id=ids[position], outcome=outcome.value)
            for position, outcome in enumerate(report.outcomes)
            if outcome is not DeltaOutcome.APPLIED
        ],
    )
