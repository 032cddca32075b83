"""Two replicas on one real Redis: stock changes reach both at once, flips within the poll.

Two instances of the real app, each under its own uvicorn server with its own store client
and mirror, share the test Redis (a key prefix of their own). ATP is read live from Redis at
every request, so a sell-out posted to one replica is what the other reads next; the item
master is mirrored in each process and follows the pointer, which each replica polls every
``snapshot_refresh_seconds``. Figures are printed and recorded as test properties; the one
the issue states ("every replica within one second") is asserted.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_faults import (
    ADMIN_TOKEN,
    build_app,
    cart_bodies,
    fresh_snapshot,
    publish,
    served,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
POLL_DEADLINE_S = 10.0


def replica_settings(
    redis_url: str, prefix: str, demo: DemoData, tmp_path: Path, *, refresh_seconds: float
) -> Settings:
    return Settings(
        auth="off",  # not about auth: channel calls open
        redis_url=redis_url,
        redis_prefix=prefix,
        state_dir=tmp_path / "state",
        artifacts_dir=demo.artifacts_dir,
        snapshot_refresh_seconds=refresh_seconds,
        log_level="error",
        admin_token=ADMIN_TOKEN,
    )


def sell_out(sku: str, node_ids: list[str], *, tag: str) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "deltas": [
            {"delta_id": f"{tag}-{sku}-{node}", "sku": sku, "node_id": node, "atp": 0, "as_of": now}
            for node in node_ids
        ]
    }


def skus_of(answer: dict[str, Any]) -> list[str]:
    return [item["sku"] for item in answer["items"]]


def first_recommended(client: httpx.Client, bodies: list[dict[str, Any]]) -> tuple[dict, str]:
    for body in bodies:
        answer = client.post("/v1/recommendations", json=body).json()
        if answer["items"]:
            return body, answer["items"][0]["sku"]
    raise AssertionError("no sample basket gets a recommendation")


@pytest.mark.parametrize("stock_mirror", [False, True], ids=["stock-read-live", "stock-mirror"])
def test_sell_out_posted_to_one_replica_stops_the_other_within_a_second(
    redis_url: str,
    redis_prefix: str,
    demo_data: DemoData,
    tmp_path: Path,
    record_property: Any,
    stock_mirror: bool,
) -> None:
    """A sell-out POSTed to replica A: replica B stops recommending the item within 1 s of
    the POST being sent (polled, not slept). Reading stock live, it is the very next answer
    B gives; with the stock mirror, B's copy hears of it from Redis's change stream."""
    settings = replica_settings(
        redis_url, redis_prefix, demo_data, tmp_path, refresh_seconds=1.0
    ).model_copy(update={"stock_mirror": stock_mirror})
    snapshot = fresh_snapshot(demo_data.contract_dir)
    publish(settings, snapshot)
    bodies = cart_bodies(demo_data, 40)
    app_b = build_app(settings)

    with (
        served(build_app(settings)) as url_a,
        served(app_b) as url_b,
        httpx.Client(base_url=url_a, timeout=10) as replica_a,
        httpx.Client(base_url=url_b, timeout=10) as replica_b,
    ):
        body, sku = first_recommended(replica_b, bodies)
        if stock_mirror:  # B answers from its copy, not from Redis, when the sell-out comes
            runtime_b = app_b.state.runtime
            deadline = time.monotonic() + POLL_DEADLINE_S
            while not runtime_b.stock_mirror.is_fresh(runtime_b.mirror.loaded.meta.version):
                assert time.monotonic() < deadline, "replica B's stock mirror never loaded"
                time.sleep(0.01)
        stocked_at = snapshot.inventory.filter(pl.col("sku") == sku).get_column("node_id").to_list()
        sent = time.monotonic()
        posted = replica_a.post(
            "/v1/admin/inventory", json=sell_out(sku, stocked_at, tag="sellout"), headers=AUTH
        )
        acknowledged = time.monotonic()
        assert posted.status_code == 200, posted.text
        assert posted.json()["applied"] == len(stocked_at)
        answers = 0
        while time.monotonic() - sent < POLL_DEADLINE_S:
            answers += 1
            answer = replica_b.post("/v1/recommendations", json=body).json()
            if sku not in skus_of(answer):
                gone = time.monotonic()
                break
        else:
            raise AssertionError(f"replica B still recommends {sku} after {POLL_DEADLINE_S}s")

    seconds = gone - sent
    figures = {
        "sellout_post_s": round(acknowledged - sent, 4),
        "sellout_seen_by_other_replica_s": round(seconds, 4),
        "answers_until_gone": answers,
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"\ntwo replicas, sell-out ({'stock mirror' if stock_mirror else 'live'}): {figures}")
    assert seconds < 1.0
    if not stock_mirror:
        assert answers == 1  # stock is read live: B's first answer after the POST has it


def test_a_sell_out_right_after_a_flip_reaches_a_replica_still_on_the_old_version(
    redis_url: str, redis_prefix: str, demo_data: DemoData, tmp_path: Path
) -> None:
    """Replica B polls the pointer slowly (every minute here) and still serves v1 after v2 is
    published; a sell-out POSTed to A just then reaches B at once all the same (deltas also
    go to the version flipped from, for a minute after the flip)."""
    fast = replica_settings(redis_url, redis_prefix, demo_data, tmp_path, refresh_seconds=0.2)
    slow = fast.model_copy(update={"snapshot_refresh_seconds": 60.0})
    first = fresh_snapshot(demo_data.contract_dir)
    first_meta = publish(fast, first)
    bodies = cart_bodies(demo_data, 40)

    with (
        served(build_app(fast)) as url_a,
        served(build_app(slow)) as url_b,
        httpx.Client(base_url=url_a, timeout=10) as replica_a,
        httpx.Client(base_url=url_b, timeout=10) as replica_b,
    ):
        body, sku = first_recommended(replica_b, bodies)
        # v2: the same stock, one price a cent higher, so it is another version.
        second = replace(
            first,
            items=first.items.with_columns(
                unit_price=pl.when(pl.col("sku") == first.items.get_column("sku")[0])
                .then(pl.col("unit_price") + 0.01)
                .otherwise(pl.col("unit_price"))
            ),
        )
        second_meta = publish(fast, second)
        stocked_at = first.inventory.filter(pl.col("sku") == sku).get_column("node_id").to_list()
        posted = replica_a.post(
            "/v1/admin/inventory", json=sell_out(sku, stocked_at, tag="after-flip"), headers=AUTH
        )
        assert posted.status_code == 200, posted.text
        assert posted.json()["snapshot_version"] == second_meta.version
        lagging = replica_b.post("/v1/recommendations", json=body).json()
        current = replica_a.post("/v1/recommendations", json=body).json()

    assert lagging["versions"]["snapshot"] == first_meta.version
    assert sku not in skus_of(lagging)
    assert current["versions"]["snapshot"] == second_meta.version
    assert sku not in skus_of(current)


def test_a_flip_is_followed_within_the_refresh_interval(
    redis_url: str, redis_prefix: str, demo_data: DemoData, tmp_path: Path, record_property: Any
) -> None:
    """With the default snapshot_refresh_seconds (1 s), a replica serves a newly published
    version within the interval plus the time to load the master."""
    settings = replica_settings(redis_url, redis_prefix, demo_data, tmp_path, refresh_seconds=1.0)
    first = fresh_snapshot(demo_data.contract_dir)
    publish(settings, first)
    body = cart_bodies(demo_data, 1)[0]
    second = replace(first, as_of=first.as_of.replace(microsecond=1))
    with served(build_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as replica:
        replica.post("/v1/recommendations", json=body)  # the mirror has just checked
        published = time.monotonic()
        meta = publish(settings, second)
        while time.monotonic() - published < POLL_DEADLINE_S:
            answer = replica.post("/v1/recommendations", json=body).json()
            if answer["versions"]["snapshot"] == meta.version:
                seconds = time.monotonic() - published
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"the replica did not follow the flip in {POLL_DEADLINE_S}s")
    record_property("flip_followed_s", round(seconds, 3))
    print(f"\nflip followed after {seconds:.3f}s (refresh interval 1.0 s)")
    assert seconds < settings.snapshot_refresh_seconds + 1.0
