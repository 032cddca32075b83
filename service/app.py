"""The FastAPI application, built by ``create_app(settings)``."""

from __future__ import annotations

import gc
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anthropic
import structlog
from fastapi import FastAPI

from service.api.admin import router as inventory_router
from service.api.admin_explanations import router as admin_explanations_router
from service.api.admin_policy import router as admin_policy_router
from service.api.auth import Guard
from service.api.errors import install_error_handlers
from service.api.events import router as events_router
from service.api.limits import BodyLimitMiddleware
from service.api.metrics_route import router as metrics_router
from service.api.observe import ObserveMiddleware
from service.api.ping import router as ping_router
from service.api.routes import router
from service.api.timing import ArrivalMiddleware
from service.api_keys import load_key_ring
from service.keys_watch import KeysFileWatcher
from service.logging import configure_logging
from service.metrics import Metrics, multiprocess_dir
from service.rate_limit import RateLimiter
from service.request_id import RequestIdMiddleware
from service.runtime import Runtime, explanation_redis_client
from service.settings import Settings, load_settings
from service.store.base import SnapshotStore
from service.store.redis_store import RedisSnapshotStore

log = structlog.get_logger(__name__)


def create_app(
    settings: Settings,
    *,
    store: SnapshotStore | None = None,
    anthropic_client: anthropic.AsyncAnthropic | None = None,
) -> FastAPI:
    """An app whose lifespan opens the store (or uses ``store``), model, policy and explainer
    (whose LLM client is ``anthropic_client`` if given, else built from the settings)."""
    configure_logging(level=settings.log_level, json=settings.log_json)
    keys = load_key_ring(settings.api_keys_file)  # a bad keys file stops start-up here
    metrics = Metrics()
    guard = Guard(settings, keys, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings, store=store, anthropic_client=anthropic_client)
        app.state.runtime = runtime
        if isinstance(runtime.store, RedisSnapshotStore):
            runtime.store.observe = metrics.observe_redis
        guard.limiter = RateLimiter(
            redis=explanation_redis_client(runtime.store),
            prefix=settings.redis_prefix,
            observe=metrics.observe_redis,
            on_fallback=metrics.rate_limit_fallbacks.inc,
        )
        log_auth(guard)
        keys_watcher = (
            KeysFileWatcher(
                settings.api_keys_file,
                loaded=keys,
                use=guard.use_keys,
                interval=settings.api_keys_reload_seconds,
                on_outcome=lambda outcome: metrics.api_keys_reloads.labels(outcome).inc(),
            )
            if settings.api_keys_file is not None and settings.api_keys_reload_seconds > 0
            else None
        )
        if keys_watcher is not None:
            keys_watcher.start()
        # What start-up allocated (model, catalog, indexes) lives as long as the process: out
        # of the collector's reach, a full collection stays short enough not to eat a
        # channel's budget (one took up to 130 ms without this, benchmarks/README.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # what this app held may be collected once it is closed
            if keys_watcher is not None:
                await keys_watcher.close()
            await runtime.close()

    app = FastAPI(
        title="upsell",
        version="0.1.0",
        summary="Margin-aware upsell and cross-sell recommendations under retail constraints.",
        lifespan=lifespan,
    )
    app.state.guard = guard
    app.state.metrics = metrics
    install_error_handlers(app)
    # FastAPI matches included routers in order, each one's routes in turn: the hot paths
    # first (ping is the load benchmark's ceiling, last it was matched against every route).
    app.include_router(ping_router)
    app.include_router(router)
    app.include_router(metrics_router)
    app.include_router(admin_policy_router)
    app.include_router(inventory_router)
    app.include_router(admin_explanations_router)
    app.include_router(events_router)
    # Outermost last: arrival stamp, request id (bound before anything logs), metrics and
    # the request log line, then the body limit just outside the routes.
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_body_bytes,
        batch_limit=settings.max_batch_body_bytes,
    )
    app.add_middleware(ObserveMiddleware, metrics=metrics, log_requests=settings.log_requests)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(ArrivalMiddleware)  # added last: outermost, so it stamps arrival first
    return app


def app_from_environment() -> FastAPI:
    """The app the environment configures: the factory each ``upsell serve`` worker calls."""
    return create_app(load_settings())


def log_auth(guard: Guard) -> None:
    """Say once, at start, how callers are checked, loudly when that refuses or opens all."""
    described = guard.describe() | {"metrics_multiprocess_dir": multiprocess_dir()}
    if guard.mode == "off":
        log.warning(
            "auth_off",
            effect="UPSELL_AUTH=off: recommendations are open to anyone, unlimited (a local "
            "demo only); admin and events calls still need a key",
            **described,
        )
    elif not guard.has_credentials:
        log.warning(
            "auth_no_keys",
            effect="UPSELL_AUTH=keys without keys: every protected call is refused; set "
            "UPSELL_API_KEYS_FILE (`upsell keys new` makes a key)",
            **described,
        )
    elif not guard.keys:
        log.warning(
            "auth_no_keys_file",
            effect="only UPSELL_ADMIN_TOKEN is accepted; set UPSELL_API_KEYS_FILE for callers",
            **described,
        )
    else:
        log.info("auth_configured", **described)
    keys_file = guard.keys.source
    if keys_file is not None and writable_by_others(Path(keys_file)):
        log.warning(
            "api_keys_file_writable",
            keys_file=keys_file,
            effect="users other than its owner can write the keys file, so they can add a "
            "key with any scope (and it is reloaded while serving): chmod go-w it",
        )


def writable_by_others(path: Path) -> bool:
    """Whether the group or others may write ``path`` (False when it cannot be read)."""
    try:
        return bool(path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    except OSError:
        return False
