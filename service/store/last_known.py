"""Last known stock: a bounded copy of the stock cells one replica read recently.

Used only under the policy setting ``stock.on_unavailable: last_known``: while the stock store
answers, every stock read is remembered here; when it cannot be read, a request is judged on
the remembered figures of its cells instead of none, the pipeline's staleness rule
(``stock.max_age_seconds``, by each figure's ``as_of``) still applies to them, and the
response says ``degraded``. A cell never read is not remembered, and reads back as not
ranged: nothing is ever recommended on stock this replica has not seen.

The copy belongs to one served snapshot version (``ServingSnapshot``): cells are keyed by the
version's catalog and node positions, and a new version starts empty. It is a ring of
``capacity`` cells (the newest reads overwrite the oldest), so remembering costs one slice
copy per request; recalling sorts the ring once after the last write and then answers by
binary search, which is what an outage (no writes) needs.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from service.store.base import StockMatrix

__all__ = ["DEFAULT_CAPACITY", "LastKnownStock"]

# ~49 bytes a cell: 200,000 cells (about 80 requests of 300 candidates x 8 nodes) are ~10 MB.
DEFAULT_CAPACITY: Final = 200_000
_EMPTY: Final = -1  # the key of a slot never written

IntArray = npt.NDArray[np.int64]


class LastKnownStock:
    """The newest figure this replica read for each of up to ``capacity`` stock cells.

    ``node_count`` is the number of nodes of the version, which keys cells as
    ``catalog position x node_count + node position``. Only the event loop calls it, and no
    method awaits, so a recall never sees half a write.
    """

    def __init__(self, *, node_count: int, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._node_count = max(node_count, 1)
        self._capacity = capacity
        self._keys = np.full(capacity, _EMPTY, np.int64)
        self._atp = np.zeros(capacity, np.int64)
        self._safety_stock = np.zeros(capacity, np.int64)
        self._inbound = np.zeros(capacity, np.int64)
        self._as_of_us = np.zeros(capacity, np.int64)
        self._ranged = np.zeros(capacity, np.bool_)
        self._head = 0  # the next slot to write
        self._index: tuple[IntArray, IntArray] | None = None  # sorted keys, their slots

    def remember(self, catalog_pos: IntArray, node_positions: IntArray, stock: StockMatrix) -> None:
        """Keep ``stock``, read for these catalog positions (rows) at these node positions."""
        keys = self._cell_keys(catalog_pos, node_positions).ravel()
        columns = (
            (self._atp, stock.atp),
            (self._safety_stock, stock.safety_stock),
            (self._inbound, stock.inbound),
            (self._as_of_us, stock.as_of_us),
            (self._ranged, stock.ranged),
        )
        count = min(keys.size, self._capacity)
        skip = keys.size - count  # a read larger than the ring keeps its last cells
        slots = (self._head + np.arange(count)) % self._capacity
        self._keys[slots] = keys[skip:]
        for stored, read in columns:
            stored[slots] = read.ravel()[skip:]
        self._head = (self._head + count) % self._capacity
        self._index = None

    def recall(
        self,
        catalog_pos: IntArray,
        node_positions: IntArray,
        *,
        skus: tuple[str, ...],
        node_ids: tuple[str, ...],
    ) -> StockMatrix:
        """The remembered figures of these cells; a cell never read is not ranged, with an
        unknown as_of (0), which no staleness limit trusts."""
        wanted = self._cell_keys(catalog_pos, node_positions)
        sorted_keys, slots = self._sorted()
        found = np.zeros(wanted.shape, np.bool_)
        slot = np.zeros(wanted.shape, np.int64)
        if sorted_keys.size:
            at = np.minimum(np.searchsorted(sorted_keys, wanted), sorted_keys.size - 1)
            found = sorted_keys[at] == wanted
            slot = slots[at]
        ranged = found & self._ranged[slot]
        return StockMatrix(
            skus=skus,
            node_ids=node_ids,
            atp=np.where(ranged, self._atp[slot], 0),
            safety_stock=np.where(ranged, self._safety_stock[slot], 0),
            inbound=np.where(ranged, self._inbound[slot], 0),
            ranged=ranged,
            as_of_us=np.where(found, self._as_of_us[slot], 0),
        )

    def _cell_keys(self, catalog_pos: IntArray, node_positions: IntArray) -> IntArray:
        rows = np.asarray(catalog_pos, np.int64)[:, np.newaxis]
        return rows * self._node_count + np.asarray(node_positions, np.int64)[np.newaxis, :]

    def _sorted(self) -> tuple[IntArray, IntArray]:
        """Each remembered key once, sorted, with the slot of its newest figure."""
        if self._index is None:
            written = np.flatnonzero(self._keys != _EMPTY)
            # Slots written longer ago are further behind the head (mod capacity).
            age = (self._head - 1 - written) % self._capacity
            order = np.lexsort((age, self._keys[written]))  # by key, newest first
            ordered = written[order]
            keys, first = np.unique(self._keys[ordered], return_index=True)
            self._index = (keys, ordered[first])
        return self._index
