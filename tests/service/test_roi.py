"""The ROI read-out: exact accounting on a small hand-made case, then a simulated experiment
on real order lines (the bundled sample) with a known injected uplift, and an A/A arm."""

from __future__ import annotations

import asyncio
import csv
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from rules.experiments import Assignment, arm_index
from rules.policy import Experiment, load_policy
from service.cli import main
from service.exposures import (
    ExposureRecorder,
    exposures_frame,
    open_exposure_sink,
    pseudonymizer_for,
)
from service.outcomes import open_outcome_store, outcome_frames
from service.pipeline import (
    Recommendation,
    RecommendationQuery,
    RecommendedItem,
    ScoreTrace,
    Versions,
)
from service.roi.analysis import ALL, analyse, system_cost_from
from service.roi.render import CSV_COLUMNS
from service.roi.report import build_report
from service.roi.simulate import SimulationResult, simulate
from service.settings import Settings
from tests.service.conftest import DemoData

T0 = datetime(2025, 3, 1, 12, 0)
HANDLING = 0.5
WEEK = timedelta(days=7)


# -- exact accounting -------------------------------------------------------------------------


def shown(sku: str, *, price: float, cost: float, node: str, fulfilment: float) -> RecommendedItem:
    return RecommendedItem(
        sku=sku,
        name=sku,
        kind="cross_sell",
        score=1.0,
        unit_price=price,
        unit_margin=price - cost,
        fulfillment_node=node,
        reason_codes=(),
        explanation="",
        explanation_source="template",
        score_parts=ScoreTrace(
            relevance=1.0,
            p_accept=0.1,
            unit_margin=price - cost,
            return_cost=0.0,
            fulfilment_cost=fulfilment,
            contribution=0.0,
            margin_weight=0.0,
            final=1.0,
        ),
        category="TOYS",
    )


EXACT = Experiment.model_validate(
    {
        "name": "exact",
        "salt": "e1",
        "arms": [
            {"name": "holdout", "share": 0.5, "strategy": "holdout"},
            {"name": "treatment", "share": 0.5, "strategy": "policy"},
        ],
    }
)
ITEMS = pl.DataFrame(
    {
        "sku": ["X", "Y", "Z", "B"],
        "category": ["TOYS", "TOYS", "TOYS", "FOOD"],
        "unit_cost": [4.0, 3.0, 1.0, 15.0],
    }
)


def customer_in(arm: str) -> str:
    wanted = [a.name for a in EXACT.arms].index(arm)
    return next(f"c-{n}" for n in range(1000) if arm_index(EXACT, f"c-{n}") == wanted)


