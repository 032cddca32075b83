"""Checks on LLM text before anyone sees it: pure functions over the text and its request.

An explanation passes when every check holds, in this order (the first failure is reported):

- ``EMPTY`` / ``TOO_LONG`` / ``MULTI_LINE``: some text, at most ``max_chars``, one line;
- ``MARKUP``: no links, no markup characters;
- ``INSTRUCTION_TEXT``: nothing that reads like instructions or a model talking about itself
  ("ignore previous instructions", "as an AI"): what comes out when a model follows an
  injection carried in a product name, or refuses;
- ``BANNED_WORD``: none of the policy's banned words or phrases;
- ``OTHER_PRODUCT``: names only the recommended item and the anchor: no other catalog name;
- ``UNGROUNDED_NUMBER``: every number (and currency or percent sign) appears in the facts
  (the request's ``facts`` values, e.g. a price);
- ``UNGROUNDED_CLAIM``: every claim term is backed: promotion words by ``ON_PROMOTION``, stock
  and delivery words by an in-stock reason, popularity words by ``POPULAR``, history words by
  ``MATCHES_HISTORY`` (or a personal / replenish kind); absolute claims ("free", "best",
  "guaranteed", "new", ...) only when a ``facts`` value says so;
- ``WRONG_LANGUAGE``: the text is in the locale's language.

These are heuristics, and honest about it: words are matched as whole tokens after case
folding, claims are a fixed vocabulary per family (English and German), and the language test
counts stopwords (a text needs at least one of its language's and more of them than of the
other language's). They reject good text sometimes (then the template is served, which is
always correct) and cannot catch a fluent false claim made of unlisted words; the prompt asks
for facts only, and these checks hold the model to the part that can be checked mechanically.

The item's and the anchor's own names are taken out of the text before the word checks, so a
product called "FREE RANGE EGGS" or "3 WICK CANDLE" does not fail its own explanation; but a
name's words back nothing outside the name, so a name carrying an injected "free, 90% off"
cannot make "free" or "90" acceptable elsewhere in the sentence.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from rules.reasons import ShowReason
from service.explain.base import ExplanationRequest
from service.explain.templates import template_locale

__all__ = [
    "NameIndex",
    "Problem",
    "Verdict",
    "detect_language",
    "tokens",
    "validate_explanation",
]


class Problem(StrEnum):
    """Why a text was refused; counted per kind in the explainer's accounting."""

    MALFORMED = "malformed"  # the reply was not the JSON the prompt asks for (set by callers)
    EMPTY = "empty"
    TOO_LONG = "too_long"
    MULTI_LINE = "multi_line"
    MARKUP = "markup"
    INSTRUCTION_TEXT = "instruction_text"
    BANNED_WORD = "banned_word"
    OTHER_PRODUCT = "other_product"
    UNGROUNDED_NUMBER = "ungrounded_number"
    UNGROUNDED_CLAIM = "ungrounded_claim"
    WRONG_LANGUAGE = "wrong_language"


@dataclass(frozen=True)
class Verdict:
    problem: Problem | None = None
    detail: str = ""  # the offending word, name or figure, for logs

    @property
    def ok(self) -> bool:
        return self.problem is None


_PASSED: Final = Verdict()


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_WORD = re.compile(r"[^\W_]+")
_DIGIT = re.compile(r"\d")
_MARKUP = re.compile(r"https?:|www\.|[<>{}\[\]`*#|\\]")
_SIGNS: Final = frozenset("£$€¥%")


def tokens(text: str) -> list[str]:
    """Case-folded words and numbers of ``text`` (``"T-Light 2.95"`` -> t, light, 2, 95)."""
    return _WORD.findall(text.casefold())


class NameIndex:
    """Catalog names as token sequences, for finding any of them inside a text.

    Built once per catalog (O(names)); a look-up costs O(words in the text x longest name),
    independent of the catalog's size.
    """

    __slots__ = ("_first_tokens", "_longest", "_names")

    def __init__(self, names: Iterable[str]) -> None:
        sequences = {tuple(tokens(name)) for name in names}
        sequences.discard(())
        self._names = frozenset(sequences)
        self._first_tokens = frozenset(sequence[0] for sequence in sequences)
        self._longest = max((len(sequence) for sequence in sequences), default=0)

    def __len__(self) -> int:
        return len(self._names)

    def find(self, words: Sequence[str], *, allowed: Sequence[Sequence[str]] = ()) -> str | None:
        """The first catalog name in ``words`` that is not part of an ``allowed`` name."""
        for start, word in enumerate(words):
            if word not in self._first_tokens:
                continue
            for length in range(1, min(self._longest, len(words) - start) + 1):
                candidate = tuple(words[start : start + length])
                if candidate in self._names and not any(
                    _contains(name, candidate) for name in allowed
                ):
                    return " ".join(candidate)
        return None


