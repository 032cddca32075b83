"""A request reads its stock in one round trip, and only its candidates at its eligible nodes.

The real app runs on a Redis started for this test. Two observers, neither of them ours:

- Redis's own MONITOR stream shows every command Redis executed during the request, with
  its arguments: which stock keys (nodes) and which SKUs were read (the read script's keys
  and its NUL-joined SKUs; the commands the script runs inside Redis are left out).
- A TCP relay between the app and Redis holds Redis's replies back until the app has been
  quiet for a while, so a client that pipelines sends everything before it gets any reply,
  and one that needs a reply to go on shows a second burst. Counting the app's bursts that
  carry stock commands counts the round trips of the stock read.

The request asks with ``debug`` so that the trace says which candidates the item-master rules
dropped (those must not be read) and which the stock rules judged (those must be).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient

from rules.constraints import STOCK_CONSTRAINTS
from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_faults import (
    HOST,
    OwnRedis,
    build_app,
    cart_bodies,
    fresh_snapshot,
    publish,
    running_redis,
)

HOLD_S = 0.05  # replies wait until the app has sent nothing for this long
TICK_S = 0.005  # how often the relay looks whether it may release replies
PREFIX = "roundtrip"
_ARGUMENT = re.compile(r'"((?:[^"\\]|\\.)*)"')
STOCK_KEY_MARK = b":atp:{"  # in every stock hash's key (service.store.redis_store)


@dataclass
class HoldingRelay:
    """app <-> Redis, forwarding Redis's bytes only once the app has been quiet for HOLD_S.

    ``bursts`` lists, per app connection, what the app sent between two forwarded replies.
    """

    upstream_port: int
    port: int = 0
    bursts: list[bytearray] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    async def _serve(self, started: threading.Event, stop: asyncio.Event) -> None:
        server = await asyncio.start_server(self._relay, HOST, 0)
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        async with server:
            await stop.wait()
        for connection in self.connections:
            connection.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    async def _relay(self, app_in: asyncio.StreamReader, app_out: asyncio.StreamWriter) -> None:
        this = asyncio.current_task()
        assert this is not None
        self.connections.add(this)
        redis_in, redis_out = await asyncio.open_connection(HOST, self.upstream_port)
        last_sent = time.monotonic()
        held = bytearray()
        burst: bytearray | None = None

        async def from_app() -> None:
            nonlocal last_sent, burst
            while data := await app_in.read(65536):
                last_sent = time.monotonic()
                with self.lock:
                    if burst is None:  # the first bytes since a reply went back: a new turn
                        burst = bytearray()
                        self.bursts.append(burst)
                    burst += data
                redis_out.write(data)
                await redis_out.drain()
            redis_out.close()

        async def from_redis() -> None:
            while data := await redis_in.read(65536):
                held.extend(data)

        async def release() -> None:
            nonlocal burst
            while True:
                await asyncio.sleep(TICK_S)
                if held and time.monotonic() - last_sent >= HOLD_S:
                    with self.lock:
                        burst = None
                    app_out.write(bytes(held))
                    held.clear()
                    await app_out.drain()

        releasing = asyncio.ensure_future(release())
        try:
            await asyncio.gather(from_app(), from_redis())
        except (ConnectionError, OSError):
            pass
        finally:
            releasing.cancel()
            redis_out.close()
            app_out.close()

    def stock_round_trips(self, since: int) -> list[bytes]:
        """The bursts after the first ``since`` that carry a stock read (name a stock hash)."""
        with self.lock:
            return [bytes(b) for b in self.bursts[since:] if STOCK_KEY_MARK in b]

    def burst_count(self) -> int:
        with self.lock:
            return len(self.bursts)


@contextmanager
def holding_relay(upstream_port: int) -> Iterator[HoldingRelay]:
    relay = HoldingRelay(upstream_port)
    started, loop = threading.Event(), asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(relay._serve(started, stop),), daemon=True
    )
    thread.start()
    assert started.wait(10)
    try:
        yield relay
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()


@dataclass
class Monitor:
    """Redis's MONITOR stream, read on a socket of its own into ``lines``."""

    port: int
    lines: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def commands(self, since: int) -> list[list[str]]:
        """Commands clients sent since line ``since`` (not those scripts ran inside Redis)."""
        with self.lock:
            lines = self.lines[since:]
        return [
            [arg.replace('\\"', '"') for arg in _ARGUMENT.findall(line)]
            for line in lines
            if " lua] " not in line
        ]

    def count(self) -> int:
        with self.lock:
            return len(self.lines)


