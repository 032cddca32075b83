"""``upsell explain warm``, run as a real subprocess against the local Messages API and a real
Redis; then a service on that Redis serves the warmed text to the cart from its first request.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from models.artifacts import load_artifacts
from models.data.contract import read_snapshot_dir
from rules.catalog import catalog_from_items
from service.app import create_app
from service.explain.cache import CacheKey
from service.explain.prompts import PROMPT_VERSION
from service.explain.warm import top_pairs
from tests.service.conftest import DemoData
from tests.service.explain.fake_anthropic import FakeAnthropicServer, Scenario, grounded_reply
from tests.service.explain.service_builders import publish, recommend, service_settings, stats

REPO = Path(__file__).resolve().parents[3]


def upsell(
    *args: str, demo: DemoData, tmp_path: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, configured only by the UPSELL_* variables given."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("UPSELL_")}
    environment.update(
        UPSELL_STATE_DIR=str(tmp_path / "state"),
        UPSELL_ARTIFACTS_DIR=str(demo.artifacts_dir),
        UPSELL_LOG_LEVEL="warning",
        OPENBLAS_NUM_THREADS="1",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def warmed_keys(redis_url: str, prefix: str) -> set[CacheKey]:
    client = redis.Redis.from_url(redis_url)
    try:
        pattern = CacheKey.pattern(prefix, PROMPT_VERSION)
        parsed = {CacheKey.parse(raw.decode(), prefix) for raw in client.scan_iter(match=pattern)}
    finally:
        client.close()
    return {key for key in parsed if key is not None}


def counts(stdout: str) -> dict[str, int]:
    found = re.search(
        r"explanations in [\d.]+s: (\d+) cached, (\d+) generated, (\d+) failed", stdout
    )
    assert found is not None, stdout
    cached, generated, failed = (int(group) for group in found.groups())
    return {"cached": cached, "generated": generated, "failed": failed}


@pytest.fixture
def scenario(fake_anthropic: FakeAnthropicServer) -> Scenario:
    return fake_anthropic.scenario(grounded_reply)


def test_warm_generates_the_top_pairs_once_and_the_service_serves_them_from_the_start(
    demo_data: DemoData,
    scenario: Scenario,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    """12 pairs x 2 channels x 2 locales: 48 texts generated into Redis (one call each), none
    paid for again on a second run; a service started afterwards serves the cart's warmed
    pairs from the cache on its very first request."""
    settings = service_settings(
        demo_data, tmp_path, scenario, redis_url=redis_url, redis_prefix=redis_prefix
    )
    snapshot = read_snapshot_dir(demo_data.contract_dir)
    publish(settings, snapshot)
    env = {
        "UPSELL_REDIS_URL": redis_url,
        "UPSELL_REDIS_PREFIX": redis_prefix,
        "UPSELL_ANTHROPIC_API_KEY": "test-key",
        "UPSELL_ANTHROPIC_BASE_URL": scenario.base_url,
    }
    args = ["explain", "warm", "--pairs", "12", "--per-anchor", "3"]
    args += ["--channel", "cart", "--channel", "contact_center", "--locale", "en", "--locale", "de"]

    first = upsell(*args, demo=demo_data, tmp_path=tmp_path, **env)
    assert first.returncode == 0, first.stderr
    assert (
        "warmed 12 pairs x 2 channels (cart, contact_center) x 2 locales (en, de)" in first.stdout
    )
    assert counts(first.stdout) == {"cached": 0, "generated": 48, "failed": 0}
    assert scenario.calls == 48
    keys = warmed_keys(redis_url, redis_prefix)
    assert len(keys) == 48
    assert {(key.channel, key.locale) for key in keys} == {
        (channel, locale) for channel in ("cart", "contact_center") for locale in ("en", "de")
    }

    # The pairs are the model's most popular items, then its top anchors' partners.
    artifacts = load_artifacts(demo_data.artifacts_dir)
    catalog = catalog_from_items(snapshot.items)
    most_popular = [
        artifacts.item_skus[row]
        for row in np.argsort(-artifacts.popularity, kind="stable")
        if artifacts.item_skus[row] in catalog.index
    ]
    anchorless = {key.item_sku for key in keys if key.anchor_sku is None}
    assert anchorless == set(most_popular[:3])
    assert {key.kind for key in keys if key.anchor_sku is None} == {"popular"}
    assert {key.anchor_sku for key in keys if key.anchor_sku is not None} <= set(most_popular[:3])

    again = upsell(*args, demo=demo_data, tmp_path=tmp_path, **env)
    assert again.returncode == 0, again.stderr
    assert counts(again.stdout) == {"cached": 48, "generated": 0, "failed": 0}
    assert scenario.calls == 48  # nothing paid for twice

    pairs = top_pairs(artifacts, catalog, pairs=12, per_anchor=3)
    anchor = catalog.skus[next(pair.anchor for pair in pairs if pair.anchor is not None)]
    app = create_app(settings)
    with TestClient(app) as client:
        # Preloading runs in the background of start-up; wait for it on the app's own loop.
        assert client.portal is not None
        preloaded = client.portal.call(app.state.runtime.explainer.preloaded)
        answer = recommend(client, {"channel": "cart", "basket": [{"sku": anchor}], "limit": 10})
        accounting = stats(client)
    assert preloaded == 48
    assert accounting["cache_preload"] == "done"
    cart_keys = {key for key in keys if key.channel == "cart" and key.locale == "en"}
    warmed_items = [
        item
        for item in answer["items"]
        if CacheKey(
            anchor_sku=anchor if item["kind"] != "popular" else None,
            item_sku=item["sku"],
            kind=item["kind"],
            channel="cart",
            locale="en",
            prompt_version=PROMPT_VERSION,
        )
        in cart_keys
    ]
    assert warmed_items, "the cart should show at least one warmed pair"
    assert {item["explanation_source"] for item in warmed_items} == {"cache"}


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("UPSELL_ANTHROPIC_API_KEY", "UPSELL_ANTHROPIC_API_KEY"),
        ("UPSELL_REDIS_URL", "UPSELL_REDIS_URL"),
    ],
)
def test_warm_refuses_without_a_key_or_a_redis(
    missing: str,
    named: str,
    demo_data: DemoData,
    scenario: Scenario,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Without a key there is nothing to generate; without Redis the text would die with the
    command: both exit 2 naming the variable, and no call is made."""
    env = {
        "UPSELL_REDIS_URL": redis_url,
        "UPSELL_ANTHROPIC_API_KEY": "test-key",
        "UPSELL_ANTHROPIC_BASE_URL": scenario.base_url,
    }
    del env[missing]
    result = upsell("explain", "warm", demo=demo_data, tmp_path=tmp_path, **env)
    assert result.returncode == 2
    assert missing in result.stderr
    assert "Traceback" not in result.stderr
    assert scenario.calls == 0


def test_warm_options_are_validated(demo_data: DemoData, tmp_path: Path) -> None:
    """A bad --pairs, --channel or --locale is a usage error naming the option."""
    for bad, option in (
        (["--pairs", "0"], "--pairs"),
        (["--channel", "web"], "--channel"),
        (["--locale", "german"], "--locale"),
    ):
        result = upsell("explain", "warm", *bad, demo=demo_data, tmp_path=tmp_path)
        assert result.returncode == 2
        assert option in result.stderr
