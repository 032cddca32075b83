"""Builders for tests of explanations through the whole service: settings, publishing, polling.

The service is the real app (``create_app``) on the bundled sample, its LLM client built from
settings (``UPSELL_ANTHROPIC_BASE_URL`` pointed at a scenario of the local Messages API), as
in production.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from models.data.schema import SnapshotData
from service.settings import Settings
from service.store.base import SnapshotMeta
from service.store.factory import open_configured_store
from tests.service.conftest import DemoData
from tests.service.explain.fake_anthropic import Scenario

ADMIN_TOKEN = "explain-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HEART_SKU = "85123A"  # the README's example anchor


def service_settings(
    demo: DemoData,
    tmp_path: Path,
    scenario: Scenario | None = None,
    **overrides: Any,
) -> Settings:
    """The service on the sample's model; LLM text from ``scenario`` when given, else none."""
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "artifacts_dir": demo.artifacts_dir,
        "snapshot_refresh_seconds": 0,
        "log_level": "warning",
        "admin_token": ADMIN_TOKEN,
        "auth": "off",  # not about auth: channel calls open
        "anthropic_api_key": "test-key" if scenario is not None else None,
        "anthropic_base_url": scenario.base_url if scenario is not None else None,
        "explain_background_timeout_ms": 3000,
        "explain_stats_log_seconds": 0,
    }
    values.update(overrides)
    return Settings(**values)


def publish(settings: Settings, snapshot: SnapshotData) -> SnapshotMeta:
    async def run() -> SnapshotMeta:
        store = await open_configured_store(settings)
        try:
            return await store.publish(snapshot)
        finally:
            await store.close()

    return asyncio.run(run())


def recommend(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["items"], body
    return answer


def stats(client: TestClient) -> dict[str, Any]:
    response = client.get("/v1/admin/explanations", headers=ADMIN)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def wait_until(
    condition: Callable[[], bool], *, what: str, timeout_s: float = 20.0, every_s: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it never does."""
    give_up_at = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up_at:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(every_s)


def sources(answer: dict[str, Any]) -> list[str]:
    return [item["explanation_source"] for item in answer["items"]]


def ranking(answer: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What the explainer must never change: the items shown, their order and their data."""
    return [
        (
            item["sku"],
            item["kind"],
            item["score"],
            item["unit_price"],
            item["fulfillment_node"],
            tuple(item["reason_codes"]),
        )
        for item in answer["items"]
    ]
