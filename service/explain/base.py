"""What the pipeline hands the explanation stage, and what it gets back.

The explainer describes; it never changes what is recommended or in what order. It must
return one explanation per request, in order, by ``deadline`` (a ``time.monotonic()``
instant), whatever the LLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from rules.policy import Channel
from rules.reasons import ShowReason

ExplanationSource = Literal["template", "cache", "llm"]

# Kinds of pair ``upsell explain warm`` pre-generates (see ``service.explain.warm``); here,
# where the command line can read them without importing the machinery.
WARM_KINDS: Final = ("popular", "cross_sell", "bundle")


@dataclass(frozen=True)
class ExplanationRequest:
    """Product facts and reason codes for one shown item; never customer data."""

    item_sku: str
    item_name: str
    kind: str  # wire kind: cross_sell, personal, popular, substitute, ...
    channel: Channel
    locale: str  # e.g. "en", "de"
    reasons: tuple[ShowReason, ...]
    anchor_sku: str | None = None  # the basket / PDP item the recommendation hangs on
    anchor_name: str | None = None
    # Facts the text may state (category, brand, price, promotion, fulfillment): nothing else.
    facts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Explanation:
    text: str
    source: ExplanationSource


class Explainer(Protocol):
    async def explain(
        self, requests: Sequence[ExplanationRequest], *, deadline: float
    ) -> list[Explanation]:
        """One explanation per request, in order, returned by ``deadline``."""
        ...
