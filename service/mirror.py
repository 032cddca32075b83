"""The in-process mirror of the current snapshot, joined with the model and the policy.

Follows the store's ``current`` pointer (checked at most every ``refresh_seconds``) and
rebuilds the array forms only when the version changes. When the store cannot be reached
the last good mirror keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import structlog

from models.generators import HybridWeights, ItemFacts, build_generator
from models.interfaces import CandidateGenerator, ModelArtifacts
from models.substitutes import SubstituteFinder
from rules.catalog import Catalog, NodeTable, catalog_from_items, node_table_from_nodes
from rules.constraints import CompiledPolicy, compile_policy
from rules.errors import NotReadyError, StoreError
from rules.policy import Policy
from service.store.base import SnapshotMeta, SnapshotStore
from service.store.last_known import LastKnownStock

log = structlog.get_logger(__name__)


@dataclass(frozen=True, eq=False)
class ServingSnapshot:
    """Everything a request reads without I/O, for one (snapshot, model, policy) triple."""

    meta: SnapshotMeta
    catalog: Catalog
    nodes: NodeTable
    policy: CompiledPolicy
    model_to_catalog: npt.NDArray[np.int64]  # per model item row: catalog position or -1
    catalog_to_model: npt.NDArray[np.int64]  # per catalog position: model item row or -1
    # The policy's generator mix over the model, with this snapshot's item facts (upgrades
    # and category popularity need categories, prices and costs, which change by snapshot).
    generator: CandidateGenerator
    # Same-category alternatives for basket items that cannot be fulfilled.
    substitutes: SubstituteFinder
    # Stock cells of this version read recently (policy stock.on_unavailable: last_known).
    last_known_stock: LastKnownStock


def build_serving_generator(
    artifacts: ModelArtifacts,
    policy: Policy,
    catalog: Catalog,
    model_to_catalog: npt.NDArray[np.int64],
) -> CandidateGenerator:
    """The hybrid the policy's ``candidates.weights`` describe, over this snapshot's facts."""
    weights = HybridWeights(**policy.candidates.weights.model_dump())
    return build_generator(
        artifacts, weights, facts=ItemFacts.from_catalog(catalog, model_to_catalog)
    )


def compile_for(policy: Policy, catalog: Catalog) -> CompiledPolicy:
    """``compile_policy``, saying in the log which of the policy's categories the item
    master lacks: a typo there would otherwise restrict nothing, silently."""
    compiled = compile_policy(policy, catalog)
    if compiled.unknown_categories:
        log.warning(
            "policy_categories_unknown",
            policy_version=policy.content_hash,
            categories=list(compiled.unknown_categories),
        )
    return compiled


def join_model_to_catalog(
    artifacts: ModelArtifacts, catalog: Catalog
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Index maps both ways between the model's items and the snapshot's item master."""
    model_to_catalog = catalog.positions(artifacts.item_skus)
    catalog_to_model = np.full(len(catalog), -1, dtype=np.int64)
    in_catalog = model_to_catalog >= 0
    catalog_to_model[model_to_catalog[in_catalog]] = np.flatnonzero(in_catalog)
    return model_to_catalog, catalog_to_model


class SnapshotMirror:
    """Holds the current ``ServingSnapshot``; ``current()`` refreshes it when due."""

    def __init__(
        self,
        *,
        store: SnapshotStore,
        artifacts: ModelArtifacts,
        policy: Policy,
        refresh_seconds: float,
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self._policy = policy
        self._refresh_seconds = refresh_seconds
        self._serving: ServingSnapshot | None = None
        self._checked_at = float("-inf")
        self._lock = asyncio.Lock()
        self.last_error: str | None = None

    @property
    def loaded(self) -> ServingSnapshot | None:
        return self._serving

    @property
    def policy(self) -> Policy:
        return self._policy

    async def set_policy(self, policy: Policy) -> None:
        """Serve ``policy`` from the next request on (compiled against the current catalog)."""
        async with self._lock:
            self._policy = policy
            if self._serving is not None:
                serving = self._serving
                self._serving = replace(
                    serving,
                    policy=compile_for(policy, serving.catalog),
                    generator=build_serving_generator(
                        self._artifacts, policy, serving.catalog, serving.model_to_catalog
                    ),
                )

    async def current(self) -> ServingSnapshot:
        """The serving snapshot, refreshed if the check is due; NotReadyError if none yet."""
        if time.monotonic() - self._checked_at >= self._refresh_seconds:
            await self.refresh()
        if self._serving is None:
            raise NotReadyError(
                self.last_error
                or "no snapshot has been published yet: run `upsell snapshot publish DIR`"
            )
        return self._serving

    async def refresh(self) -> None:
        """Follow the store's pointer; keep the last good mirror if the store fails."""
        async with self._lock:
            if time.monotonic() - self._checked_at < self._refresh_seconds:
                return  # another request refreshed while this one waited
            self._checked_at = time.monotonic()
            try:
                version = await self._store.current_version()
                if version is None:
                    self.last_error = "no snapshot has been published yet"
                    return
                if self._serving is not None and self._serving.meta.version == version:
                    return
                master = await self._store.load_master(version)
            except StoreError as exc:
                self.last_error = f"snapshot store unavailable: {exc}"
                log.warning("snapshot_refresh_failed", error=str(exc))
                return
            catalog = catalog_from_items(master.items)
            model_to_catalog, catalog_to_model = join_model_to_catalog(self._artifacts, catalog)
            in_catalog = model_to_catalog >= 0
            nodes = node_table_from_nodes(master.nodes)
            self._serving = ServingSnapshot(
                meta=master.meta,
                catalog=catalog,
                nodes=nodes,
                policy=compile_for(self._policy, catalog),
                model_to_catalog=model_to_catalog,
                catalog_to_model=catalog_to_model,
                generator=build_serving_generator(
                    self._artifacts, self._policy, catalog, model_to_catalog
                ),
                substitutes=SubstituteFinder(
                    self._artifacts,
                    np.where(
                        in_catalog,
                        catalog.category_code[np.where(in_catalog, model_to_catalog, 0)],
                        -1,
                    ).astype(np.int64),
                ),
                last_known_stock=LastKnownStock(node_count=len(nodes)),
            )
            self.last_error = None
            log.info(
                "snapshot_loaded",
                snapshot_version=version,
                items=len(catalog),
                model_items_in_catalog=int((model_to_catalog >= 0).sum()),
            )
