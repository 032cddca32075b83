"""The service end to end: real sample data in, constrained recommendations out, over HTTP.

Constraint checks here are written again from the raw contract tables, independently of
``rules/``, so that a bug in a rule cannot hide itself.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from fastapi.testclient import TestClient

from models.data.contract import read_snapshot_dir
from models.data.schema import SnapshotData
from rules.policy import Policy, load_policy
from service.app import create_app
from service.settings import Settings
from service.store.base import SnapshotMeta
from service.store.factory import open_configured_store
from tests.service.conftest import DemoData

CHANNELS = ("cart", "pdp", "pos", "contact_center")


def publish(settings: Settings, snapshot: SnapshotData) -> SnapshotMeta:
    async def run() -> SnapshotMeta:
        store = await open_configured_store(settings)
        try:
            return await store.publish(snapshot)
        finally:
            await store.close()

    return asyncio.run(run())


def stressed_snapshot(contract_dir: Path, *, seed: int) -> SnapshotData:
    """The sample's snapshot with the edges the rules must hold on made common.

    A tenth of the items are on a live promotion priced just above cost (below the margin
    floor: must be dropped); another tenth have a regular price below the floor and a
    generous promotion that has ended or not begun (must be dropped too); a fifth of the
    stock rows sit exactly at safety stock. A third of the items ship to home (POS may sell
    them from the region's DCs), a tenth are age-restricted and a tenth come from the vendor
    ``STRESS_EXCLUDED_BRAND``, which ``stressed_policy`` excludes.
    """
    base = read_snapshot_dir(contract_dir)
    now = datetime.now(UTC).replace(tzinfo=None)
    rng = np.random.default_rng(seed)
    draw = pl.Series(rng.random(base.items.height))
    live, ended, future = (
        draw < 0.10,
        (draw >= 0.10) & (draw < 0.15),
        (draw >= 0.15) & (draw < 0.20),
    )
    thin_price = pl.col("unit_cost") * 1.05 + 0.01
    flags = pl.Series(rng.random(base.items.height))
    items = base.items.with_columns(
        ship_to_home=pl.Series(rng.random(base.items.height) < 0.33),
        age_restricted=flags < 0.10,
        brand=pl.when((flags >= 0.10) & (flags < 0.20))
        .then(pl.lit(STRESS_EXCLUDED_BRAND))
        .otherwise(pl.col("brand")),
        unit_price=pl.when(ended | future).then(thin_price).otherwise(pl.col("unit_price")),
        promo_price=pl.when(live)
        .then(thin_price)
        .when(ended | future)
        .then(pl.col("unit_cost") * 3 + 1)
        .otherwise(None),
        promo_start=pl.when(live)
        .then(pl.lit(now - timedelta(days=1)))
        .when(ended)
        .then(pl.lit(now - timedelta(days=30)))
        .when(future)
        .then(pl.lit(now + timedelta(days=1)))
        .otherwise(None),
        promo_end=pl.when(live)
        .then(pl.lit(now + timedelta(days=30)))
        .when(ended)
        .then(pl.lit(now - timedelta(days=2)))
        .when(future)
        .then(pl.lit(now + timedelta(days=30)))
        .otherwise(None),
    )
    at_safety = pl.Series(rng.random(base.inventory.height) < 0.20)
    inventory = base.inventory.with_columns(
        safety_stock=pl.when(at_safety).then(pl.col("atp")).otherwise(pl.col("safety_stock"))
    )
    return SnapshotData(items=items, nodes=base.nodes, inventory=inventory, as_of=base.as_of)


STRESS_EXCLUDED_BRAND = "STRESS-EXCLUDED"
HISTORY_KINDS = {"personal", "replenish"}


def stressed_policy(snapshot: SnapshotData, path: Path, *, seed: int) -> Path:
    """The default policy plus restrictions the stressed snapshot can trip: a few restricted
    category pairs among the sample's busiest categories, and the stress vendor excluded."""
    categories = (
        (snapshot.items.group_by("category").len().sort(["len", "category"], descending=True))
        .get_column("category")[:12]
        .to_list()
    )
    rng = random.Random(seed)
    pairs = [rng.sample(categories, 2) for _ in range(4)]
    document = load_policy().model_dump(mode="json")
    document["restrictions"]["category_pairs"] = pairs
    document["restrictions"]["excluded_brands"] = [STRESS_EXCLUDED_BRAND]
    path.write_text(yaml.safe_dump(document))
    return path


class ConstraintOracle:
    """The constraints a shown item must meet, checked from the contract tables alone.

    Split-shipment economics are left to the rules' own tests: which nodes ship the basket
    is the pipeline's choice, so an oracle could only restate it.
    """

    def __init__(self, snapshot: SnapshotData, policy: Policy) -> None:
        self.policy = policy
        self.items = {row["sku"]: row for row in snapshot.items.to_dicts()}
        self.stock = {(row["sku"], row["node_id"]): row for row in snapshot.inventory.to_dicts()}
        self.nodes = snapshot.nodes.to_dicts()
        self.restricted = {
            frozenset(pair) for pair in policy.restrictions.category_pairs if len(set(pair)) == 2
        } | {frozenset([a]) for a, b in policy.restrictions.category_pairs if a == b}

    def eligible(self, body: dict, sku: str) -> set[str]:
        if body["channel"] == "pos":
            store = body["store_id"]
            nodes = {store}
            region = next(node["region"] for node in self.nodes if node["node_id"] == store)
            if self.items[sku]["ship_to_home"] and self.policy.fulfilment.pos_ships_from_region_dcs:
                nodes |= {
                    node["node_id"]
                    for node in self.nodes
                    if node["kind"] == "dc" and node["region"] == region
                }
            return nodes
        in_region = {node["node_id"] for node in self.nodes if node["region"] == body.get("region")}
        return in_region or {node["node_id"] for node in self.nodes if node["kind"] == "dc"}

    def pairing_violations(self, body: dict, items: list[dict]) -> list[str]:
        """Restricted category pairs: never with a basket category, nor between two items
        shown together."""
        asked = [line["sku"] for line in body.get("basket", [])] + [body.get("sku")]
        basket = {self.items[sku]["category"] for sku in asked if sku in self.items}
        problems = []
        shown = [self.items[item["sku"]]["category"] for item in items]
        for index, item in enumerate(items):
            category = shown[index]
            for other in basket | set(shown[:index]):
                if frozenset([category, other]) in self.restricted:
                    problems.append(f"{item['sku']}: {category} may not pair with {other}")
        return problems

    def violations(self, body: dict, item: dict) -> list[str]:
        sku, node = item["sku"], item["fulfillment_node"]
        asked = {line["sku"] for line in body.get("basket", [])} | {body.get("sku")}
        if sku not in self.items:
            return [f"{sku}: unknown SKU recommended"]
        problems = []
        master = self.items[sku]
        if sku in asked:
            problems.append(f"{sku}: already in the basket / on screen")
        if node not in self.eligible(body, sku):
            problems.append(f"{sku}: node {node} not eligible")
        if (
            master["age_restricted"]
            and body["channel"] not in self.policy.restrictions.age_verified_channels
        ):
            problems.append(f"{sku}: age-restricted on {body['channel']}")
        if master["brand"] in self.policy.restrictions.excluded_brands:
            problems.append(f"{sku}: vendor {master['brand']} excluded")
        if item["kind"] in HISTORY_KINDS and not body.get("consent"):
            problems.append(f"{sku}: {item['kind']} shown without consent")
        row = self.stock.get((sku, node))
        quantity = body.get("quantity") or 1
        if row is None or row["atp"] - row["safety_stock"] < quantity:
            problems.append(f"{sku}: stock at {node} does not cover {quantity} above safety")
        now = datetime.now(UTC).replace(tzinfo=None)
        promo_live = (
            master["promo_price"] is not None
            and (master["promo_start"] is None or master["promo_start"] <= now)
            and (master["promo_end"] is None or now < master["promo_end"])
        )
        price = master["promo_price"] if promo_live else master["unit_price"]
        margin = price - master["unit_cost"]
        floor = self.policy.floor_for(category=master["category"], channel=body["channel"])
        if margin < floor.absolute - 1e-9 or margin < floor.percent * price - 1e-9:
            problems.append(f"{sku}: margin {margin:.4f} on {price:.2f} below floor {floor}")
        if abs(item["unit_margin"] - margin) > 1e-3:
            problems.append(f"{sku}: reported margin {item['unit_margin']} != {margin:.4f}")
        return problems


def random_bodies(
    demo: DemoData, snapshot: SnapshotData, count: int, *, seed: int
) -> Iterator[dict]:
    """Real baskets from the sample's orders, on random channels, regions and quantities."""
    rng = random.Random(seed)
    orders = (
        pl.read_parquet(demo.contract_dir / "orders.parquet")
        .group_by("order_id", maintain_order=True)
        .agg(pl.col("sku"), pl.col("customer_id").first())
    )
    baskets = orders.get_column("sku").to_list()
    customers = orders.get_column("customer_id").to_list()
    stores = snapshot.nodes.filter(pl.col("kind") == "store").get_column("node_id").to_list()
    regions = [*snapshot.nodes.get_column("region").unique().sort().to_list(), "NOWHERE", None]
    for _ in range(count):
        index = rng.randrange(len(baskets))
        skus = rng.sample(baskets[index], k=min(len(baskets[index]), rng.randint(1, 6)))
        if rng.random() < 0.1:
            skus.append(f"UNKNOWN-{rng.randrange(1000)}")
        channel = rng.choice(CHANNELS)
        body: dict = {"channel": channel, "limit": rng.choice([1, 5, 10, 20])}
        if channel == "pdp":
            body["sku"] = skus[0]
        else:
            body["basket"] = [{"sku": sku, "quantity": rng.randint(1, 3)} for sku in skus]
        if channel == "pos":
            body["store_id"] = rng.choice(stores)
        else:
            region = rng.choice(regions)
            if region is not None:
                body["region"] = region
        if rng.random() < 0.3:
            body["quantity"] = rng.randint(1, 4)
        if customers[index] is not None and rng.random() < 0.5:
            body["customer_id"] = customers[index]
            body["consent"] = rng.random() < 0.7
        yield body


@pytest.fixture(params=["in-process", "redis"])
def settings(request: pytest.FixtureRequest, demo_data: DemoData, tmp_path: Path) -> Settings:
    """Service settings on the in-process store (persisted) or on the real Redis."""
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    prefix = request.getfixturevalue("redis_prefix") if request.param == "redis" else "upsell"
    return Settings(
        auth="off",  # not about auth: channel calls open
        redis_url=redis_url,
        redis_prefix=prefix,
        state_dir=tmp_path / "state",
        artifacts_dir=demo_data.artifacts_dir,
        admin_token="e2e-admin",
        snapshot_refresh_seconds=0,
        log_level="warning",
    )


def test_thousand_random_baskets_break_no_constraint(
    settings: Settings, demo_data: DemoData
) -> None:
    """1,000 real baskets on random channels: no returned item breaks any constraint, and
    every rule the stressed snapshot and policy can trip has dropped something."""
    snapshot = stressed_snapshot(demo_data.contract_dir, seed=3)
    policy_path = stressed_policy(snapshot, settings.state_dir.parent / "policy.yaml", seed=3)
    settings = settings.model_copy(update={"policy_path": policy_path})
    meta = publish(settings, snapshot)
    oracle = ConstraintOracle(snapshot, load_policy(policy_path))
    kinds: set[str] = set()
    drops: Counter[str] = Counter()
    shown = 0
    problems: list[str] = []
    with TestClient(create_app(settings)) as client:
        for body in random_bodies(demo_data, snapshot, 1000, seed=11):
            response = client.post(
                "/v1/recommendations",
                json={**body, "debug": True},
                headers={"Authorization": "Bearer e2e-admin"},
            )
            assert response.status_code == 200, (body, response.text)
            answer = response.json()
            drops.update(answer["trace"]["dropped_by_rule"])
            assert answer["versions"]["snapshot"] == meta.version
            assert len(answer["items"]) <= body["limit"]
            asked = [line["sku"] for line in body.get("basket", [])]
            unknown = {sku for sku in asked if sku.startswith("UNKNOWN")}
            assert set(answer["unknown_skus"]) == unknown
            for item in answer["items"]:
                shown += 1
                kinds.add(item["kind"])
                problems.extend(oracle.violations(body, item))
            problems.extend(oracle.pairing_violations(body, answer["items"]))
    assert not problems, problems[:10]
    assert {"cross_sell", "bundle", "personal", "substitute"} <= kinds
    assert {
        "IN_BASKET",
        "RESTRICTED_PAIRING",
        "AGE_RESTRICTED",
        "EXCLUDED_VENDOR",
        "BELOW_MARGIN_FLOOR",
        "NOT_IN_ASSORTMENT",
        "NO_STOCK",
        "SPLIT_SHIPMENT_COST",
    } <= set(drops), drops
    assert shown > 2000  # the rules must not pass by showing nothing


@pytest.fixture
def in_process_settings(demo_data: DemoData, tmp_path: Path) -> Settings:
    return Settings(
        auth="off",  # not about auth: channel calls open
        state_dir=tmp_path / "state",
        artifacts_dir=demo_data.artifacts_dir,
        snapshot_refresh_seconds=0,
        log_level="warning",
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"channel": "web"}, "channel"),
        ({}, "channel"),
        ({"channel": "pdp"}, "sku"),
        ({"channel": "pos", "basket": [{"sku": "85123A"}]}, "store_id"),
        ({"channel": "cart", "limit": 0}, "limit"),
        ({"channel": "cart", "limit": 51}, "limit"),
        ({"channel": "cart", "basket": [{"sku": ""}]}, "basket.0.sku"),
        ({"channel": "cart", "basket": [{"sku": "A", "quantity": -1}]}, "basket.0.quantity"),
        ({"channel": "cart", "basket": [{"sku": "A"}] * 201}, "basket"),
        ({"channel": "cart", "basket": "85123A"}, "basket"),
        ({"channel": "cart", "surprise": 1}, "surprise"),
        ({"channel": "pos", "store_id": "S-NOWHERE"}, "store_id"),
    ],
)
def test_malformed_requests_get_422_naming_the_field(
    in_process_settings: Settings, demo_data: DemoData, body: dict, field: str
) -> None:
    """A malformed request is a 422 problem whose errors name the field at fault."""
    publish(in_process_settings, read_snapshot_dir(demo_data.contract_dir))
    with TestClient(create_app(in_process_settings)) as client:
        response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert field in [error["field"] for error in problem["errors"]], problem
    assert problem["request_id"] == response.headers["x-request-id"]


