"""Who may call what. For now one admin bearer token guards /v1/admin/*; per-caller API keys
with scopes replace it (see the production-service issue)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="UPSELL_ADMIN_TOKEN")


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def require_admin(request: Request, credentials: BearerDep) -> None:
    """403 while no admin token is configured; 401 for a missing or wrong token."""
    check_admin(request, credentials, what="admin endpoints are off")


def check_admin(
    request: Request, credentials: HTTPAuthorizationCredentials | None, *, what: str
) -> None:
    """Raise unless the caller holds the admin token; ``what`` says what is refused."""
    runtime: Runtime = request.app.state.runtime
    expected = runtime.settings.admin_token
    if expected is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"{what}: set UPSELL_ADMIN_TOKEN to use them"
        )
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "admin token missing or wrong",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Annotated[None, Depends(require_admin)]
