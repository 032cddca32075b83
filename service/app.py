"""The FastAPI application, built by ``create_app(settings)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.admin import router as inventory_router
from service.api.admin_policy import router as admin_policy_router
from service.api.errors import install_error_handlers
from service.api.events import router as events_router
from service.api.routes import router
from service.logging import configure_logging
from service.request_id import RequestIdMiddleware
from service.runtime import Runtime
from service.settings import Settings
from service.store.base import SnapshotStore


def create_app(settings: Settings, *, store: SnapshotStore | None = None) -> FastAPI:
    """An app whose lifespan opens the store (or uses ``store``), model and policy."""
    configure_logging(level=settings.log_level, json=settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings, store=store)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.close()

    app = FastAPI(
        title="upsell",
        version="0.1.0",
        summary="Margin-aware upsell and cross-sell recommendations under retail constraints.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_policy_router)
    app.include_router(inventory_router)
    app.include_router(events_router)
    app.add_middleware(RequestIdMiddleware)
    return app
