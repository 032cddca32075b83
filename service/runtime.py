"""What a running service holds: the store, the model, the policy, the mirror, the pipeline.

Opened once by the app's lifespan (or by the CLI) and closed with it. Parts are handed in
where a caller has them already (tests hand a store on a real Redis).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from models.artifacts import load_artifacts
from models.calibration import load_calibration
from models.interfaces import ModelArtifacts
from rules.errors import NotReadyError
from rules.policy import Policy, load_policy
from service.exposures import ExposureRecorder, open_exposure_sink, pseudonymizer_for
from service.mirror import SnapshotMirror
from service.pipeline import Recommender
from service.settings import Settings
from service.store.base import SnapshotStore
from service.store.factory import open_configured_store

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
    exposures: ExposureRecorder | None = None  # what every response showed, for the ROI report

    @classmethod
    async def start(cls, settings: Settings, *, store: SnapshotStore | None = None) -> Runtime:
        """Open everything; a missing model leaves the service up but not ready."""
        policy = load_policy(settings.policy_path)  # an invalid policy stops start-up
        if store is None:
            store = await open_configured_store(settings)
        try:
            artifacts = load_artifacts(settings.artifacts_dir)
        except NotReadyError as exc:
            log.warning("model_missing", reason=str(exc))
            return cls(settings, store, policy, None, None, None, str(exc))
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
        exposures = ExposureRecorder(
            open_exposure_sink(settings),
            pseudonymizer_for(settings),
            capacity=settings.exposures_buffer,
        )
        exposures.start()
        recommender = Recommender(
            mirror=mirror,
            store=store,
            artifacts=artifacts,
            calibration=calibration,
            exposures=exposures,
        )
        log.info(
            "service_started",
            store="redis" if settings.redis_url else "in-process",
            model_version=artifacts.version,
            policy_version=policy.content_hash,
            snapshot_version=mirror.loaded.meta.version if mirror.loaded else None,
        )
        return cls(settings, store, policy, artifacts, mirror, recommender, None, exposures)

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
        if self.exposures is not None:
            await self.exposures.close()
        await self.store.close()
