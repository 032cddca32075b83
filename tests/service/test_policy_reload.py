"""Policy reload without restart: guarded by the admin token, refused whole when invalid."""

from __future__ import annotations

from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from models.data.contract import read_snapshot_dir
from rules.policy import load_policy
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_end_to_end import publish

BODY = {"channel": "cart", "basket": [{"sku": "85123A"}], "limit": 5, "debug": True}
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_policy(path: Path, **ranking: object) -> None:
    document = load_policy().model_dump(mode="json")
    document["ranking"].update(ranking)
    path.write_text(yaml.safe_dump(document))


def settings_for(demo: DemoData, tmp_path: Path, *, token: str | None) -> Settings:
    settings = Settings(
        auth="off",  # not about auth: channel calls open
        state_dir=tmp_path / "state",
        artifacts_dir=demo.artifacts_dir,
        policy_path=tmp_path / "policy.yaml",
        admin_token=token,
        snapshot_refresh_seconds=0,
        log_level="warning",
    )
    publish(settings, read_snapshot_dir(demo.contract_dir))
    return settings


def test_reload_swaps_the_policy_and_refuses_a_bad_one(demo_data: DemoData, tmp_path: Path) -> None:
    """A valid edit is served after reload (new hash, new knob); an invalid one is refused with
    the field named and the previous policy keeps serving."""
    write_policy(tmp_path / "policy.yaml", knobs=[{"margin_weight": 0.0}])
    settings = settings_for(demo_data, tmp_path, token=TOKEN)
    auth = AUTH
    with TestClient(create_app(settings)) as client:
        before = client.post("/v1/recommendations", json=BODY, headers=auth).json()

        write_policy(tmp_path / "policy.yaml", knobs=[{"margin_weight": 1.0}])
        reloaded = client.post("/v1/admin/policy/reload", headers=auth)
        after = client.post("/v1/recommendations", json=BODY, headers=auth).json()

        (tmp_path / "policy.yaml").write_text(
            "name: broken\nversion: 1\nmargin_floors: [{percent: 7}]\n"
        )
        refused = client.post("/v1/admin/policy/reload", headers=auth)
        still = client.post("/v1/recommendations", json=BODY, headers=auth).json()

    assert reloaded.status_code == 200
    assert reloaded.json()["policy_version"] == after["versions"]["policy"]
    assert after["versions"]["policy"] != before["versions"]["policy"]
    assert {item["score_parts"]["margin_weight"] for item in before["trace"]["shown"]} == {0.0}
    assert {item["score_parts"]["margin_weight"] for item in after["trace"]["shown"]} == {1.0}
    assert refused.status_code == 422
    assert "margin_floors.0.percent" in refused.json()["detail"]
    assert still["versions"]["policy"] == after["versions"]["policy"]


def test_admin_endpoints_need_the_token(demo_data: DemoData, tmp_path: Path) -> None:
    """No token configured: 403; missing or wrong token: 401 with a problem body."""
    write_policy(tmp_path / "policy.yaml")
    with TestClient(create_app(settings_for(demo_data, tmp_path, token=None))) as client:
        off = client.post("/v1/admin/policy/reload", headers={"Authorization": "Bearer x"})
    with TestClient(create_app(settings_for(demo_data, tmp_path, token="s3cret"))) as client:
        missing = client.post("/v1/admin/policy/reload")
        wrong = client.post("/v1/admin/policy/reload", headers={"Authorization": "Bearer nope"})
    assert off.status_code == 403
    assert "UPSELL_ADMIN_TOKEN" in off.json()["detail"]
    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert wrong.headers["content-type"] == "application/problem+json"


def test_debug_trace_names_every_drop(demo_data: DemoData, tmp_path: Path) -> None:
    """With debug=true every considered candidate is either shown or listed as dropped with
    its rule, and each shown item carries its score parts; without it, no trace."""
    write_policy(tmp_path / "policy.yaml")
    with TestClient(create_app(settings_for(demo_data, tmp_path, token=TOKEN))) as client:
        traced = client.post("/v1/recommendations", json=BODY, headers=AUTH).json()
        plain = client.post("/v1/recommendations", json={**BODY, "debug": False}).json()
    trace = traced["trace"]
    assert plain["trace"] is None
    assert plain["items"] == traced["items"]  # tracing changes nothing of the answer
    assert sum(trace["dropped_by_rule"].values()) == len(trace["dropped"])
    # Considered = kept (shown or ranked below the limit) + dropped, nothing unaccounted.
    assert trace["candidates_considered"] - len(trace["dropped"]) >= len(traced["items"])
    assert trace["dropped_by_rule"]["IN_BASKET"] >= 1  # the basket item is a neighbour of itself
    assert all(entry["rule"] in trace["dropped_by_rule"] for entry in trace["dropped"])
    shown = {item["sku"] for item in traced["items"]}
    assert shown.isdisjoint(entry["sku"] for entry in trace["dropped"])
    assert [entry["sku"] for entry in trace["shown"]] == [item["sku"] for item in traced["items"]]
    for entry in trace["shown"]:
        parts = entry["score_parts"]
        assert 0 <= parts["p_accept"] <= 1
        assert parts["final"] == next(
            i["score"] for i in traced["items"] if i["sku"] == entry["sku"]
        )


def test_strict_rules_backfill_from_deeper_candidates(demo_data: DemoData, tmp_path: Path) -> None:
    """With a tiny first pool and a high floor, the list is filled from deeper candidates
    rather than left short while valid items exist."""
    document = load_policy().model_dump(mode="json")
    document |= {"candidate_pool": 10, "max_candidate_pool": 1200}
    document["margin_floors"] = [{"absolute": 0.0, "percent": 0.55}]
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(document))
    with TestClient(create_app(settings_for(demo_data, tmp_path, token=TOKEN))) as client:
        answer = client.post("/v1/recommendations", json={**BODY, "limit": 8}, headers=AUTH).json()
    assert len(answer["items"]) == 8
    assert answer["trace"]["candidates_considered"] > 10
    assert answer["trace"]["dropped_by_rule"]["BELOW_MARGIN_FLOOR"] > 0
    assert all(item["unit_margin"] >= 0.55 * item["unit_price"] - 1e-9 for item in answer["items"])


def test_debug_traces_need_the_admin_token(demo_data: DemoData, tmp_path: Path) -> None:
    """debug=true shows margins and rule workings: 403 while no admin token is configured,
    401 without the right one; the plain answer needs no token."""
    write_policy(tmp_path / "policy.yaml")
    with TestClient(create_app(settings_for(demo_data, tmp_path, token=None))) as client:
        off = client.post("/v1/recommendations", json=BODY)
    with TestClient(create_app(settings_for(demo_data, tmp_path, token=TOKEN))) as client:
        missing = client.post("/v1/recommendations", json=BODY)
        wrong = client.post("/v1/recommendations", json=BODY, headers={"Authorization": "Bearer x"})
        plain = client.post("/v1/recommendations", json={**BODY, "debug": False})
    assert off.status_code == 403
    assert "debug traces are admin-only" in off.json()["detail"]
    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert plain.status_code == 200