# Phrases of a model following injected instructions or talking about itself.
_INSTRUCTION_PHRASES: Final = tuple(
    tuple(tokens(phrase))
    for phrase in (
        "ignore previous",
        "ignore all",
        "ignore the above",
        "ignore your",
        "previous instructions",
        "my instructions",
        "system prompt",
        "as an ai",
        "language model",
        "i cannot",
        "i can't",
        "i am sorry",
        "i'm sorry",
        "ignoriere",
        "anweisungen",
        "als ki",
        "sprachmodell",
    )
)


@dataclass(frozen=True)
class _ClaimFamily:
    """Claim words that need backing: a reason code, a kind, or the facts saying them."""

    terms: frozenset[str]
    backed_by_reasons: frozenset[ShowReason] = frozenset()
    backed_by_kinds: frozenset[str] = frozenset()


_CLAIM_FAMILIES: Final = (
    _ClaimFamily(  # promotion
        terms=_words(
            "sale sales discount discounted discounts offer offers deal deals save saving savings "
            "reduced promotion promotional promo bargain clearance angebot angebote sonderangebot "
            "rabatt reduziert reduzierte sparen aktion preisnachlass schnäppchen"
        ),
        backed_by_reasons=frozenset({ShowReason.ON_PROMOTION}),
    ),
    _ClaimFamily(  # stock and delivery
        terms=_words(
            "stock available availability ship ships shipping shipped delivery deliver delivered "
            "dispatch dispatched lager vorrätig vorrätige vorrätigen lieferbar verfügbar versand "
            "lieferung geliefert"
        ),
        backed_by_reasons=frozenset({ShowReason.IN_STOCK_AT_STORE, ShowReason.IN_STOCK_TO_SHIP}),
        backed_by_kinds=frozenset({"substitute"}),
    ),
    _ClaimFamily(  # popularity
        terms=_words(
            "popular favourite favorite favourites favorites bestseller bestsellers bestselling "
            "trending beliebt beliebte beliebter beliebtes kundenliebling renner"
        ),
        backed_by_reasons=frozenset({ShowReason.POPULAR}),
        backed_by_kinds=frozenset({"popular"}),
    ),
    _ClaimFamily(  # the customer's own history
        terms=_words(
            "history past previous previously before again regularly usual usually bisherigen "
            "früheren früher wieder regelmäßig gewohnt"
        ),
        backed_by_reasons=frozenset({ShowReason.MATCHES_HISTORY}),
        backed_by_kinds=frozenset({"personal", "replenish"}),
    ),
    _ClaimFamily(  # absolute claims: only when the facts themselves say so
        terms=_words(
            "free gratis kostenlos kostenlose guaranteed guarantee warranty garantie garantiert "
            "best beste besten bester bestes cheapest lowest günstigste günstigsten exclusive "
            "exklusiv limited limitiert award winning certified zertifiziert organic bio new neu "
            "neue neuer neues neuen half hälfte double doppelt twice percent prozent cure cures "
            "heals healthy gesund"
        ),
    ),
)

# Distinctive function words: a word both languages use ("in", "an", "so", "was", "will",
# "also", "am") is in neither list, so it cannot tip the count.
_STOPWORDS: Final = {
    "en": _words(
        "the a and with for of to your you this that these those is are it its on at from by or "
        "be as our we can goes well just more than into pairs perfect makes make match matches "
        "together often bought buy step up time item"
    ),
    "de": _words(
        "der die das den dem des ein eine einen einem einer eines und mit für zu zum zur ihr ihre "
        "ihren ihrer ihrem ihres sie ist sind auf von aus bei oder nicht wird werden passt gut "
        "oft zusammen dieser diese diesem dieses diesen noch auch als wie nach im vom beim unser "
        "unsere unseren unserer sehr jetzt dazu passend passende gekauft zeit wahl"
    ),
}
_UMLAUTS = re.compile(r"[äöüß]")


