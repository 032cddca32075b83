"""Outcome ingestion: POST /v1/events/orders and `upsell events import`, validated whole,
idempotent by id, ids hashed before they are stored; on the file store and on real Redis."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main
from service.outcomes import open_outcome_store
from service.settings import Settings, load_settings

TOKEN = "events-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=["file", "redis"])
def settings(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The same configuration as env vars (for the CLI) and as Settings (for the app)."""
    for name in [name for name in os.environ if name.startswith("UPSELL_")]:
        monkeypatch.delenv(name)
    env = {
        "UPSELL_STATE_DIR": str(tmp_path / "state"),
        "UPSELL_ARTIFACTS_DIR": str(tmp_path / "no-artifacts"),
        "UPSELL_ADMIN_TOKEN": TOKEN,
        "UPSELL_AUTH": "off",  # not about auth: channel calls open
        "UPSELL_LOG_LEVEL": "warning",
    }
    if request.param == "redis":
        env["UPSELL_REDIS_URL"] = request.getfixturevalue("redis_url")
        env["UPSELL_REDIS_PREFIX"] = request.getfixturevalue("redis_prefix")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def order(order_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer_id": "17850",
        "ordered_at": "2025-03-01T10:20:00Z",
        "channel": "web",
        "lines": [
            {"sku": "85123A", "quantity": 2, "unit_price": 2.55},
            {"sku": "21733", "quantity": 1, "unit_price": 2.95},
        ],
        **changes,
    }


def stored(settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    async def load() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        store = open_outcome_store(settings)
        try:
            return await store.load()
        finally:
            await store.close()

    return asyncio.run(load())


def test_orders_and_returns_are_idempotent_by_id(settings: Settings) -> None:
    """A replay is all duplicates; an id sent again with other content is a conflict and the
    first version stays; raw customer ids never reach the store."""
    body = {
        "orders": [order("web-1"), order("web-2", customer_id=None, session_id="sess-9")],
        "returns": [
            {
                "return_id": "rma-1",
                "order_id": "web-1",
                "sku": "21733",
                "quantity": 1,
                "returned_at": "2025-03-09T09:00:00",
            }
        ],
    }
    with TestClient(create_app(settings)) as client:
        first = client.post("/v1/events/orders", json=body, headers=AUTH)
        again = client.post("/v1/events/orders", json=body, headers=AUTH)
        changed = client.post(
            "/v1/events/orders",
            json={"orders": [order("web-1", ordered_at="2025-03-02T08:00:00"), order("web-3")]},
            headers=AUTH,
        )
    assert first.status_code == 200, first.text
    assert first.json()["orders"] | {"not_added": []} == {
        "added": 2,
        "duplicate": 0,
        "conflict": 0,
        "not_added": [],
    }
    assert first.json()["returns"]["added"] == 1
    assert again.json()["orders"]["duplicate"] == 2
    assert again.json()["returns"]["duplicate"] == 1
    assert changed.json()["orders"] == {
        "added": 1,
        "duplicate": 0,
        "conflict": 1,
        "not_added": [{"id": "web-1", "outcome": "conflict"}],
    }
    orders, returns = stored(settings)
    assert sorted(record["order_id"] for record in orders) == ["web-1", "web-2", "web-3"]
    web_1 = next(record for record in orders if record["order_id"] == "web-1")
    assert web_1["ordered_at"] == "2025-03-01T10:20:00.000000"  # the first version stayed
    assert [line["sku"] for line in web_1["lines"]] == ["21733", "85123A"]
    assert len(returns) == 1
    text = repr(orders)
    assert "17850" not in text
    assert "sess-9" not in text
    assert web_1["customer"] is not None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"orders": [order("o-1", lines=[{"sku": "A", "quantity": 0, "unit_price": 1}])]},
            "quantity",
        ),
        ({"orders": [order("o 1")]}, "order_id"),
        # No UTC instant in years 1-9999 (schemathesis found the 500 this was).
        ({"orders": [order("o-1", ordered_at="0001-01-01T00:00:11+01:00")]}, "ordered_at"),
        (
            {
                "orders": [order("o-1")],
                "returns": [
                    {
                        "return_id": "r-1",
                        "order_id": "o-1",
                        "sku": "21733",
                        "quantity": 1,
                        "returned_at": "0001-01-01T00:00:00+05:00",
                    }
                ],
            },
            "returned_at",
        ),
        ({"orders": [order("o-1"), order("o-1")]}, "orders[1]"),
        (
            {
                "orders": [
                    order(
                        "o-1",
                        lines=[
                            {"sku": "A", "quantity": 1, "unit_price": 1},
                            {"sku": "A", "quantity": 2, "unit_price": 1},
                        ],
                    )
                ]
            },
            "one line per sku",
        ),
        ({}, "at least one"),
        (
            {
                "returns": [
                    {
                        "return_id": "r-1",
                        "order_id": "nowhere",
                        "sku": "A",
                        "quantity": 1,
                        "returned_at": "2025-03-09",
                    }
                ]
            },
            "returns[0].order_id: unknown order 'nowhere'",
        ),
        (
            {
                "orders": [order("o-1")],
                "returns": [
                    {
                        "return_id": "r-1",
                        "order_id": "o-1",
                        "sku": "22222",
                        "quantity": 1,
                        "returned_at": "2025-03-09",
                    }
                ],
            },
            "returns[0].sku",
        ),
        (
            {
                "orders": [order("o-1")],
                "returns": [
                    {
                        "return_id": "r-1",
                        "order_id": "o-1",
                        "sku": "21733",
                        "quantity": 3,
                        "returned_at": "2025-03-09",
                    }
                ],
            },
            "returns[0].quantity: 3 returned, 1 bought",
        ),
    ],
)
def test_a_bad_batch_is_a_422_naming_the_field_and_nothing_is_stored(
    settings: Settings, body: dict[str, Any], field: str
) -> None:
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/events/orders", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert field in response.text
    assert stored(settings) == ([], [])


