"""``POST /v1/ping``: the ceiling of this stack, for the load benchmark.

It runs through the same uvicorn, middleware (arrival stamp, request id) and router as
``/v1/recommendations`` and does no work of its own: no auth, no body parsing, no pydantic
serialisation (the bytes are orjson's, made once). What a benchmark measures here is what
the framework costs; the difference to a recommendation is what the pipeline costs.
"""

from __future__ import annotations

from typing import Final, Literal

import orjson
from fastapi import APIRouter, Response
from pydantic import BaseModel

router = APIRouter()

_PONG: Final = orjson.dumps({"ok": True})


class PingResponse(BaseModel):
    ok: Literal[True]


@router.post(
    "/v1/ping",
    response_model=PingResponse,
    responses={200: {"model": PingResponse, "description": 'Always `{"ok": true}`.'}},
    tags=["operations"],
)
async def ping() -> Response:
    """Answer at once whatever the body: the trivial endpoint the load benchmark compares
    ``/v1/recommendations`` with (same server, same middleware, no work)."""
    return Response(content=_PONG, media_type="application/json")
