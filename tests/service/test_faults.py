"""Faults against real servers: Redis frozen and killed under load, corrupt publishes, replays.

The outage test runs the real app under uvicorn on a Redis started for the test (AOF on, so a
killed Redis comes back with its data), drives a bounded load of real baskets through HTTP,
freezes Redis (SIGSTOP) and thaws it (SIGCONT), then kills it (SIGKILL) and restarts it.
Every answer must be a 200 and break no constraint that can be checked from the published
snapshot (``service.evaluate.ConstraintOracle``: stock, eligibility, basket, margin floor,
restrictions), nothing may be recommended on stock the service could not see, ``/readyz`` must
say 503 / store unreachable while Redis is frozen and while it is dead, and the time to the
first healthy answer after Redis returns is printed and recorded as a test property (timings
are figures, not assertions).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from models.data.contract import read_snapshot_dir
from models.data.schema import SnapshotData
from rules.errors import ContractError, StoreError
from rules.policy import load_policy
from service.api.admin import router as inventory_router
from service.app import create_app
from service.evaluate import ConstraintOracle
from service.pipeline import BasketLine, RecommendationQuery
from service.settings import Settings
from service.store.base import SnapshotMeta
from service.store.codec import snapshot_version
from service.store.factory import open_configured_store, open_store
from tests.service.conftest import DemoData
from tests.service.test_store import make_snapshot

HOST = "127.0.0.1"
STOCK_UNAVAILABLE = "stock unavailable"
ADMIN_TOKEN = "fault-test-token"
LOAD_THREADS = 4


# -- a Redis of our own, to freeze and kill -----------------------------------------------------


class OwnRedis:
    """A redis-server on a free port with an append-only file, so a kill loses nothing."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            self.port: int = probe.getsockname()[1]
        self.url = f"redis://{HOST}:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                _, stderr = self.process.communicate()
                pytest.fail(f"redis-server did not start on {self.port}: {stderr.decode()}")
            time.sleep(0.02)

    def answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.2)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.signal(signal.SIGCONT)  # a frozen process would not act on SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


@contextmanager
def running_redis(workdir: Path) -> Iterator[OwnRedis]:
    """A Redis of the caller's own in ``workdir``; skipped without redis-server (failed in CI)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI for the fault tests")
        pytest.skip("fault tests need a redis-server binary on PATH")
    workdir.mkdir()
    server = OwnRedis(binary, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis started for this test only."""
    with running_redis(tmp_path / "redis") as server:
        yield server


# -- the app and its data -----------------------------------------------------------------------


def fresh_snapshot(contract_dir: Path) -> SnapshotData:
    """The sample's snapshot with stock as of a minute ago, so no staleness limit hides it."""
    base = read_snapshot_dir(contract_dir)
    as_of = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(minutes=1)
    return replace(base, inventory=base.inventory.with_columns(as_of=pl.lit(as_of)), as_of=as_of)


def publish(settings: Settings, snapshot: SnapshotData) -> SnapshotMeta:
    async def run() -> SnapshotMeta:
        store = await open_configured_store(settings)
        try:
            return await store.publish(snapshot)
        finally:
            await store.close()

    return asyncio.run(run())


def build_app(settings: Settings) -> FastAPI:
    app = create_app(settings)
    # create_app mounts the inventory router once it is wired in; mount it here until then.
    if not any(getattr(route, "path", "") == "/v1/admin/inventory" for route in app.routes):
        app.include_router(inventory_router)
    return app


def settings_for(redis_url: str | None, *, demo: DemoData, tmp_path: Path, prefix: str) -> Settings:
    return Settings(
        auth="off",  # not about auth: channel calls open
        redis_url=redis_url,
        redis_prefix=prefix,
        state_dir=tmp_path / "state",
        artifacts_dir=demo.artifacts_dir,
        snapshot_refresh_seconds=0.2,
        log_level="error",
        admin_token=ADMIN_TOKEN,
    )


def cart_bodies(demo: DemoData, count: int) -> list[dict[str, Any]]:
    """Real baskets from the sample's orders, on the cart channel in the UK."""
    orders = (
        pl.read_parquet(demo.contract_dir / "orders.parquet")
        .group_by("order_id", maintain_order=True)
        .agg(pl.col("sku"))
        .head(count)
    )
    return [
        {"channel": "cart", "region": "UK", "basket": [{"sku": sku} for sku in skus[:4]]}
        for skus in orders.get_column("sku").to_list()
    ]


def query_of(body: dict[str, Any]) -> RecommendationQuery:
    """The domain query a /v1/recommendations body asks (as the route builds it)."""
    return RecommendationQuery(
        request_id="",
        channel=body["channel"],
        basket=tuple(
            BasketLine(sku=line["sku"], quantity=line.get("quantity", 1))
            for line in body.get("basket", [])
        ),
        pdp_sku=body.get("sku"),
        store_id=body.get("store_id"),
        region=body.get("region"),
        limit=body.get("limit", 5),
        quantity=body.get("quantity"),
    )


