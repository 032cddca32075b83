"""Fixtures shared by every test package: real Redis servers, and keys of their own per test.

``redis_url``     a session-wide Redis: the one on 127.0.0.1:6379 if it answers, else a
                  ``redis-server`` started for the session (no persistence), else skip (fail
                  when the CI environment variable is set).
``redis_prefix``  a key prefix unique to the test; its keys are deleted afterwards.
``redis_client``  a factory of ``async with redis_client() as client:`` blocks. A redis.asyncio
                  client belongs to the event loop that first uses it, and each test runs its
                  own loop (``asyncio.run``), so clients are opened inside the coroutine.
``redis_cluster_url``     a session-wide local Redis Cluster: three masters started from
                  ``redis-server --cluster-enabled yes`` on free loopback ports in a temp dir
                  and joined by ``redis-cli --cluster create``; its URL is
                  ``redis+cluster://127.0.0.1:<port>``. Skipped (failed in CI) without both
                  binaries.
``redis_cluster_prefix``  as ``redis_prefix``, on the cluster.
``redis_cluster_client``  as ``redis_client``: redis.asyncio.RedisCluster clients.

Keys under a prefix ``p`` are ``p:...`` and ``{p}:...`` (the snapshot store's hash tag).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import NoReturn

import pytest
import redis
import redis.asyncio
import redis.cluster
from redis.asyncio.cluster import RedisCluster

RedisClientFactory = Callable[[], AbstractAsyncContextManager[redis.asyncio.Redis]]
RedisClusterClientFactory = Callable[[], AbstractAsyncContextManager[RedisCluster]]

_DEFAULT_HOST = "127.0.0.1"
_DEFAULT_PORT = 6379
_PING_TIMEOUT_S = 0.5
_START_TIMEOUT_S = 10.0
_CLUSTER_MASTERS = 3
_CLUSTER_BUS_OFFSET = 10_000  # Redis Cluster talks to its peers on port + 10000


def _answers_ping(url: str) -> bool:
    client = redis.Redis.from_url(
        url, socket_connect_timeout=_PING_TIMEOUT_S, socket_timeout=_PING_TIMEOUT_S
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_DEFAULT_HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _unavailable(reason: str) -> NoReturn:
    """Redis-backed tests are required in CI and optional on a laptop."""
    if os.environ.get("CI"):
        pytest.fail(f"Redis is required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis: the local default one, or a throwaway redis-server."""
    default_url = f"redis://{_DEFAULT_HOST}:{_DEFAULT_PORT}/0"
    if _answers_ping(default_url):
        yield default_url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable(
            f"no Redis on {_DEFAULT_HOST}:{_DEFAULT_PORT} and no redis-server binary on PATH"
        )
    port = _free_port()
    url = f"redis://{_DEFAULT_HOST}:{port}/0"
    with tempfile.TemporaryDirectory(prefix="upsell-redis-") as workdir:
        command = [binary, "--port", str(port), "--bind", _DEFAULT_HOST, "--save", ""]
        command += ["--appendonly", "no", "--dir", workdir]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not _answers_ping(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    _, stderr = server.communicate()
                    _unavailable(
                        f"no Redis on {_DEFAULT_HOST}:{_DEFAULT_PORT}, and {binary} did not "
                        f"start on port {port}: {stderr.decode(errors='replace').strip()}"
                    )
                time.sleep(0.05)
            yield url
        finally:
            if server.poll() is None:
                server.terminate()
                try:
                    server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
            if server.stderr is not None:
                server.stderr.close()


def _delete_prefix(client: redis.Redis | redis.cluster.RedisCluster, prefix: str) -> None:
    """Unlink every key under ``prefix`` (both spellings), one key per command (Cluster)."""
    for pattern in (f"{prefix}:*", f"{{{prefix}}}:*"):
        for key in list(client.scan_iter(match=pattern, count=1_000)):
            client.unlink(key)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; every key under it is deleted after the test."""
    prefix = f"upsell-test:{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        _delete_prefix(client, prefix)
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> RedisClientFactory:
    """Open a redis.asyncio client inside the running event loop; closed on leaving the block."""

    @asynccontextmanager
    async def open_client() -> AsyncIterator[redis.asyncio.Redis]:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=False)
        try:
            yield client
        finally:
            await client.aclose()

    return open_client


# -- a local Redis Cluster ----------------------------------------------------------------------


def _free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = _free_port()
        if port in taken or port + _CLUSTER_BUS_OFFSET > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((_DEFAULT_HOST, port + _CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _cluster_is_ok(port: int) -> bool:
    client = redis.Redis(
        host=_DEFAULT_HOST,
        port=port,
        socket_connect_timeout=_PING_TIMEOUT_S,
        socket_timeout=_PING_TIMEOUT_S,
    )
    try:
        info = client.execute_command("CLUSTER INFO")  # parsed to a dict by redis-py
        if isinstance(info, bytes):
            return b"cluster_state:ok" in info
        return bool(info.get("cluster_state") in ("ok", b"ok"))
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _stop(servers: list[subprocess.Popen[bytes]]) -> None:
    for server in servers:
        if server.poll() is None:
            server.terminate()
    for server in servers:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stderr is not None:
            server.stderr.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A three-master Redis Cluster on loopback, started for the session and torn down."""
    server_binary, cli_binary = shutil.which("redis-server"), shutil.which("redis-cli")
    if server_binary is None or cli_binary is None:
        _unavailable("a local Redis Cluster needs redis-server and redis-cli on PATH")
    taken: set[int] = set()
    for _ in range(_CLUSTER_MASTERS):
        taken.add(_free_cluster_port(taken))
    ports = sorted(taken)
    servers: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="upsell-cluster-") as workdir:
        try:
            for port in ports:
                node_dir = os.path.join(workdir, str(port))
                os.mkdir(node_dir)
                command = [server_binary, "--port", str(port), "--bind", _DEFAULT_HOST]
                command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                command += ["--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no"]
                command += ["--dir", node_dir]
                servers.append(
                    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                )
            deadline = time.monotonic() + _START_TIMEOUT_S
            for port, server in zip(ports, servers, strict=True):
                while not _answers_ping(f"redis://{_DEFAULT_HOST}:{port}/0"):
                    if server.poll() is not None or time.monotonic() > deadline:
                        _unavailable(f"redis-server did not start on port {port} as a cluster node")
                    time.sleep(0.05)
            created = subprocess.run(
                [cli_binary, "--cluster", "create"]
                + [f"{_DEFAULT_HOST}:{port}" for port in ports]
                + ["--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if created.returncode != 0:
                _unavailable(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not all(_cluster_is_ok(port) for port in ports):
                if time.monotonic() > deadline:
                    _unavailable(f"the local Redis Cluster on ports {ports} never became ok")
                time.sleep(0.1)
            yield f"redis+cluster://{_DEFAULT_HOST}:{ports[0]}"
        finally:
            _stop(servers)


def _plain_cluster_url(cluster_url: str) -> str:
    return cluster_url.replace("redis+cluster://", "redis://", 1)


@pytest.fixture
def redis_cluster_prefix(redis_cluster_url: str) -> Iterator[str]:
    """A key prefix no other test uses on the cluster; its keys are deleted after the test."""
    prefix = f"upsell-test:{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.cluster.RedisCluster.from_url(_plain_cluster_url(redis_cluster_url))
    try:
        _delete_prefix(client, prefix)
    finally:
        client.close()


@pytest.fixture
def redis_cluster_client(redis_cluster_url: str) -> RedisClusterClientFactory:
    """Open a redis.asyncio.RedisCluster client inside the running event loop."""

    @asynccontextmanager
    async def open_client() -> AsyncIterator[RedisCluster]:
        client = RedisCluster.from_url(
            _plain_cluster_url(redis_cluster_url), decode_responses=False
        )
        try:
            yield client
        finally:
            await client.aclose()

    return open_client
