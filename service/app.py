"""The FastAPI application, built by ``create_app(settings)``."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anthropic
from fastapi import FastAPI

from service.api.admin import router as inventory_router
from service.api.admin_explanations import router as admin_explanations_router
from service.api.admin_policy import router as admin_policy_router
from service.api.errors import install_error_handlers
from service.api.events import router as events_router
from service.api.ping import router as ping_router
from service.api.routes import router
from service.api.timing import ArrivalMiddleware
from service.logging import configure_logging
from service.request_id import RequestIdMiddleware
from service.runtime import Runtime
from service.settings import Settings
from service.store.base import SnapshotStore


def create_app(
    settings: Settings,
    *,
    store: SnapshotStore | None = None,
    anthropic_client: anthropic.AsyncAnthropic | None = None,
) -> FastAPI:
    """An app whose lifespan opens the store (or uses ``store``), model, policy and explainer
    (whose LLM client is ``anthropic_client`` if given, else built from the settings)."""
    configure_logging(level=settings.log_level, json=settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings, store=store, anthropic_client=anthropic_client)
        app.state.runtime = runtime
        # What start-up allocated (model, catalog, indexes) lives as long as the process: out
        # of the collector's reach, a full collection stays short enough not to eat a
        # channel's budget (one took up to 130 ms without this, benchmarks/README.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # what this app held may be collected once it is closed
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
    app.include_router(admin_explanations_router)
    app.include_router(events_router)
    app.include_router(ping_router)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(ArrivalMiddleware)  # added last: outermost, so it stamps arrival first
    return app