def test_events_need_the_admin_token(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        missing = client.post("/v1/events/orders", json={"orders": [order("o-1")]})
        wrong = client.post(
            "/v1/events/orders",
            json={"orders": [order("o-1")]},
            headers={"Authorization": "Bearer nope"},
        )
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert stored(settings) == ([], [])


def test_events_import_from_files(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Order lines in the orders contract (CSV) and returns (Parquet): imported once, a
    second import is all duplicates; a bad row is refused whole, naming file, row and column;
    lines of one order that disagree on its customer are refused."""
    lines = tmp_path / "orders.csv"
    lines.write_text(
        "order_id,customer_id,sku,quantity,unit_price,ordered_at,store_id,channel,session_id\n"
        "A-1,c1,85123A,2,2.55,2025-03-01 10:00:00,,web,\n"
        "A-1,c1,21733,1,2.95,2025-03-01 10:00:00,,web,\n"
        "A-1,c1,21733,1,2.95,2025-03-01 10:00:00,,web,\n"
        "A-2,,85123A,1,2.55,2025-03-02T11:00:00,,web,s-77\n"
    )
    returns = tmp_path / "returns.parquet"
    pl.DataFrame(
        {
            "return_id": ["R-1"],
            "order_id": ["A-1"],
            "sku": ["21733"],
            "quantity": [2],
            "returned_at": ["2025-03-05T09:00:00"],
        }
    ).write_parquet(returns)
    assert main(["events", "import", str(lines), "--returns", str(returns)]) == 0
    out = capsys.readouterr().out
    assert "orders: 2 added" in out
    assert "returns: 1 added" in out
    assert main(["events", "import", str(lines), "--returns", str(returns)]) == 0
    assert "orders: 0 added, 2 duplicate" in capsys.readouterr().out
    orders, _ = stored(settings)
    a_1 = next(record for record in orders if record["order_id"] == "A-1")
    assert {line["sku"]: line["quantity"] for line in a_1["lines"]} == {"21733": 2, "85123A": 2}

    bad = tmp_path / "bad.csv"
    bad.write_text(
        "order_id,customer_id,sku,quantity,unit_price,ordered_at\n"
        "B-1,c1,85123A,2,2.55,2025-03-01\n"
        "B-2,c1,85123A,-1,2.55,2025-03-01\n"
    )
    assert main(["events", "import", str(bad)]) == 2
    assert "bad.csv, row 2, column 'quantity'" in capsys.readouterr().err
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(
        "order_id,customer_id,sku,quantity,unit_price,ordered_at\n"
        "C-1,c1,85123A,2,2.55,2025-03-01\n"
        "C-1,c2,21733,1,2.95,2025-03-01\n"
    )
    assert main(["events", "import", str(mixed)]) == 2
    assert "mixed.csv, row 2, column 'customer_id'" in capsys.readouterr().err
    assert sorted(record["order_id"] for record in stored(settings)[0]) == ["A-1", "A-2"]