def test_body_that_is_not_json_is_a_422(in_process_settings: Settings) -> None:
    """Bad JSON is a 422 naming the body, never a 500 (even before anything is published)."""
    with TestClient(create_app(in_process_settings)) as client:
        response = client.post(
            "/v1/recommendations",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body"


def test_unknown_skus_are_reported_not_fatal(
    in_process_settings: Settings, demo_data: DemoData
) -> None:
    """Unknown basket SKUs come back in `unknown_skus`; known ones still drive the answer."""
    publish(in_process_settings, read_snapshot_dir(demo_data.contract_dir))
    body = {"channel": "cart", "basket": [{"sku": "NO-SUCH"}, {"sku": "85123A"}], "limit": 5}
    with TestClient(create_app(in_process_settings)) as client:
        answer = client.post("/v1/recommendations", json=body).json()
        only_unknown = client.post(
            "/v1/recommendations", json={"channel": "pdp", "sku": "NO-SUCH"}
        ).json()
    assert answer["unknown_skus"] == ["NO-SUCH"]
    assert answer["items"]
    assert answer["items"][0]["kind"] == "cross_sell"
    assert only_unknown["unknown_skus"] == ["NO-SUCH"]
    assert only_unknown["items"], "cold start must still answer from popularity"


def test_readiness_tells_the_truth(in_process_settings: Settings, demo_data: DemoData) -> None:
    """Not ready (503) before a snapshot is published, ready once one is, and requests wait
    for readiness with a 503 problem rather than a 500."""
    with TestClient(create_app(in_process_settings)) as client:
        before = client.get("/readyz")
        refused = client.post("/v1/recommendations", json={"channel": "cart"})
        publish(in_process_settings, read_snapshot_dir(demo_data.contract_dir))
        after = client.get("/readyz")
        served = client.post("/v1/recommendations", json={"channel": "cart"})
        health = client.get("/healthz")
    assert before.status_code == 503
    assert before.json()["checks"]["snapshot"] != "ok"
    assert refused.status_code == 503
    assert "publish" in refused.json()["detail"]
    assert after.status_code == 200
    assert after.json()["ready"] is True
    assert served.status_code == 200
    assert served.json()["items"]
    assert health.json() == {"status": "ok"}


def test_no_model_means_not_ready(tmp_path: Path) -> None:
    """Without trained artifacts the service starts, says why it is not ready, and 503s."""
    settings = Settings(auth="off", state_dir=tmp_path / "state", artifacts_dir=tmp_path / "none")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        refused = client.post("/v1/recommendations", json={"channel": "cart"})
    assert ready.status_code == 503
    assert "upsell train" in ready.json()["checks"]["model"]
    assert refused.status_code == 503


def test_new_snapshot_is_followed_and_rollback_restores(
    in_process_settings: Settings, demo_data: DemoData
) -> None:
    """A running service follows the pointer: stock zeroed in a new version stops an item
    being shown, and a rollback brings it back."""
    first = read_snapshot_dir(demo_data.contract_dir)
    publish(in_process_settings, first)
    body = {"channel": "cart", "basket": [{"sku": "85123A"}], "limit": 1}
    with TestClient(create_app(in_process_settings)) as client:
        top = client.post("/v1/recommendations", json=body).json()["items"][0]["sku"]
        emptied = first.inventory.with_columns(
            atp=pl.when(pl.col("sku") == top).then(0).otherwise(pl.col("atp"))
        )
        second = publish(
            in_process_settings,
            SnapshotData(
                items=first.items, nodes=first.nodes, inventory=emptied, as_of=first.as_of
            ),
        )
        after = client.post("/v1/recommendations", json=body).json()

        async def rollback() -> None:
            store = await open_configured_store(in_process_settings)
            await store.rollback()

        asyncio.run(rollback())
        restored = client.post("/v1/recommendations", json=body).json()
    assert after["versions"]["snapshot"] == second.version
    assert top not in [item["sku"] for item in after["items"]]
    assert restored["items"][0]["sku"] == top
