"""What the service proposes: the policy's generator mix, substitutes for basket items that
cannot be fulfilled, calibrated p(accept), consent, and the decision record of each request.

All over HTTP on the bundled sample with a real trained model and calibration.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pytest
import yaml
from fastapi.testclient import TestClient

from models.artifacts import load_artifacts
from models.calibration import load_calibration
from models.data.contract import read_snapshot_dir
from models.data.schema import SnapshotData
from models.interfaces import Kind
from rules.policy import load_policy
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_end_to_end import publish, random_bodies

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings_for(demo: DemoData, tmp_path: Path, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "state_dir": tmp_path / "state",
        "artifacts_dir": demo.artifacts_dir,
        "admin_token": TOKEN,
        "auth": "off",  # not about auth: channel calls open
        "snapshot_refresh_seconds": 0,
        "log_level": "warning",
    }
    return Settings(**(fields | overrides))


def item_categories(snapshot: SnapshotData) -> dict[str, str]:
    return dict(snapshot.items.select("sku", "category").iter_rows())


def sold_out(snapshot: SnapshotData, sku: str) -> SnapshotData:
    """The snapshot with ``sku`` at zero ATP at every node."""
    inventory = snapshot.inventory.with_columns(
        atp=pl.when(pl.col("sku") == sku).then(0).otherwise(pl.col("atp"))
    )
    return SnapshotData(
        items=snapshot.items, nodes=snapshot.nodes, inventory=inventory, as_of=snapshot.as_of
    )


@pytest.fixture
def base_snapshot(demo_data: DemoData) -> SnapshotData:
    return read_snapshot_dir(demo_data.contract_dir)


def crowded_modelled_sku(demo: DemoData, snapshot: SnapshotData) -> str:
    """A SKU the model knows whose category holds many other modelled items."""
    modelled = set(load_artifacts(demo.artifacts_dir).item_skus)
    categories = item_categories(snapshot)
    sizes = Counter(category for sku, category in categories.items() if sku in modelled)
    return max(
        (sku for sku in modelled if sku in categories),
        key=lambda sku: (sizes[categories[sku]], sku),
    )


def test_a_sold_out_basket_item_gets_in_stock_substitutes_from_its_category(
    demo_data: DemoData, base_snapshot: SnapshotData, tmp_path: Path
) -> None:
    """Sold out at every node: alternatives of its category are offered (kind substitute,
    naming it), each in stock at its node; in stock again: no substitutes."""
    sku = crowded_modelled_sku(demo_data, base_snapshot)
    categories = item_categories(base_snapshot)
    body = {"channel": "cart", "basket": [{"sku": sku}], "region": "UK", "limit": 20}
    settings = settings_for(demo_data, tmp_path)
    snapshot = sold_out(base_snapshot, sku)
    publish(settings, snapshot)
    stock = {
        (row["sku"], row["node_id"]): row["atp"] - row["safety_stock"]
        for row in snapshot.inventory.iter_rows(named=True)
    }
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/recommendations", json=body, headers=AUTH).json()
        substitutes = [item for item in answer["items"] if item["kind"] == "substitute"]
        assert substitutes, answer
        name = base_snapshot.items.filter(pl.col("sku") == sku).get_column("name").item()
        for item in substitutes:
            assert categories[item["sku"]] == categories[sku]
            assert item["reason_codes"][0] == "REPLACES_UNAVAILABLE"
            assert name.title() in item["explanation"]
            assert stock[(item["sku"], item["fulfillment_node"])] >= 1
        assert sku not in {item["sku"] for item in answer["items"]}

        publish(settings, base_snapshot)  # the item is back in stock
        again = client.post("/v1/recommendations", json=body).json()
    assert again["versions"]["snapshot"] != answer["versions"]["snapshot"]
    assert "substitute" not in {item["kind"] for item in again["items"]}


def test_substitutes_can_be_switched_off_by_policy(
    demo_data: DemoData, base_snapshot: SnapshotData, tmp_path: Path
) -> None:
    """``candidates.substitutes_per_item: 0`` proposes none, sold out or not."""
    document = load_policy().model_dump(mode="json")
    document["candidates"]["substitutes_per_item"] = 0
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(document))
    sku = crowded_modelled_sku(demo_data, base_snapshot)
    settings = settings_for(demo_data, tmp_path, policy_path=tmp_path / "policy.yaml")
    publish(settings, sold_out(base_snapshot, sku))
    body = {"channel": "cart", "basket": [{"sku": sku}], "region": "UK", "limit": 20}
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/recommendations", json=body).json()
    assert answer["items"]
    assert "substitute" not in {item["kind"] for item in answer["items"]}


def test_the_policy_mix_serves_every_basket_kind_and_history_only_with_consent(
    demo_data: DemoData, base_snapshot: SnapshotData, tmp_path: Path
) -> None:
    """Over real baskets the default mix shows co-purchase and bundle kinds; items from the
    customer's history (personal, replenish) appear only with consent."""
    settings = settings_for(demo_data, tmp_path)
    publish(settings, base_snapshot)
    kinds_with_consent: Counter[str] = Counter()
    kinds_without: Counter[str] = Counter()
    with TestClient(create_app(settings)) as client:
        for body in random_bodies(demo_data, base_snapshot, 300, seed=5):
            answer = client.post("/v1/recommendations", json=body)
            assert answer.status_code == 200, answer.text
            kinds = Counter(item["kind"] for item in answer.json()["items"])
            if body.get("consent"):
                kinds_with_consent += kinds
            else:
                kinds_without += kinds
    assert {"cross_sell", "bundle"} <= set(kinds_with_consent | kinds_without)
    assert kinds_with_consent["personal"] > 0
    assert kinds_without["personal"] == 0
    assert kinds_without["replenish"] == 0


