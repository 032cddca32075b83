"""``GET /metrics``: the Prometheus text format (open, like /healthz)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.routes import refresh_gauges
from service.metrics import CONTENT_TYPE_LATEST, Metrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Every series of the service (see service/metrics.py and docs/operations.md)."""
    registry: Metrics = request.app.state.metrics
    refresh_gauges(request.app.state.runtime, registry)
    return Response(registry.exposition(), media_type=CONTENT_TYPE_LATEST)
