"""Staleness through the service: stock older than the policy trusts is not recommended on.

Real app (TestClient), the real sample and model, on the persisted in-process store and on the
real Redis. The default policy trusts ATP for 26 hours (``stock.max_age_seconds: 93600``).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from fastapi.testclient import TestClient

from rules.policy import load_policy
from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_faults import ADMIN_TOKEN, build_app, cart_bodies, fresh_snapshot, publish

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(params=["in-process", "redis"])
def settings(request: pytest.FixtureRequest, demo_data: DemoData, tmp_path: Any) -> Settings:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    prefix = request.getfixturevalue("redis_prefix") if request.param == "redis" else "upsell"
    return Settings(
        auth="off",  # not about auth: channel calls open
        redis_url=redis_url,
        redis_prefix=prefix,
        state_dir=tmp_path / "state",
        artifacts_dir=demo_data.artifacts_dir,
        snapshot_refresh_seconds=0,
        log_level="warning",
        admin_token=ADMIN_TOKEN,
    )


def test_stale_stock_hides_the_item_until_a_delta_refreshes_it(
    settings: Settings, demo_data: DemoData
) -> None:
    """An item shown on fresh stock is not shown once its stock rows are older than
    max_age_seconds, `degraded` names stale stock; a delta refreshing one of its cells
    brings it back, fulfilled from that node."""
    max_age = load_policy().stock.max_age_seconds
    assert max_age is not None
    fresh = fresh_snapshot(demo_data.contract_dir)
    publish(settings, fresh)
    bodies = cart_bodies(demo_data, 40)
    with TestClient(build_app(settings)) as client:
        for body in bodies:
            answer = client.post("/v1/recommendations", json=body).json()
            if answer["items"]:
                break
        assert not answer["degraded"]
        target = answer["items"][0]
        sku, node = target["sku"], target["fulfillment_node"]

    stale_as_of = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=max_age + 3600)
    stale = replace(
        fresh,
        inventory=fresh.inventory.with_columns(
            as_of=pl.when(pl.col("sku") == sku).then(pl.lit(stale_as_of)).otherwise(pl.col("as_of"))
        ),
        as_of=stale_as_of,  # the snapshot's as_of is its oldest row's
    )
    stale_meta = publish(settings, stale)

    def ask(client: TestClient) -> dict[str, Any]:
        response = client.post("/v1/recommendations", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        assert answer["versions"]["snapshot"] == stale_meta.version
        return answer

    with TestClient(build_app(settings)) as client:
        hidden = ask(client)
        refreshed = client.post(
            "/v1/admin/inventory",
            json={
                "deltas": [
                    {
                        "delta_id": f"recount-{sku}-{node}",
                        "sku": sku,
                        "node_id": node,
                        "atp": int(
                            fresh.inventory.filter(
                                (pl.col("sku") == sku) & (pl.col("node_id") == node)
                            )
                            .get_column("atp")
                            .item()
                        ),
                        "as_of": datetime.now(UTC).isoformat(),
                    }
                ]
            },
            headers=AUTH,
        )
        back = ask(client)

    assert sku not in [item["sku"] for item in hidden["items"]]
    assert any(reason.startswith("stale stock") for reason in hidden["degraded"])
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["applied"] == 1
    assert (sku, node) in [(item["sku"], item["fulfillment_node"]) for item in back["items"]]
