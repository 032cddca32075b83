"""Template explanations: deterministic text built from an item's kind and reason codes.

Always available and fast (a few dictionary look-ups and one ``str.format``); the fallback
whenever LLM text cannot be had in time, and the only text when no API key is set.

A sentence is a lead, set by the item's kind (``cross_sell``, ``upgrade``, ...), then the
other reasons as clauses: "Often bought with X; in stock to ship with your order.". A kind
this module does not know leads with its lead reason instead, as before kinds had wording.

Locales: ``en`` (the wording in ``rules.reasons``) and ``de``. A locale is matched on its
language (``de-AT`` reads ``de``); any other language reads English, since text in a language
nobody has written templates for cannot be produced honestly. A reason that has no fragment
in a locale is left out of that locale's text rather than shown in another language.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Final

from rules.reasons import SHOW_REASON_WORDING, ShowReason
from service.explain.base import ExplanationRequest

__all__ = [
    "DEFAULT_LOCALE",
    "KIND_LEADS",
    "SUPPORTED_LOCALES",
    "template_explanation",
    "template_for",
    "template_locale",
]

DEFAULT_LOCALE: Final = "en"
SUPPORTED_LOCALES: Final = ("en", "de")

# Reasons that say why the item is there at all; they open the sentence, never a clause.
_LEAD_REASONS: Final = (
    ShowReason.BOUGHT_TOGETHER,
    ShowReason.MATCHES_HISTORY,
    ShowReason.POPULAR,
    ShowReason.COMPLETES_THE_SET,
    ShowReason.PREMIUM_UPGRADE,
    ShowReason.DUE_AGAIN,
    ShowReason.REPLACES_UNAVAILABLE,
)

# German fragments of the reason wording in rules.reasons ({anchor} as there).
_REASON_WORDING_DE: Final[Mapping[ShowReason, str]] = {
    ShowReason.BOUGHT_TOGETHER: "Wird oft zusammen mit {anchor} gekauft",
    ShowReason.MATCHES_HISTORY: "Passend zu Ihren bisherigen Bestellungen ausgewählt",
    ShowReason.POPULAR: "Bei unseren Kunden sehr beliebt",
    ShowReason.IN_STOCK_AT_STORE: "in dieser Filiale vorrätig",
    ShowReason.IN_STOCK_TO_SHIP: "auf Lager und mit Ihrer Bestellung lieferbar",
    ShowReason.MARGIN_FLOOR_MET: "",
    ShowReason.ON_PROMOTION: "derzeit im Angebot",
    ShowReason.COMPLETES_THE_SET: "Ergänzt {anchor} zum Set",
    ShowReason.PREMIUM_UPGRADE: "Eine hochwertigere Alternative zu {anchor}",
    ShowReason.DUE_AGAIN: "Zeit zum Nachkaufen: Sie bestellen diesen Artikel regelmäßig",
    ShowReason.REPLACES_UNAVAILABLE: "Eine vorrätige Alternative zu {anchor}",
}

REASON_WORDING: Final[Mapping[str, Mapping[ShowReason, str]]] = {
    "en": SHOW_REASON_WORDING,
    "de": _REASON_WORDING_DE,
}

# Per locale and wire kind: (lead with an anchor item, lead without one). Leads with an anchor
# are their lead reason's wording so that the two can never drift apart.
_LEAD_REASON_OF_KIND: Final[Mapping[str, ShowReason]] = {
    "cross_sell": ShowReason.BOUGHT_TOGETHER,
    "personal": ShowReason.MATCHES_HISTORY,
    "popular": ShowReason.POPULAR,
    "upgrade": ShowReason.PREMIUM_UPGRADE,
    "bundle": ShowReason.COMPLETES_THE_SET,
    "replenish": ShowReason.DUE_AGAIN,
    "substitute": ShowReason.REPLACES_UNAVAILABLE,
}
_LEAD_WITHOUT_ANCHOR: Final[Mapping[str, Mapping[str, str]]] = {
    "en": {
        "cross_sell": SHOW_REASON_WORDING[ShowReason.POPULAR],
        "upgrade": "A step up in this range",
        "bundle": "Completes the set",
        "substitute": "An in-stock alternative",
    },
    "de": {
        "cross_sell": _REASON_WORDING_DE[ShowReason.POPULAR],
        "upgrade": "Eine hochwertigere Wahl in diesem Sortiment",
        "bundle": "Ergänzt Ihr Set",
        "substitute": "Eine vorrätige Alternative",
    },
}
KIND_LEADS: Final[Mapping[str, Mapping[str, tuple[str, str]]]] = {
    locale: {
        kind: (
            wording[reason],
            _LEAD_WITHOUT_ANCHOR[locale].get(kind, wording[reason]),
        )
        for kind, reason in _LEAD_REASON_OF_KIND.items()
    }
    for locale, wording in REASON_WORDING.items()
}


def template_locale(locale: str) -> str:
    """The template locale for a request locale: its language when supported, else English."""
    language = locale.replace("_", "-").split("-", 1)[0].lower()
    return language if language in SUPPORTED_LOCALES else DEFAULT_LOCALE


def template_explanation(
    reasons: Sequence[ShowReason],
    *,
    anchor_name: str | None,
    kind: str | None = None,
    locale: str = DEFAULT_LOCALE,
) -> str:
    """One sentence from the kind and reason codes, e.g. "Often bought with X; in stock at this
    store.". Without ``kind`` the lead reason sets the sentence (the original behaviour)."""
    return _sentence(tuple(reasons), anchor_name, kind, locale)


@functools.lru_cache(maxsize=16384)  # a pure function of few inputs, called per item shown
def _sentence(
    reasons: tuple[ShowReason, ...], anchor_name: str | None, kind: str | None, locale: str
) -> str:
    language = template_locale(locale)
    wording = REASON_WORDING[language]
    anchor = _display_name(anchor_name) if anchor_name else None
    leads = KIND_LEADS[language].get(kind) if kind is not None else None
    if leads is not None:
        lead = leads[0] if anchor else leads[1]
    else:
        lead_reason = next((r for r in reasons if r in _LEAD_REASONS), ShowReason.POPULAR)
        if lead_reason is ShowReason.BOUGHT_TOGETHER and not anchor:
            lead_reason = ShowReason.POPULAR
        lead = wording[lead_reason]
    sentence = lead.format(anchor=anchor or "")
    clauses = [
        fragment
        for reason in dict.fromkeys(reasons)  # a repeated code is stated once
        if reason not in _LEAD_REASONS and (fragment := wording.get(reason, ""))
    ]
    if clauses:
        sentence += "; " + ", ".join(clauses)
    return sentence + "."


def template_for(request: ExplanationRequest) -> str:
    """The template text for one explanation request."""
    return template_explanation(
        request.reasons,
        anchor_name=request.anchor_name,
        kind=request.kind,
        locale=request.locale,
    )


def _display_name(name: str) -> str:
    # Item masters often hold names in capitals; read them as titles in a sentence.
    return name.title() if name.isupper() else name