def answer_violations(
    oracle: ConstraintOracle, body: dict[str, Any], answer: dict[str, Any]
) -> list[str]:
    """Every constraint a shown item breaks, judged from the published snapshot alone
    (``service.evaluate.ConstraintOracle``: item master, basket, node eligibility, stock
    above safety stock, margin floor, restrictions, reported margin). A service failing open
    on unreadable stock shows here: the sample has many empty cells."""
    query = query_of(body)
    now = datetime.now(UTC).replace(tzinfo=None)
    return [
        problem
        for item in answer["items"]
        for problem in oracle.violations(
            query,
            sku=item["sku"],
            node=item["fulfillment_node"],
            reported_margin=item["unit_margin"],
            now=now,
        )
    ]


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """The app under a real uvicorn in a thread; yields its base URL."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host=HOST, port=port, log_level="error", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# -- load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    sent: float
    done: float
    asked: dict[str, Any]
    status: int
    body: dict[str, Any] | None

    @property
    def healthy(self) -> bool:
        """A 200 whose stock was seen."""
        return (
            self.status == 200
            and self.body is not None
            and not any(STOCK_UNAVAILABLE in reason for reason in self.body["degraded"])
        )


@dataclass
class Load:
    """Worker threads sending the bodies round-robin, and a /readyz poller, until stopped."""

    base_url: str
    bodies: list[dict[str, Any]]
    answers: list[Answer] = field(default_factory=list)
    readiness: list[tuple[float, int, dict[str, str]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _work(self, offset: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            index = offset
            while not self.stop.is_set():
                body = self.bodies[index % len(self.bodies)]
                index += LOAD_THREADS
                sent = time.monotonic()
                response = client.post("/v1/recommendations", json=body)
                payload = response.json() if response.status_code == 200 else None
                with self.lock:
                    self.answers.append(
                        Answer(sent, time.monotonic(), body, response.status_code, payload)
                    )

    def _poll_readiness(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while not self.stop.is_set():
                response = client.get("/readyz")
                with self.lock:
                    self.readiness.append(
                        (time.monotonic(), response.status_code, response.json()["checks"])
                    )
                time.sleep(0.1)

    @contextmanager
    def running(self) -> Iterator[None]:
        threads = [
            threading.Thread(target=self._work, args=(n,), daemon=True) for n in range(LOAD_THREADS)
        ]
        threads.append(threading.Thread(target=self._poll_readiness, daemon=True))
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=60)

    def recovery_seconds(self, back_at: float, *, deadline_s: float = 20.0) -> float:
        """Seconds from ``back_at`` to the end of the first healthy answer sent after it."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            with self.lock:
                done = [a.done for a in self.answers if a.sent >= back_at and a.healthy]
            if done:
                return min(done) - back_at
            time.sleep(0.02)
        pytest.fail(f"no healthy answer within {deadline_s}s of Redis coming back")

    def ready_again_seconds(self, back_at: float, *, deadline_s: float = 20.0) -> float:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            with self.lock:
                ready = [t for t, status, _ in self.readiness if t >= back_at and status == 200]
            if ready:
                return min(ready) - back_at
            time.sleep(0.02)
        pytest.fail(f"/readyz not ready within {deadline_s}s of Redis coming back")


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stock_mirror", [False, True], ids=["stock-read-live", "stock-mirror"])
def test_redis_frozen_then_killed_under_load_gives_no_5xx_and_no_unseen_stock(
    own_redis: OwnRedis,
    demo_data: DemoData,
    tmp_path: Path,
    record_property: Any,
    stock_mirror: bool,
) -> None:
    """SIGSTOP then SIGKILL of Redis mid-load: all 200s, nothing on unseen stock, recovery.

    With the stock mirror, answers go on from the worker's copy until Redis has not
    answered its follower for the max lag (nothing can change in a frozen Redis), then read
    Redis and fail closed like the others."""
    settings = settings_for(
        own_redis.url, demo=demo_data, tmp_path=tmp_path, prefix="faults"
    ).model_copy(update={"stock_mirror": stock_mirror})
    blind_after = settings.stock_mirror_max_lag_seconds + 0.1 if stock_mirror else 0.05
    snapshot = fresh_snapshot(demo_data.contract_dir)
    meta = publish(settings, snapshot)
    oracle = ConstraintOracle(snapshot, load_policy())
    bodies = cart_bodies(demo_data, 200)

    with served(build_app(settings)) as base_url:
        load = Load(base_url, bodies)
        with load.running():
            time.sleep(1.0)
            frozen_at = time.monotonic()
            own_redis.signal(signal.SIGSTOP)
            time.sleep(2.0)
            thawed_at = time.monotonic()
            own_redis.signal(signal.SIGCONT)
            after_thaw = load.recovery_seconds(thawed_at)
            ready_after_thaw = load.ready_again_seconds(thawed_at)
            time.sleep(0.5)
            killed_at = time.monotonic()
            own_redis.kill()
            time.sleep(1.5)
            restarting_at = time.monotonic()
            own_redis.start()
            restarted_at = time.monotonic()
            after_restart = load.recovery_seconds(restarted_at)
            ready_after_restart = load.ready_again_seconds(restarted_at)
            time.sleep(0.5)

    answers = load.answers
    statuses = {answer.status for answer in answers}
    assert statuses == {200}, f"non-200 answers: {sorted(statuses)}"
    problems = [
        problem
        for answer in answers
        if answer.body is not None
        for problem in answer_violations(oracle, answer.asked, answer.body)
    ]
    assert not problems, problems[:10]
    assert all(
        a.body is not None and a.body["versions"]["snapshot"] == meta.version for a in answers
    )
    # Answered wholly while Redis was frozen: no stock could be seen, so nothing is shown.
    # (An answer may mix batches: one read before the freeze, one failing in it.)
    blind = [a for a in answers if frozen_at + blind_after <= a.sent and a.done < thawed_at]
    assert blind
    assert not [a.body["items"] for a in blind if a.body and a.body["items"]]
    assert any(not a.healthy for a in blind)
    assert any(a.sent >= killed_at and not a.healthy for a in answers)
    assert sum(len(a.body["items"]) for a in answers if a.healthy and a.body) > 0
    # /readyz told the truth: 503 and the store unreachable while Redis was frozen (a ping
    # waits out its 0.5 s timeout first) and while it was dead (refused at once), ready again
    # once it was back (measured above).
    for since, until in ((frozen_at + 0.6, thawed_at), (killed_at + 0.1, restarting_at)):
        polled = [(status, c) for t, status, c in load.readiness if since <= t < until]
        assert polled, (since, until)
        assert all(status == 503 and c["store"] == "unreachable" for status, c in polled), polled

    figures = {
        "requests": len(answers),
        "degraded_answers": sum(1 for a in answers if not a.healthy),
        "recovery_after_sigcont_s": round(after_thaw, 3),
        "ready_after_sigcont_s": round(ready_after_thaw, 3),
        "recovery_after_restart_s": round(after_restart, 3),
        "ready_after_restart_s": round(ready_after_restart, 3),
        "readiness_polls_while_down": sum(
            1 for t, status, _ in load.readiness if killed_at <= t < restarting_at and status == 503
        ),
        "slowest_answer_while_frozen_s": round(max(a.done - a.sent for a in blind), 3),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"\nredis outage under load (stock mirror {stock_mirror}): {figures}")


