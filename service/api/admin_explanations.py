"""Admin route: the explanation stage's accounting (``GET /v1/admin/explanations``).

Counts since the process started: explanations served by source, LLM calls, timeouts and
errors, text refused by validation, background queue outcomes, tokens in and out as the API
reported them, the estimated spend per 1,000 explained items, and the circuit breaker's
state. The same figures are logged as ``explanation_stats`` every
``UPSELL_EXPLAIN_STATS_LOG_SECONDS`` and at shutdown.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from service.api.auth import AdminDep
from service.api.schemas import Problem
from service.runtime import Runtime

__all__ = ["ExplanationStats", "router"]

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class ExplanationStats(BaseModel):
    llm_enabled: bool = Field(description="False: no API key, every explanation a template.")
    served: dict[str, int] = Field(description="Explanations served, by source.")
    llm_calls: int = Field(description="Calls that went out, in requests and in the background.")
    timeouts: int = Field(description="Calls that gave no answer within their time.")
    errors: dict[str, int] = Field(description="Other failures, by kind (429, 5xx, ...).")
    skipped_breaker_open: int = Field(description="Calls not made: the breaker was open.")
    rejected: dict[str, int] = Field(description="LLM text refused by validation, by problem.")
    queue: dict[str, int] = Field(description="Background submissions, by outcome.")
    queue_waiting: int
    queue_capacity: int
    tokens_in: int
    tokens_out: int
    cost_usd: float = Field(description="Estimated spend so far, at UPSELL_LLM_PRICE_*.")
    cost_usd_per_1000_recommendations: float = Field(
        description="Estimated spend per 1,000 explained items (background calls included)."
    )
    breaker_state: Literal["closed", "open", "half_open", "none"]
    breaker_times_opened: int
    cache: Literal["redis", "in-process", "none"]
    cache_preload: Literal["none", "running", "done"]
    cache_preloaded: int = Field(description="Entries copied from Redis at start.")


@router.get(
    "/explanations",
    response_model=ExplanationStats,
    responses={
        401: {"model": Problem, "description": "API key missing or unknown."},
        403: {"model": Problem, "description": "The key lacks the admin scope."},
        429: {"model": Problem, "description": "The key's rate limit is reached."},
    },
)
async def explanation_stats(request: Request, _: AdminDep) -> ExplanationStats:
    """The explanation stage's counters since start, and the breaker's state."""
    runtime: Runtime = request.app.state.runtime
    return ExplanationStats.model_validate(runtime.explainer.stats())
