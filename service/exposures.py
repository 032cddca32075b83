"""Exposures: what every response showed (or, in a holdout arm, would have shown).

The ROI report joins them with ingested orders (``service.outcomes``) to count an item as
attached when it was shown to that customer and bought within the attribution window. One
exposure per response::

    {"request_id", "at" (ISO 8601, naive UTC), "experiment", "arm", "strategy", "unit",
     "channel", "store_id", "region", "customer": keyed hash or null, "session": keyed hash
     or null, "policy", "model", "snapshot",
     "items": [{"sku", "kind", "category", "unit_price", "unit_margin", "fulfilment_cost",
                "node"}],
     "withheld": [... the same, for a holdout arm ...],
     "llm_input_tokens", "llm_output_tokens" (only when the caller knows them)}

Customer and session ids are never stored: ``Pseudonymizer`` replaces them with a keyed
BLAKE2b hash (``UPSELL_CUSTOMER_HASH_KEY``, else a random key kept in the state dir), the same
one outcome ingestion uses, so they still join.

Recording never blocks or fails a response: ``ExposureRecorder.record`` appends to a bounded
in-process buffer (full: the exposure is dropped and counted), and a background task writes
batches to the sink: a Redis stream capped near ``UPSELL_EXPOSURES_MAX_LEN`` entries (XADD
MAXLEN ~) when Redis is configured, else an append-only JSONL file under the state dir. A
failed write keeps the batch for the next flush. ``upsell exposures export`` writes them to
Parquet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
from collections import deque
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
import polars as pl
import redis.asyncio
import redis.exceptions
import structlog
from redis.asyncio.cluster import RedisCluster

from rules.errors import InputError, StoreError
from service.settings import Settings

if TYPE_CHECKING:  # the pipeline imports this module; only its types are needed here
    from service.pipeline import Recommendation, RecommendationQuery, RecommendedItem

__all__ = [
    "EXPOSURE_ITEM_SCHEMA",
    "ExposureRecorder",
    "ExposureSink",
    "FileExposureSink",
    "Pseudonymizer",
    "RedisExposureSink",
    "export_exposures",
    "exposure_item",
    "exposures_frame",
    "open_exposure_sink",
    "open_redis_client",
    "pseudonymizer_for",
]

log = structlog.get_logger(__name__)

KEY_FILE: Final = "customer_hash.key"
_KEY_BYTES: Final = 32
_DIGEST_BYTES: Final = 16
_READ_CHUNK: Final = 10_000
_FLUSH_INTERVAL_S: Final = 0.2
_BATCH: Final = 500
_RETRY_BACKOFF_S: Final = 1.0
_CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_UNREACHABLE: Final = (redis.exceptions.RedisError, OSError)

EXPOSURE_ITEM_SCHEMA: Final = pl.Struct(
    {
        "sku": pl.String(),
        "kind": pl.String(),
        "category": pl.String(),
        "unit_price": pl.Float64(),
        "unit_margin": pl.Float64(),
        "fulfilment_cost": pl.Float64(),
        "node": pl.String(),
    }
)
EXPOSURE_SCHEMA: Final = pl.Schema(
    {
        "request_id": pl.String(),
        "at": pl.Datetime("us"),
        "experiment": pl.String(),
        "arm": pl.String(),
        "strategy": pl.String(),
        "unit": pl.String(),
        "channel": pl.String(),
        "store_id": pl.String(),
        "region": pl.String(),
        "customer": pl.String(),
        "session": pl.String(),
        "policy": pl.String(),
        "model": pl.String(),
        "snapshot": pl.String(),
        "items": pl.List(EXPOSURE_ITEM_SCHEMA),
        "withheld": pl.List(EXPOSURE_ITEM_SCHEMA),
        "llm_input_tokens": pl.Int64(),
        "llm_output_tokens": pl.Int64(),
    }
)


# -- pseudonyms ---------------------------------------------------------------------------


class Pseudonymizer:
    """Keyed hash of customer and session ids: stable for one key, useless without it."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise InputError("UPSELL_CUSTOMER_HASH_KEY: at least 16 bytes are needed")
        self._key = hashlib.blake2b(key, digest_size=32).digest()

    def __call__(self, value: str) -> str:
        return hashlib.blake2b(
            value.encode("utf-8"), key=self._key, digest_size=_DIGEST_BYTES
        ).hexdigest()

    def many(self, values: Sequence[str | None]) -> list[str | None]:
        return [None if value is None else self(value) for value in values]