def test_upgrades_are_dearer_better_margin_items_of_a_basket_category(
    demo_data: DemoData, base_snapshot: SnapshotData, tmp_path: Path
) -> None:
    """A policy leaning on upgrades serves them, and each is in the category of a basket item
    and dearer, with more margin, than some basket item of that category."""
    document = load_policy().model_dump(mode="json")
    document["candidates"]["weights"] = {
        "cross_sell": 0.0,
        "personal": 0.0,
        "popular": 0.01,
        "factor_cross_sell": 0.0,
        "bundle": 0.0,
        "upgrade": 1.0,
        "replenish": 0.0,
        "segment_popular": 0.0,
    }
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(document))
    settings = settings_for(demo_data, tmp_path, policy_path=tmp_path / "policy.yaml")
    publish(settings, base_snapshot)
    master = {row["sku"]: row for row in base_snapshot.items.iter_rows(named=True)}
    upgrades = 0
    with TestClient(create_app(settings)) as client:
        for body in random_bodies(demo_data, base_snapshot, 100, seed=9):
            answer = client.post("/v1/recommendations", json=body).json()
            asked = [line["sku"] for line in body.get("basket", [])] + [body.get("sku")]
            basket = [master[sku] for sku in asked if sku in master]
            for item in answer["items"]:
                if item["kind"] != "upgrade":
                    continue
                upgrades += 1
                offered = master[item["sku"]]
                assert any(
                    line["category"] == offered["category"]
                    and offered["unit_price"] > line["unit_price"]
                    and offered["unit_price"] - offered["unit_cost"]
                    > line["unit_price"] - line["unit_cost"]
                    for line in basket
                ), (item, basket)
    assert upgrades >= 20


def test_p_accept_is_the_calibrated_relevance(
    demo_data: DemoData, base_snapshot: SnapshotData, tmp_path: Path
) -> None:
    """Ranking's p(accept) is the trained calibration of each item's relevance, per kind,
    not the raw relevance."""
    settings = settings_for(demo_data, tmp_path)
    publish(settings, base_snapshot)
    artifacts = load_artifacts(demo_data.artifacts_dir)
    calibration = load_calibration(demo_data.artifacts_dir / artifacts.version)
    assert calibration is not None
    by_wire = {kind.wire: kind.value for kind in Kind}
    relevance, p_accept, kinds = [], [], []
    with TestClient(create_app(settings)) as client:
        for body in random_bodies(demo_data, base_snapshot, 40, seed=8):
            answer = client.post(
                "/v1/recommendations", json={**body, "debug": True}, headers=AUTH
            ).json()
            for item, traced in zip(answer["items"], answer["trace"]["shown"], strict=True):
                relevance.append(traced["score_parts"]["relevance"])
                p_accept.append(traced["score_parts"]["p_accept"])
                kinds.append(by_wire[item["kind"]])
    expected = calibration.predict(np.array(relevance), np.array(kinds, dtype=np.int8))
    assert np.allclose(p_accept, expected, atol=2e-6)
    assert not np.allclose(p_accept, relevance, atol=1e-3)


