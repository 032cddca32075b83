"""Who may call what: API keys with scopes, and a rate limit per key.

A caller sends ``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``). Keys come from
``UPSELL_API_KEYS_FILE`` (``service.api_keys``); ``UPSELL_ADMIN_TOKEN``, when set, is one more
credential, named ``admin-token``, with the admin scope (and so every scope) and no rate limit.

- 401: no key, or a key no entry has (``WWW-Authenticate: Bearer``).
- 403: the key lacks the scope (the body names the scope needed), or no credential that
  could hold it is configured at all (the body names the variable to set).
- 429: the key's bucket is empty (``Retry-After`` in whole seconds).

Scopes: recommendations need their ``channel`` (cart, pdp, pos, contact_center) and, with
``debug=true``, ``admin``; /v1/admin/* needs ``admin``; ``POST /v1/events/orders`` needs
``events``; ``admin`` holds every scope. ``UPSELL_AUTH=off`` (the local demo) opens the channel
scopes to anyone, unlimited, whatever key is sent (none, an unknown one, one of another
scope); admin and events still need a credential.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Final, Literal

import structlog
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from rules.policy import CHANNELS
from service.api.observe import note
from service.api_keys import ADMIN, EVENTS, ApiKey, KeyRing, RateLimit, hash_key
from service.metrics import Metrics
from service.rate_limit import RateLimiter
from service.settings import Settings

__all__ = [
    "AdminDep",
    "Caller",
    "CallerDep",
    "EventsDep",
    "Guard",
    "accepted_caller",
    "authorize",
    "identify",
]

log = structlog.get_logger(__name__)

ADMIN_TOKEN_NAME: Final = "admin-token"
_bearer = HTTPBearer(auto_error=False, description="An API key (UPSELL_API_KEYS_FILE).")
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The same key, in a header of its own."
)


@dataclass(frozen=True)
class Caller:
    """Who is calling: a key's name and scopes, or the anonymous caller of UPSELL_AUTH=off."""

    name: str
    key: ApiKey | None  # None: anonymous

    def allows(self, scope: str) -> bool:
        return self.key is not None and self.key.allows(scope)


ANONYMOUS: Final = Caller(name="anonymous", key=None)


class Guard:
    """The app's keys, its rate limiter (set once the lifespan opened Redis) and its metrics."""

    def __init__(self, settings: Settings, keys: KeyRing, metrics: Metrics) -> None:
        self.mode: Literal["keys", "off"] = settings.auth
        self.keys = keys
        self.metrics = metrics
        self.default_limit = RateLimit(
            per_second=settings.rate_limit_per_second, burst=settings.rate_limit_burst
        )
        admin_token = settings.admin_token
        self._admin = (
            ApiKey(
                name=ADMIN_TOKEN_NAME,
                digest=hash_key(admin_token.get_secret_value()),
                scopes=frozenset((ADMIN,)),
                rate_limit=RateLimit(per_second=0, burst=1),  # an operator's, not a caller's
            )
            if admin_token is not None
            else None
        )
        self.limiter = RateLimiter(redis=None)

    def use_keys(self, keys: KeyRing) -> None:
        """Serve with ``keys`` from now on (the keys file changed and loaded well)."""
        self.keys = keys

    @property
    def has_credentials(self) -> bool:
        return bool(self.keys) or self._admin is not None

    def find(self, raw: str) -> ApiKey | None:
        found = self.keys.find(raw)
        if self._admin is not None and hmac.compare_digest(self._admin.digest, hash_key(raw)):
            found = self._admin
        return found

    def describe(self) -> dict[str, object]:
        """What start-up logs (once) about auth."""
        return {
            "auth": self.mode,
            "keys": len(self.keys),
            "keys_file": self.keys.source,
            "admin_token": self._admin is not None,
            "rate_limit": self.limiter.backend,
        }

    def refuse(
        self, code: int, reason: str, detail: str, headers: dict[str, str] | None = None
    ) -> HTTPException:
        self.metrics.auth_failures.labels(reason).inc()
        return HTTPException(code, detail, headers=headers)