def test_margin_attachment_and_window_are_counted_exactly(tmp_path: Path) -> None:
    """One treated and one held-out customer, through the real recorder and outcome store:

    treated: shown X, Y (both shipped apart from DC-2 at 3.00) and Z; buys 2 X, 1 Y and a
    basket item B an hour later, returns one X; buys X again 8 days later (outside the
    window: not counted). Margin = 6 x 1 kept + 2 + 5 - 0.5 handling - 3 (one extra
    shipment for X and Y together) = 9.5. Held out: X withheld, bought anyway with B:
    margin 6 + 5 = 11. A second held-out customer ordered before any exposure: not counted.
    """
    settings = Settings(state_dir=tmp_path / "state")
    treated, held_out = customer_in("treatment"), customer_in("holdout")
    early = next(
        f"c-{n}" for n in range(1000) if arm_index(EXACT, f"c-{n}") == 0 and f"c-{n}" != held_out
    )
    x = shown("X", price=10.0, cost=4.0, node="DC-2", fulfilment=3.0)
    y = shown("Y", price=5.0, cost=3.0, node="DC-2", fulfilment=3.0)
    z = shown("Z", price=2.0, cost=1.0, node="DC-1", fulfilment=0.0)

    def exposure(
        customer: str,
        arm: str,
        items: tuple[RecommendedItem, ...],
        withheld: tuple[RecommendedItem, ...],
    ) -> tuple[RecommendationQuery, Recommendation]:
        strategy = "holdout" if arm == "holdout" else "policy"
        return (
            RecommendationQuery(request_id="", channel="cart", customer_id=customer),
            Recommendation(
                request_id=f"req-{customer}",
                channel="cart",
                items=items,
                unknown_skus=(),
                degraded=(),
                versions=Versions(model="m", snapshot="s", policy="p"),
                candidates_considered=3,
                experiment=Assignment("exact", arm, strategy, None, "customer"),  # type: ignore[arg-type]
                withheld=withheld,
            ),
        )

    def lines(*entries: tuple[str, int, float]) -> list[dict[str, Any]]:
        return [{"sku": s, "quantity": q, "unit_price": p} for s, q, p in sorted(entries)]

    pseudonym = pseudonymizer_for(settings)

    def placed(
        order_id: str, customer: str, at: datetime, *entries: tuple[str, int, float]
    ) -> dict[str, Any]:
        return {
            "order_id": order_id,
            "customer": pseudonym(customer),
            "session": None,
            "ordered_at": at.isoformat(timespec="microseconds"),
            "channel": "web",
            "store_id": None,
            "lines": lines(*entries),
        }

    async def scenario() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        recorder = ExposureRecorder(open_exposure_sink(settings), pseudonym, capacity=100)
        for query, result in (
            exposure(treated, "treatment", (x, y, z), ()),
            exposure(held_out, "holdout", (), (x,)),
        ):
            recorder.record(query, result, now=T0)
        await recorder.close()
        store = open_outcome_store(settings)
        await store.add(
            [
                placed(
                    "T1",
                    treated,
                    T0 + timedelta(hours=1),
                    ("X", 2, 10.0),
                    ("Y", 1, 5.0),
                    ("B", 1, 20.0),
                ),
                placed("T2", treated, T0 + timedelta(days=8), ("X", 1, 10.0)),
                placed("C1", held_out, T0 + timedelta(hours=2), ("X", 1, 10.0), ("B", 1, 20.0)),
                placed("E1", early, T0 - timedelta(hours=1), ("B", 1, 20.0)),
            ],
            [
                {
                    "return_id": "R1",
                    "order_id": "T1",
                    "sku": "X",
                    "quantity": 1,
                    "returned_at": (T0 + timedelta(days=2)).isoformat(),
                }
            ],
            source="test",
        )
        orders, returns = await store.load()
        order_lines, returned = outcome_frames(orders, returns)
        sink = open_exposure_sink(settings)
        return await exposures_frame(sink), order_lines, returned

    exposures, order_lines, returned = asyncio.run(scenario())
    report = analyse(
        EXACT,
        exposures=exposures,
        order_lines=order_lines,
        returns=returned,
        items=ITEMS,
        window=WEEK,
        return_handling_cost=HANDLING,
        system_cost=system_cost_from(
            exposures,
            experiment="exact",
            accounting=None,
            price_input_per_mtok=1.0,
            price_output_per_mtok=5.0,
            currency_per_usd=1.0,
        ),
        replicates=200,
    )
    rows = {(r["arm"], r["channel"], r["category"]): r for r in report.rows}
    treatment, control = rows[("treatment", ALL, ALL)], rows[("holdout", ALL, ALL)]
    assert (treatment["orders"], control["orders"]) == (1, 1)
    assert treatment["margin_per_order"] == pytest.approx(9.5)
    assert control["margin_per_order"] == pytest.approx(11.0)
    assert treatment["incremental_margin_per_order"] == pytest.approx(-1.5)
    assert treatment["aov"] == pytest.approx(45.0)
    assert treatment["net_revenue_per_order"] == pytest.approx(35.0)
    assert treatment["incremental_net_revenue_per_order"] == pytest.approx(5.0)
    assert treatment["units_per_order"] == pytest.approx(4.0)
    assert treatment["return_rate"] == pytest.approx(0.25)
    assert (treatment["attachment_rate"], control["attachment_rate"]) == (1.0, 0.0)
    assert (treatment["would_have_bought_rate"], control["would_have_bought_rate"]) == (0.0, 1.0)
    assert (treatment["split_shipment_rate"], control["split_shipment_rate"]) == (1.0, 0.0)
    # Categories add up to the order: TOYS 6 + 2 - 0.5 - 3 = 4.5, FOOD 5.
    assert rows[("treatment", ALL, "TOYS")]["margin_per_order"] == pytest.approx(4.5)
    assert rows[("treatment", ALL, "FOOD")]["margin_per_order"] == pytest.approx(5.0)
    assert rows[("treatment", "cart", ALL)]["margin_per_order"] == pytest.approx(9.5)
    assert treatment["system_cost_per_order"] == 0.0
    assert "system cost taken as 0" in report.system_cost_source
    assert any("2 of 4 ingested orders" in note for note in report.notes)