def pseudonymizer_for(settings: Settings) -> Pseudonymizer:
    """The configured key, else the state dir's key file (created, mode 0600, on first use).

    Several replicas or hosts must share one key (set ``UPSELL_CUSTOMER_HASH_KEY``), or their
    exposures will not join the orders.
    """
    if settings.customer_hash_key is not None:
        return Pseudonymizer(settings.customer_hash_key.get_secret_value().encode("utf-8"))
    path = settings.state_dir / KEY_FILE
    try:
        return Pseudonymizer(bytes.fromhex(path.read_text("ascii").strip()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable customer hash key: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(_KEY_BYTES)
    try:
        # O_EXCL: when two processes start at once, one key wins and both read it.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return Pseudonymizer(bytes.fromhex(path.read_text("ascii").strip()))
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(key.hex())
    log.info("customer_hash_key_created", path=str(path))
    return Pseudonymizer(key)


# -- sinks ----------------------------------------------------------------------------------


class ExposureSink(Protocol):
    async def write(self, lines: Sequence[bytes]) -> None:
        """Append serialized exposures; raise StoreError when they were not written."""

    def read(self) -> AsyncIterator[list[bytes]]:
        """Every stored exposure, oldest first, in chunks."""

    async def close(self) -> None: ...


class FileExposureSink:
    """Append-only JSONL. Each batch is one ``write(2)`` on an O_APPEND descriptor, so
    processes sharing the file never interleave within a line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def write(self, lines: Sequence[bytes]) -> None:
        payload = b"".join(line + b"\n" for line in lines)
        try:
            await asyncio.to_thread(self._append, payload)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot append exposures: {exc.strerror}") from exc

    def _append(self, payload: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, payload)
        finally:
            os.close(descriptor)

    async def read(self) -> AsyncIterator[list[bytes]]:
        if not self.path.exists():
            return
        chunk: list[bytes] = []
        with self.path.open("rb") as handle:
            for line in handle:
                # A line without its newline is a write cut short (a crash): not an exposure.
                if line.endswith(b"\n") and len(line) > 1:
                    chunk.append(line[:-1])
                if len(chunk) >= _READ_CHUNK:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    async def close(self) -> None:
        return None


AnyRedis = redis.asyncio.Redis | RedisCluster


def open_redis_client(url: str) -> AnyRedis:
    """A client for ``url``; ``redis+cluster://`` opens Redis Cluster (as the snapshot store)."""
    scheme, separator, rest = url.partition("://")
    if separator and scheme.lower() in _CLUSTER_SCHEMES:
        return RedisCluster.from_url(
            f"{_CLUSTER_SCHEMES[scheme.lower()]}://{rest}",
            decode_responses=False,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
        )
    return redis.asyncio.from_url(
        url, decode_responses=False, socket_connect_timeout=1.0, socket_timeout=2.0
    )


class RedisExposureSink:
    """A Redis stream trimmed near ``max_len`` entries (exported before they age out)."""

    def __init__(self, client: AnyRedis, *, prefix: str, max_len: int) -> None:
        self._client = client
        self.key = f"{prefix}:exposures"
        self._max_len = max_len

    async def write(self, lines: Sequence[bytes]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for line in lines:
                    pipe.xadd(self.key, {"e": line}, maxlen=self._max_len, approximate=True)
                await pipe.execute()
        except _UNREACHABLE as exc:
            raise StoreError(f"Redis stream {self.key}: {exc}") from exc

    async def read(self) -> AsyncIterator[list[bytes]]:
        start = "-"
        while True:
            try:
                entries = await self._client.xrange(self.key, min=start, count=_READ_CHUNK)
            except _UNREACHABLE as exc:
                raise StoreError(f"Redis stream {self.key}: {exc}") from exc
            if not entries:
                return
            # decode_responses=False: ids and values are bytes (the stubs allow str too).
            yield [_as_bytes(fields[b"e"]) for _, fields in entries if fields]
            if len(entries) < _READ_CHUNK:
                return
            start = "(" + _as_bytes(entries[-1][0]).decode("ascii")

    async def close(self) -> None:
        await self._client.aclose()


def _as_bytes(value: bytes | str | None) -> bytes:
    if isinstance(value, bytes):
        return value
    if value is None:
        raise StoreError("Redis returned an exposure without its payload")
    return value.encode("utf-8")


def open_exposure_sink(settings: Settings) -> ExposureSink:
    """Redis when ``UPSELL_REDIS_URL`` is set, else ``<state_dir>/exposures/exposures.jsonl``.

    Never connects here: a Redis that is down makes writes fail and the recorder retry.
    """
    if settings.redis_url:
        return RedisExposureSink(
            open_redis_client(settings.redis_url),
            prefix=settings.redis_prefix,
            max_len=settings.exposures_max_len,
        )
    return FileExposureSink(settings.state_dir / "exposures" / "exposures.jsonl")


# -- the recorder ---------------------------------------------------------------------------


def exposure_item(item: RecommendedItem) -> dict[str, object]:
    return {
        "sku": item.sku,
        "kind": item.kind,
        "category": item.category,
        "unit_price": item.unit_price,
        "unit_margin": item.unit_margin,
        "fulfilment_cost": item.score_parts.fulfilment_cost,
        "node": item.fulfillment_node,
    }


class ExposureRecorder:
    """A bounded buffer in front of a sink, flushed by a background task."""

    def __init__(
        self,
        sink: ExposureSink,
        pseudonymize: Pseudonymizer,
        *,
        capacity: int,
        batch_size: int = _BATCH,
        flush_interval_s: float = _FLUSH_INTERVAL_S,
    ) -> None:
        self.sink = sink
        self._pseudonymize = pseudonymize
        self._capacity = capacity
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._buffer: deque[dict[str, Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.recorded = 0
        self.written = 0
        self.dropped = 0
        self.failed_writes = 0

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def record(
        self,
        query: RecommendationQuery,
        result: Recommendation,
        *,
        now: datetime,
        llm_tokens: tuple[int, int] | None = None,
    ) -> None:
        """Queue the exposure of one response; never raises, never waits."""
        if len(self._buffer) >= self._capacity:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("exposures_dropped", dropped=self.dropped, capacity=self._capacity)
            return
        assignment = result.experiment
        exposure: dict[str, Any] = {
            "request_id": result.request_id,
            "at": now.isoformat(timespec="microseconds"),
            "experiment": assignment.experiment if assignment else None,
            "arm": assignment.arm if assignment else None,
            "strategy": assignment.strategy if assignment else None,
            "unit": assignment.unit if assignment else None,
            "channel": result.channel,
            "store_id": query.store_id,
            "region": query.region,
            "customer": self._pseudonym(query.customer_id),
            "session": self._pseudonym(query.session_id),
            "policy": result.versions.policy,
            "model": result.versions.model,
            "snapshot": result.versions.snapshot,
            "items": [exposure_item(item) for item in result.items],
            "withheld": [exposure_item(item) for item in result.withheld],
        }
        if llm_tokens is not None:
            exposure["llm_input_tokens"], exposure["llm_output_tokens"] = llm_tokens
        self._buffer.append(exposure)
        self.recorded += 1
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    def _pseudonym(self, value: str | None) -> str | None:
        return None if value is None else self._pseudonymize(value)

    def start(self) -> None:
        """Start the background flush (inside the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # The flag, not only the cancellation, ends the loop: on Python 3.11 wait_for can
        # swallow a cancel that lands as the wait completes, and close() would wait forever.
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._flush_interval_s)
            self._wake.clear()
            if self._stopping:
                return
            if not await self.flush() and not self._stopping:
                await asyncio.sleep(_RETRY_BACKOFF_S)

    async def flush(self) -> bool:
        """Write everything buffered; False when the sink failed (the batch stays queued)."""
        while self._buffer:
            batch = [self._buffer[i] for i in range(min(self._batch_size, len(self._buffer)))]
            try:
                await self.sink.write([orjson.dumps(exposure) for exposure in batch])
            except StoreError as exc:
                self.failed_writes += 1
                log.warning("exposures_write_failed", error=str(exc), pending=len(self._buffer))
                return False
            for _ in batch:
                self._buffer.popleft()
            self.written += len(batch)
        return True

    async def close(self, *, timeout_s: float = 5.0) -> None:
        """Stop the task, write what is left (within ``timeout_s``), close the sink."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            # Let a write in flight finish: cancelled mid-write, the batch would stay queued
            # though the sink may have it (a file write in its thread always completes), and
            # the flush below would store it twice. Cancelled only past the timeout.
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=timeout_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), timeout=timeout_s)
        except TimeoutError:
            log.warning("exposures_lost_at_shutdown", pending=len(self._buffer))
        if self._buffer:
            log.warning("exposures_lost_at_shutdown", pending=len(self._buffer))
        await self.sink.close()


# -- reading and export ---------------------------------------------------------------------


async def exposures_frame(sink: ExposureSink) -> pl.DataFrame:
    """Every stored exposure as one frame in ``EXPOSURE_SCHEMA`` (items as lists of structs)."""
    records: list[dict[str, Any]] = []
    async for chunk in sink.read():
        records.extend(orjson.loads(line) for line in chunk)
    if not records:
        return pl.DataFrame(schema=EXPOSURE_SCHEMA)
    as_read = pl.Schema({**EXPOSURE_SCHEMA, "at": pl.String()})
    frame = pl.DataFrame(
        [{name: record.get(name) for name in as_read} for record in records], schema=as_read
    )
    return frame.with_columns(pl.col("at").str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="us"))


async def export_exposures(sink: ExposureSink, path: Path) -> int:
    """Write every stored exposure to a Parquet file (by rename: whole or not at all)."""
    if path.suffix.lower() != ".parquet":
        raise InputError(f"{path}: the export is Parquet: name the file *.parquet")
    frame = await exposures_frame(sink)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    frame.write_parquet(partial)
    partial.replace(path)
    return frame.height
