"""``upsell explain warm``: LLM text for the pairs most requests will ask for, generated ahead.

Which pairs: the trained model's most popular items, first as themselves (kind ``popular``,
no anchor: the cold-start and backfill items every channel shows), then as anchors, each with
its top co-bought neighbours (kind ``cross_sell``) and, where the model has them, its bundle
partners by lift (kind ``bundle``), by popularity rank until ``pairs`` are chosen. Only items
of the current snapshot count. Each pair is asked for each channel and locale requested,
built exactly as the request path builds it (``service.explain.requests``), so the text
lands under the keys requests will read.

Text goes to the shared (Redis) cache, which every replica reads (tight channels through the
in-process tier each replica preloads at start). An in-process cache would die with this
command, so the verb refuses to run without ``UPSELL_REDIS_URL``; without an API key there is
nothing to generate, and it refuses too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import numpy as np

from models.artifacts import load_artifacts
from models.interfaces import ModelArtifacts, NeighbourTable
from rules.catalog import Catalog, catalog_from_items
from rules.errors import InputError, NotReadyError
from rules.policy import Channel
from rules.reasons import ShowReason
from service.explain.base import WARM_KINDS, ExplanationRequest
from service.explain.explainer import LlmExplainer, build_explainer
from service.explain.requests import explanation_request
from service.mirror import join_model_to_catalog
from service.runtime import explanation_redis_client
from service.settings import Settings
from service.store.factory import open_configured_store

__all__ = ["WARM_KINDS", "WarmPair", "WarmReport", "requests_for", "top_pairs", "warm"]

# The reason that leads each warmed kind's explanation, as the request path gives it.
_LEAD_REASON: Final = {
    "popular": ShowReason.POPULAR,
    "cross_sell": ShowReason.BOUGHT_TOGETHER,
    "bundle": ShowReason.BOUGHT_TOGETHER,
}


@dataclass(frozen=True)
class WarmPair:
    """Catalog positions: the anchor (None for an item explained on its own) and the item."""

    anchor: int | None
    item: int
    kind: str


@dataclass(frozen=True)
class WarmReport:
    pairs: int
    channels: tuple[Channel, ...]
    locales: tuple[str, ...]
    outcomes: dict[str, int]  # LlmExplainer.warm's counts
    seconds: float
    stats: dict[str, object]  # the explainer's accounting afterwards

    @property
    def explanations(self) -> int:
        return self.pairs * len(self.channels) * len(self.locales)


def top_pairs(
    artifacts: ModelArtifacts,
    catalog: Catalog,
    *,
    pairs: int,
    per_anchor: int,
    kinds: Sequence[str] = WARM_KINDS,
) -> list[WarmPair]:
    """Up to ``pairs`` pairs, most popular first (see the module doc)."""
    model_to_catalog, _ = join_model_to_catalog(artifacts, catalog)
    by_popularity = np.argsort(-np.asarray(artifacts.popularity), kind="stable")
    in_catalog = [int(row) for row in by_popularity if model_to_catalog[row] >= 0]
    chosen: list[WarmPair] = []
    if "popular" in kinds:
        chosen.extend(
            WarmPair(anchor=None, item=int(model_to_catalog[row]), kind="popular")
            for row in in_catalog[:per_anchor]
        )
    tables: list[tuple[str, NeighbourTable]] = []
    if "cross_sell" in kinds:
        tables.append(
            ("cross_sell", NeighbourTable(artifacts.neighbours, artifacts.neighbour_scores))
        )
    if "bundle" in kinds and artifacts.bundles is not None:
        tables.append(("bundle", artifacts.bundles))
    for anchor_row in in_catalog:
        if len(chosen) >= pairs:
            break
        anchor = int(model_to_catalog[anchor_row])
        for kind, table in tables:
            partners = [
                int(model_to_catalog[row])
                for row in table.items[anchor_row]
                if row >= 0 and row != anchor_row and model_to_catalog[row] >= 0
            ]
            chosen.extend(
                WarmPair(anchor=anchor, item=item, kind=kind) for item in partners[:per_anchor]
            )
    return chosen[:pairs]


def requests_for(
    pairs: Sequence[WarmPair],
    catalog: Catalog,
    *,
    channels: Sequence[Channel],
    locales: Sequence[str],
    now: datetime,
) -> list[ExplanationRequest]:
    """Every pair for every channel and locale, with the reasons a request would give it."""
    positions = np.array([pair.item for pair in pairs], dtype=np.int64)
    prices = catalog.effective_price(positions, now=now)
    on_promotion = catalog.on_promotion(positions, now=now)
    made = []
    for channel in channels:
        stock = ShowReason.IN_STOCK_AT_STORE if channel == "pos" else ShowReason.IN_STOCK_TO_SHIP
        for locale in locales:
            for index, pair in enumerate(pairs):
                reasons = [_LEAD_REASON[pair.kind], stock]
                if on_promotion[index]:
                    reasons.append(ShowReason.ON_PROMOTION)
                reasons.append(ShowReason.MARGIN_FLOOR_MET)
                made.append(
                    explanation_request(
                        catalog,
                        item_position=pair.item,
                        anchor_position=pair.anchor,
                        kind=pair.kind,
                        channel=channel,
                        locale=locale,
                        reasons=reasons,
                        price=float(prices[index]),
                    )
                )
    return made


async def warm(
    settings: Settings,
    *,
    pairs: int,
    per_anchor: int,
    channels: Sequence[Channel],
    locales: Sequence[str],
    kinds: Sequence[str] = WARM_KINDS,
) -> WarmReport:
    """Generate and cache the text of the top pairs; what became of each explanation."""
    if settings.anthropic_api_key is None:
        raise InputError(
            "UPSELL_ANTHROPIC_API_KEY is not set: without it explanations are templates, "
            "and there is nothing to pre-generate"
        )
    if not settings.redis_url:
        raise InputError(
            "UPSELL_REDIS_URL is not set: warmed text would live in this command's in-process "
            "cache and die with it; point it at the Redis the service uses"
        )
    artifacts = load_artifacts(settings.artifacts_dir)
    store = await open_configured_store(settings)
    try:
        version = await store.current_version()
        if version is None:
            raise NotReadyError(
                "no snapshot has been published yet: run `upsell snapshot publish DIR`"
            )
        catalog = catalog_from_items((await store.load_master(version)).items)
        chosen = top_pairs(artifacts, catalog, pairs=pairs, per_anchor=per_anchor, kinds=kinds)
        asked = requests_for(
            chosen,
            catalog,
            channels=channels,
            locales=locales,
            now=datetime.now(UTC).replace(tzinfo=None),
        )
        names = catalog.names
        explainer = build_explainer(
            settings, redis_client=explanation_redis_client(store), catalog_names=lambda: names
        )
        if not isinstance(explainer, LlmExplainer):  # unreachable with a key: said above
            raise InputError("UPSELL_ANTHROPIC_API_KEY is not set")
        started = time.monotonic()
        await explainer.start()
        try:
            outcomes = await explainer.warm(asked)
        finally:
            await explainer.aclose()
        return WarmReport(
            pairs=len(chosen),
            channels=tuple(channels),
            locales=tuple(locales),
            outcomes=outcomes,
            seconds=time.monotonic() - started,
            stats=explainer.stats(),
        )
    finally:
        await store.close()
