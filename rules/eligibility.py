"""Which fulfillment nodes may serve a request, by channel, and what shipping from each costs.

POS sells from the store itself (take-home, no shipment) and, for items sold for home
delivery, from the distribution centres of the store's region when the policy allows.
Ecommerce and the contact center ship from the nodes in the customer's region, or from every
distribution centre when no region is given or none of the nodes serves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rules.catalog import NodeTable
from rules.errors import InputError, UnknownNodeError
from rules.policy import Channel, Policy


@dataclass(frozen=True)
class EligibleNodes:
    positions: npt.NDArray[np.int64]  # node table positions; the stock arrays' columns
    take_home: npt.NDArray[np.bool_]  # per column: the POS store itself (no shipment)
    shipment_cost: npt.NDArray[np.float64]  # per column: cost of one extra shipment
    notes: tuple[str, ...]  # why the set is wider or narrower than asked, for the caller


def eligible_nodes(
    nodes: NodeTable,
    *,
    channel: Channel,
    store_id: str | None,
    region: str | None,
    policy: Policy,
) -> EligibleNodes:
    """The node positions that may fulfil a recommendation on this channel."""
    notes: tuple[str, ...] = ()
    if channel == "pos":
        if store_id is None:
            raise InputError("store_id: required on the pos channel")
        store = nodes.index.get(store_id)
        if store is None:
            raise UnknownNodeError(f"store_id: '{store_id}' is not a node in the current snapshot")
        positions = np.array([store], dtype=np.int64)
        if policy.fulfilment.pos_ships_from_region_dcs:
            region_dcs = nodes.in_region(nodes.regions[store])
            region_dcs = region_dcs[~nodes.is_store[region_dcs]]
            positions = np.concatenate([positions, region_dcs])
        take_home = positions == store
    else:
        positions = nodes.in_region(region) if region is not None else np.empty(0, np.int64)
        if region is not None and not positions.size:
            notes = (f"region '{region}' has no nodes; shipping from any distribution centre",)
        if not positions.size:
            positions = nodes.distribution_centres()
        take_home = np.zeros(len(positions), dtype=np.bool_)
    cost = np.where(take_home, 0.0, nodes.fulfillment_cost[positions])
    return EligibleNodes(positions=positions, take_home=take_home, shipment_cost=cost, notes=notes)
