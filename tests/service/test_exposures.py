"""Experiments through the service, and the exposures every response leaves behind.

The real app on the bundled sample, with a policy running a holdout experiment; exposures go
to the JSONL file under the state dir, or to a Redis stream on the real Redis.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
import redis
import yaml
from fastapi.testclient import TestClient

from models.data.contract import read_snapshot_dir
from rules.policy import load_policy
from service.app import create_app
from service.cli import main
from service.exposures import (
    ExposureRecorder,
    FileExposureSink,
    RedisExposureSink,
    exposures_frame,
    open_exposure_sink,
    open_redis_client,
    pseudonymizer_for,
)
from service.logging import configure_logging
from service.pipeline import (
    Recommendation,
    RecommendationQuery,
    Versions,
)
from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_end_to_end import publish

EXPERIMENT = "holdout-2025"
BASKET = [{"sku": "85123A", "quantity": 2}]


def holdout_policy(path: Path) -> Path:
    document = load_policy().model_dump(mode="json")
    document["experiments"] = {
        "running": [
            {
                "name": EXPERIMENT,
                "salt": "a1",
                "arms": [
                    {"name": "holdout", "share": 0.5, "strategy": "holdout"},
                    {"name": "margin", "share": 0.5, "strategy": "policy"},
                ],
            }
        ]
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(params=["file", "redis"])
def settings(request: pytest.FixtureRequest, demo_data: DemoData, tmp_path: Path) -> Settings:
    extra: dict[str, object] = {}
    if request.param == "redis":
        extra = {
            "redis_url": request.getfixturevalue("redis_url"),
            "redis_prefix": request.getfixturevalue("redis_prefix"),
        }
    return Settings(
        auth="off",  # not about auth: channel calls open
        state_dir=tmp_path / "state",
        artifacts_dir=demo_data.artifacts_dir,
        policy_path=holdout_policy(tmp_path / "policy.yaml"),
        snapshot_refresh_seconds=0,
        log_level="warning",
        **extra,  # type: ignore[arg-type]
    )


def stored_exposures(settings: Settings) -> pl.DataFrame:
    async def read() -> pl.DataFrame:
        sink = open_exposure_sink(settings)
        try:
            return await exposures_frame(sink)
        finally:
            await sink.close()

    return asyncio.run(read())


def raw_store_bytes(settings: Settings) -> bytes:
    if settings.redis_url is None:
        return (settings.state_dir / "exposures" / "exposures.jsonl").read_bytes()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        entries = client.xrange(f"{settings.redis_prefix}:exposures")
        return b"\n".join(fields[b"e"] for _, fields in entries)
    finally:
        client.close()


def test_arms_in_responses_and_every_response_recorded(
    settings: Settings, demo_data: DemoData
) -> None:
    """Each response names its experiment and arm (null without a customer or session); the
    holdout arm shows nothing; a customer keeps its arm; every response leaves one exposure,
    the holdout's with the items it withheld, and no raw customer id is stored anywhere."""
    publish(settings, read_snapshot_dir(demo_data.contract_dir))
    bodies = [
        *({"customer_id": f"cust-{number:03d}"} for number in range(40)),
        *({"session_id": f"sess-{number:03d}"} for number in range(10)),
        *({} for _ in range(5)),
        {"customer_id": "cust-007"},  # again: same arm
    ]
    responses = []
    with TestClient(create_app(settings)) as client:
        for body in bodies:
            response = client.post(
                "/v1/recommendations",
                json={"channel": "cart", "basket": BASKET, "region": "UK", "limit": 3, **body},
            )
            assert response.status_code == 200, response.text
            responses.append(response.json())
    # Leaving the client ran the lifespan's shutdown: the buffer is flushed.

    arms = {}
    for body, answer in zip(bodies, responses, strict=True):
        unit = body.get("customer_id") or body.get("session_id")
        if unit is None:
            assert answer["experiment"] is None
            assert answer["items"], "outside any experiment the service answers as usual"
            continue
        assert answer["experiment"]["name"] == EXPERIMENT
        arm = answer["experiment"]["arm"]
        assert arms.setdefault(unit, arm) == arm, "a unit keeps its arm"
        if arm == "holdout":
            assert answer["items"] == []
        else:
            assert answer["items"]
    assert set(arms.values()) == {"holdout", "margin"}

    stored = stored_exposures(settings)
    assert stored.height == len(bodies)
    by_request = {row["request_id"]: row for row in stored.iter_rows(named=True)}
    assert set(by_request) == {answer["request_id"] for answer in responses}
    pseudonym = pseudonymizer_for(settings)
    for body, answer in zip(bodies, responses, strict=True):
        exposure = by_request[answer["request_id"]]
        assert exposure["experiment"] == (answer["experiment"] or {}).get("name")
        assert exposure["arm"] == (answer["experiment"] or {}).get("arm")
        assert [item["sku"] for item in exposure["items"]] == [i["sku"] for i in answer["items"]]
        assert exposure["channel"] == "cart"
        if exposure["arm"] == "holdout":
            assert exposure["withheld"], "the holdout records what it would have shown"
        else:
            assert exposure["withheld"] == []
        for item, shown in zip(exposure["items"], answer["items"], strict=True):
            assert item["unit_margin"] == shown["unit_margin"]
            assert item["node"] == shown["fulfillment_node"]
            assert item["category"]
        if "customer_id" in body:
            assert exposure["customer"] == pseudonym(body["customer_id"])
            assert exposure["unit"] == "customer"
        elif "session_id" in body:
            assert exposure["session"] == pseudonym(body["session_id"])
            assert exposure["unit"] == "session"
    raw = raw_store_bytes(settings)
    assert b"cust-0" not in raw
    assert b"sess-0" not in raw