def test_every_request_logs_its_decision_without_the_customer(
    demo_data: DemoData,
    base_snapshot: SnapshotData,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The decision record names what was shown and what each rule dropped, with versions and
    the request id, and never the customer id."""
    settings = settings_for(demo_data, tmp_path, log_level="info")
    publish(settings, base_snapshot)
    customer = "CUSTOMER-0042"
    body = {
        "channel": "cart",
        "basket": [{"sku": "85123A"}],
        "customer_id": customer,
        "consent": True,
        "limit": 5,
    }
    with TestClient(create_app(settings)) as client:
        capfd.readouterr()
        answer = client.post(
            "/v1/recommendations", json=body, headers={"X-Request-ID": "req-decision-1"}
        ).json()
    logged = capfd.readouterr().err
    records = [orjson.loads(line) for line in logged.splitlines() if line.startswith("{")]
    decisions = [record for record in records if record.get("event") == "decision"]
    assert len(decisions) == 1
    decision = decisions[0]
    assert decision["request_id"] == answer["request_id"] == "req-decision-1"
    assert [entry["sku"] for entry in decision["shown"]] == [i["sku"] for i in answer["items"]]
    assert decision["dropped"]["IN_BASKET"] == len(decision["dropped_skus"]["IN_BASKET"])
    assert "85123A" in decision["dropped_skus"]["IN_BASKET"]
    assert decision["policy_version"] == answer["versions"]["policy"]
    assert decision["snapshot_version"] == answer["versions"]["snapshot"]
    assert decision["model_version"] == answer["versions"]["model"]
    assert customer not in logged


def test_the_decision_record_says_when_a_guests_list_was_remembered(
    demo_data: DemoData,
    base_snapshot: SnapshotData,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A guest asking twice: the first decision generated its list, the second reused it;
    a known customer's list is never remembered."""
    settings = settings_for(demo_data, tmp_path, log_level="info")
    publish(settings, base_snapshot)
    orders = pl.read_parquet(demo_data.contract_dir / "orders.parquet")
    known = orders.get_column("customer_id").drop_nulls()[0]
    guest = {"channel": "cart", "basket": [{"sku": "85123A"}], "limit": 5}
    customer = {**guest, "customer_id": known, "consent": True}
    with TestClient(create_app(settings)) as client:
        capfd.readouterr()
        for body in (guest, guest, customer, customer):
            assert client.post("/v1/recommendations", json=body).status_code == 200
    records = [
        orjson.loads(line) for line in capfd.readouterr().err.splitlines() if line[:1] == "{"
    ]
    decisions = [record for record in records if record.get("event") == "decision"]
    assert [d["candidates_remembered"] for d in decisions] == [False, True, False, False]
    assert [d["personalized"] for d in decisions] == [False, False, True, True]


def test_remembered_guest_lists_change_no_answer(
    demo_data: DemoData, base_snapshot: SnapshotData, tmp_path: Path
) -> None:
    """Real baskets on every channel, asked twice with the guest memory on and once with it
    off: the same answers, and the second pass remembers every guest's list."""
    bodies = list(random_bodies(demo_data, base_snapshot, 80, seed=23))
    guests = sum(1 for body in bodies if not body.get("consent"))
    publish(settings_for(demo_data, tmp_path), base_snapshot)

    def answers(client: TestClient) -> list[dict]:
        answered = []
        for body in bodies:
            response = client.post("/v1/recommendations", json=body)
            assert response.status_code == 200, (body, response.text)
            answer = response.json()
            del answer["request_id"]
            answered.append(answer)
        return answered

    with TestClient(create_app(settings_for(demo_data, tmp_path))) as client:
        first, second = answers(client), answers(client)
        metrics = client.get("/metrics").text
    off = settings_for(demo_data, tmp_path, generation_memory_lists=0)
    with TestClient(create_app(off)) as client:
        unremembered = answers(client)
    assert first == second == unremembered
    assert sum(len(answer["items"]) for answer in first) > 0
    remembered = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("upsell_candidate_lists_total{") and 'origin="remembered"' in line
    )
    assert guests <= remembered < len(bodies) * 2
