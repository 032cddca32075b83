"""Shared builders for explanation tests: requests, settings, and running a coroutine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from rules.policy import Channel
from rules.reasons import ShowReason
from service.explain.base import ExplanationRequest
from service.settings import Settings

T = TypeVar("T")

HEART = "WHITE HANGING HEART T-LIGHT HOLDER"
LANTERN = "RED HANGING HEART T-LIGHT HOLDER"
CATALOG_NAMES = (HEART, LANTERN, "JUMBO BAG RED RETROSPOT", "WOODEN PICTURE FRAME WHITE FINISH")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine on a loop of its own."""
    return asyncio.run(coroutine)


def request(
    *,
    channel: Channel = "contact_center",
    item_sku: str = "21733",
    item_name: str = LANTERN,
    anchor_sku: str | None = "85123A",
    anchor_name: str | None = HEART,
    kind: str = "cross_sell",
    locale: str = "en",
    reasons: tuple[ShowReason, ...] = (
        ShowReason.BOUGHT_TOGETHER,
        ShowReason.IN_STOCK_TO_SHIP,
        ShowReason.MARGIN_FLOOR_MET,
    ),
    facts: dict[str, str] | None = None,
) -> ExplanationRequest:
    """An explanation request as the pipeline builds one (defaults: the README's example)."""
    return ExplanationRequest(
        item_sku=item_sku,
        item_name=item_name,
        kind=kind,
        channel=channel,
        locale=locale,
        reasons=reasons,
        anchor_sku=anchor_sku,
        anchor_name=anchor_name,
        facts=facts or {},
    )


def settings(**overrides: Any) -> Settings:
    """Settings for explainer tests: no key from the environment, a short background limit."""
    values: dict[str, Any] = {
        "anthropic_api_key": None,
        "explain_background_timeout_ms": 2000,
        "llm_breaker_failures": 5,
    }
    values.update(overrides)
    return Settings(**values)


def deadline_in(seconds: float) -> float:
    """A deadline as the pipeline passes it: a ``time.monotonic()`` instant."""
    return time.monotonic() + seconds
