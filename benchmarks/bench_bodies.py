"""The recommendation request body the benchmarks post for a channel and a basket's SKUs."""

from __future__ import annotations

from typing import Any


def request_body(channel: str, skus: list[str], *, limit: int = 5) -> dict[str, Any]:
    """PDP asks about the first SKU, other channels about the basket; POS at the sample's
    store, the rest in its region."""
    body: dict[str, Any] = {"channel": channel, "limit": limit}
    if channel == "pdp":
        body["sku"] = skus[0]
    else:
        body["basket"] = [{"sku": sku, "quantity": 1} for sku in skus]
    if channel == "pos":
        body["store_id"] = "S-UK"
    else:
        body["region"] = "UK"
    return body
