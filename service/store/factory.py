"""Open the snapshot store the configuration asks for: Redis by URL, else in process.

``redis://`` / ``rediss://`` / ``unix://`` URLs open a single Redis; ``redis+cluster://host:port``
(``rediss+cluster://`` with TLS) opens Redis Cluster, discovering the other masters from that one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, cast

import hiredis
import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.typing import EncodableT

from service.settings import Settings
from service.store.base import SnapshotStore
from service.store.memory import InProcessStore
from service.store.redis_store import RedisSnapshotStore

__all__ = ["CLUSTER_SCHEMES", "HiredisPackingConnection", "open_configured_store", "open_store"]

CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# A request has 15-25 ms in all, so a Redis that does not answer must fail fast; the pipeline
# then degrades (fail closed on stock) instead of queueing requests behind a dead socket.
_CONNECT_TIMEOUT_S: Final = 1.0
_OPERATION_TIMEOUT_S: Final = 0.5
_HEALTH_CHECK_INTERVAL_S: Final = 15  # PING a pooled connection idle this long before reuse
# One quick retry on a connection error covers a pooled connection the server dropped; timeouts
# are not retried: a second 0.5 s wait would only push the request further past its deadline.
_RETRIES: Final = 1


class _HiredisPacking:
    """Pack commands with hiredis (C) instead of redis-py's pure-Python packer.

    redis-py's sync client does this when hiredis is installed; its asyncio client (8.x)
    does not, and a stock read is ~2,400 arguments: about 3 ms of Python per request, a
    tenth of that in C (benchmarks/README.md).
    """

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        head, *rest = args
        # Multi-word command names ("CONFIG GET") go as separate arguments, as in redis-py.
        if isinstance(head, str):
            names: tuple[EncodableT, ...] = tuple(head.encode().split())
        elif isinstance(head, bytes) and b" " in head:
            names = tuple(head.split())
        else:
            names = (head,)
        packed = tuple(
            bytes(arg) if isinstance(arg, bytearray | memoryview) else arg
            for arg in (*names, *rest)
        )
        try:
            # hiredis's stub types the argument as a 1-tuple; it takes any length.
            return [hiredis.pack_command(cast(Any, packed))]
        except TypeError as exc:
            raise redis.exceptions.DataError(str(exc)) from exc


class HiredisPackingConnection(_HiredisPacking, Connection):
    """A TCP connection packing with hiredis."""


class _HiredisPackingSSLConnection(_HiredisPacking, SSLConnection):
    """A TLS connection packing with hiredis."""


class _HiredisPackingUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    """A Unix socket connection packing with hiredis."""


_PACKING_CLASS: Final[dict[type[AbstractConnection], type[AbstractConnection]]] = {
    Connection: HiredisPackingConnection,
    SSLConnection: _HiredisPackingSSLConnection,
    UnixDomainSocketConnection: _HiredisPackingUnixConnection,
}


async def open_store(
    *, redis_url: str | None, prefix: str, state_dir: Path | None, keep: int
) -> SnapshotStore:
    """Redis when ``redis_url`` is set, else the in-process store (persisted under ``state_dir``).

    Never connects: a Redis that is down at start-up makes ``ping()`` False and operations
    raise StoreError, so the service can start, report not-ready and recover by itself.
    """
    if redis_url:
        scheme, separator, rest = redis_url.partition("://")
        retry = Retry(
            ExponentialBackoff(cap=0.05, base=0.01),
            _RETRIES,
            supported_errors=(redis.exceptions.ConnectionError,),
        )
        client: redis.asyncio.Redis | RedisCluster
        if separator and scheme.lower() in CLUSTER_SCHEMES:
            client = RedisCluster.from_url(
                f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}",
                decode_responses=False,  # payloads are Parquet and packed integers
                socket_connect_timeout=_CONNECT_TIMEOUT_S,
                socket_timeout=_OPERATION_TIMEOUT_S,
                health_check_interval=_HEALTH_CHECK_INTERVAL_S,
                retry=retry,
            )
        else:
            client = redis.asyncio.from_url(
                redis_url,
                decode_responses=False,
                socket_connect_timeout=_CONNECT_TIMEOUT_S,
                socket_timeout=_OPERATION_TIMEOUT_S,
                health_check_interval=_HEALTH_CHECK_INTERVAL_S,
                retry=retry,
            )
            pool = client.connection_pool
            pool.connection_class = _PACKING_CLASS.get(pool.connection_class, pool.connection_class)
        return RedisSnapshotStore(client, prefix=prefix, keep=keep)
    return InProcessStore(state_dir=state_dir, keep=keep)


async def open_configured_store(settings: Settings) -> SnapshotStore:
    """The store ``settings`` name (``UPSELL_REDIS_URL`` et al.)."""
    return await open_store(
        redis_url=settings.redis_url,
        prefix=settings.redis_prefix,
        state_dir=settings.state_dir,
        keep=settings.snapshot_keep,
    )
