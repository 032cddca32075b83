"""When a request arrived, for its deadline, and how long the service took, for the caller.

``ArrivalMiddleware`` stamps each HTTP request with its arrival (``time.monotonic()``) before
anything else runs, and answers with ``Server-Timing: app;dur=<ms>``: the time from that
stamp to the response's start, i.e. the server-side share of the request that the channel
budgets (``UPSELL_DEADLINE_*_MS``) bound. Outermost of the app's middleware, so that both
cover the other middleware too.
"""

from __future__ import annotations

import time
from typing import Final

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ArrivalMiddleware", "arrived_at"]

_ARRIVED_AT: Final = "upsell.arrived_at"
HEADER: Final = b"server-timing"


def arrived_at(request: Request) -> float:
    """The request's arrival stamp; now, for a request the middleware did not see."""
    stamp = request.scope.get(_ARRIVED_AT)
    return stamp if isinstance(stamp, float) else time.monotonic()


class ArrivalMiddleware:
    """Pure ASGI middleware: a stamp in the scope and a header on the way out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        scope[_ARRIVED_AT] = arrived

        async def send_with_timing(message: Message) -> None:
            if message["type"] == "http.response.start":
                duration_ms = (time.monotonic() - arrived) * 1000
                message["headers"] = [
                    *message.get("headers", ()),
                    (HEADER, f"app;dur={duration_ms:.3f}".encode()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_timing)