@contextmanager
def monitoring(port: int) -> Iterator[Monitor]:
    monitor = Monitor(port)
    connection = socket.create_connection((HOST, port))
    connection.sendall(b"MONITOR\r\n")
    reader = connection.makefile("rb")
    assert reader.readline() == b"+OK\r\n"

    def read() -> None:
        for raw in reader:
            with monitor.lock:
                monitor.lines.append(raw.decode(errors="replace").rstrip("\r\n"))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        yield monitor
    finally:
        connection.shutdown(socket.SHUT_RDWR)
        connection.close()
        thread.join(timeout=5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[OwnRedis]:
    with running_redis(tmp_path / "redis") as server:
        yield server


def settle(monitor: Monitor, relay: HoldingRelay) -> None:
    """Wait until neither observer has seen anything new for a few hold periods."""
    seen = (-1, -1)
    while (now := (monitor.count(), relay.burst_count())) != seen:
        seen = now
        time.sleep(HOLD_S * 4)


def test_a_request_reads_stock_in_one_round_trip_for_candidates_at_eligible_nodes(
    redis_server: OwnRedis, demo_data: DemoData, tmp_path: Path
) -> None:
    """One burst of stock commands per request: one meta check and one read script call
    naming every eligible node (the region's nodes) and exactly the candidates the item-master
    rules kept plus the basket, and none they dropped."""
    snapshot = fresh_snapshot(demo_data.contract_dir)
    with holding_relay(redis_server.port) as relay, monitoring(redis_server.port) as monitor:
        settings = Settings(
            auth="off",  # not about auth: channel calls open
            redis_url=f"redis://{HOST}:{relay.port}/0",
            redis_prefix=PREFIX,
            state_dir=tmp_path / "state",
            artifacts_dir=demo_data.artifacts_dir,
            snapshot_refresh_seconds=3600,  # no pointer check inside the measured request
            admin_token="round-trip",  # a debug trace is admin-only
            log_level="error",
        )
        # Published straight to Redis: only the app's traffic is what the relay is about.
        meta = publish(settings.model_copy(update={"redis_url": redis_server.url}), snapshot)
        body = {**cart_bodies(demo_data, 1)[0], "limit": 3, "debug": True}
        with TestClient(build_app(settings)) as client:
            auth = {"Authorization": "Bearer round-trip"}
            warm = client.post("/v1/recommendations", json=body, headers=auth)  # GETs the meta
            assert warm.status_code == 200
            settle(monitor, relay)
            commands_before, bursts_before = monitor.count(), relay.burst_count()
            response = client.post("/v1/recommendations", json=body, headers=auth)
            settle(monitor, relay)
        commands = monitor.commands(commands_before)
        stock_bursts = relay.stock_round_trips(bursts_before)

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["items"], "the request must judge stock for something"

    # One round trip carried the whole stock read.
    assert len(stock_bursts) == 1, [burst[:200] for burst in stock_bursts]

    # What clients sent during the request: the meta check and one read script call for all
    # nodes (a single Redis: one slot group). Snapshot keys only: the exposure of each answer
    # goes to its stream from a background task (service.exposures), off the request path.
    snap_commands = [c for c in commands if any(PREFIX in arg and ":snap:" in arg for arg in c[1:])]
    assert snap_commands, commands
    meta_checks = [c for c in snap_commands if c[0].upper() == "EXISTS"]
    reads = [c for c in snap_commands if c[0].upper() == "EVALSHA"]
    assert meta_checks == [["EXISTS", f"{{{PREFIX}}}:snap:{meta.version}:meta"]]
    assert len(reads) == 1, reads
    assert len(snap_commands) == len(meta_checks) + len(reads)
    (read,) = reads
    key_count = int(read[2])
    keys, arguments = read[3 : 3 + key_count], read[3 + key_count :]

    nodes = snapshot.nodes
    in_region = nodes.filter(pl.col("region") == body["region"]).get_column("node_id").to_list()
    eligible = in_region or nodes.filter(pl.col("kind") == "dc").get_column("node_id").to_list()
    read_nodes = [
        re.fullmatch(rf"{PREFIX}:snap:{meta.version}:atp:\{{(.+)\}}", key) for key in keys
    ]
    assert all(read_nodes), keys
    assert sorted(m.group(1) for m in read_nodes if m) == sorted(eligible)

    # One argument: the SKUs, joined by NUL (which MONITOR shows escaped).
    assert len(arguments) == 1, arguments
    skus = arguments[0].split("\\x00")
    assert len(skus) == len(set(skus))
    trace = answer["trace"]
    stock_rules = {reason.code for reason, _ in STOCK_CONSTRAINTS}
    judged_on_stock = {d["sku"] for d in trace["dropped"] if d["rule"] in stock_rules}
    dropped_before_stock = {d["sku"] for d in trace["dropped"] if d["rule"] not in stock_rules}
    shown = {item["sku"] for item in answer["items"]}
    basket = {line["sku"] for line in body["basket"]}
    known = set(snapshot.items.get_column("sku").to_list())
    # Read: every candidate the item-master rules kept (shown, dropped by a stock rule, or
    # ranked below the limit), and the basket; nothing they dropped.
    assert shown | judged_on_stock | (basket & known) <= set(skus)
    assert not set(skus) & (dropped_before_stock - basket)
    kept_by_master_rules = trace["candidates_considered"] - len(dropped_before_stock)
    assert len(set(skus) - basket) == kept_by_master_rules


def test_relay_counts_a_second_round_trip(redis_server: OwnRedis) -> None:
    """The relay's own check: a client that waits for a reply between two stock commands
    shows two bursts, a pipelined one shows one."""
    first = b"*3\r\n$5\r\nHMGET\r\n$9\r\nk:atp:{n}\r\n$1\r\na\r\n"
    second = b"*3\r\n$5\r\nHMGET\r\n$9\r\nk:atp:{n}\r\n$1\r\nb\r\n"

    def receive(client: socket.socket, replies: int) -> None:
        received = b""
        while received.count(b"\r\n") < 2 * replies:  # each reply: *1, then $-1
            received += client.recv(4096)

    def bursts(*, pipelined: bool) -> int:
        with (
            holding_relay(redis_server.port) as relay,
            socket.create_connection((HOST, relay.port)) as client,
        ):
            if pipelined:
                client.sendall(first + second)
                receive(client, 2)
            else:
                for command in (first, second):
                    client.sendall(command)
                    receive(client, 1)
            return len(relay.stock_round_trips(0))

    assert bursts(pipelined=True) == 1
    assert bursts(pipelined=False) == 2