@pytest.fixture(params=["in-process", "redis"])
def serving_settings(
    request: pytest.FixtureRequest, demo_data: DemoData, tmp_path: Path
) -> Settings:
    """Service settings on the persisted in-process store or on the shared test Redis."""
    if request.param == "redis":
        redis_url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        return settings_for(redis_url, demo=demo_data, tmp_path=tmp_path, prefix=prefix)
    return settings_for(None, demo=demo_data, tmp_path=tmp_path, prefix="upsell")


def test_corrupt_publishes_leave_the_previous_version_serving(
    serving_settings: Settings, demo_data: DemoData, tmp_path: Path
) -> None:
    """A bad file, an unpublishable snapshot and a write failing midway all leave v1 serving."""
    snapshot = fresh_snapshot(demo_data.contract_dir)
    first = publish(serving_settings, snapshot)
    body = cart_bodies(demo_data, 1)[0]

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for table in ("items", "nodes", "inventory"):
        shutil.copy(demo_data.contract_dir / f"{table}.parquet", bad_dir)
    (bad_dir / "inventory.parquet").unlink()
    (bad_dir / "inventory.csv").write_text("sku,node_id,atp\n15036,DC-1,lots\n")
    null_atp = replace(
        snapshot, inventory=snapshot.inventory.with_columns(atp=pl.lit(None, pl.Int64))
    )
    midway = replace(snapshot, as_of=snapshot.as_of + timedelta(seconds=1))

    with TestClient(build_app(serving_settings)) as client:
        assert client.post("/v1/recommendations", json=body).json()["versions"]["snapshot"] == (
            first.version
        )
        with pytest.raises(ContractError, match=r"inventory\.csv, row 1, column 'atp'"):
            publish(serving_settings, read_snapshot_dir(bad_dir))
        with pytest.raises(StoreError, match=r"inventory\.atp has \d+ null"):
            publish(serving_settings, null_atp)
        break_next_write(serving_settings, snapshot_version(midway))
        with pytest.raises(StoreError, match="publish"):
            publish(serving_settings, midway)

        time.sleep(0.3)  # past the mirror's refresh interval
        answer = client.post("/v1/recommendations", json=body)
        assert answer.status_code == 200
        assert answer.json()["versions"]["snapshot"] == first.version
        assert answer.json()["items"]
        assert client.get("/readyz").status_code == 200


