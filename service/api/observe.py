"""Per request: latency and count metrics by route template and channel, and one log line.

Routes put what only they know in the scope (``note(request, ...)``): the channel, and the
customer's pseudonym (a keyed hash, ``service.exposures.Pseudonymizer``), so the ``request``
log line never carries a raw customer id. The request id comes from the bound context
(``service.request_id``), the key's name from the auth dependency.
"""

from __future__ import annotations

import time
from typing import Final

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

__all__ = ["ObserveMiddleware", "note"]

log = structlog.get_logger("service.request")

_NOTES: Final = "upsell.notes"
_NO_CHANNEL: Final = "none"


def note(request: Request, **fields: str | None) -> None:
    """Fields for this request's metrics labels (``channel``) and log line."""
    request.scope.setdefault(_NOTES, {}).update(fields)


class ObserveMiddleware:
    """Pure ASGI middleware timing each HTTP request from its start to its last byte."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, log_requests: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests
        # Bound once (the app configured logging before its middleware is built): the
        # module's lazy proxy re-binds on every call, about 5 µs even for a filtered line.
        self._log = log.bind()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what an exception escaping the app becomes

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method: str = scope.get("method", "")
            notes: dict[str, str | None] = scope.get(_NOTES, {})
            channel = notes.get("channel") or _NO_CHANNEL
            self.metrics.request_seconds_of(template, method, channel).observe(seconds)
            self.metrics.requests_of(template, method, channel, str(status)).inc()
            if self.log_requests and template not in ("/metrics", "/healthz", "/readyz"):
                self._log.info(
                    "request",
                    method=method,
                    route=template,
                    status=status,
                    duration_ms=round(seconds * 1000, 3),
                    **{name: value for name, value in notes.items() if value is not None},
                )