def _not_configured(mode: str, scope: str) -> str:
    if scope in CHANNELS and mode == "keys":
        return (
            "no API keys are configured (UPSELL_AUTH=keys): set UPSELL_API_KEYS_FILE to a "
            "keys file (`upsell keys new`; UPSELL_ADMIN_TOKEN serves admin calls), or "
            "UPSELL_AUTH=off for a local demo"
        )
    holders = "admin" if scope == ADMIN else f"{scope!r} or admin"
    return (
        f"no credential with the {scope!r} scope is configured: set UPSELL_API_KEYS_FILE "
        f"(a key with scope {holders}) or UPSELL_ADMIN_TOKEN"
    )


def _guard(request: Request) -> Guard:
    guard: Guard = request.app.state.guard
    return guard


async def identify(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> Caller:
    """The caller named by the request's key (401 for an unknown one, under UPSELL_AUTH=keys);
    anonymous without one.

    Under UPSELL_AUTH=keys a request without a key is refused here, before its body is
    validated (FastAPI has parsed it as JSON by then: broken JSON is a 422 first).
    ``async`` though it never awaits: FastAPI runs a plain ``def`` dependency in its thread
    pool, and that hop (and the GIL hand-offs it brings) cost more than the check itself.
    """
    guard = _guard(request)
    raw = bearer.credentials if bearer is not None else api_key
    caller = _caller_of(request, guard, raw)
    if caller is not None:
        return caller
    if not guard.has_credentials:
        raise guard.refuse(403, "not_configured", _not_configured("keys", "cart"))
    if raw is None:
        raise guard.refuse(
            401,
            "missing",
            "API key missing: send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    raise guard.refuse(
        401, "unknown", "API key unknown or revoked", headers={"WWW-Authenticate": "Bearer"}
    )


async def accepted_caller(request: Request) -> Caller | None:
    """The caller ``identify`` would return for this request, read without FastAPI's
    dependency machinery (a route's fast path); None wherever ``identify`` would refuse,
    so that the dependency-driven path answers those requests, with its reasons."""
    bearer = await _bearer(request)
    raw = bearer.credentials if bearer is not None else await _api_key_header(request)
    return _caller_of(request, _guard(request), raw)


def _caller_of(request: Request, guard: Guard, raw: str | None) -> Caller | None:
    """The caller of key ``raw`` (None: no key sent); None where the request is refused."""
    if not guard.has_credentials or raw is None:
        return None if guard.mode == "keys" else ANONYMOUS
    key = guard.find(raw)
    if key is None:  # under UPSELL_AUTH=off only admin and events calls look at keys
        return None if guard.mode == "keys" else ANONYMOUS
    caller = Caller(name=key.name, key=key)
    note(request, caller=caller.name)
    return caller


CallerDep = Annotated[Caller, Depends(identify)]


async def authorize(request: Request, caller: Caller, scope: str, *, what: str = "") -> None:
    """Raise unless ``caller`` holds ``scope`` and has a token left in its bucket; ``what``
    (e.g. "debug traces are admin-only") starts the refusal's message."""
    guard = _guard(request)
    if guard.mode == "off" and scope in CHANNELS:
        return  # open to anyone, unlimited, whatever key is sent (the local demo)
    lead = f"{what}: " if what else ""
    if caller.key is None:
        if not guard.has_credentials:
            raise guard.refuse(403, "not_configured", lead + _not_configured(guard.mode, scope))
        raise guard.refuse(
            401,
            "missing",
            f"{lead}this call needs an API key with the {scope!r} scope: send "
            "`Authorization: Bearer <key>` or `X-API-Key: <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not caller.allows(scope):
        held = ", ".join(sorted(caller.key.scopes))
        raise guard.refuse(
            403,
            "forbidden",
            f"{lead}key {caller.name!r} lacks the {scope!r} scope (it holds: {held})",
        )
    limit = caller.key.rate_limit or guard.default_limit
    decision = await guard.limiter.take(caller.name, limit)
    if not decision.allowed:
        guard.metrics.rate_limited.labels(caller.name).inc()
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit of key {caller.name!r} reached ({limit.per_second:g}/s, burst "
            f"{limit.burst}): retry after {decision.retry_after_s} s",
            headers={"Retry-After": str(decision.retry_after_s)},
        )


def require(scope: str) -> Callable[..., object]:
    """A dependency refusing callers without ``scope``."""

    async def check(request: Request, caller: CallerDep) -> Caller:
        await authorize(request, caller, scope)
        return caller

    return check


AdminDep = Annotated[Caller, Depends(require(ADMIN))]
EventsDep = Annotated[Caller, Depends(require(EVENTS))]
