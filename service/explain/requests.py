"""``ExplanationRequest``s from the mirrored catalog: what the request path and
``upsell explain warm`` both build, so that both address the same cache entries.

A request carries product facts (name, category, brand, price) and the decision's reason
codes: never anything about the customer, whose basket is seen only as the anchor product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from rules.catalog import Catalog
from rules.policy import Channel
from rules.reasons import ShowReason
from service.explain.base import ExplanationRequest

__all__ = ["ANCHORED_KINDS", "explanation_request", "item_facts"]

# Kinds whose explanation is about the anchor product ("goes with X", "a step up from X").
# The others (popular, personal, replenish) are explained without one, so their text is
# cached once per item instead of once per basket they happen to appear in.
ANCHORED_KINDS: Final = frozenset({"cross_sell", "bundle", "upgrade", "substitute"})


def item_facts(catalog: Catalog, position: int, *, price: float) -> dict[str, str]:
    """The facts an explanation may state about the item at ``position``."""
    facts = {
        "category": catalog.categories[int(catalog.category_code[position])],
        # As the response shows it: a number the text states must match one the shopper sees.
        "price": f"{price:.2f}",
    }
    brand = catalog.brands[position]
    if brand:
        facts["brand"] = brand
    return facts


def explanation_request(
    catalog: Catalog,
    *,
    item_position: int,
    anchor_position: int | None,
    kind: str,
    channel: Channel,
    locale: str,
    reasons: Sequence[ShowReason],
    price: float,
) -> ExplanationRequest:
    """The explanation request for one shown item (``kind`` is the wire kind)."""
    anchor = anchor_position if kind in ANCHORED_KINDS else None
    return ExplanationRequest(
        item_sku=catalog.skus[item_position],
        item_name=catalog.names[item_position],
        kind=kind,
        channel=channel,
        locale=locale,
        reasons=tuple(reasons),
        anchor_sku=catalog.skus[anchor] if anchor is not None else None,
        anchor_name=catalog.names[anchor] if anchor is not None else None,
        facts=item_facts(catalog, item_position, price=price),
    )
