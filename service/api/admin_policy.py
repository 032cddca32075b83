"""Admin route: reload the policy file without a restart."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from service.api.auth import AdminDep
from service.api.schemas import Problem
from service.runtime import Runtime

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class PolicyReloaded(BaseModel):
    name: str
    version: int
    policy_version: str  # the content hash every response carries


@router.post(
    "/policy/reload",
    response_model=PolicyReloaded,
    responses={
        401: {"model": Problem, "description": "API key missing or unknown."},
        403: {"model": Problem, "description": "The key lacks the admin scope."},
        429: {"model": Problem, "description": "The key's rate limit is reached."},
        422: {"model": Problem, "description": "Invalid policy file; the old one keeps serving."},
    },
)
async def reload_policy(request: Request, _: AdminDep) -> PolicyReloaded:
    """Re-read UPSELL_POLICY_PATH (or the default policy), validate it, and serve it."""
    runtime: Runtime = request.app.state.runtime
    policy = await runtime.reload_policy()
    return PolicyReloaded(
        name=policy.name, version=policy.version, policy_version=policy.content_hash
    )
