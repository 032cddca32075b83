"""Reason codes: why a candidate was dropped, why a shown item is there, and their wording.

Codes are stable strings on the wire and in decision records; the enum order of
``DropReason`` is the order in which constraints run.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class DropReason(IntEnum):
    """Why a constraint removed a candidate. The value is also the constraint's run order:
    rules that need only the mirrored item master run first, so that stock is read only for
    candidates that could still be shown; rules that need stock run after the read."""

    UNKNOWN_SKU = 0  # the model knows the item, the snapshot's item master does not
    IN_BASKET = 1  # already in the basket, or the PDP item itself
    NO_CONSENT = 2  # built from customer history, and the customer did not consent
    RESTRICTED_PAIRING = 3  # its category may not be recommended with a basket category
    AGE_RESTRICTED = 4  # age-restricted, and this channel does not verify age
    EXCLUDED_VENDOR = 5  # its brand is excluded by policy
    BELOW_MARGIN_FLOOR = 6  # unit margin below the policy's absolute or percent floor
    NOT_IN_ASSORTMENT = 7  # POS: not ranged at the store and not sold for home delivery
    NO_STOCK = 8  # ATP minus safety stock does not cover the quantity at any eligible node
    SPLIT_SHIPMENT_COST = 9  # ships apart from the basket, and the extra cost breaks the floor

    @property
    def code(self) -> str:
        return self.name


class ShowReason(StrEnum):
    """Why a shown item is there: what the explanation is built from."""

    BOUGHT_TOGETHER = "BOUGHT_TOGETHER"
    MATCHES_HISTORY = "MATCHES_HISTORY"
    POPULAR = "POPULAR"
    IN_STOCK_AT_STORE = "IN_STOCK_AT_STORE"
    IN_STOCK_TO_SHIP = "IN_STOCK_TO_SHIP"
    MARGIN_FLOOR_MET = "MARGIN_FLOOR_MET"
    ON_PROMOTION = "ON_PROMOTION"
    # Lead reasons of the kinds beyond the basic three (wire names stay stable).
    COMPLETES_THE_SET = "COMPLETES_THE_SET"  # bundle
    PREMIUM_UPGRADE = "PREMIUM_UPGRADE"  # upgrade
    DUE_AGAIN = "DUE_AGAIN"  # replenish
    REPLACES_UNAVAILABLE = "REPLACES_UNAVAILABLE"  # substitute for a basket item out of stock


# Plain-language fragments, joined by the template explainer; {anchor} is the basket or PDP
# item the recommendation hangs on, {item} the recommended one.
SHOW_REASON_WORDING: dict[ShowReason, str] = {
    ShowReason.BOUGHT_TOGETHER: "Often bought with {anchor}",
    ShowReason.MATCHES_HISTORY: "Picked for you from your past orders",
    ShowReason.POPULAR: "A customer favourite",
    ShowReason.IN_STOCK_AT_STORE: "in stock at this store",
    ShowReason.IN_STOCK_TO_SHIP: "in stock to ship with your order",
    ShowReason.MARGIN_FLOOR_MET: "",
    ShowReason.ON_PROMOTION: "on promotion now",
    ShowReason.COMPLETES_THE_SET: "Completes the set with {anchor}",
    ShowReason.PREMIUM_UPGRADE: "A step up from {anchor}",
    ShowReason.DUE_AGAIN: "Time to restock an item you buy regularly",
    ShowReason.REPLACES_UNAVAILABLE: "An in-stock alternative to {anchor}",
}

DROP_REASON_WORDING: dict[DropReason, str] = {
    DropReason.UNKNOWN_SKU: "not in the current item master",
    DropReason.IN_BASKET: "already in the basket",
    DropReason.NO_CONSENT: "personalized, but the customer has not consented",
    DropReason.RESTRICTED_PAIRING: "its category may not be paired with the basket",
    DropReason.AGE_RESTRICTED: "age-restricted on a channel that does not verify age",
    DropReason.EXCLUDED_VENDOR: "vendor excluded by policy",
    DropReason.BELOW_MARGIN_FLOOR: "unit margin below the policy's floor",
    DropReason.NOT_IN_ASSORTMENT: "not ranged at this store nor sold for delivery",
    DropReason.NO_STOCK: "not enough stock above safety stock at an eligible node",
    DropReason.SPLIT_SHIPMENT_COST: "extra shipment cost takes the margin below the floor",
}
