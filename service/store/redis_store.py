"""The Redis snapshot store: one versioned copy of the ERP snapshot, shared by every replica.

Works on a single Redis and on Redis Cluster (hand in ``redis.asyncio.RedisCluster``).

Key layout (``<p>`` is the prefix, ``<v>`` a version id: a 16-hex content hash). Keys in
braces share a hash tag, so that each multi-key operation stays on one Cluster slot::

    {<p>}:snap:current            STRING  the version readers use
    {<p>}:snap:history            LIST    retained version ids, newest publish first
    {<p>}:snap:<v>:meta           STRING  SnapshotMeta as JSON (service.store.codec)
    {<p>}:snap:<v>:items          STRING  the items frame as Parquet
    {<p>}:snap:<v>:nodes          STRING  the nodes frame as Parquet
    {<p>}:snap:previous           STRING  "<v> <ms>": the version the last flip left, and when
    {<p>}:inv:log                 STREAM  delta chunks with new ids, for replay at a flip
    {<p>}:inv:ids                 HASH    delta_id -> "<log entry id> <fingerprint>": the ledger
    <p>:snap:<v>:atp:{<node_id>}  HASH    sku -> b"<atp>,<ss>,<inbound>[,<as_of_us>[,<delta_id>]]"
    <p>:snap:<v>:chg:{<node_id>}  STREAM  per apply call, the cells it wrote: c = sku NUL cell ...

The control keys (pointers, history, metas, tables, delta log, ledger) share the slot of
``{<p>}``: the pointer flip checks the target's meta and moves history and pointer in one
script, and one script checks a chunk's ids against the ledger, logs it and reads the
pointers. Each node's stock hash has a slot of its own (tagged by node id, the same tag in
every version), so stock spreads over the Cluster's masters. A stock cell without
``as_of_us`` has its version's ``as_of``; a cell set by a snapshot row with its own
``as_of`` carries it, and a cell set by a delta carries its ``as_of`` and its ``delta_id``
(the cell's place in the (as_of, delta_id) order of ``service.store.deltas``). A ledger
fingerprint is the first 16 hex digits of the sha1 of the delta's figures (sku, node, atp,
safety stock, inbound, as_of_us, NUL-joined).

Reading stock
    One pipelined round trip: the meta (existence; ``as_of`` the first time) and the read
    script, which takes the request's SKUs as one NUL-joined argument and answers, per node
    hash, one string of its values for them, NUL-joined. On a single Redis one call covers
    every node (keys of other slots are fine outside Cluster); on Cluster there is a call
    per slot (per node hash), and the pipeline goes to every master holding one at once.
    The client so packs one copy of the SKUs instead of one per node, and gets a string per
    node instead of an object per cell; numpy parses all of them in one pass. Small node
    hashes (listpack-encoded, up to 512 fields by default) are read with one HGETALL each
    inside the script: HMGET on a listpack scans the whole hash once per field asked.

    Measured (issue 7) by replaying the request path's reads of the bundled sample (~300
    SKUs x 2 nodes, node hashes of ~330 SKUs: listpack), old and new back to back on one
    Redis, a loaded 2-core box: per read, client CPU 1.1-1.2 -> 0.6 ms, Redis CPU 1.4-1.6 ->
    0.5 ms, p50 2.6-3.0 -> 1.1-1.2 ms; the same SKUs at 16 nodes: client CPU 5.5 -> 1.8 ms,
    Redis CPU 12 -> 3.4 ms. On large hashes (hash tables, ~40k SKUs a node) the script costs
    Redis more than bare HMGETs did, Lua converting every reply value (about +15% at 16
    nodes, +45% at 2, in a side measurement); the client saves more than that. Before, a
    single Redis took plain HMGETs packed by hiredis (``open_store`` still hands in a
    connection packing with hiredis: publishing and deltas send many arguments too).

Publishing ``<v>``
    1. Encode everything (Parquet, packed stock) before the first write, so a snapshot that
       cannot be encoded writes nothing.
    2. Write the version's keys in pipelined chunks (stock as one Lua call per 1,000 cells,
       again to keep packing off the client), ``meta`` last, then verify them (every key
       present, every stock hash holding at least the expected number of SKUs). If
       content-identical ``<v>`` is already whole, only its meta is rewritten.
    3. Replay the delta log onto ``<v>`` (deltas as new as its rows or newer; see Deltas).
    4. Flip: one script checks that ``<v>``'s meta exists, moves ``<v>`` to the front of
       history and sets ``current``. This is the commit point: a reader following
       ``current`` always finds a whole version.
    5. Replay the log entries that arrived since step 3 (see Deltas), then prune history
       past ``keep`` (sparing current and the rollback target): history entry first, then
       keys; and trim the delta log and the ledger to what retained versions can still take.

    A failure before the flip leaves ``current`` untouched and deletes, best effort, what
    this publish created (unless ``current`` names it after all: a flip whose reply was
    lost). A failure in step 5's replay raises StoreError saying the version is current but
    may miss deltas that raced the flip (applying them again fixes it); a failure while
    pruning is only logged.

Deltas
    ``apply_deltas`` checks the batch against the current version's items and nodes, then
    per chunk of at most 2,000 deltas: one script on the control slot checks each id against
    the ledger (taken with the same figures: a replay; with others: ``conflict``), appends
    the deltas with new ids to the log and records them in the ledger, and reads ``current``
    and the previous pointer (atomically); then one script per slot applies the chunk's
    deltas of that slot to ``current``'s stock hashes, each placed against its cell by
    (as_of, delta_id) (``service.store.deltas``). Replayed ids go to their cells too: if an
    earlier attempt was recorded and logged but died before applying, this applies them
    (reported ``applied``); otherwise the cell holds them or something newer (``duplicate``).
    A chunk is atomic per slot: on a single Redis the whole chunk, on Cluster each node's
    share. Every replica reads stock from here at each request, so an applied delta reaches
    all of them at once; or, with a stock mirror (``service.stock_mirror``), from the change
    stream each apply call appends its new cells to (``<p>:snap:<v>:chg:{<node_id>}``, one
    per stock hash, same slot, entries kept ``STOCK_CHANGES_RETENTION_MS``).

    Replicas follow the pointer within ``UPSELL_SNAPSHOT_REFRESH_SECONDS`` plus the time to
    load the new master, and until then read the stock of the version they serve. So for a
    minute after a flip, each chunk is also applied to the version the flip left (same
    slots: the tag is the node id; same round trip; outcomes not reported): a sell-out
    posted just after a publish or a rollback reaches lagging replicas at once too.

    A flip must not lose a delta that raced it. The publisher replays the log up to entry X
    onto the new version, flips, then replays the entries after X. An applier logs first and
    reads ``current`` in the same script: if its entry is at or before X, the first replay has
    it; if after X but before the flip, the second; if after the flip, it reads the new
    ``current`` and applies to the new version itself. So a full snapshot supersedes every
    delta older than its rows, and deltas as new as its rows or newer survive the flip.
    Replay starts an hour before the version's ``as_of`` (arrival time is the stream id; the
    hour allows for clocks out of step), and the log is trimmed by the same rule against the
    oldest retained version: a rollback replays too.

    Retention: at each publish the log is trimmed to entries that arrived at most an hour
    before the oldest retained version's ``as_of``, and the ledger forgets the ids of the
    entries trimmed (one HSCAN pass over it, after the flip, off the request path). Between
    publishes both grow with the deltas (the log also has a fuse of a million entries).

Outages
    Every call is bounded by the client's socket timeouts and raises StoreError when Redis
    does not answer. After such a failure (timeout, refused or broken connection; not an
    error reply) calls fail at once for half a second, then one call
    at a time probes Redis until one succeeds (``ping`` always asks): during an outage a
    request that makes several calls pays one timeout, not one per call, and the client's
    pool reconnects by itself when Redis is back (scripts are reloaded on NOSCRIPT).

One publisher at a time is assumed (the CLI, or an admin endpoint): two concurrent publishers
cannot corrupt a version (ids are content hashes) but may race on the pointer; a rollback
refuses to move a pointer that moved under it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

import numpy as np
import polars as pl
import redis.asyncio
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.data.schema import SnapshotData
from rules.errors import SnapshotNotFoundError, StoreError
from rules.staleness import epoch_us
from service.store.base import DeltaReport, SnapshotMaster, SnapshotMeta, StockMatrix
from service.store.codec import (
    build_meta,
    check_publishable,
    decode_frame,
    decode_meta,
    encode_frame,
    encode_meta,
    previous_version,
    snapshot_version,
    versions_to_prune,
)
from service.store.deltas import (
    FIELD_SEPARATOR,
    DeltaBatch,
    DeltaOutcome,
    check_delta_references,
    decode_log_payload,
    encode_log_payload,
)
from service.store.stock_cells import parse_stock_cells

__all__ = ["AnyRedis", "RedisSnapshotStore"]

AnyRedis = redis.asyncio.Redis | RedisCluster

_log = structlog.get_logger(__name__)

_CELLS_PER_WRITE: Final = 1_000  # stock cells per write script call (bounds Redis's time in it)
_COMMANDS_PER_ROUND_TRIP: Final = 64  # bounds client memory per pipeline while publishing
_DELTAS_PER_CHUNK: Final = 2_000  # deltas per log entry and per apply script call
_LOG_ENTRIES_PER_READ: Final = 200
_LOG_MAX_ENTRIES: Final = 1_000_000  # a memory fuse only; trimming by age is the rule
_REPLAY_MARGIN_MS: Final = 3_600_000  # arrival (stream id) may precede as_of by clock skew
# For this long after a flip, deltas also go to the version flipped from: replicas follow the
# pointer within UPSELL_SNAPSHOT_REFRESH_SECONDS plus the time to load a master, and read
# stock of the version they serve meanwhile.
_LAGGING_REPLICA_GRACE_MS: Final = 60_000
# Change streams (one per stock hash, what in-process mirrors follow) keep this much: a
# mirror that was away longer loads the hashes again anyway.
STOCK_CHANGES_RETENTION_MS: Final = 600_000
_CHANGES_PER_READ: Final = 1_000
_CELLS_PER_SCAN: Final = 2_000  # stock cells per HSCAN step of a mirror's load
_LEDGER_ENTRIES_PER_SCAN: Final = 1_000
_KEYS_PER_SCAN: Final = 1_000
_CACHED_VERSIONS: Final = 8
_MAX_ERROR_DETAIL: Final = 400
_GLOB_SPECIALS: Final = frozenset("*?[]\\")
_SEPARATOR: Final = FIELD_SEPARATOR.encode()
# After Redis fails to answer, calls fail at once for this long (one probe at a time after).
_FAIL_FAST_SECONDS: Final = 0.5
# Failures that mean "Redis did not answer", as opposed to an answer we did not like.
_UNREACHABLE: Final = (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError)

_Command = tuple[str | bytes | int, ...]

# Split on a one-character separator, keeping empty fields (string.gmatch would drop them).
_LUA_SPLIT: Final = """
local function split(text, separator)
  local parts, start = {}, 1
  while true do
    local stop = string.find(text, separator, start, true)
    if not stop then
      parts[#parts + 1] = string.sub(text, start)
      return parts
    end
    parts[#parts + 1] = string.sub(text, start, stop - 1)
    start = stop + 1
  end
end
"""

# KEYS: stock hashes. ARGV[1]: SKUs joined by NUL. Returns, per key, its values joined by NUL
# ('' for a SKU not ranged there): one bulk string per key, so the client builds a handful of
# objects, not one per cell, and parses them with numpy (_parse_cells).
# HMGET on a listpack-encoded hash (a small one: up to hash-max-listpack-entries fields; a
# ziplist before Redis 7) scans
# the whole hash for each field asked; for more than a few SKUs one HGETALL pass into a Lua
# table is cheaper (a 333-SKU node, 300 asked: about a third of the Redis CPU). Large hashes
# are hash tables, where HMGET is a lookup per field.
# unpack() is bounded by Lua's C stack: 4,000 at a time.
_READ_STOCK: Final = (
    _LUA_SPLIT
    + """
local skus = split(ARGV[1], '\\0')
local count = #skus
local replies = {}
for k = 1, #KEYS do
  local values = {}
  local encoding = count >= 16 and redis.call('OBJECT', 'ENCODING', KEYS[k])
  if encoding == 'listpack' or encoding == 'ziplist' then
    local flat = redis.call('HGETALL', KEYS[k])
    local cells = {}
    for i = 1, #flat, 2 do cells[flat[i]] = flat[i + 1] end
    for i = 1, count do values[i] = cells[skus[i]] or '' end
  else
    for first = 1, count, 4000 do
      local last = math.min(first + 3999, count)
      local got = redis.call('HMGET', KEYS[k], unpack(skus, first, last))
      for i = 1, last - first + 1 do values[first + i - 1] = got[i] or '' end
    end
  end
  replies[k] = table.concat(values, '\\0')
end
return replies
"""
)

# KEYS[1]: a stock hash. ARGV[1]: sku, value, sku, value, ... joined by NUL. Returns HLEN.
_WRITE_CELLS: Final = (
    _LUA_SPLIT
    + """
local fields = split(ARGV[1], '\\0')
for first = 1, #fields, 2000 do
  redis.call('HSET', KEYS[1], unpack(fields, first, math.min(first + 1999, #fields)))
end
return redis.call('HLEN', KEYS[1])
"""
)

# Byte order, whatever the server's locale (Lua's '<' on strings uses strcoll, and Redis sets
# LC_COLLATE from its environment): the order of delta ids must be the same everywhere.
_LUA_BYTES_AFTER: Final = """
local function bytes_after(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end
"""

# KEYS: stock hashes (one slot), then their change streams in the same order. ARGV[1]: the
# version's as_of_us (cells without their own).
# ARGV[2]: per delta, key index, sku, atp, safety stock, inbound ('' = keep), as_of_us and
# delta id, joined by NUL, sorted by as_of. Returns one letter per delta: a(pplied),
# d(uplicate: the cell holds this delta), c(onflict: another id at the same as_of sorts
# after it), s(tale). The order is (as_of, delta id), a snapshot row's id '' before all.
# ARGV[3]: how long (ms) a change stream keeps its entries. Each hash written to gets one
# change stream entry, field 'c': sku, new cell, sku, new cell, ... joined by NUL (what
# in-process stock mirrors follow, service.stock_mirror).
# Decides everything before writing anything, so a corrupt cell fails the call whole.
_APPLY_DELTAS: Final = (
    _LUA_SPLIT
    + _LUA_BYTES_AFTER
    + """
local hashes = #KEYS / 2
local base = tonumber(ARGV[1])
local fields = split(ARGV[2], '\\0')
local cells, writes, order, outcomes = {}, {}, {}, {}
for first = 1, #fields - 6, 7 do
  local key_index = tonumber(fields[first])
  local key = KEYS[key_index]
  local sku = fields[first + 1]
  local id = key .. '\\0' .. sku
  local cell = cells[id]
  if cell == nil then
    local raw = redis.call('HGET', key, sku)
    if raw then
      local atp, ss, inb, at, by = string.match(raw, '^(%d+),(%d+),(%d+),(%-?%d+),([^,]+)$')
      if not atp then
        atp, ss, inb, at = string.match(raw, '^(%d+),(%d+),(%d+),(%-?%d+)$')
      end
      if not atp then
        atp, ss, inb = string.match(raw, '^(%d+),(%d+),(%d+)$')
      end
      if not atp then
        return redis.error_reply('UPSELL stock payload at ' .. key .. ' field ' .. sku ..
          ' does not decode: ' .. raw)
      end
      cell = {as_of = at and tonumber(at) or base, by = by or '', ss = ss, inb = inb}
    else
      cell = {as_of = nil, by = '', ss = '0', inb = '0'}
    end
    cells[id] = cell
  end
  local as_of_text, delta_id = fields[first + 5], fields[first + 6]
  local as_of = tonumber(as_of_text)
  if cell.as_of == nil or as_of > cell.as_of or
      (as_of == cell.as_of and bytes_after(delta_id, cell.by)) then
    local ss, inb = fields[first + 3], fields[first + 4]
    if ss == '' then ss = cell.ss end
    if inb == '' then inb = cell.inb end
    cell.as_of, cell.by, cell.ss, cell.inb = as_of, delta_id, ss, inb
    if writes[id] == nil then order[#order + 1] = id end
    writes[id] = {key, sku,
      fields[first + 2] .. ',' .. ss .. ',' .. inb .. ',' .. as_of_text .. ',' .. delta_id,
      key_index}
    outcomes[#outcomes + 1] = 'a'
  elseif as_of == cell.as_of and delta_id == cell.by then
    outcomes[#outcomes + 1] = 'd'
  elseif as_of == cell.as_of then
    outcomes[#outcomes + 1] = 'c'
  else
    outcomes[#outcomes + 1] = 's'
  end
end
local changed = {}
for _, id in ipairs(order) do
  local write = writes[id]
  redis.call('HSET', write[1], write[2], write[3])
  local list = changed[write[4]]
  if list == nil then
    list = {}
    changed[write[4]] = list
  end
  list[#list + 1] = write[2]
  list[#list + 1] = write[3]
end
if #order > 0 then
  local now = redis.call('TIME')
  local oldest_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) -
    tonumber(ARGV[3])
  for index, list in pairs(changed) do
    redis.call('XADD', KEYS[index + hashes], 'MINID', '~', tostring(math.max(oldest_ms, 0)),
      '*', 'c', table.concat(list, '\\0'))
  end
end
return table.concat(outcomes)
"""
)

# KEYS: the delta log, the pointer, the ledger of delta ids, the previous pointer.
# ARGV: the chunk (service.store.deltas log payload: 7 fields per delta), max log entries,
# and how long after a flip (ms) the version flipped from still gets deltas.
# Per delta one letter: n(ew id), d(taken before with the same figures: a replay),
# c(taken before with other figures). Only new ids are logged, and recorded in the ledger
# with their log entry and a fingerprint of their figures. Recording, logging and reading
# the pointers in one script is what makes both idempotence and replay at a flip complete.
# Returns {log entry id or '', current or '', letters, version flipped from or ''}.
_LOG_DELTAS: Final = (
    _LUA_SPLIT
    + """
local fields = split(ARGV[1], '\\0')
local letters, fresh, fresh_ids, prints = {}, {}, {}, {}
for first = 1, #fields - 6, 7 do
  local id = fields[first]
  local print = string.sub(redis.sha1hex(table.concat(fields, '\\0', first + 1, first + 6)), 1, 16)
  local taken = redis.call('HGET', KEYS[3], id)
  if taken then
    if string.sub(taken, -16) == print then
      letters[#letters + 1] = 'd'
    else
      letters[#letters + 1] = 'c'
    end
  else
    letters[#letters + 1] = 'n'
    for i = first, first + 6 do fresh[#fresh + 1] = fields[i] end
    fresh_ids[#fresh_ids + 1] = id
    prints[#prints + 1] = print
  end
end
local entry = ''
if #fresh_ids > 0 then
  entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
    'd', table.concat(fresh, '\\0'), 'n', #fresh_ids)
  for i, id in ipairs(fresh_ids) do
    redis.call('HSET', KEYS[3], id, entry .. ' ' .. prints[i])
  end
end
local lagging = ''
local previous = redis.call('GET', KEYS[4])
if previous then
  local version, flipped_ms = string.match(previous, '^(%S+) (%d+)$')
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if version and now_ms - tonumber(flipped_ms) <= tonumber(ARGV[3]) then lagging = version end
end
return {entry, redis.call('GET', KEYS[2]) or '', table.concat(letters), lagging}
"""
)

# KEYS: pointer, history, the target's meta, the previous pointer. ARGV: target, 'publish' |
# 'rollback', and for a rollback the version current is expected to be (compare and set).
# The previous pointer records the version flipped from and when (server clock, ms).
_FLIP: Final = """
if redis.call('EXISTS', KEYS[3]) == 0 then
  return redis.error_reply('UPSELL cannot point at ' .. ARGV[1] .. ': ' .. KEYS[3] .. ' is gone')
end
local current = redis.call('GET', KEYS[1]) or ''
if ARGV[2] == 'publish' then
  redis.call('LREM', KEYS[2], 0, ARGV[1])
  redis.call('LPUSH', KEYS[2], ARGV[1])
elseif current ~= ARGV[3] then
  return redis.error_reply('UPSELL current moved from ' .. ARGV[3] .. ' to ' .. current ..
    ' during the rollback')
end
if current ~= '' and current ~= ARGV[1] then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('SET', KEYS[4], current .. ' ' .. now_ms)
end
redis.call('SET', KEYS[1], ARGV[1])
return 'OK'
"""


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


_SCRIPTS: Final = {
    name: _Script.of(source)
    for name, source in (
        ("read_stock", _READ_STOCK),
        ("write_cells", _WRITE_CELLS),
        ("apply_deltas", _APPLY_DELTAS),
        ("log_deltas", _LOG_DELTAS),
        ("flip", _FLIP),
    )
}
_OUTCOME_BY_LETTER: Final = {
    "a": DeltaOutcome.APPLIED,
    "d": DeltaOutcome.DUPLICATE,
    "c": DeltaOutcome.CONFLICT,
    "s": DeltaOutcome.STALE,
}


@dataclass(frozen=True)
class _EncodedSnapshot:
    """Everything a publish writes, encoded before the first write."""

    meta: SnapshotMeta
    items: bytes
    nodes: bytes
    node_ids: tuple[str, ...]  # every node of the snapshot; stock keys exist for a subset
    stock_payloads: pl.DataFrame  # node_id, payload: NUL-joined sku/value pairs, <= 1,000 cells
    stock_counts: dict[str, int]  # node_id -> SKUs in its stock hash
    refs: _VersionRefs


@dataclass(frozen=True, eq=False)
class _VersionRefs:
    """What deltas for a version are checked against, and its base as_of."""

    skus: pl.Series
    node_ids: pl.Series
    as_of_us: int


class RedisSnapshotStore:
    """A SnapshotStore in Redis or Redis Cluster; see the module docstring for the protocol.

    The store owns ``client`` (``close()`` closes it). The client must return bytes
    (``decode_responses=False``): payloads are Parquet and packed integers, not text. The
    prefix may not hold braces: it is the control keys' hash tag.
    """

    def __init__(self, client: AnyRedis, *, prefix: str = "upsell", keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if client.get_encoder().decode_responses:
            raise ValueError("RedisSnapshotStore needs a client with decode_responses=False")
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be non-empty and without braces, got {prefix!r}")
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._prefix = prefix
        self._keep = keep
        self._refs_cache: OrderedDict[str, _VersionRefs] = OrderedDict()
        self._as_of_cache: dict[str, int] = {}  # version -> as_of_us, for reading stock
        # Fail-fast state (see _redis_errors); only the event loop thread touches it.
        self._unreachable_since: float | None = None
        self._fail_fast_until = 0.0
        self._probing = False
        self._last_unreachable = ""
        self._follow_client: redis.asyncio.Redis | None = None  # blocking change reads
        # Called with (operation, seconds, failed) after each Redis operation: the metrics.
        self.observe: Callable[[str, float, bool], None] | None = None

    def __repr__(self) -> str:
        kind = "cluster" if self._cluster else "single"
        return f"RedisSnapshotStore({kind}, prefix={self._prefix!r}, keep={self._keep})"

    # -- keys -----------------------------------------------------------------------------

    def _control_key(self, *parts: str) -> str:
        return ":".join((f"{{{self._prefix}}}", *parts))

    @property
    def _current_key(self) -> str:
        return self._control_key("snap", "current")

    @property
    def _history_key(self) -> str:
        return self._control_key("snap", "history")

    @property
    def _log_key(self) -> str:
        return self._control_key("inv", "log")

    @property
    def _ledger_key(self) -> str:
        return self._control_key("inv", "ids")

    @property
    def _previous_key(self) -> str:
        return self._control_key("snap", "previous")

    def _meta_key(self, version: str) -> str:
        return self._control_key("snap", version, "meta")

    def _table_key(self, version: str, table: str) -> str:
        return self._control_key("snap", version, table)

    def _stock_key(self, version: str, node_id: str) -> str:
        return f"{self._prefix}:snap:{version}:atp:{{{node_id}}}"

    def _stock_changes_key(self, version: str, node_id: str) -> str:
        return f"{self._prefix}:snap:{version}:chg:{{{node_id}}}"

    # -- SnapshotStore --------------------------------------------------------------------

    async def publish(self, snapshot: SnapshotData) -> SnapshotMeta:
        """Write a new version whole, then point ``current`` at it; keep older versions."""
        encoded = await asyncio.to_thread(_encode, snapshot)
        version = encoded.meta.version
        with self._redis_errors("publish"):
            current = await self._get_current()
            # EXISTS first: a new version (the usual case) costs one command, not a full check.
            already_whole = bool(
                await self._client.exists(self._meta_key(version))
            ) and await self._is_whole(version, encoded)
            try:
                if already_whole:
                    await self._client.set(self._meta_key(version), encode_meta(encoded.meta))
                else:
                    await self._write_version(encoded)
                    if not await self._is_whole(version, encoded):
                        raise StoreError(
                            f"publish of snapshot {version} did not verify: keys of "
                            f"{self._meta_key(version)} are missing or incomplete after writing"
                        )
                self._remember_refs(version, encoded.refs)
                replayed_up_to = await self._replay_log(version, encoded.refs, start=None)
                await self._flip(version, mode="publish", expected=None)
            except BaseException:
                if not already_whole and version != current:
                    await self._discard_partial(version, encoded.node_ids)
                raise
            await self._catch_up(version, encoded.refs, after=replayed_up_to)
        await self._prune_best_effort(current=version)
        return encoded.meta

    async def current_version(self) -> str | None:
        """The version readers should use, or None when nothing was ever published."""
        with self._redis_errors("current_version"):
            return await self._get_current()

    async def versions(self) -> list[SnapshotMeta]:
        """Retained versions, newest publish first."""
        with self._redis_errors("versions"):
            history = await self._get_history()
            return await self._metas(history)

    async def rollback(self) -> SnapshotMeta:
        """Point ``current`` at the version published before it; SnapshotNotFoundError if none.

        Deltas newer than the target's rows are replayed onto it around the flip, as when
        publishing.
        """
        with self._redis_errors("rollback"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self._current_key)
                pipe.lrange(self._history_key, 0, -1)
                raw_current, raw_history = await pipe.execute()
            current = None if raw_current is None else _text(raw_current, key=self._current_key)
            history = [_text(raw, key=self._history_key) for raw in raw_history]
            target = previous_version(history, current)
            if target is None:
                raise SnapshotNotFoundError(
                    f"nothing to roll back to under {self._control_key('snap')}: current is "
                    f"{current}, history is {history}"
                )
            metas = await self._metas([target])
            if not metas:
                raise SnapshotNotFoundError(
                    f"cannot roll back to snapshot {target}: {self._meta_key(target)} is gone"
                )
            refs = await self._refs(target)
            replayed_up_to = await self._replay_log(target, refs, start=None)
            await self._flip(target, mode="rollback", expected=current or "")
            await self._catch_up(target, refs, after=replayed_up_to)
            return metas[0]

    async def load_master(self, version: str) -> SnapshotMaster:
        """Items and nodes of a version, for mirroring in process."""
        with self._redis_errors("load_master"):
            return await self._load_master(version)

    async def _load_master(self, version: str) -> SnapshotMaster:
        keys = (
            self._meta_key(version),
            self._table_key(version, "items"),
            self._table_key(version, "nodes"),
        )
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            raw_meta, raw_items, raw_nodes = await pipe.execute()
        if raw_meta is None:
            raise SnapshotNotFoundError(f"snapshot version {version} does not exist ({keys[0]})")
        meta = decode_meta(raw_meta, source=keys[0])
        frames = []
        for key, payload in zip(keys[1:], (raw_items, raw_nodes), strict=True):
            if payload is None:
                raise StoreError(f"snapshot {version} is incomplete: {key} is missing")
            # Off the event loop: a million-SKU master takes a noticeable time to decode.
            frames.append(await asyncio.to_thread(decode_frame, payload, source=key))
        items, nodes = frames
        return SnapshotMaster(meta=meta, items=items, nodes=nodes)

    async def read_stock(
        self, version: str, skus: Sequence[str], node_ids: Sequence[str]
    ) -> StockMatrix:
        """Stock of ``skus`` at ``node_ids``: one pipelined round trip (see the module doc)."""
        stock_keys = [self._stock_key(version, node_id) for node_id in node_ids]
        # EXISTS rides along so a pruned or unknown version is an error, not "no stock"; the
        # first read of a version GETs the meta instead, for its as_of (which never changes).
        cached_as_of_us = self._as_of_cache.get(version)
        commands: list[_Command] = [
            ("EXISTS" if cached_as_of_us is not None else "GET", self._meta_key(version))
        ]
        groups = self._slot_groups(stock_keys) if skus else []
        if groups:
            joined_skus = FIELD_SEPARATOR.join(skus)
            if joined_skus.count(FIELD_SEPARATOR) != len(skus) - 1:
                raise StoreError("cannot read stock: a SKU contains a NUL character")
            commands += [
                (*self._script_call("read_stock", [stock_keys[i] for i in group]), joined_skus)
                for group in groups
            ]
        with self._redis_errors("read_stock"):
            meta_reply, *group_replies = await self._execute(commands)
        if not meta_reply:
            raise SnapshotNotFoundError(f"snapshot version {version} does not exist")
        if cached_as_of_us is not None:
            base_as_of_us = cached_as_of_us
        else:
            meta = decode_meta(meta_reply, source=self._meta_key(version))
            base_as_of_us = epoch_us(meta.as_of)
            if len(self._as_of_cache) >= _CACHED_VERSIONS:
                self._as_of_cache.clear()
            self._as_of_cache[version] = base_as_of_us
        replies: list[bytes] = [b""] * len(stock_keys)
        for group, group_reply in zip(groups, group_replies, strict=True):
            for position, reply in zip(group, group_reply, strict=True):
                replies[position] = bytes(reply)
        return _stock_matrix(skus, node_ids, replies, stock_keys, base_as_of_us=base_as_of_us)

    # -- following stock changes (service.stock_mirror) -------------------------------------

    @property
    def follows_stock_changes(self) -> bool:
        """Whether a stock mirror can follow this store: on a single Redis. (On Cluster one
        blocking XREAD cannot cover every node's change stream: they lie on other slots.)"""
        return not self._cluster

    async def stock_change_ids(self, version: str, node_ids: Sequence[str]) -> list[bytes]:
        """Per node, the id of its change stream's last entry (``b"0-0"``: none yet), read
        before its cells: whatever a scan of the cells reads after this, the entries after
        these ids are the writes the scan may have missed (see ``scan_stock_cells``)."""
        if self._cluster:
            raise StoreError("stock mirrors follow a single Redis, not Redis Cluster")
        with self._redis_errors("stock_change_ids"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.exists(self._meta_key(version))
                for node_id in node_ids:
                    pipe.xrevrange(self._stock_changes_key(version, node_id), count=1)
                exists, *lasts = await pipe.execute()
        if not exists:
            raise SnapshotNotFoundError(f"snapshot version {version} does not exist")
        return [bytes(last[0][0]) if last else b"0-0" for last in lasts]

    async def scan_stock_cells(
        self, version: str, node_id: str, cursor: int, *, count: int = _CELLS_PER_SCAN
    ) -> tuple[int, dict[bytes, bytes]]:
        """One HSCAN step over a node's stock hash: (the next cursor, 0 when done; sku ->
        cell as stored). A scan returns every cell present throughout, some maybe twice, each
        as it was when its step ran; a change during the scan is in the change stream after
        the id ``stock_change_ids`` read first, so replaying from there makes the copy whole.
        Small steps keep each reply short: a worker loading 1.6 million cells goes on
        answering requests between them."""
        with self._redis_errors("scan_stock_cells"):
            next_cursor, cells = await self._client.hscan(
                self._stock_key(version, node_id), cursor=cursor, count=count
            )
        return int(next_cursor), cast(dict[bytes, bytes], cells)  # decode_responses=False

    async def stock_changes(
        self,
        version: str,
        node_ids: Sequence[str],
        after: Sequence[bytes],
        *,
        block_ms: int,
        count: int = _CHANGES_PER_READ,
    ) -> list[tuple[int, bytes, list[bytes]]]:
        """Change stream entries of ``version``'s stock hashes after the ids ``after`` (one
        per node), waiting up to ``block_ms`` for the first: per node with news, (its index in
        ``node_ids``, the last entry id, each entry's payload: sku, cell, sku, cell, ...
        joined by NUL), at most ``count`` entries a node. Empty when nothing changed in that
        time."""
        client = self._follower(block_ms)
        keys = [self._stock_changes_key(version, node_id) for node_id in node_ids]
        index_of = {key.encode(): index for index, key in enumerate(keys)}
        # A long poll, not refused while calls fail fast: its answer is what ends that.
        with self._redis_errors("stock_changes", probe=True):
            reply: list[Any] = await client.xread(  # type: ignore[assignment]
                dict(zip(keys, after, strict=True)), count=count, block=block_ms
            )
        news = []
        for raw_key, entries in reply or ():  # RESP2: [[key, [(id, fields), ...]], ...]
            if entries:
                payloads = [bytes(fields.get(b"c", b"")) for _, fields in entries]
                news.append((index_of[bytes(raw_key)], bytes(entries[-1][0]), payloads))
        return news

    def _follower(self, block_ms: int) -> redis.asyncio.Redis:
        """A client of its own for blocking reads: the shared pool's socket timeout is
        shorter than a block, and a blocked read must not hold a request's connection."""
        if self._follow_client is None:
            if isinstance(self._client, RedisCluster):
                raise StoreError("stock mirrors follow a single Redis, not Redis Cluster")
            pool = self._client.connection_pool
            kwargs = dict(pool.connection_kwargs)
            # Generous: the mirror's freshness is judged by when Redis last answered, not by
            # this; a timeout here only means a reconnect (and a reload).
            kwargs["socket_timeout"] = (kwargs.get("socket_timeout") or 1.0) + 2 + block_ms / 1000
            self._follow_client = redis.asyncio.Redis(
                connection_pool=redis.asyncio.ConnectionPool(
                    connection_class=pool.connection_class, max_connections=4, **kwargs
                )
            )
        return self._follow_client

    async def apply_deltas(self, batch: DeltaBatch) -> DeltaReport:
        """Check the batch against the current version, then per chunk: check the ids against
        the ledger and log the new ones, then apply them (see the module docstring)."""
        deltas = batch.with_as_of_us().sort("as_of_us", maintain_order=True)
        with self._redis_errors("apply_deltas"):
            current = await self._get_current()
            if current is None:
                raise SnapshotNotFoundError(
                    "no snapshot is published: deltas change a snapshot's stock, so publish "
                    "one first"
                )
            refs = await self._refs(current)
        check_delta_references(batch, known_skus=refs.skus, known_node_ids=refs.node_ids)
        outcomes: list[DeltaOutcome] = [DeltaOutcome.SKIPPED] * len(batch)
        target = current
        with self._redis_errors("apply_deltas"):
            for start in range(0, deltas.height, _DELTAS_PER_CHUNK):
                chunk = deltas.slice(start, _DELTAS_PER_CHUNK)
                keys = [self._log_key, self._current_key, self._ledger_key, self._previous_key]
                (logged,) = await self._execute(
                    [
                        (
                            *self._script_call("log_deltas", keys),
                            encode_log_payload(chunk),
                            _LOG_MAX_ENTRIES,
                            _LAGGING_REPLICA_GRACE_MS,
                        )
                    ]
                )
                _, raw_target, raw_letters, raw_lagging = logged
                target = _text(raw_target, key=self._current_key) or current
                letters = _text(raw_letters, key=f"log_deltas reply for {self._ledger_key}")
                if len(letters) != chunk.height:
                    raise StoreError(
                        f"log_deltas answered {len(letters)} outcomes for {chunk.height} deltas"
                    )
                target_refs = refs if target == current else await self._refs(target)
                lagging = await self._lagging(
                    _text(raw_lagging, key=self._previous_key), target=target
                )
                # Ids taken before with other figures change nothing. Ids taken with the same
                # figures go to the cells again: if an earlier attempt logged them and died
                # before applying, this applies them; else the cell says it holds them.
                retried = [letter != "c" for letter in letters]
                to_apply = chunk.filter(pl.Series(retried))
                cell_outcomes = iter(
                    await self._apply_to_version(target, target_refs, to_apply, also=lagging)
                )
                positions = chunk.get_column("position").to_list()
                for position, letter in zip(positions, letters, strict=True):
                    if letter == "c":
                        outcomes[position] = DeltaOutcome.CONFLICT
                        continue
                    cell = next(cell_outcomes)
                    taken = letter == "d" and cell is not DeltaOutcome.APPLIED
                    outcomes[position] = DeltaOutcome.DUPLICATE if taken else cell
        return DeltaReport(version=target, outcomes=tuple(outcomes))

    async def _lagging(self, version: str, *, target: str) -> tuple[str, _VersionRefs] | None:
        """The version flipped from moments ago, which replicas may still serve, with its
        refs; None when there is none (or it is gone: pruned, or never whole)."""
        if not version or version == target:
            return None
        try:
            return version, await self._refs(version)
        except SnapshotNotFoundError:
            return None

    @property
    def client(self) -> AnyRedis:
        """The store's client, for other caches on the same Redis (still the store's to close)."""
        return self._client

    async def ping(self) -> bool:
        """True when Redis (every Cluster node) answers PING within the client's timeouts.

        Always asks Redis, even while other calls fail fast: readiness must tell the truth,
        and a PONG ends the fail-fast period at once.
        """
        try:
            with self._redis_errors("ping", probe=True):
                return bool(await self._client.ping())
        except StoreError:
            return False

    async def close(self) -> None:
        """Close the client and its connection pool(s)."""
        if self._follow_client is not None:
            await self._follow_client.aclose()
            await self._follow_client.connection_pool.aclose()
        await self._client.aclose()

    # -- scripts and pipelines ------------------------------------------------------------

    def _script_call(self, name: str, keys: Sequence[str]) -> _Command:
        return ("EVALSHA", _SCRIPTS[name].sha, len(keys), *keys)

    async def _execute(
        self, commands: Sequence[_Command], *, errors_from: int | None = None
    ) -> list[Any]:
        """Run ``commands`` in one pipeline; load the scripts once if Redis lost them.

        An error reply raises, except one of a command at ``errors_from`` or after, which
        comes back as its reply (the exception) for the caller to weigh.
        """
        for attempt in (1, 2):
            async with self._client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(reply, NoScriptError) for reply in replies):
                # A restarted or flushed Redis (or a new Cluster master) has no scripts yet.
                # SCRIPT LOAD goes to every master on Cluster.
                for script in _SCRIPTS.values():
                    await self._client.script_load(script.source)
                continue
            for reply in replies[:errors_from]:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        raise AssertionError("unreachable")

    def _slot_groups(self, keys: Sequence[str]) -> list[list[int]]:
        """Positions of ``keys`` grouped so that each group may go to one script call."""
        if not self._cluster:
            return [list(range(len(keys)))] if keys else []
        groups: dict[int, list[int]] = {}
        for position, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(position)
        return list(groups.values())

    # -- publishing -----------------------------------------------------------------------

    async def _write_version(self, encoded: _EncodedSnapshot) -> None:
        version = encoded.meta.version
        payloads = encoded.stock_payloads
        data_commands = itertools.chain(
            [
                ("SET", self._table_key(version, "items"), encoded.items),
                ("SET", self._table_key(version, "nodes"), encoded.nodes),
            ],
            (
                (*self._script_call("write_cells", [self._stock_key(version, node_id)]), payload)
                for node_id, payload in zip(
                    payloads.get_column("node_id").to_list(),
                    payloads.get_column("payload").to_list(),
                    strict=True,
                )
            ),
        )
        await self._run_chunked(data_commands)
        # Meta last and on its own: it only exists once every data write has succeeded, and
        # it is what readers (and a republish) check first.
        await self._client.set(self._meta_key(version), encode_meta(encoded.meta))

    async def _run_chunked(self, commands: Iterable[_Command]) -> None:
        iterator = iter(commands)
        while batch := list(itertools.islice(iterator, _COMMANDS_PER_ROUND_TRIP)):
            await self._execute(batch)

    async def _is_whole(self, version: str, encoded: _EncodedSnapshot) -> bool:
        """Every key of ``version`` present and each stock hash at least the expected size
        (deltas may have ranged more SKUs in a version published before)."""
        stock_nodes = list(encoded.stock_counts)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.exists(
                self._meta_key(version),
                self._table_key(version, "items"),
                self._table_key(version, "nodes"),
            )
            for node_id in stock_nodes:
                pipe.hlen(self._stock_key(version, node_id))
            present, *sizes = await pipe.execute()
        return bool(present == 3) and all(
            size >= encoded.stock_counts[node_id]
            for node_id, size in zip(stock_nodes, sizes, strict=True)
        )

    async def _flip(self, version: str, *, mode: str, expected: str | None) -> None:
        keys = [self._current_key, self._history_key, self._meta_key(version), self._previous_key]
        await self._execute([(*self._script_call("flip", keys), version, mode, expected or "")])

    async def _discard_partial(self, version: str, node_ids: Sequence[str]) -> None:
        """Best effort after a failed publish: delete what it wrote, unless the pointer names
        it after all (a flip whose reply was lost) or that cannot be told (Redis gone): stray
        keys cost memory, deleting the current version would cost every stock read."""
        self._refs_cache.pop(version, None)
        try:
            if await self._get_current() == version:
                return
            await self._client.lrem(self._history_key, 0, version)
            await self._unlink(self._version_keys(version, node_ids))
        except (RedisError, RedisClusterException, OSError, StoreError) as exc:
            _log.warning(
                "snapshot_partial_cleanup_failed",
                version=version,
                prefix=self._prefix,
                error=str(exc),
            )

    async def _prune_best_effort(self, *, current: str) -> None:
        """Drop versions past ``keep`` and old delta log entries; a failure here costs
        memory, not the publish."""
        try:
            history = await self._get_history()
            stale = versions_to_prune(history, current=current, keep=self._keep)
            if stale:
                async with self._client.pipeline(transaction=False) as pipe:
                    # History first: versions() must never list a version whose keys are going.
                    for version in stale:
                        pipe.lrem(self._history_key, 0, version)
                    await pipe.execute()
                for version in stale:
                    self._refs_cache.pop(version, None)
                    await self._unlink(await self._keys_of(version))
            retained = await self._metas([v for v in history if v not in stale])
            if retained:
                oldest_ms = min(epoch_us(meta.as_of) for meta in retained) // 1_000
                cutoff_ms = max(oldest_ms - _REPLAY_MARGIN_MS, 0)
                await self._client.xtrim(self._log_key, minid=cutoff_ms, approximate=True)
                await self._trim_ledger(cutoff_ms)
        except (RedisError, RedisClusterException, OSError, StoreError) as exc:
            _log.warning(
                "snapshot_prune_failed", current=current, prefix=self._prefix, error=str(exc)
            )

    async def _trim_ledger(self, cutoff_ms: int) -> None:
        """Forget delta ids logged before ``cutoff_ms``, the delta log's own cut: an id is
        remembered as long as the log keeps its delta."""
        forgotten: list[bytes] = []
        async for field, value in self._client.hscan_iter(
            self._ledger_key, count=_LEDGER_ENTRIES_PER_SCAN
        ):
            # value: b"<log entry id: ms-seq> <fingerprint>"
            logged_ms = value.split(b"-", 1)[0]
            if not logged_ms.isdigit() or int(logged_ms) < cutoff_ms:
                forgotten.append(field)
        for start in range(0, len(forgotten), _LEDGER_ENTRIES_PER_SCAN):
            await self._client.hdel(
                self._ledger_key, *forgotten[start : start + _LEDGER_ENTRIES_PER_SCAN]
            )

    async def _keys_of(self, version: str) -> list[str]:
        """A retained version's keys, via its nodes frame; SCAN if that frame is unreadable."""
        nodes_key = self._table_key(version, "nodes")
        payload = await self._client.get(nodes_key)
        if isinstance(payload, bytes):
            try:
                node_ids = decode_frame(payload, source=nodes_key).get_column("node_id")
                return self._version_keys(version, [str(n) for n in node_ids.to_list()])
            except (StoreError, pl.exceptions.PolarsError) as exc:
                _log.warning("snapshot_nodes_unreadable_scanning", key=nodes_key, error=str(exc))
        keys = []
        for pattern in (
            _glob_escape(self._control_key("snap", version)) + ":*",
            _glob_escape(f"{self._prefix}:snap:{version}") + ":*",
        ):
            keys += [
                key.decode() if isinstance(key, bytes) else str(key)
                async for key in self._client.scan_iter(match=pattern, count=_KEYS_PER_SCAN)
            ]
        return keys

    def _version_keys(self, version: str, node_ids: Iterable[str]) -> list[str]:
        return [
            self._meta_key(version),
            self._table_key(version, "items"),
            self._table_key(version, "nodes"),
            *(
                key
                for node_id in node_ids
                for key in (
                    self._stock_key(version, node_id),
                    self._stock_changes_key(version, node_id),
                )
            ),
        ]

    async def _unlink(self, keys: Sequence[str]) -> None:
        # One key per UNLINK: multi-key commands would need every key in one Cluster slot.
        await self._run_chunked(("UNLINK", key) for key in keys)

    # -- deltas ---------------------------------------------------------------------------

    async def _apply_to_version(
        self,
        version: str,
        refs: _VersionRefs,
        deltas: pl.DataFrame,
        *,
        also: tuple[str, _VersionRefs] | None = None,
    ) -> list[DeltaOutcome]:
        """Apply log-column deltas (sorted by as_of) to ``version``; outcomes in row order.

        ``also`` names another version (the one just flipped from, which lagging replicas
        still read) that gets the same deltas in the same round trip; its outcomes are not
        reported. Deltas naming a SKU or node a version does not know are skipped there: they
        were checked against another version (a flip raced them), and a stock key for an
        unknown node would outlive the version's pruning.
        """
        commands, command_rows, outcomes = self._apply_commands(version, refs, deltas)
        if also is not None:
            commands += self._apply_commands(*also, deltas)[0]
        if not commands:
            return outcomes
        # The first replies are the target's. A failure on ``also`` (a corrupt cell in a
        # version on its way out) is logged, not raised: it must not block the current one.
        replies = await self._execute(commands, errors_from=len(command_rows))
        failed = [reply for reply in replies[len(command_rows) :] if isinstance(reply, Exception)]
        if failed and also is not None:
            _log.warning(
                "lagging_version_deltas_failed", version=also[0], error=str(failed[0])[:400]
            )
        for indexes, letters in zip(command_rows, replies[: len(command_rows)], strict=True):
            text = _text(letters, key=f"apply_deltas reply for {version}")
            if len(text) != len(indexes):
                raise StoreError(
                    f"apply_deltas answered {len(text)} outcomes for {len(indexes)} deltas"
                )
            for index, letter in zip(indexes, text, strict=True):
                outcomes[index] = _OUTCOME_BY_LETTER[letter]
        return outcomes

    def _apply_commands(
        self, version: str, refs: _VersionRefs, deltas: pl.DataFrame
    ) -> tuple[list[_Command], list[list[int]], list[DeltaOutcome]]:
        """The apply script calls for ``version`` (one per slot), the delta rows each call
        decides, and the outcomes so far (SKIPPED for deltas the version does not know)."""
        known = (
            deltas.select(
                (
                    pl.col("sku").is_in(refs.skus.implode())
                    & pl.col("node_id").is_in(refs.node_ids.implode())
                ).alias("known")
            )
            .get_column("known")
            .to_list()
        )
        outcomes = [DeltaOutcome.SKIPPED] * deltas.height
        rows = [
            (index, row)
            for index, (row, is_known) in enumerate(
                zip(deltas.iter_rows(named=True), known, strict=True)
            )
            if is_known
        ]
        if not rows:
            return [], [], outcomes
        node_ids = sorted({row["node_id"] for _, row in rows})
        stock_keys = [self._stock_key(version, node_id) for node_id in node_ids]
        # node id -> (its group, its 1-based index among the group's KEYS)
        group_of_node: dict[str, tuple[int, int]] = {}
        groups = self._slot_groups(stock_keys)
        for group_number, group in enumerate(groups):
            for key_index, position in enumerate(group, start=1):
                group_of_node[node_ids[position]] = (group_number, key_index)
        per_group: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for index, row in rows:
            per_group.setdefault(group_of_node[row["node_id"]][0], []).append((index, row))
        commands: list[_Command] = []
        command_rows: list[list[int]] = []
        for group_number, group_rows in per_group.items():
            keys = [stock_keys[position] for position in groups[group_number]]
            fields: list[str] = []
            for _, row in group_rows:
                fields += [
                    str(group_of_node[row["node_id"]][1]),
                    row["sku"],
                    str(row["atp"]),
                    "" if row["safety_stock"] is None else str(row["safety_stock"]),
                    "" if row["inbound"] is None else str(row["inbound"]),
                    str(row["as_of_us"]),
                    row["delta_id"],
                ]
            change_keys = [
                self._stock_changes_key(version, node_ids[position])
                for position in groups[group_number]
            ]
            commands.append(
                (
                    *self._script_call("apply_deltas", [*keys, *change_keys]),
                    str(refs.as_of_us),
                    FIELD_SEPARATOR.join(fields),
                    STOCK_CHANGES_RETENTION_MS,
                )
            )
            command_rows.append([index for index, _ in group_rows])
        return commands, command_rows, outcomes

    async def _replay_log(self, version: str, refs: _VersionRefs, *, start: str | None) -> str:
        """Apply logged deltas newer than ``version``'s rows onto it, reading the log from
        ``start`` (an XRANGE bound; None: an hour before the version's as_of). Returns the
        bound to continue from: after the last entry read, or ``start`` if there was none.
        """
        if start is None:
            start = f"{max(refs.as_of_us // 1_000 - _REPLAY_MARGIN_MS, 0)}-0"
        frames = []
        while True:
            # redis-py types XRANGE loosely; with decode_responses=False it returns
            # [(id bytes, {field bytes: value bytes})].
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await self._client.execute_command(
                "XRANGE", self._log_key, start, "+", "COUNT", _LOG_ENTRIES_PER_READ
            )
            for raw_id, fields in entries:
                entry_id = _text(raw_id, key=self._log_key)
                frames.append(
                    decode_log_payload(fields.get(b"d", b""), source=f"{self._log_key} {entry_id}")
                )
                start = f"({entry_id}"
            if len(entries) < _LOG_ENTRIES_PER_READ:
                break
        if frames:
            # Only deltas at least as new as the version's as_of can beat one of its rows.
            newer = pl.concat(frames).filter(pl.col("as_of_us") >= refs.as_of_us)
            if newer.height:
                ordered = newer.sort("as_of_us", maintain_order=True)
                for start_row in range(0, ordered.height, _DELTAS_PER_CHUNK):
                    await self._apply_to_version(
                        version, refs, ordered.slice(start_row, _DELTAS_PER_CHUNK)
                    )
        return start

    async def _catch_up(self, version: str, refs: _VersionRefs, *, after: str) -> None:
        """The replay after a flip; the flip has happened, so a failure is worth shouting."""
        try:
            await self._replay_log(version, refs, start=after)
        except (RedisError, RedisClusterException, OSError, StoreError) as exc:
            raise StoreError(
                f"snapshot {version} is current, but deltas logged while the pointer flipped "
                f"may be missing from it: apply them again (deltas are idempotent) or publish "
                f"again. Cause: {type(exc).__name__}: {exc}"
            ) from exc

    def _remember_refs(self, version: str, refs: _VersionRefs) -> None:
        self._refs_cache[version] = refs
        self._refs_cache.move_to_end(version)
        while len(self._refs_cache) > _CACHED_VERSIONS:
            self._refs_cache.popitem(last=False)

    async def _refs(self, version: str) -> _VersionRefs:
        """SKUs, nodes and as_of of a version (cached: a version's content never changes)."""
        cached = self._refs_cache.get(version)
        if cached is not None:
            self._refs_cache.move_to_end(version)
            return cached
        master = await self._load_master(version)
        refs = _VersionRefs(
            skus=master.items.get_column("sku"),
            node_ids=master.nodes.get_column("node_id"),
            as_of_us=epoch_us(master.meta.as_of),
        )
        self._remember_refs(version, refs)
        return refs

    # -- reading --------------------------------------------------------------------------

    async def _get_current(self) -> str | None:
        raw = await self._client.get(self._current_key)
        return None if raw is None else _text(raw, key=self._current_key)

    async def _get_history(self) -> list[str]:
        raw_history = await self._client.lrange(self._history_key, 0, -1)
        return [_text(raw, key=self._history_key) for raw in raw_history]

    async def _metas(self, versions: Sequence[str]) -> list[SnapshotMeta]:
        """Metas of ``versions`` in order, skipping any whose meta key is gone."""
        if not versions:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for version in versions:
                pipe.get(self._meta_key(version))
            payloads = await pipe.execute()
        return [
            decode_meta(payload, source=self._meta_key(version))
            for version, payload in zip(versions, payloads, strict=True)
            if payload is not None
        ]

    @contextmanager
    def _redis_errors(self, operation: str, *, probe: bool = False) -> Iterator[None]:
        """Redis failures become StoreError naming the operation and where Redis is.

        Also the fail-fast gate: once Redis has not answered (a timeout, a refused or broken
        connection), calls fail at once for _FAIL_FAST_SECONDS instead of each waiting out
        its socket timeout, then one call at a time probes Redis until one succeeds. A
        request path making several calls (mirror check, stock reads) thus costs one
        timeout per period during an outage, not one per call. ``probe`` (ping) always asks.
        """
        probing = False
        if not probe:
            since = self._unreachable_since
            if since is not None:
                if self._probing or time.monotonic() < self._fail_fast_until:
                    raise StoreError(
                        f"redis snapshot store {operation} failed ({self._where()}, prefix "
                        f"{self._prefix!r}): Redis has not answered for "
                        f"{time.monotonic() - since:.1f}s, failing fast until it does "
                        f"(last: {self._last_unreachable})"
                    )
                self._probing = probing = True
        started = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        except (RedisError, RedisClusterException, OSError) as exc:
            # redis-py quotes the failing command in pipeline errors, payload included (a
            # Parquet blob, a thousand stock cells): keep the message a log line.
            detail = str(exc)
            if len(detail) > _MAX_ERROR_DETAIL:
                detail = f"{detail[:_MAX_ERROR_DETAIL]}... ({len(detail)} chars)"
            if isinstance(exc, _UNREACHABLE):
                now = time.monotonic()
                if self._unreachable_since is None:
                    self._unreachable_since = now
                self._fail_fast_until = now + _FAIL_FAST_SECONDS
                self._last_unreachable = f"{type(exc).__name__}: {detail}"
            raise StoreError(
                f"redis snapshot store {operation} failed ({self._where()}, prefix "
                f"{self._prefix!r}): {type(exc).__name__}: {detail}"
            ) from exc
        else:
            self._unreachable_since = None
        finally:
            if probing:
                self._probing = False
            if self.observe is not None:
                self.observe(operation, time.perf_counter() - started, failed)

    def _where(self) -> str:
        if isinstance(self._client, RedisCluster):
            nodes = self._client.nodes_manager.startup_nodes.values()
            return "cluster " + ",".join(f"{node.host}:{node.port}" for node in nodes)
        kwargs: dict[str, Any] = self._client.connection_pool.connection_kwargs
        if kwargs.get("path"):
            return f"unix:{kwargs['path']}"
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def _text(raw: bytes | str, *, key: str) -> str:
    """A version id (or short reply) from ``key``; StoreError naming the key if not ASCII."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise StoreError(f"value at {key} does not decode: {raw!r}") from exc


def _encode(snapshot: SnapshotData) -> _EncodedSnapshot:
    """Everything a publish writes; runs in a worker thread (hashing, Parquet, payloads)."""
    check_publishable(snapshot)
    for table, frame, column in (
        ("items", snapshot.items, "sku"),
        ("inventory", snapshot.inventory, "sku"),
        ("inventory", snapshot.inventory, "node_id"),
    ):
        with_nul = frame.select(pl.col(column).str.contains(FIELD_SEPARATOR, literal=True).any())
        if with_nul.item():
            raise StoreError(f"cannot publish: {table}.{column} holds a NUL character")
    version = snapshot_version(snapshot)
    base_as_of_us = epoch_us(snapshot.as_of)
    inventory = snapshot.inventory
    counts = pl.format("{},{},{}", "atp", "safety_stock", "inbound")
    if "as_of" in inventory.columns:
        row_as_of = pl.col("as_of").dt.epoch("us")
        # A row as of the snapshot's as_of (the usual case) stores no as_of of its own.
        packed = (
            pl.when(row_as_of.is_null() | (row_as_of == base_as_of_us))
            .then(counts)
            .otherwise(pl.format("{},{}", counts, row_as_of))
        )
    else:
        packed = counts
    stock_payloads = (
        inventory.select(
            pl.col("node_id"),
            (pl.int_range(pl.len()).over("node_id") // _CELLS_PER_WRITE).alias("chunk"),
            pl.concat_str([pl.col("sku"), packed], separator=FIELD_SEPARATOR).alias("cell"),
        )
        .group_by("node_id", "chunk", maintain_order=True)
        .agg(pl.col("cell").str.join(FIELD_SEPARATOR).alias("payload"))
        .select("node_id", "payload")
    )
    stock_counts = inventory.group_by("node_id").len()
    return _EncodedSnapshot(
        meta=build_meta(snapshot, version=version, published_at=datetime.now(UTC)),
        items=encode_frame(snapshot.items, table="items"),
        nodes=encode_frame(snapshot.nodes, table="nodes"),
        node_ids=tuple(str(n) for n in snapshot.nodes.get_column("node_id").to_list()),
        stock_payloads=stock_payloads,
        stock_counts=dict(
            zip(
                stock_counts.get_column("node_id").to_list(),
                stock_counts.get_column("len").to_list(),
                strict=True,
            )
        ),
        refs=_VersionRefs(
            skus=snapshot.items.get_column("sku"),
            node_ids=snapshot.nodes.get_column("node_id"),
            as_of_us=base_as_of_us,
        ),
    )


def _stock_matrix(
    skus: Sequence[str],
    node_ids: Sequence[str],
    replies: Sequence[bytes],
    stock_keys: Sequence[str],
    *,
    base_as_of_us: int,
) -> StockMatrix:
    """Script replies (per node, its values for ``skus`` joined by NUL; empty = not ranged) as
    StockMatrix arrays.

    All replies are parsed together in one compiled pass (``parse_stock_cells``).
    Only replies that fail to parse are looked at cell by cell, to name the key and SKU.
    """
    sku_count, node_count = len(skus), len(node_ids)
    values = np.zeros((node_count * sku_count, 4), np.int64)
    values[:, 3] = base_as_of_us
    ranged = np.zeros(node_count * sku_count, np.bool_)
    if sku_count and node_count:
        # Node-major, every cell followed by a NUL.
        packed = _SEPARATOR.join(replies) + _SEPARATOR
        parsed = parse_stock_cells(packed, node_count * sku_count, base_as_of_us=base_as_of_us)
        if parsed is None:
            raise _undecodable_stock(skus, replies, stock_keys)
        values, ranged = parsed
    by_sku = values.reshape(node_count, sku_count, 4).transpose(1, 0, 2)
    return StockMatrix(
        skus=tuple(skus),
        node_ids=tuple(node_ids),
        atp=np.ascontiguousarray(by_sku[:, :, 0]),
        safety_stock=np.ascontiguousarray(by_sku[:, :, 1]),
        inbound=np.ascontiguousarray(by_sku[:, :, 2]),
        ranged=np.ascontiguousarray(ranged.reshape(node_count, sku_count).T),
        as_of_us=np.ascontiguousarray(by_sku[:, :, 3]),
    )


def _undecodable_stock(
    skus: Sequence[str], replies: Sequence[bytes], stock_keys: Sequence[str]
) -> StoreError:
    for key, reply in zip(stock_keys, replies, strict=True):
        cells = reply.split(_SEPARATOR)
        if len(cells) != len(skus):
            return StoreError(f"stock reply for {key} has {len(cells)} values for {len(skus)} SKUs")
        for sku, raw in zip(skus, cells, strict=True):
            if raw and parse_stock_cells(raw + _SEPARATOR, 1, base_as_of_us=0) is None:
                return StoreError(f"stock payload at {key} field {sku!r} does not decode: {raw!r}")
    return StoreError(f"stock payloads at {list(stock_keys)} do not decode")


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join(f"\\{char}" if char in _GLOB_SPECIALS else char for char in text)
