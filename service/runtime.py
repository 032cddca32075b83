"""What a running service holds: the store, the model, the policy, the mirror, the pipeline
and the explainer.

Opened once by the app's lifespan (or by the CLI) and closed with it. Parts are handed in
where a caller has them already (tests hand a store on a real Redis, or an ``anthropic``
client pointed at a local server).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import anthropic
import structlog

from models.artifacts import load_artifacts
from models.calibration import load_calibration
from models.interfaces import ModelArtifacts
from rules.compiled import warm_up as warm_up_compiled_rules
from rules.errors import NotReadyError
from rules.policy import CHANNELS, Policy, load_policy
from service.explain.cache import AnyRedis
from service.explain.explainer import ManagedExplainer, build_explainer, channel_budget_seconds
from service.exposures import (
    ExposureRecorder,
    Pseudonymizer,
    open_exposure_sink,
    pseudonymizer_for,
)
from service.mirror import SnapshotMirror
from service.pipeline import Recommender
from service.settings import Settings
from service.stock_mirror import StockMirror
from service.store.base import SnapshotStore
from service.store.factory import open_configured_store
from service.store.redis_store import RedisSnapshotStore

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    settings: Settings
    store: SnapshotStore
    policy: Policy
    artifacts: ModelArtifacts | None
    mirror: SnapshotMirror | None
    recommender: Recommender | None
    not_ready_reason: str | None
    explainer: ManagedExplainer
    exposures: ExposureRecorder | None = None  # what every response showed, for the ROI report
    stock_mirror: StockMirror | None = None  # UPSELL_STOCK_MIRROR: stock followed in process
    _stats_logger: asyncio.Task[None] | None = field(default=None, repr=False)
    _pseudonymizer: Pseudonymizer | None = field(default=None, repr=False)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        store: SnapshotStore | None = None,
        anthropic_client: anthropic.AsyncAnthropic | None = None,
    ) -> Runtime:
        """Open everything; a missing model leaves the service up but not ready.

        ``anthropic_client`` (tests, benchmarks) replaces the one the settings would build.
        """
        policy = load_policy(settings.policy_path)  # an invalid policy stops start-up
        if store is None:
            store = await open_configured_store(settings)
        try:
            artifacts = load_artifacts(settings.artifacts_dir)
        except NotReadyError as exc:
            log.warning("model_missing", reason=str(exc))
            explainer = await start_explainer(
                settings, store, anthropic_client=anthropic_client, catalog_names=None
            )
            runtime = cls(settings, store, policy, None, None, None, str(exc), explainer)
            runtime._start_stats_logger()
            return runtime
        # Compiled rule loops are built (or loaded from numba's cache) now, not by the first
        # request; off the event loop, since a cold compile takes seconds.
        compiled_loops = await asyncio.to_thread(warm_up_compiled_rules)
        log.info("compiled_rules_ready", loops=compiled_loops)
        mirror = SnapshotMirror(
            store=store,
            artifacts=artifacts,
            policy=policy,
            refresh_seconds=settings.snapshot_refresh_seconds,
        )
        await mirror.refresh()
        calibration = load_calibration(settings.artifacts_dir / artifacts.version)
        if calibration is None:
            log.warning("calibration_missing", effect="ranking uses raw relevance as p(accept)")
        explainer = await start_explainer(
            settings, store, anthropic_client=anthropic_client, catalog_names=mirrored_names(mirror)
        )
        exposures = ExposureRecorder(
            open_exposure_sink(settings),
            pseudonymizer_for(settings),
            capacity=settings.exposures_buffer,
        )
        exposures.start()
        stock_mirror = open_stock_mirror(settings, store, mirror)
        recommender = Recommender(
            mirror=mirror,
            store=store,
            artifacts=artifacts,
            calibration=calibration,
            explainer=explainer,
            channel_budgets={
                channel: channel_budget_seconds(settings, channel) for channel in CHANNELS
            },
            exposures=exposures,
            stock_mirror=stock_mirror,
            generation_memory_lists=settings.generation_memory_lists,
        )
        log.info(
            "service_started",
            store="redis" if settings.redis_url else "in-process",
            model_version=artifacts.version,
            policy_version=policy.content_hash,
            snapshot_version=mirror.loaded.meta.version if mirror.loaded else None,
        )
        runtime = cls(
            settings,
            store,
            policy,
            artifacts,
            mirror,
            recommender,
            None,
            explainer,
            exposures,
            stock_mirror,
        )
        runtime._start_stats_logger()
        return runtime

    async def reload_policy(self) -> Policy:
        """Load and validate the configured policy file, then serve it.

        An invalid file raises PolicyError and the policy in service stays as it was.
        """
        policy = load_policy(self.settings.policy_path)
        if self.mirror is not None:
            await self.mirror.set_policy(policy)
        previous, self.policy = self.policy, policy
        log.info(
            "policy_reloaded",
            previous_version=previous.content_hash,
            policy_version=policy.content_hash,
            policy_name=policy.name,
        )
        return policy

    def pseudonymize(self, value: str) -> str:
        """The keyed hash of a customer or session id (the one exposures carry), for logs."""
        if self._pseudonymizer is None:
            self._pseudonymizer = pseudonymizer_for(self.settings)
        return self._pseudonymizer(value)

    def require_recommender(self) -> Recommender:
        if self.recommender is None:
            raise NotReadyError(self.not_ready_reason or "the service is not ready")
        return self.recommender

    async def readiness(self) -> dict[str, str]:
        """Each check's state; the service is ready when every value is 'ok'."""
        checks = {"store": "ok" if await self.store.ping() else "unreachable"}
        checks["model"] = "ok" if self.artifacts is not None else (self.not_ready_reason or "")
        if self.mirror is None:
            checks["snapshot"] = "waiting for a model"
        else:
            try:
                await self.mirror.current()
                checks["snapshot"] = "ok"
            except NotReadyError as exc:
                checks["snapshot"] = str(exc)
        return checks

    async def close(self) -> None:
        """Stop the explainer (its cache writes go to the store's Redis), flush the exposures,
        then close the store."""
        if self._stats_logger is not None:
            self._stats_logger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_logger
        if self.stock_mirror is not None:
            await self.stock_mirror.close()
        try:
            await self.explainer.aclose()
        finally:
            log.info("explanation_stats", final=True, **self.explainer.stats())
            if self.exposures is not None:
                await self.exposures.close()
            await self.store.close()

    def _start_stats_logger(self) -> None:
        interval = self.settings.explain_stats_log_seconds
        if interval > 0:
            self._stats_logger = asyncio.create_task(
                _log_stats_every(self.explainer, interval), name="explanation-stats-log"
            )