def detect_language(words: Sequence[str]) -> str | None:
    """``en`` or ``de`` by distinctive stopword count (umlauts count for German), or None
    when neither has a hit or they tie."""
    hits = {
        language: sum(w in stopwords for w in words) for language, stopwords in _STOPWORDS.items()
    }
    hits["de"] += sum(bool(_UMLAUTS.search(w)) for w in words)
    ranked = sorted(hits.items(), key=lambda pair: pair[1], reverse=True)
    (best, best_hits), (_, runner_up_hits) = ranked[0], ranked[1]
    if best_hits in {0, runner_up_hits}:
        return None
    return best


def validate_explanation(
    text: str,
    request: ExplanationRequest,
    *,
    max_chars: int,
    banned_words: Sequence[str] = (),
    forbidden_names: NameIndex | Collection[str] = (),
) -> Verdict:
    """Whether ``text`` may be shown as the explanation of ``request`` (see the module doc).

    ``forbidden_names`` are the catalog's product names (a prebuilt ``NameIndex`` for a large
    catalog); the request's own item and anchor may appear in the text even when listed.
    """
    stripped = text.strip()
    if not stripped:
        return Verdict(Problem.EMPTY)
    if len(stripped) > max_chars:
        return Verdict(Problem.TOO_LONG, f"{len(stripped)} > {max_chars}")
    if "\n" in stripped or "\r" in stripped:
        return Verdict(Problem.MULTI_LINE)

    all_words = tokens(stripped)
    joined = " " + " ".join(all_words) + " "
    for phrase in _INSTRUCTION_PHRASES:
        if " " + " ".join(phrase) + " " in joined:
            return Verdict(Problem.INSTRUCTION_TEXT, " ".join(phrase))

    own_names = [name for name in (request.item_name, request.anchor_name) if name]
    own_sequences = [tokens(name) for name in own_names]
    outside_names = _remove_names(stripped, own_names)
    if markup := _MARKUP.search(outside_names):
        return Verdict(Problem.MARKUP, markup.group(0))
    words = _remove_sequences(all_words, own_sequences)

    for banned in banned_words:
        banned_sequence = tokens(banned)
        if banned_sequence and _contains(words, banned_sequence):
            return Verdict(Problem.BANNED_WORD, banned)

    index: NameIndex | None
    if isinstance(forbidden_names, NameIndex):
        index = forbidden_names
    else:
        index = NameIndex(forbidden_names) if forbidden_names else None
    if index is not None and (other := index.find(all_words, allowed=own_sequences)):
        return Verdict(Problem.OTHER_PRODUCT, other)

    # Grounding comes from the structured facts only. Words of the names count where the name
    # stands (it was taken out above), not elsewhere: a name carrying "free, 90% off" must not
    # back those words in a sentence of their own.
    fact_text = " ".join(request.facts.values())
    fact_words = frozenset(tokens(fact_text))
    for word in words:
        if _DIGIT.search(word) and word not in fact_words:
            return Verdict(Problem.UNGROUNDED_NUMBER, word)
    for sign in _SIGNS:
        if sign in outside_names and sign not in fact_text:
            return Verdict(Problem.UNGROUNDED_NUMBER, sign)

    reasons = frozenset(request.reasons)
    for family in _CLAIM_FAMILIES:
        if family.backed_by_reasons & reasons or request.kind in family.backed_by_kinds:
            continue
        for word in words:
            if word in family.terms and word not in fact_words:
                return Verdict(Problem.UNGROUNDED_CLAIM, word)

    expected = template_locale(request.locale)
    found = detect_language([word for word in words if not _DIGIT.search(word)])
    if found != expected:
        return Verdict(Problem.WRONG_LANGUAGE, f"expected {expected}, read {found}")
    return _PASSED


def _contains(words: Sequence[str], sequence: Sequence[str]) -> bool:
    width = len(sequence)
    return any(
        list(words[start : start + width]) == list(sequence)
        for start in range(len(words) - width + 1)
    )


def _remove_sequences(words: list[str], sequences: Sequence[Sequence[str]]) -> list[str]:
    """``words`` without any occurrence of the given sequences (longest first)."""
    kept = words
    for sequence in sorted((list(s) for s in sequences if s), key=len, reverse=True):
        width, result, start = len(sequence), [], 0
        while start < len(kept):
            if kept[start : start + width] == sequence:
                start += width
            else:
                result.append(kept[start])
                start += 1
        kept = result
    return kept


def _remove_names(text: str, names: Sequence[str]) -> str:
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(re.escape(name), " ", text, flags=re.IGNORECASE)
    return text