# -- a simulated experiment on real order lines -------------------------------------------------

INJECTED_ATTACH_RATE = 0.5
INJECTED_QUANTITY = 24
INJECTED_RETURN_RATE = 0.2


@dataclass(frozen=True)
class Rehearsal:
    settings: Settings
    policy_path: Path
    items_path: Path
    result: SimulationResult


def rehearsal_policy(path: Path) -> Path:
    document = load_policy().model_dump(mode="json")
    document["experiments"] = {
        "attribution_window_hours": 168,
        "running": [
            {
                "name": "rehearsal",
                "salt": "r1",
                "control": "control",
                "arms": [
                    {"name": "control", "share": 0.34, "strategy": "policy"},
                    {"name": "aa", "share": 0.33, "strategy": "policy"},
                    {
                        "name": "treatment",
                        "share": 0.33,
                        "strategy": "margin_weight",
                        "margin_weight": 0.7,
                    },
                ],
            }
        ],
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def rehearsal(demo_data: DemoData, tmp_path_factory: pytest.TempPathFactory) -> Rehearsal:
    """1,500 real orders of the sample replayed through the service under a three-arm
    experiment (control, an A/A copy of it, a treatment), exposures recorded, the orders
    ingested as outcomes, and in the treatment arm an injected purchase of its top item."""
    root = tmp_path_factory.mktemp("rehearsal")
    settings = Settings(state_dir=root / "state", log_level="warning")
    policy_path = rehearsal_policy(root / "policy.yaml")

    async def run() -> SimulationResult:
        pseudonym = pseudonymizer_for(settings)
        recorder = ExposureRecorder(open_exposure_sink(settings), pseudonym, capacity=1_000_000)
        outcomes = open_outcome_store(settings)
        try:
            return await simulate(
                demo_data.contract_dir,
                load_policy(policy_path),
                "rehearsal",
                replay_orders=1500,
                recorder=recorder,
                outcomes=outcomes,
                pseudonymize=pseudonym,
                inject_arm="treatment",
                inject_attach_rate=INJECTED_ATTACH_RATE,
                inject_quantity=INJECTED_QUANTITY,
                inject_return_rate=INJECTED_RETURN_RATE,
                train_iterations=8,
                replicates=500,
            )
        finally:
            await recorder.close()
            await outcomes.close()

    result = asyncio.run(run())
    return Rehearsal(settings, policy_path, demo_data.contract_dir / "items.parquet", result)


def overall(rows: list[dict[str, object]], arm: str) -> dict[str, object]:
    return next(r for r in rows if (r["arm"], r["channel"], r["category"]) == (arm, ALL, ALL))


def test_report_recovers_the_injected_uplift_and_the_aa_arm_shows_none(
    rehearsal: Rehearsal,
) -> None:
    """The injected uplift lies inside the treatment's 95% interval; the A/A arm's interval
    holds 0 and is not significant; the underpowered flag follows MDE > target."""
    report = asyncio.run(
        build_report(
            rehearsal.settings,
            experiment_name="rehearsal",
            policy_path=rehearsal.policy_path,
            items_path=rehearsal.items_path,
            replicates=2000,
        )
    )
    truth = rehearsal.result.truth["treatment"]
    assert truth > 5.0, "the injection must be worth measuring"
    assert rehearsal.result.truth["aa"] == 0.0
    treatment, aa = overall(report.rows, "treatment"), overall(report.rows, "aa")
    low, high = (
        treatment["incremental_margin_per_order_low"],
        treatment["incremental_margin_per_order_high"],
    )
    assert isinstance(low, float)
    assert isinstance(high, float)
    assert low <= truth <= high, (low, truth, high)
    aa_low, aa_high = (
        aa["incremental_margin_per_order_low"],
        aa["incremental_margin_per_order_high"],
    )
    assert isinstance(aa_low, float)
    assert isinstance(aa_high, float)
    assert aa_low <= 0.0 <= aa_high
    assert aa["significant"] is False
    for row in (treatment, aa):
        mde, target = row["mde_margin_per_order"], row["target_effect"]
        assert isinstance(mde, float)
        assert isinstance(target, float)
        assert row["underpowered"] is (mde > target)
    assert treatment["attachment_rate"] > aa["attachment_rate"]  # type: ignore[operator]


def test_the_estimate_moves_by_exactly_the_injected_margin(rehearsal: Rehearsal) -> None:
    """Take the injected purchases out again and the treatment's estimate drops by what they
    were worth, computed here from the outcome records alone; that worth is near the truth
    the simulation announced (only the purchase and return draws differ)."""

    async def load() -> tuple[pl.DataFrame, list[dict[str, Any]], list[dict[str, Any]]]:
        sink = open_exposure_sink(rehearsal.settings)
        store = open_outcome_store(rehearsal.settings)
        orders, returns = await store.load()
        return await exposures_frame(sink), orders, returns

    exposures, orders, returns = asyncio.run(load())
    original = pl.read_parquet(rehearsal.items_path.with_name("orders.parquet"))
    bought = {
        (f"sim-{order_id}", sku) for order_id, sku in original.select("order_id", "sku").iter_rows()
    }
    cost = dict(pl.read_parquet(rehearsal.items_path).select("sku", "unit_cost").iter_rows())
    returned = {(r["order_id"], r["sku"]): r["quantity"] for r in returns}
    fulfilment = {
        row["request_id"]: row["items"][0]["fulfilment_cost"]
        for row in exposures.iter_rows(named=True)
        if row["items"]
    }
    arm_of = {row["request_id"]: row["arm"] for row in exposures.iter_rows(named=True)}
    worth, stripped = 0.0, []
    treated_orders = sum(1 for arm in arm_of.values() if arm == "treatment")
    for order in orders:
        kept_lines = [line for line in order["lines"] if (order["order_id"], line["sku"]) in bought]
        for line in order["lines"]:
            if (order["order_id"], line["sku"]) in bought:
                continue
            back = returned.get((order["order_id"], line["sku"]), 0)
            worth += (
                (line["unit_price"] - cost[line["sku"]]) * (line["quantity"] - back)
                - HANDLING * back
                - fulfilment[order["order_id"]]
            )
        stripped.append({**order, "lines": kept_lines})
    assert worth != 0.0
    policy = load_policy(rehearsal.policy_path)
    experiment = policy.experiments.running[0]
    items = pl.read_parquet(rehearsal.items_path).select("sku", "category", "unit_cost")

    def estimate(records: list[dict[str, Any]], kept_returns: list[dict[str, Any]]) -> float:
        order_lines, returns_frame = outcome_frames(records, kept_returns)
        report = analyse(
            experiment,
            exposures=exposures,
            order_lines=order_lines,
            returns=returns_frame,
            items=items,
            window=WEEK,
            return_handling_cost=policy.ranking.return_handling_cost,
            system_cost=system_cost_from(
                exposures,
                experiment=experiment.name,
                accounting=None,
                price_input_per_mtok=1.0,
                price_output_per_mtok=5.0,
                currency_per_usd=1.0,
            ),
            replicates=100,
        )
        value = overall(report.rows, "treatment")["margin_per_order"]
        assert isinstance(value, float)
        return value

    assert policy.ranking.return_handling_cost == HANDLING
    organic_returns = [r for r in returns if (r["order_id"], r["sku"]) in bought]
    moved = estimate(orders, returns) - estimate(stripped, organic_returns)
    assert moved == pytest.approx(worth / treated_orders, rel=0.01)
    assert worth / treated_orders == pytest.approx(rehearsal.result.truth["treatment"], rel=0.25)


def test_roi_report_cli_writes_html_and_csv(
    rehearsal: Rehearsal,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in [name for name in os.environ if name.startswith("UPSELL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("UPSELL_STATE_DIR", str(rehearsal.settings.state_dir))
    monkeypatch.setenv("UPSELL_LOG_LEVEL", "warning")
    common = ["--policy", str(rehearsal.policy_path), "--items", str(rehearsal.items_path)]
    out = tmp_path / "reports"
    status = main(
        [
            "roi",
            "report",
            "--experiment",
            "rehearsal",
            *common,
            "--out",
            str(out),
            "--replicates",
            "300",
            "--currency",
            "GBP",
        ]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "treatment:" in printed.out
    with (out / "roi_rehearsal.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert {row["arm"] for row in rows} == {"control", "aa", "treatment"}
    page = (out / "roi_rehearsal.html").read_text()
    assert page.count('class="chart"') == 4
    assert "<script" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert main(["roi", "report", "--experiment", "nope", *common, "--out", str(out)]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


# -- the page in a real browser ---------------------------------------------------------------


def test_the_page_renders_its_charts_in_headless_chromium(
    rehearsal: Rehearsal, tmp_path: Path
) -> None:
    """The ROI page (and the simulation page) opened in headless Chromium: no console error,
    no exception, no request leaving the file, and every chart drawn with visible marks."""
    from service.roi.render import write_report
    from service.roi.simulate import simulation_html
    from tests.service.chromium import chromium_or_skip, visit

    chromium_or_skip()
    report = asyncio.run(
        build_report(
            rehearsal.settings,
            experiment_name="rehearsal",
            policy_path=rehearsal.policy_path,
            items_path=rehearsal.items_path,
            replicates=300,
        )
    )
    html_path = write_report(report, tmp_path, currency="GBP")[0]
    screenshot = tmp_path / "roi.png"
    seen = visit(html_path, screenshot=screenshot)
    assert seen.console_errors == []
    assert seen.exceptions == []
    assert seen.log_errors == []
    assert all(url.startswith(("file://", "data:")) for url in seen.requests), seen.requests
    assert [chart["name"] for chart in seen.charts] == [
        "incremental-margin",
        "margin-per-order",
        "attachment",
        "by-category",
    ]
    for chart in seen.charts:
        assert chart["width"] > 100, chart
        assert chart["height"] > 50, chart
        assert chart["marks"] > 0, chart
        assert chart["visible"] == chart["marks"], chart
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000

    simulation_page = tmp_path / "simulation.html"
    simulation_page.write_text(simulation_html(rehearsal.result, currency="GBP"))
    seen = visit(simulation_page)
    assert (seen.console_errors, seen.exceptions, seen.log_errors) == ([], [], [])
    assert [chart["name"] for chart in seen.charts] == ["expected-margin", "expected-incremental"]
    assert all(chart["visible"] == chart["marks"] > 0 for chart in seen.charts), seen.charts


def test_the_browser_check_catches_a_broken_page(tmp_path: Path) -> None:
    """The same check on a page with a console error, an exception and an empty chart fails
    on each: the test above could fail."""
    from tests.service.chromium import chromium_or_skip, visit

    chromium_or_skip()
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<!DOCTYPE html><html><body><figure class="chart" data-chart="empty">'
        '<svg width="0" height="0"><rect class="bar" width="0" height="0"/></svg></figure>'
        '<script>console.error("chart data missing"); drawChart();</script></body></html>'
    )
    seen = visit(broken)
    assert seen.console_errors == ["chart data missing"]
    assert len(seen.exceptions) == 1
    assert seen.charts == [{"name": "empty", "width": 0, "height": 0, "marks": 1, "visible": 0}]