def break_next_write(settings: Settings, version: str) -> None:
    """Make the next publish of ``version`` fail after writing part of it."""
    if settings.redis_url is None:
        snapshots = settings.state_dir / "snapshots"
        (snapshots / version).write_text("in the way\n")  # the final rename fails
        return
    client = redis.Redis.from_url(settings.redis_url)
    try:
        # A string where one node's stock hash goes: Redis answers its write with WRONGTYPE.
        client.set(f"{settings.redis_prefix}:snap:{version}:atp:{{S-UK}}", b"not a hash")
    finally:
        client.close()


def test_delta_batch_replayed_over_http_changes_nothing(
    serving_settings: Settings, demo_data: DemoData
) -> None:
    """Posting a batch twice: applied, then all duplicate, with identical answers after each."""
    snapshot = fresh_snapshot(demo_data.contract_dir)
    publish(serving_settings, snapshot)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    bodies = cart_bodies(demo_data, 30)

    with TestClient(build_app(serving_settings)) as client:
        before = [client.post("/v1/recommendations", json=b).json() for b in bodies]
        shown = {(i["sku"], i["fulfillment_node"]) for a in before for i in a["items"]}
        assert shown, "the sample baskets must recommend something to sell out"
        sold_out_sku = sorted(shown)[0][0]
        stocked_at = (
            snapshot.inventory.filter(pl.col("sku") == sold_out_sku).get_column("node_id").to_list()
        )
        now = datetime.now(UTC)
        deltas = {
            "deltas": [
                {
                    "delta_id": f"sellout-{sold_out_sku}-{node}",
                    "sku": sold_out_sku,
                    "node_id": node,
                    "atp": 0,
                    "as_of": now.isoformat(),
                }
                for node in stocked_at
            ]
        }
        first = client.post("/v1/admin/inventory", json=deltas, headers=headers)
        assert first.status_code == 200, first.text
        assert first.json()["applied"] == len(stocked_at)
        after_first = [client.post("/v1/recommendations", json=b).json() for b in bodies]
        again = client.post("/v1/admin/inventory", json=deltas, headers=headers)
        assert again.status_code == 200, again.text
        assert (again.json()["applied"], again.json()["duplicate"]) == (0, len(stocked_at))
        after_again = [client.post("/v1/recommendations", json=b).json() for b in bodies]

    def items(answers: list[dict[str, Any]]) -> list[list[tuple[str, str]]]:
        return [[(i["sku"], i["fulfillment_node"]) for i in a["items"]] for a in answers]

    assert all(sku != sold_out_sku for answer in items(after_first) for sku, _ in answer)
    assert items(after_again) == items(after_first)


def test_frozen_redis_fails_fast_then_recovers_by_itself(own_redis: OwnRedis) -> None:
    """Frozen Redis: a call times out, the next fails fast, ping is False; thawed, all work."""

    async def scenario() -> None:
        store = await open_store(redis_url=own_redis.url, prefix="ff", state_dir=None, keep=3)
        try:
            meta = await store.publish(make_snapshot())
            own_redis.signal(signal.SIGSTOP)
            with pytest.raises(StoreError, match=r"read_stock failed.*TimeoutError"):
                await store.read_stock(meta.version, ["SKU-1"], ["DC01"])
            with pytest.raises(StoreError, match="failing fast"):
                await store.current_version()
            assert await store.ping() is False
            own_redis.signal(signal.SIGCONT)
            assert await store.ping() is True  # a PONG ends the fail-fast period
            stock = await store.read_stock(meta.version, ["SKU-1"], ["DC01"])
            assert int(stock.atp[0, 0]) == 900
        finally:
            own_redis.signal(signal.SIGCONT)
            await store.close()

    asyncio.run(scenario())


def test_restarted_redis_gets_its_scripts_back(own_redis: OwnRedis) -> None:
    """After a restart (or SCRIPT FLUSH) Redis has no scripts: the store reloads them itself."""

    async def scenario() -> None:
        store = await open_store(redis_url=own_redis.url, prefix="ns", state_dir=None, keep=3)
        try:
            meta = await store.publish(make_snapshot())
            client = redis.Redis.from_url(own_redis.url)
            try:
                client.script_flush()
            finally:
                client.close()
            stock = await store.read_stock(meta.version, ["SKU-1"], ["DC01"])
            assert int(stock.atp[0, 0]) == 900
        finally:
            await store.close()

    asyncio.run(scenario())