def test_a_failing_sink_never_blocks_and_loses_nothing_it_kept(tmp_path: Path) -> None:
    """record() only appends to the bounded buffer: with the sink failing, recording still
    returns at once; past the capacity exposures are dropped and counted; what was kept is
    written, in order, once the sink works again."""
    blocker = tmp_path / "exposures"
    blocker.write_text("a file where the directory should be")
    sink = FileExposureSink(blocker / "exposures.jsonl")
    settings = Settings(state_dir=tmp_path / "state")
    recorder = ExposureRecorder(sink, pseudonymizer_for(settings), capacity=5, batch_size=2)
    results = [result(f"req-{number}") for number in range(12)]

    async def scenario() -> tuple[bool, bool]:
        for item in results:
            recorder.record(query(), item, now=NOW)
        failed = await recorder.flush()
        blocker.unlink()
        return failed, await recorder.flush()

    failed, recovered = asyncio.run(scenario())
    assert (failed, recovered) == (False, True)
    assert recorder.failed_writes == 1
    assert (recorder.recorded, recorder.dropped, recorder.written) == (5, 7, 5)
    stored = asyncio.run(exposures_frame(sink))
    assert stored.get_column("request_id").to_list() == [f"req-{n}" for n in range(5)]


def test_redis_stream_is_bounded(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    """The stream is trimmed near max_len (XADD MAXLEN ~): old exposures go, new ones stay."""
    settings = Settings(state_dir=tmp_path / "state")

    async def scenario() -> pl.DataFrame:
        sink = RedisExposureSink(open_redis_client(redis_url), prefix=redis_prefix, max_len=1000)
        recorder = ExposureRecorder(sink, pseudonymizer_for(settings), capacity=10_000)
        for number in range(5000):
            recorder.record(query(), result(f"req-{number}"), now=NOW)
        assert await recorder.flush()
        try:
            return await exposures_frame(sink)
        finally:
            await sink.close()

    stored = asyncio.run(scenario())
    assert 1000 <= stored.height < 2000
    assert stored.get_column("request_id")[-1] == "req-4999"


def test_export_to_parquet_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`upsell exposures export FILE.parquet` writes every exposure, nested items included;
    another suffix is refused with exit status 2."""
    for name in [name for name in os.environ if name.startswith("UPSELL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("UPSELL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("UPSELL_LOG_LEVEL", "warning")
    settings = Settings(state_dir=tmp_path / "state")

    async def record() -> None:
        recorder = ExposureRecorder(
            open_exposure_sink(settings), pseudonymizer_for(settings), capacity=100
        )
        for number in range(30):
            recorder.record(query(), result(f"req-{number}"), now=NOW)
        await recorder.close()

    asyncio.run(record())
    out = tmp_path / "export" / "exposures.parquet"
    assert main(["exposures", "export", str(out)]) == 0
    assert "exported 30 exposures" in capsys.readouterr().out
    exported = pl.read_parquet(out)
    assert exported.height == 30
    assert str(exported.schema["items"]).startswith("List(Struct")
    assert exported.get_column("items").list.len().to_list() == [0] * 30
    assert main(["exposures", "export", str(tmp_path / "exposures.csv")]) == 2
    assert "Parquet" in capsys.readouterr().err


# -- builders ---------------------------------------------------------------------------------

NOW = datetime(2025, 3, 1, 12, 0)


def query() -> RecommendationQuery:
    return RecommendationQuery(request_id="", channel="cart", customer_id="someone")


def result(request_id: str) -> Recommendation:
    return Recommendation(
        request_id=request_id,
        channel="cart",
        items=(),
        unknown_skus=(),
        degraded=(),
        versions=Versions(model="m", snapshot="s", policy="p"),
        candidates_considered=0,
    )


def test_decision_record_names_the_arm(
    demo_data: DemoData, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The decision record logs experiment and arm (and what a holdout withheld), still
    without the customer id."""
    import orjson

    settings = Settings(
        auth="off",  # not about auth: channel calls open
        state_dir=tmp_path / "state",
        artifacts_dir=demo_data.artifacts_dir,
        policy_path=holdout_policy(tmp_path / "policy.yaml"),
        snapshot_refresh_seconds=0,
        log_level="info",
    )
    publish(settings, read_snapshot_dir(demo_data.contract_dir))
    customers = [f"CUSTOMER-{number:04d}" for number in range(12)]
    with TestClient(create_app(settings)) as client:
        capfd.readouterr()
        answers = [
            client.post(
                "/v1/recommendations",
                json={"channel": "cart", "basket": BASKET, "region": "UK", "customer_id": c},
            ).json()
            for c in customers
        ]
    logged = capfd.readouterr().err
    decisions = {
        record["request_id"]: record
        for record in (orjson.loads(line) for line in logged.splitlines() if line.startswith("{"))
        if record.get("event") == "decision"
    }
    assert len(decisions) == len(customers)
    for answer in answers:
        decision = decisions[answer["request_id"]]
        assert decision["experiment"] == EXPERIMENT
        assert decision["arm"] == answer["experiment"]["arm"]
        assert bool(decision["withheld"]) == (decision["arm"] == "holdout")
    assert {decision["arm"] for decision in decisions.values()} == {"holdout", "margin"}
    assert not any(customer in logged for customer in customers)


def test_close_returns_when_a_flush_is_woken_as_it_stops(tmp_path: Path) -> None:
    """close() right after a record() that woke the flush task (the cancel then lands as the
    task's wait completes, which Python 3.11's wait_for can swallow) still returns, every
    time, with everything written."""
    configure_logging(level="warning")  # onto this test's stderr, not an earlier test's
    settings = Settings(state_dir=tmp_path / "state")

    async def scenario() -> int:
        written = 0
        for round_number in range(200):
            sink = FileExposureSink(tmp_path / f"exposures-{round_number}.jsonl")
            recorder = ExposureRecorder(
                sink, pseudonymizer_for(settings), capacity=10, batch_size=1
            )
            recorder.start()
            await asyncio.sleep(0)  # the task is now waiting on its wake event
            recorder.record(query(), result(f"req-{round_number}"), now=NOW)
            await asyncio.wait_for(recorder.close(), timeout=10)
            written += recorder.written
        return written

    assert asyncio.run(scenario()) == 200


class _SlowFileSink(FileExposureSink):
    """The real file sink, each append taking a while: a write is in flight when close()
    comes (as when CI found every exposure stored twice)."""

    def _append(self, payload: bytes) -> None:
        time.sleep(0.05)
        super()._append(payload)


def test_close_during_a_write_stores_each_exposure_once(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    sink = _SlowFileSink(tmp_path / "exposures.jsonl")

    async def scenario() -> None:
        recorder = ExposureRecorder(sink, pseudonymizer_for(settings), capacity=100, batch_size=5)
        recorder.start()
        for number in range(5):  # a full batch wakes the flush task
            recorder.record(query(), result(f"req-{number}"), now=NOW)
        await asyncio.sleep(0.01)  # ... which is now inside the write
        await recorder.close()

    asyncio.run(scenario())
    stored = asyncio.run(exposures_frame(sink))
    assert stored.get_column("request_id").to_list() == [f"req-{n}" for n in range(5)]
