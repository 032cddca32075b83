"""Inventory deltas at the edges: POST /v1/admin/inventory and `upsell inventory apply FILE`."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rules.errors import ContractError
from service.settings import Settings
from service.store.cli_inventory import add_inventory_parser
from service.store.memory import InProcessStore
from tests.service.conftest import DemoData
from tests.service.test_faults import ADMIN_TOKEN, build_app, fresh_snapshot, publish

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def settings(demo_data: DemoData, tmp_path: Path) -> Settings:
    """The persisted in-process store with the sample snapshot published, admin token set."""
    settings = Settings(
        auth="off",  # not about auth: channel calls open
        state_dir=tmp_path / "state",
        artifacts_dir=demo_data.artifacts_dir,
        snapshot_refresh_seconds=0,
        log_level="warning",
        admin_token=ADMIN_TOKEN,
    )
    publish(settings, fresh_snapshot(demo_data.contract_dir))
    return settings


def one_delta(**overrides: Any) -> dict[str, Any]:
    delta = {
        "delta_id": "d1",
        "sku": "15036",
        "node_id": "DC-1",
        "atp": 3,
        "as_of": datetime.now(UTC).isoformat(),
    }
    return {**delta, **overrides}


@pytest.mark.parametrize(
    ("deltas", "field"),
    [
        ([one_delta(atp=-1)], "deltas.0.atp"),
        ([one_delta(delta_id="no spaces")], "deltas.0.delta_id"),
        ([one_delta(), one_delta(node_id="NOWHERE", delta_id="d2")], "deltas[1].node_id"),
        ([one_delta(), one_delta(sku="NOPE", delta_id="d2")], "deltas[1].sku"),
        ([one_delta(), one_delta()], "deltas[1].delta_id"),
        (
            [one_delta(as_of=(datetime.now(UTC) + timedelta(hours=1)).isoformat())],
            "deltas[0].as_of",
        ),
        ([], "deltas"),
        ([one_delta(surprise=1)], "deltas.0.surprise"),
    ],
)
def test_bad_batch_is_a_422_naming_the_delta_field(
    settings: Settings, deltas: list[dict[str, Any]], field: str
) -> None:
    """A bad batch is refused whole with a 422 whose errors name deltas[i].field."""
    with TestClient(build_app(settings)) as client:
        response = client.post("/v1/admin/inventory", json={"deltas": deltas}, headers=AUTH)
        assert response.status_code == 422, response.text
        assert field in [error["field"] for error in response.json()["errors"]], response.json()
        assert (
            client.post(
                "/v1/admin/inventory", json={"deltas": [one_delta(delta_id="ok")]}, headers=AUTH
            ).json()["applied"]
            == 1
        )  # nothing of the refused batch was applied before


def test_admin_token_is_required(settings: Settings) -> None:
    """Without the bearer token 401; with no token configured at all 403."""
    with TestClient(build_app(settings)) as client:
        response = client.post("/v1/admin/inventory", json={"deltas": [one_delta()]})
        assert response.status_code == 401
    closed = settings.model_copy(update={"admin_token": None})
    with TestClient(build_app(closed)) as client:
        response = client.post("/v1/admin/inventory", json={"deltas": [one_delta()]}, headers=AUTH)
        assert response.status_code == 403


def test_response_lists_what_did_not_apply(settings: Settings) -> None:
    """Counts per outcome, and every delta that changed nothing with its reason."""
    now = datetime.now(UTC)
    with TestClient(build_app(settings)) as client:
        first = client.post(
            "/v1/admin/inventory", json={"deltas": [one_delta(as_of=now.isoformat())]}, headers=AUTH
        )
        late = client.post(
            "/v1/admin/inventory",
            json={
                "deltas": [
                    one_delta(as_of=now.isoformat()),
                    one_delta(delta_id="d0", as_of=(now - timedelta(seconds=5)).isoformat()),
                ]
            },
            headers=AUTH,
        )
    assert first.json()["applied"] == 1
    body = late.json()
    assert (body["applied"], body["duplicate"], body["stale"]) == (0, 1, 1)
    assert body["not_applied"] == [
        {"delta_id": "d1", "outcome": "duplicate"},
        {"delta_id": "d0", "outcome": "stale"},
    ]


def test_contradicting_deltas_come_back_as_conflict(settings: Settings) -> None:
    """An id taken before with other figures, and another id at the same as_of that sorts
    before the stored one, are counted and listed as conflict; nothing changes."""
    now = datetime.now(UTC).isoformat()
    with TestClient(build_app(settings)) as client:
        first = client.post(
            "/v1/admin/inventory",
            json={"deltas": [one_delta(delta_id="erp-2", atp=3, as_of=now)]},
            headers=AUTH,
        )
        reused = client.post(
            "/v1/admin/inventory",
            json={"deltas": [one_delta(delta_id="erp-2", atp=9, as_of=now)]},
            headers=AUTH,
        )
        # One batch may not hold two deltas for one cell at one instant; two batches may.
        earlier_id = client.post(
            "/v1/admin/inventory",
            json={"deltas": [one_delta(delta_id="erp-1", atp=7, as_of=now)]},
            headers=AUTH,
        )
    assert first.json()["applied"] == 1
    for response, delta_id in ((reused, "erp-2"), (earlier_id, "erp-1")):
        body = response.json()
        assert (body["applied"], body["duplicate"], body["conflict"]) == (0, 0, 1), body
        assert body["not_applied"] == [{"delta_id": delta_id, "outcome": "conflict"}]

    async def read() -> int:
        store = InProcessStore(state_dir=settings.state_dir)
        version = await store.current_version()
        assert version is not None
        return int((await store.read_stock(version, ["15036"], ["DC-1"])).atp[0, 0])

    assert asyncio.run(read()) == 3


def run_cli(settings: Settings, *argv: str) -> None:
    parser = argparse.ArgumentParser(prog="upsell")
    add_inventory_parser(parser.add_subparsers(dest="verb", required=True), settings)
    args = parser.parse_args(list(argv))
    args.handler(args, settings)


def test_cli_applies_a_file_and_a_second_run_changes_nothing(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`upsell inventory apply FILE` twice: applied, then all duplicate; stock as after one."""
    as_of = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    path = tmp_path / "deltas.csv"
    path.write_text(
        "delta_id,sku,node_id,atp,safety_stock,inbound,as_of\n"
        f"e1,15036,DC-1,7,,,{as_of}\n"
        f"e2,15036,DC-2,0,1,,{as_of}\n"
    )
    run_cli(settings, "inventory", "apply", str(path))
    assert "2 applied, 0 duplicate, 0 stale, 0 conflict" in capsys.readouterr().out
    run_cli(settings, "inventory", "apply", str(path))
    assert "0 applied, 2 duplicate, 0 stale, 0 conflict" in capsys.readouterr().out
    path.write_text(
        f"delta_id,sku,node_id,atp,safety_stock,inbound,as_of\ne1,15036,DC-1,8,,,{as_of}\n"
    )
    run_cli(settings, "inventory", "apply", str(path))
    output = capsys.readouterr().out
    assert "0 applied, 0 duplicate, 0 stale, 1 conflict" in output
    assert "conflict (contradict a stored figure; resend under a new id): e1" in output

    async def read() -> tuple[int, int]:
        store = InProcessStore(state_dir=settings.state_dir)
        version = await store.current_version()
        assert version is not None
        stock = await store.read_stock(version, ["15036"], ["DC-1", "DC-2"])
        return int(stock.atp[0, 0]), int(stock.safety_stock[0, 1])

    assert asyncio.run(read()) == (7, 1)


def test_cli_refuses_a_bad_file_naming_row_and_column(settings: Settings, tmp_path: Path) -> None:
    """A file naming an unknown node fails with its row and column; nothing applies."""
    as_of = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    path = tmp_path / "deltas.csv"
    path.write_text(
        f"delta_id,sku,node_id,atp,as_of\ne1,15036,DC-1,7,{as_of}\ne2,15036,MOON,0,{as_of}\n"
    )
    with pytest.raises(ContractError, match=r"deltas\.csv, row 2, column 'node_id'"):
        run_cli(settings, "inventory", "apply", str(path))