def open_stock_mirror(
    settings: Settings, store: SnapshotStore, snapshots: SnapshotMirror
) -> StockMirror | None:
    """The stock mirror UPSELL_STOCK_MIRROR asks for, following; None when off or when the
    store cannot feed one (said once in the log: requests then read Redis, as without)."""
    if not settings.stock_mirror:
        return None
    if not isinstance(store, RedisSnapshotStore) or not store.follows_stock_changes:
        log.warning(
            "stock_mirror_unavailable",
            reason="UPSELL_STOCK_MIRROR needs a single Redis (UPSELL_REDIS_URL, not Cluster)",
            effect="stock is read from the store per request",
        )
        return None
    stock_mirror = StockMirror(
        store=store,
        snapshots=snapshots,
        max_lag_seconds=settings.stock_mirror_max_lag_seconds,
    )
    stock_mirror.start()
    return stock_mirror


def explanation_redis_client(store: SnapshotStore) -> AnyRedis | None:
    """The Redis the explanation cache shares with the snapshot store, if the store is one."""
    return store.client if isinstance(store, RedisSnapshotStore) else None


def mirrored_names(mirror: SnapshotMirror) -> Callable[[], Collection[str]]:
    """The current snapshot's product names: a new object exactly when the catalog changes,
    which is what tells the explainer to index the names again."""

    def names() -> Collection[str]:
        serving = mirror.loaded
        return serving.catalog.names if serving is not None else ()

    return names


async def start_explainer(
    settings: Settings,
    store: SnapshotStore,
    *,
    anthropic_client: anthropic.AsyncAnthropic | None,
    catalog_names: Callable[[], Collection[str]] | None,
) -> ManagedExplainer:
    """The explainer the settings ask for, on the store's Redis when there is one, started."""
    explainer = build_explainer(
        settings,
        redis_client=explanation_redis_client(store),
        anthropic_client=anthropic_client,
        catalog_names=catalog_names,
    )
    await explainer.start()
    return explainer


async def _log_stats_every(explainer: ManagedExplainer, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        log.info("explanation_stats", final=False, **explainer.stats())
