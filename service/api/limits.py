"""Request body limits: 413 naming the limit, on the declared length and on the bytes read.

``Content-Length`` above the limit is refused before the body is read; a chunked or
under-declared body is counted as it arrives and refused once it passes the limit (the
route's body read raises, and the error handlers answer). Batch endpoints (/v1/admin/*,
/v1/events/*) have a limit of their own (``UPSELL_MAX_BATCH_BODY_BYTES``).
"""

from __future__ import annotations

from typing import Final

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import problem_response

__all__ = ["BodyLimitMiddleware"]

_BATCH_PREFIXES: Final = ("/v1/admin/", "/v1/events/")
_CONTENT_LENGTH: Final = b"content-length"


class BodyLimitMiddleware:
    """Pure ASGI middleware; ``limit`` for most routes, ``batch_limit`` for batch ones."""

    def __init__(self, app: ASGIApp, *, limit: int, batch_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.batch_limit = batch_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        batch = path.startswith(_BATCH_PREFIXES)
        limit = self.batch_limit if batch else self.limit
        variable = "UPSELL_MAX_BATCH_BODY_BYTES" if batch else "UPSELL_MAX_BODY_BYTES"
        detail = f"body: larger than the limit of {limit} bytes ({variable})"
        for name, value in scope.get("headers", ()):
            if name == _CONTENT_LENGTH:
                if value.isdigit() and int(value) > limit:
                    response = problem_response(413, "Content too large", detail)
                    await response(scope, receive, send)
                    return
                break
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, counting_receive, send)
