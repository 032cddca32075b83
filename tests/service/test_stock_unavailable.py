"""Stock that cannot be read: the policy's ``stock.on_unavailable`` with a real Redis killed.

``closed`` (the default) recommends nothing while Redis is down. ``last_known`` serves the
figures this replica read before the outage, only while they are within
``stock.max_age_seconds`` of their as_of, never stock it has not seen, and says ``degraded``
either way. The runtime is the real one (store, mirror, model, pipeline) on a Redis started
for the test; ``recommend(now=...)`` moves the clock for the age limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rules.errors import PolicyError
from rules.policy import load_policy, parse_policy
from service.evaluate import ConstraintOracle
from service.pipeline import Recommendation
from service.runtime import Runtime
from service.settings import Settings
from service.store.base import StockMatrix
from service.store.last_known import LastKnownStock
from tests.service.conftest import DemoData
from tests.service.test_faults import (
    OwnRedis,
    answer_violations,
    cart_bodies,
    fresh_snapshot,
    publish,
    query_of,
    running_redis,
)

REPO = Path(__file__).resolve().parents[2]
MAX_AGE_SECONDS = 600


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[OwnRedis]:
    with running_redis(tmp_path / "redis") as server:
        yield server


def settings_with(
    on_unavailable: str, *, redis: OwnRedis, demo: DemoData, tmp_path: Path
) -> Settings:
    """A policy file like the default but for the stock section, and a store on ``redis``."""
    default = (REPO / "rules" / "policies" / "default.yaml").read_text("utf-8")
    policy = default.replace("on_unavailable: closed", f"on_unavailable: {on_unavailable}")
    policy = policy.replace("max_age_seconds: 93600", f"max_age_seconds: {MAX_AGE_SECONDS}")
    assert f"on_unavailable: {on_unavailable}" in policy
    assert f"max_age_seconds: {MAX_AGE_SECONDS}" in policy
    path = tmp_path / "policy.yaml"
    path.write_text(policy, encoding="utf-8")
    return Settings(
        auth="off",  # not about auth: channel calls open
        redis_url=redis.url,
        redis_prefix="unavailable",
        state_dir=tmp_path / "state",
        artifacts_dir=demo.artifacts_dir,
        policy_path=path,
        # The mirror keeps its last good copy anyway; not polling keeps the test about stock.
        snapshot_refresh_seconds=3600,
        log_level="error",
    )


def shown(answer: Recommendation) -> list[tuple[str, str]]:
    return [(item.sku, item.fulfillment_node) for item in answer.items]


def test_closed_recommends_nothing_while_redis_is_down(
    redis_server: OwnRedis, demo_data: DemoData, tmp_path: Path
) -> None:
    """closed: with Redis killed the same basket gets no items, a 'stock unavailable' reason
    and no exception."""
    settings = settings_with("closed", redis=redis_server, demo=demo_data, tmp_path=tmp_path)
    publish(settings, fresh_snapshot(demo_data.contract_dir))

    async def scenario() -> tuple[Recommendation, Recommendation]:
        runtime = await Runtime.start(settings)
        try:
            recommender = runtime.require_recommender()
            for body in cart_bodies(demo_data, 40):
                before = await recommender.recommend(query_of(body))
                if before.items:
                    break
            redis_server.kill()
            return before, await recommender.recommend(query_of(body))
        finally:
            await runtime.close()

    before, during = asyncio.run(scenario())
    assert before.items
    assert not before.degraded
    assert during.items == ()
    assert "stock unavailable: nothing recommended on unseen stock" in during.degraded
    assert during.versions.snapshot == before.versions.snapshot  # the mirror kept serving


def test_last_known_serves_what_was_read_within_the_age_limit(
    redis_server: OwnRedis, demo_data: DemoData, tmp_path: Path
) -> None:
    """last_known: with Redis killed, a basket asked before gets the same items from the
    figures read then, every one within the snapshot's constraints and marked degraded; the
    same basket once those figures are past max_age_seconds gets nothing."""
    settings = settings_with("last_known", redis=redis_server, demo=demo_data, tmp_path=tmp_path)
    snapshot = fresh_snapshot(demo_data.contract_dir)
    publish(settings, snapshot)
    oracle = ConstraintOracle(snapshot, load_policy(settings.policy_path))

    async def scenario() -> tuple[dict[str, Any], list[Recommendation]]:
        runtime = await Runtime.start(settings)
        try:
            recommender = runtime.require_recommender()
            for body in cart_bodies(demo_data, 40):
                before = await recommender.recommend(query_of(body))
                if len(before.items) >= 2:
                    break
            redis_server.kill()
            during = await recommender.recommend(query_of(body))
            too_old = datetime.now(UTC) + timedelta(seconds=MAX_AGE_SECONDS + 120)
            aged = await recommender.recommend(query_of(body), now=too_old)
            return body, [before, during, aged]
        finally:
            await runtime.close()

    body, (before, during, aged) = asyncio.run(scenario())
    assert len(before.items) >= 2
    assert not before.degraded
    assert shown(during) == shown(before)
    assert any("stock unavailable: last known figures used" in r for r in during.degraded)
    as_dicts = {
        "items": [
            {"sku": i.sku, "fulfillment_node": i.fulfillment_node, "unit_margin": i.unit_margin}
            for i in during.items
        ]
    }
    assert not answer_violations(oracle, body, as_dicts)
    assert aged.items == ()
    assert any("stale stock" in reason for reason in aged.degraded)


def test_last_known_never_recommends_stock_this_replica_has_not_seen(
    redis_server: OwnRedis, demo_data: DemoData, tmp_path: Path
) -> None:
    """last_known, Redis killed before this replica read any stock: nothing is shown, for
    any basket, and every answer says why."""
    settings = settings_with("last_known", redis=redis_server, demo=demo_data, tmp_path=tmp_path)
    publish(settings, fresh_snapshot(demo_data.contract_dir))

    async def scenario() -> list[Recommendation]:
        runtime = await Runtime.start(settings)
        try:
            redis_server.kill()
            recommender = runtime.require_recommender()
            return [await recommender.recommend(query_of(b)) for b in cart_bodies(demo_data, 20)]
        finally:
            await runtime.close()

    answers = asyncio.run(scenario())
    assert all(answer.items == () for answer in answers)
    assert all(
        any("stock unavailable: last known figures used" in r for r in answer.degraded)
        for answer in answers
    )


def test_last_known_stock_recalls_the_newest_read_of_each_cell_and_nothing_else() -> None:
    """The newest read of a cell wins; cells never read are not ranged with an unknown as_of;
    a full ring forgets its oldest cells first."""
    memory = LastKnownStock(node_count=3, capacity=4)

    def read(atp: list[list[int]], as_of: int) -> StockMatrix:
        values = np.array(atp, np.int64)
        return StockMatrix(
            skus=("a", "b")[: len(atp)],
            node_ids=("n0", "n2"),
            atp=values,
            safety_stock=np.zeros_like(values),
            inbound=np.ones_like(values),
            ranged=values > 0,
            as_of_us=np.full(values.shape, as_of, np.int64),
        )

    memory.remember(np.array([10, 11]), np.array([0, 2]), read([[5, 6], [0, 8]], 100))
    memory.remember(np.array([10]), np.array([0, 2]), read([[7, 9]], 200))
    recalled = memory.recall(
        np.array([10, 11, 12]),
        np.array([0, 2, 1]),
        skus=("a", "b", "c"),
        node_ids=("n0", "n2", "n1"),
    )
    assert recalled.atp.tolist() == [[7, 9, 0], [0, 8, 0], [0, 0, 0]]
    assert recalled.ranged.tolist() == [[True, True, False], [False, True, False], [False] * 3]
    assert recalled.as_of_us.tolist() == [[200, 200, 0], [100, 100, 0], [0, 0, 0]]
    # Capacity 4: the second read took the two oldest slots; a third overwrites the next two
    # oldest, (11, n0) and (11, n2).
    memory.remember(np.array([12]), np.array([0, 2]), read([[3, 4]], 300))
    again = memory.recall(
        np.array([11, 12]), np.array([0, 2]), skus=("b", "c"), node_ids=("n0", "n2")
    )
    assert again.ranged.tolist() == [[False, False], [True, True]]
    assert again.atp.tolist() == [[0, 0], [3, 4]]


def test_policy_last_known_needs_an_age_limit() -> None:
    """closed is the default; last_known without max_age_seconds is refused naming the field."""
    base = "name: x\nversion: 1\nmargin_floors: [{absolute: 0.1}]\n"
    assert parse_policy(base, source="p.yaml").stock.on_unavailable == "closed"
    assert load_policy().stock.on_unavailable == "closed"
    with pytest.raises(PolicyError, match=r"p\.yaml: invalid policy: stock: .*max_age_seconds"):
        parse_policy(base + "stock: {on_unavailable: last_known}\n", source="p.yaml")
    with pytest.raises(PolicyError, match=r"stock\.on_unavailable"):
        parse_policy(base + "stock: {on_unavailable: open, max_age_seconds: 9}\n", source="p.yaml")
