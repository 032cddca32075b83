"""Template explanations: per kind and locale, deterministic, and valid by our own checks."""

from __future__ import annotations

import pytest

from rules.reasons import ShowReason
from service.explain.templates import (
    KIND_LEADS,
    REASON_WORDING,
    SUPPORTED_LOCALES,
    template_explanation,
    template_for,
    template_locale,
)
from service.explain.validation import validate_explanation
from tests.service.explain.builders import CATALOG_NAMES, HEART, request

KINDS = ("cross_sell", "personal", "popular", "upgrade", "bundle", "replenish", "substitute")
STOCK = {"cart": ShowReason.IN_STOCK_TO_SHIP, "pos": ShowReason.IN_STOCK_AT_STORE}
KIND_REASON = {
    "cross_sell": ShowReason.BOUGHT_TOGETHER,
    "personal": ShowReason.MATCHES_HISTORY,
    "popular": ShowReason.POPULAR,
}


def test_readme_example_reads_as_before() -> None:
    """The original call (no kind, no locale) still gives the README's sentence."""
    reasons = [ShowReason.BOUGHT_TOGETHER, ShowReason.IN_STOCK_TO_SHIP, ShowReason.MARGIN_FLOOR_MET]
    text = template_explanation(reasons, anchor_name=HEART)
    assert text == (
        "Often bought with White Hanging Heart T-Light Holder; in stock to ship with your order."
    )
    assert template_explanation(reasons, anchor_name=HEART, kind="cross_sell") == text


@pytest.mark.parametrize("locale", SUPPORTED_LOCALES)
def test_every_kind_and_reason_has_wording_in_every_locale(locale: str) -> None:
    """Each supported locale words all seven kinds and every reason code."""
    assert set(KIND_LEADS[locale]) == set(KINDS)
    assert set(REASON_WORDING[locale]) == set(ShowReason)


@pytest.mark.parametrize("locale", SUPPORTED_LOCALES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channel", ["cart", "pos"])
@pytest.mark.parametrize("anchor", [HEART, None])
def test_templates_pass_the_llm_validator(
    locale: str, kind: str, channel: str, anchor: str | None
) -> None:
    """Every kind x locale x channel template, with and without an anchor, passes the same
    checks LLM text must pass (language, claims backed by the reasons, no other names)."""
    reasons: tuple[ShowReason, ...] = (
        KIND_REASON.get(kind, ShowReason.POPULAR),
        STOCK[channel],
        ShowReason.ON_PROMOTION,
    )
    if kind == "cross_sell" and anchor is None:
        reasons = (ShowReason.POPULAR, STOCK[channel])  # no anchor: the pipeline says popular
    asked = request(
        channel="pos" if channel == "pos" else "cart",
        kind=kind,
        locale=locale,
        anchor_name=anchor,
        anchor_sku="85123A" if anchor else None,
        reasons=reasons,
    )
    text = template_for(asked)
    verdict = validate_explanation(text, asked, max_chars=200, forbidden_names=CATALOG_NAMES)
    assert verdict.ok, (text, verdict)


def test_german_template_is_german_throughout() -> None:
    """A de request reads German, clauses included; the anchor keeps its catalog name."""
    asked = request(
        locale="de-AT",
        channel="pos",
        reasons=(
            ShowReason.BOUGHT_TOGETHER,
            ShowReason.IN_STOCK_AT_STORE,
            ShowReason.ON_PROMOTION,
        ),
    )
    assert template_for(asked) == (
        "Wird oft zusammen mit White Hanging Heart T-Light Holder gekauft; "
        "in dieser Filiale vorrätig, derzeit im Angebot."
    )


@pytest.mark.parametrize(
    ("locale", "expected"),
    [("en", "en"), ("de", "de"), ("de-CH", "de"), ("DE_de", "de"), ("fr", "en"), ("", "en")],
)
def test_locale_falls_back_to_english(locale: str, expected: str) -> None:
    """A locale is read by its language; one without templates reads English."""
    assert template_locale(locale) == expected


def test_kinds_without_anchor_use_their_own_lead() -> None:
    """Upgrade, bundle and substitute without an anchor still say what they are."""
    for kind, lead in [
        ("upgrade", "A step up in this range"),
        ("bundle", "Completes the set"),
        ("substitute", "An in-stock alternative"),
    ]:
        text = template_explanation([ShowReason.IN_STOCK_TO_SHIP], anchor_name=None, kind=kind)
        assert text == f"{lead}; in stock to ship with your order."


def test_unknown_kind_leads_with_its_reason_and_repeated_codes_are_said_once() -> None:
    """A kind without wording falls back to its lead reason; a repeated code appears once."""
    text = template_explanation(
        [ShowReason.MATCHES_HISTORY, ShowReason.ON_PROMOTION, ShowReason.ON_PROMOTION],
        anchor_name=None,
        kind="brand_new_kind",
    )
    assert text == "Picked for you from your past orders; on promotion now."
