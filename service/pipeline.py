"""The request path, the only code that knows the order of the stages:
request -> candidates -> constraints -> ranking -> explanation -> response.

The explanation stage describes the ranked items; it is handed them after ranking and never
changes which are shown or in what order. It has until the request's deadline (its arrival
plus the channel's server-side budget): text from the explanation cache, LLM text where the
budget fits a call (contact center), else the template now and the LLM text queued.

A guest's candidate list (no customer row) is a pure function of the basket or product,
the region and the pool under one serving snapshot, so it is remembered per snapshot
(``models.memory``) and reused when a guest asks again; the rules judge it afresh.

Constraints run in two stages around one pipelined stock read: rules over the mirrored item
master first, then stock rules for the survivors (and the basket, to know which nodes already
ship it). When strict rules leave the list short, deeper candidates are fetched and judged
the same way, up to the policy's ``max_candidate_pool``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import structlog

from models.calibration import AcceptanceCalibration
from models.interfaces import (
    USES_HISTORY,
    CandidateGenerator,
    Candidates,
    GenerationContext,
    Kind,
    ModelArtifacts,
)
from models.memory import GuestCandidateMemory
from rules.constraints import (
    KEPT,
    MASTER_CONSTRAINTS,
    STOCK_CONSTRAINTS,
    CandidateFacts,
    RequestFacts,
    apply_constraints,
    basket_shipping_nodes,
    candidate_facts,
    sellable_stock,
    with_fulfilment,
)
from rules.eligibility import EligibleNodes, eligible_nodes
from rules.errors import StoreError
from rules.experiments import Assignment, arm_policy, assign
from rules.policy import Channel
from rules.ranking import RankingInputs, ScoreParts, rank, score
from rules.reasons import DropReason, ShowReason
from rules.staleness import epoch_us, trusted_stock_units
from service.explain.base import Explainer, ExplanationRequest, ExplanationSource
from service.explain.explainer import TemplateExplainer
from service.explain.requests import explanation_request
from service.exposures import ExposureRecorder
from service.logging import is_enabled_for
from service.mirror import ServingSnapshot, SnapshotMirror
from service.stock_mirror import StockMirror
from service.store.base import SnapshotStore, StockFigures, StockMatrix

log = structlog.get_logger(__name__)

IntArray = npt.NDArray[np.int64]

# Rule codes by ``DropReason`` value (the values are 0, 1, 2, ...: counted by bincount).
_DROP_CODES: tuple[str, ...] = tuple(reason.code for reason in sorted(DropReason))
assert [reason.value for reason in sorted(DropReason)] == list(range(len(_DROP_CODES)))


# Eligible node sets remembered per serving snapshot (channel x store or region).
_ELIGIBLE_NODES_REMEMBERED = 4096

_KIND_BY_VALUE: dict[int, Kind] = {kind.value: kind for kind in Kind}  # Kind(v) costs ~1 us
_KIND_WIRE: dict[int, str] = {kind.value: kind.wire for kind in Kind}

_LEAD_REASON_BY_KIND: dict[Kind, ShowReason] = {
    Kind.CROSS_SELL: ShowReason.BOUGHT_TOGETHER,
    Kind.PERSONAL: ShowReason.MATCHES_HISTORY,
    Kind.POPULAR: ShowReason.POPULAR,
    Kind.BUNDLE: ShowReason.COMPLETES_THE_SET,
    Kind.UPGRADE: ShowReason.PREMIUM_UPGRADE,
    Kind.REPLENISH: ShowReason.DUE_AGAIN,
    Kind.SUBSTITUTE: ShowReason.REPLACES_UNAVAILABLE,
}


def _show_reasons(kind: Kind, take_home: bool, on_promotion: bool) -> tuple[ShowReason, ...]:
    """Why an item is shown: its kind's lead reason, where it is in stock, a promotion, and
    the margin floor every shown item met."""
    return (
        _LEAD_REASON_BY_KIND[kind],
        ShowReason.IN_STOCK_AT_STORE if take_home else ShowReason.IN_STOCK_TO_SHIP,
        *((ShowReason.ON_PROMOTION,) if on_promotion else ()),
        ShowReason.MARGIN_FLOOR_MET,
    )


# Every combination, built once: a response would build them item by item.
_SHOW_REASONS: dict[tuple[Kind, bool, bool], tuple[ShowReason, ...]] = {
    (kind, take_home, on_promotion): _show_reasons(kind, take_home, on_promotion)
    for kind in Kind
    for take_home in (False, True)
    for on_promotion in (False, True)
}
_REASON_CODES: dict[tuple[ShowReason, ...], tuple[str, ...]] = {
    reasons: tuple(reason.value for reason in reasons) for reasons in _SHOW_REASONS.values()
}


@dataclass(frozen=True)
class BasketLine:
    sku: str
    quantity: int


@dataclass(frozen=True)
class RecommendationQuery:
    """A validated request, in domain terms (the wire schema lives in ``service.api``)."""

    request_id: str
    channel: Channel
    basket: tuple[BasketLine, ...] = ()
    pdp_sku: str | None = None
    customer_id: str | None = None
    consent: bool = False
    session_id: str | None = None  # the experiment unit when there is no customer id
    store_id: str | None = None
    region: str | None = None
    limit: int = 5
    quantity: int | None = None  # units of a recommended item; None = the policy's default
    locale: str = "en"
    debug: bool = False


# Named tuples, not frozen dataclasses: as immutable, and built in a third of the time (a
# response builds two per item shown).
class ScoreTrace(NamedTuple):
    relevance: float
    p_accept: float
    unit_margin: float
    return_cost: float
    fulfilment_cost: float
    contribution: float
    margin_weight: float
    final: float


class RecommendedItem(NamedTuple):
    sku: str
    name: str
    kind: str
    score: float
    unit_price: float
    unit_margin: float
    fulfillment_node: str
    reason_codes: tuple[str, ...]
    explanation: str
    explanation_source: ExplanationSource
    score_parts: ScoreTrace
    category: str = ""


@dataclass(frozen=True)
class DroppedCandidate:
    sku: str
    kind: str
    rule: str


@dataclass(frozen=True)
class Versions:
    model: str
    snapshot: str
    policy: str


@dataclass(frozen=True)
class Recommendation:
    request_id: str
    channel: Channel
    items: tuple[RecommendedItem, ...]
    unknown_skus: tuple[str, ...]
    degraded: tuple[str, ...]
    versions: Versions
    candidates_considered: int
    dropped_by_rule: dict[str, int] = field(default_factory=dict)
    dropped: tuple[DroppedCandidate, ...] = ()
    experiment: Assignment | None = None
    # What a holdout arm would have shown: recorded with the exposure, never answered.
    withheld: tuple[RecommendedItem, ...] = ()
    # The first candidate list came from the guest memory (``models.memory``), not the model.
    candidates_remembered: bool = False


@dataclass(frozen=True, eq=False)
class _Judged:
    """Candidates of one round after both rule stages (parallel arrays)."""

    item_idx: npt.NDArray[np.int32]  # model rows
    kind: npt.NDArray[np.int8]
    relevance: npt.NDArray[np.float64]
    catalog_pos: IntArray
    drop_reason: npt.NDArray[np.int8]
    # Of the candidates the master rules left for the stock stage, with their stock: no rule
    # or score reads the facts of one dropped before, so they are not spread back.
    facts: CandidateFacts
    fact_row: IntArray  # per candidate, its row of ``facts``; -1: dropped before the stock read
    node_column: IntArray  # -1 where no eligible node covers the quantity
    anchor_pos: IntArray  # catalog position of the item a candidate hangs on; -1: the basket


class Recommender:
    """Runs the stages for one query against the current mirror, store and model."""

    def __init__(
        self,
        *,
        mirror: SnapshotMirror,
        store: SnapshotStore,
        artifacts: ModelArtifacts,
        generator: CandidateGenerator | None = None,
        calibration: AcceptanceCalibration | None = None,
        explainer: Explainer | None = None,
        channel_budgets: Mapping[Channel, float] | None = None,
        exposures: ExposureRecorder | None = None,
        stock_mirror: StockMirror | None = None,
        generation_memory_lists: int = 0,
    ) -> None:
        """``generator`` overrides the policy's generator mix (the offline evaluation compares
        mixes); by default each snapshot's ``ServingSnapshot.generator`` proposes.
        ``channel_budgets``: server-side seconds per channel, explanation included, for a
        request whose caller gives no deadline; without them such a request gets no time for
        anything but the in-process cache and templates. ``exposures`` records every answer
        for the ROI report (none offline). ``stock_mirror``: stock read in process while it
        vouches for the figures (``service.stock_mirror``), else from the store.
        ``generation_memory_lists``: guest candidate lists remembered per serving snapshot
        (``models.memory``; 0 = none, and none with a ``generator`` override)."""
        self._explainer: Explainer = explainer or TemplateExplainer()
        self._channel_budgets = dict(channel_budgets or {})
        self._exposures = exposures
        self._stock_mirror = stock_mirror
        self._mirror = mirror
        self._calibration = calibration
        self._store = store
        self._artifacts = artifacts
        self._generator = generator
        self._user_row = {customer: row for row, customer in enumerate(artifacts.user_ids)}
        self._model_skus = np.asarray(artifacts.item_skus, dtype=object)
        self._eligible_by_serving: weakref.WeakKeyDictionary[
            ServingSnapshot, dict[tuple[Channel, str | None, str | None], EligibleNodes]
        ] = weakref.WeakKeyDictionary()
        self._generation_memory_lists = generation_memory_lists if generator is None else 0
        self._memory_by_serving: weakref.WeakKeyDictionary[
            ServingSnapshot, GuestCandidateMemory
        ] = weakref.WeakKeyDictionary()

    async def recommend(
        self,
        query: RecommendationQuery,
        *,
        now: datetime | None = None,
        deadline: float | None = None,
    ) -> Recommendation:
        """``deadline``: the ``time.monotonic()`` instant the answer is due (the HTTP layer
        passes arrival + the channel's budget); default: from now, by ``channel_budgets``."""
        if deadline is None:
            deadline = time.monotonic() + self._channel_budgets.get(query.channel, 0.0)
        now = now or datetime.now(UTC).replace(tzinfo=None)
        serving = await self._mirror.current()
        catalog, compiled = serving.catalog, serving.policy
        policy = compiled.policy
        quantity = query.quantity or policy.default_quantity
        degraded: list[str] = []

        # Request: resolve SKUs and nodes. Unknown SKUs are reported, never fatal.
        asked_skus = [line.sku for line in query.basket]
        asked_quantity = [line.quantity for line in query.basket]
        if query.pdp_sku is not None:
            asked_skus.append(query.pdp_sku)
            asked_quantity.append(1)
        asked_pos = catalog.positions(asked_skus)
        unknown_skus = tuple(
            dict.fromkeys(sku for sku, pos in zip(asked_skus, asked_pos, strict=True) if pos < 0)
        )
        known_asked = asked_pos >= 0
        excluded_pos = asked_pos[known_asked]
        assignment = assign(
            policy.experiments,
            channel=query.channel,
            categories=(
                catalog.categories[code]
                for code in sorted(set(catalog.category_code[excluded_pos].tolist()))
            ),
            store_id=query.store_id,
            customer_id=query.customer_id,
            session_id=query.session_id,
        )
        nodes = self._eligible_nodes(serving, query)
        degraded.extend(nodes.notes)

        # Which eligible nodes already ship the basket: read with the first candidates' stock.
        basket_quantity = np.asarray(asked_quantity, dtype=np.int64)[known_asked]
        model_rows = serving.catalog_to_model[excluded_pos]
        anchors = model_rows[model_rows >= 0].astype(np.int32)
        user_row = (
            self._user_row.get(query.customer_id)
            if query.consent and query.customer_id is not None
            else None
        )
        request = RequestFacts(
            channel=query.channel,
            excluded_pos=excluded_pos,
            basket_category_codes=catalog.category_code[excluded_pos].astype(np.int64),
            quantity=quantity,
            now=now,
            consent=query.consent,
            node_cost=nodes.shipment_cost,
            basket_node=np.zeros(len(nodes.positions), dtype=np.bool_),
        )

        generator = self._generator or serving.generator
        context = GenerationContext(
            now=now,
            region=_request_region(serving, query),
            categories=_unmodelled_categories(serving, excluded_pos),
        )
        rounds: list[_Judged] = []
        pool = policy.candidate_pool
        candidates_remembered = False
        memory = self._guest_memory(serving) if user_row is None else None
        while True:
            first_round = not rounds
            if memory is not None:
                candidates, remembered = memory.generate(
                    anchors=anchors, count=pool, context=context
                )
                if first_round:
                    candidates_remembered = remembered
            else:
                candidates = generator.generate(
                    anchors=anchors, user_row=user_row, count=pool, context=context
                )
            generated = len(candidates)
            if not first_round:  # a bigger pool: only what no round has judged yet
                seen = np.concatenate([judged.item_idx for judged in rounds])
                candidates = _subset(candidates, ~np.isin(candidates.item_idx, seen))
            judged, request, basket_covered = await self._judge(
                serving,
                candidates,
                request=request,
                nodes=nodes,
                basket_pos=excluded_pos if first_round else None,
                basket_quantity=basket_quantity,
                degraded=degraded,
            )
            if first_round and policy.candidates.substitutes_per_item:
                judged, substitutes = await self._substitutes(
                    serving,
                    judged,
                    unfulfillable=model_rows[~basket_covered],
                    request=request,
                    nodes=nodes,
                    degraded=degraded,
                )
                rounds.append(judged)
                if substitutes is not None:
                    rounds.append(substitutes)
            else:
                rounds.append(judged)
            kept_so_far = sum(int((r.drop_reason == KEPT).sum()) for r in rounds)
            exhausted = generated < pool or pool >= policy.max_candidate_pool
            if kept_so_far >= query.limit or exhausted:
                break
            pool = min(pool * 4, policy.max_candidate_pool)

        all_judged = _concatenate(rounds)
        kept = np.flatnonzero(all_judged.drop_reason == KEPT)
        parts, p_accept, order = self._rank(serving, all_judged, kept, query, assignment)

        # Explanation and response. The PDP item is the anchor when there is one (it is asked
        # last), else the last basket line.
        anchor_pos = int(excluded_pos[-1]) if len(excluded_pos) else None
        shown = kept[order]
        shown_pos = all_judged.catalog_pos[shown]
        on_promotion = catalog.on_promotion(shown_pos, now=now).tolist()
        facts = all_judged.facts
        shown_facts = all_judged.fact_row[shown]
        # Columns as Python lists once: per-item numpy scalar reads and float() calls cost
        # more than the rest of building the response.
        positions = shown_pos.tolist()
        columns = all_judged.node_column[shown].tolist()
        kinds = all_judged.kind[shown].tolist()
        own_anchors = all_judged.anchor_pos[shown].tolist()  # a substitute names what it replaces
        prices = facts.effective_price[shown_facts].tolist()
        margins = facts.unit_margin[shown_facts].tolist()
        fulfilment = facts.fulfilment_cost[shown_facts].tolist()
        relevance = all_judged.relevance[shown].tolist()
        finals = parts.final[order].tolist()
        p_accepts = p_accept[order].tolist()
        return_costs = parts.return_cost[order].tolist()
        contributions = parts.contribution[order].tolist()
        margin_weights = parts.margin_weight[order].tolist()
        node_ids = serving.nodes.node_ids
        explanation_requests: list[ExplanationRequest] = []
        reasons_by_item: list[tuple[ShowReason, ...]] = []
        for rank_index, pos in enumerate(positions):
            column = columns[rank_index]
            kind = _KIND_BY_VALUE[kinds[rank_index]]
            reasons = _SHOW_REASONS[kind, bool(nodes.take_home[column]), on_promotion[rank_index]]
            reasons_by_item.append(reasons)
            own_anchor = own_anchors[rank_index]
            explanation_requests.append(
                explanation_request(
                    catalog,
                    item_position=pos,
                    anchor_position=own_anchor if own_anchor >= 0 else anchor_pos,
                    kind=kind.wire,
                    channel=query.channel,
                    locale=query.locale,
                    reasons=reasons,
                    price=prices[rank_index],
                )
            )

        holdout = assignment is not None and assignment.shows_nothing
        # Text nobody will read is not worth an LLM call.
        explanations = (
            await self._explainer.explain(explanation_requests, deadline=deadline)
            if not holdout
            else [None] * len(positions)
        )
        items = []
        for rank_index, (pos, explanation) in enumerate(zip(positions, explanations, strict=True)):
            final = round(finals[rank_index], 6)
            unit_margin = round(margins[rank_index], 4)
            items.append(
                RecommendedItem(
                    sku=catalog.skus[pos],
                    name=catalog.names[pos],
                    kind=_KIND_WIRE[kinds[rank_index]],
                    score=final,
                    unit_price=round(prices[rank_index], 4),
                    unit_margin=unit_margin,
                    fulfillment_node=node_ids[int(nodes.positions[columns[rank_index]])],
                    reason_codes=_REASON_CODES[reasons_by_item[rank_index]],
                    explanation=explanation.text if explanation is not None else "",
                    explanation_source=(
                        explanation.source if explanation is not None else "template"
                    ),
                    category=catalog.categories[int(catalog.category_code[pos])],
                    score_parts=ScoreTrace(
                        relevance=round(relevance[rank_index], 6),
                        p_accept=round(p_accepts[rank_index], 6),
                        unit_margin=unit_margin,
                        return_cost=round(return_costs[rank_index], 4),
                        fulfilment_cost=round(fulfilment[rank_index], 4),
                        contribution=round(contributions[rank_index], 6),
                        margin_weight=margin_weights[rank_index],
                        final=final,
                    ),
                )
            )

        dropped_rows = np.flatnonzero(all_judged.drop_reason != KEPT)
        dropped_reason = all_judged.drop_reason[dropped_rows]
        dropped_by_rule = {
            _DROP_CODES[reason]: dropped
            for reason, dropped in enumerate(
                np.bincount(dropped_reason, minlength=len(_DROP_CODES)).tolist()
            )
            if dropped
        }
        # SKUs per rule for the decision line (when it is written) and per-candidate records
        # for a debug trace: most requests need the counts alone.
        dropped_skus = (
            self._model_skus[all_judged.item_idx[dropped_rows]]
            if query.debug or is_enabled_for(logging.INFO)
            else None
        )
        dropped_skus_by_rule = (
            {
                reason.code: skus.tolist()
                for reason in DropReason
                if (skus := dropped_skus[dropped_reason == reason.value]).size
            }
            if dropped_skus is not None
            else None
        )
        dropped = (
            tuple(
                DroppedCandidate(
                    sku=str(sku), kind=Kind(int(kind)).wire, rule=DropReason(int(reason)).code
                )
                for sku, kind, reason in zip(
                    dropped_skus,
                    all_judged.kind[dropped_rows],
                    dropped_reason,
                    strict=True,
                )
            )
            if query.debug and dropped_skus is not None
            else ()
        )
        # A holdout arm answers nothing; what it would have shown is kept for the record.
        withheld = tuple(items) if holdout else ()
        result = Recommendation(
            request_id=query.request_id,
            channel=query.channel,
            items=() if withheld else tuple(items),
            unknown_skus=unknown_skus,
            degraded=tuple(dict.fromkeys(degraded)),
            versions=Versions(
                model=self._artifacts.version,
                snapshot=serving.meta.version,
                policy=compiled.policy_version,
            ),
            candidates_considered=len(all_judged.catalog_pos),
            dropped_by_rule=dropped_by_rule,
            dropped=dropped,
            experiment=assignment,
            withheld=withheld,
            candidates_remembered=candidates_remembered,
        )
        if dropped_skus_by_rule is not None:
            self._log_decision(
                query, result, dropped_skus=dropped_skus_by_rule, personalized=user_row is not None
            )
        if self._exposures is not None:
            self._exposures.record(query, result, now=now)
        return result

    async def _judge(
        self,
        serving: ServingSnapshot,
        candidates: Candidates,
        *,
        request: RequestFacts,
        nodes: EligibleNodes,
        basket_pos: IntArray | None,
        basket_quantity: IntArray,
        degraded: list[str],
        anchor_pos: IntArray | None = None,
    ) -> tuple[_Judged, RequestFacts, npt.NDArray[np.bool_]]:
        """Both rule stages for one batch of candidates; the first batch also reads the
        basket's stock and returns the request with its basket nodes filled in, and which
        basket lines some eligible node can fulfil (all True when no basket is read)."""
        catalog, compiled = serving.catalog, serving.policy
        catalog_pos = serving.model_to_catalog[candidates.item_idx]
        count = len(catalog_pos)
        facts = candidate_facts(
            catalog,
            compiled,
            catalog_pos,
            uses_history=USES_HISTORY[candidates.kind],
            channel=request.channel,
            now=request.now,
        )
        drop_reason = apply_constraints(facts, request, compiled, MASTER_CONSTRAINTS)
        survivors = np.flatnonzero(drop_reason == KEPT)

        basket_pos = basket_pos if basket_pos is not None else np.empty(0, dtype=np.int64)
        read_pos = np.concatenate([catalog_pos[survivors], basket_pos])
        available, inbound, ranged = await self._read_stock(
            serving, read_pos, nodes, degraded, now=request.now
        )
        # A DC column serves POS only for items sold for home delivery.
        available = sellable_stock(
            available,
            catalog.ship_to_home[read_pos],
            nodes.take_home,
            channel=request.channel,
        )
        split = len(survivors)
        basket_covered: npt.NDArray[np.bool_] = np.ones(len(basket_pos), dtype=np.bool_)
        if basket_pos.size:
            basket_available = available[split:]
            request = request.with_basket_nodes(
                basket_shipping_nodes(basket_available, basket_quantity, request.node_cost)
            )
            basket_covered = np.any(basket_available >= basket_quantity[:, np.newaxis], axis=1)
        ranged_at_store: npt.NDArray[np.bool_] = (
            np.any(ranged[:split] & nodes.take_home, axis=1)
            if request.channel == "pos"
            else np.zeros(split, dtype=np.bool_)
        )
        stock_view, column = with_fulfilment(
            facts.with_stock(
                survivors,
                available=available[:split],
                inbound=inbound[:split],
                ranged_at_store=ranged_at_store,
            ),
            request,
            compiled,
        )
        drop_reason[survivors] = apply_constraints(stock_view, request, compiled, STOCK_CONSTRAINTS)
        node_column = np.full(count, -1, dtype=np.int64)
        node_column[survivors] = column
        fact_row = np.full(count, -1, dtype=np.int64)
        fact_row[survivors] = np.arange(split)
        judged = _Judged(
            item_idx=candidates.item_idx,
            kind=candidates.kind,
            relevance=candidates.score.astype(np.float64),
            catalog_pos=catalog_pos,
            drop_reason=drop_reason,
            facts=stock_view,
            fact_row=fact_row,
            node_column=node_column,
            anchor_pos=anchor_pos if anchor_pos is not None else np.full(count, -1, np.int64),
        )
        return judged, request, basket_covered

    async def _substitutes(
        self,
        serving: ServingSnapshot,
        judged: _Judged,
        *,
        unfulfillable: IntArray,
        request: RequestFacts,
        nodes: EligibleNodes,
        degraded: list[str],
    ) -> tuple[_Judged, _Judged | None]:
        """Alternatives for basket lines no eligible node can fulfil.

        Those the generators proposed already (``judged``, the first round) become
        substitutes: replacing an item the customer wanted is the stronger reason to show
        them. The others are judged by every rule like any candidate, which costs one more
        stock read, only when such a basket line exists.
        """
        modelled = unfulfillable[unfulfillable >= 0]
        if not modelled.size:
            return judged, None
        found = serving.substitutes.find(
            modelled, count_per_item=serving.policy.policy.candidates.substitutes_per_item
        )
        if not len(found):
            return judged, None
        by_item = np.argsort(found.item_idx)
        at = by_item[
            np.searchsorted(found.item_idx, judged.item_idx, sorter=by_item).clip(0, len(found) - 1)
        ]
        proposed = found.item_idx[at] == judged.item_idx
        judged = replace(
            judged,
            kind=np.where(proposed, np.int8(Kind.SUBSTITUTE.value), judged.kind).astype(np.int8),
            relevance=np.where(
                proposed, np.maximum(judged.relevance, found.score[at]), judged.relevance
            ),
            anchor_pos=np.where(
                proposed, serving.model_to_catalog[found.for_row[at]], judged.anchor_pos
            ),
        )
        fresh = ~np.isin(found.item_idx, judged.item_idx)
        if not fresh.any():
            return judged, None
        candidates = Candidates(
            item_idx=found.item_idx[fresh],
            score=found.score[fresh],
            kind=np.full(int(fresh.sum()), Kind.SUBSTITUTE.value, dtype=np.int8),
        )
        extra, _, _ = await self._judge(
            serving,
            candidates,
            request=request,
            nodes=nodes,
            basket_pos=None,
            basket_quantity=np.empty(0, dtype=np.int64),
            degraded=degraded,
            anchor_pos=serving.model_to_catalog[found.for_row[fresh]],
        )
        return judged, extra

    def _guest_memory(self, serving: ServingSnapshot) -> GuestCandidateMemory | None:
        """The guest candidate memory of ``serving``'s generator (None: remembering is off)."""
        if not self._generation_memory_lists:
            return None
        memory = self._memory_by_serving.get(serving)
        if memory is None:
            memory = self._memory_by_serving[serving] = GuestCandidateMemory(
                serving.generator, capacity=self._generation_memory_lists
            )
        return memory

    def _eligible_nodes(
        self, serving: ServingSnapshot, query: RecommendationQuery
    ) -> EligibleNodes:
        """``eligible_nodes`` for the query, remembered per serving snapshot (a new snapshot or
        policy is a new one): a pure function of the channel and the store (POS) or region
        (others), which most requests share. The arrays are shared between requests, which
        only read them."""
        remembered = self._eligible_by_serving.get(serving)
        if remembered is None:
            remembered = self._eligible_by_serving[serving] = {}
        pos = query.channel == "pos"
        key = (query.channel, query.store_id if pos else None, None if pos else query.region)
        nodes = remembered.get(key)
        if nodes is None:
            nodes = eligible_nodes(
                serving.nodes,
                channel=query.channel,
                store_id=query.store_id,
                region=query.region,
                policy=serving.policy.policy,
            )
            # Regions are the caller's free text: past the bound, computed each time.
            if len(remembered) < _ELIGIBLE_NODES_REMEMBERED:
                remembered[key] = nodes
        return nodes

    def _rank(
        self,
        serving: ServingSnapshot,
        judged: _Judged,
        kept: IntArray,
        query: RecommendationQuery,
        assignment: Assignment | None = None,
    ) -> tuple[ScoreParts, npt.NDArray[np.float64], IntArray]:
        """Score and order the kept candidates under the experiment arm's knobs, if any."""
        compiled = arm_policy(serving.policy, assignment)
        catalog_pos = judged.catalog_pos[kept]
        columns = judged.node_column[kept]
        rows = judged.fact_row[kept]  # a kept candidate passed the stock stage
        facts = judged.facts
        stock_units = facts.available[rows, columns] + facts.inbound[rows, columns]
        relevance = judged.relevance[kept]
        p_accept = (
            self._calibration.predict(relevance, judged.kind[kept])
            if self._calibration is not None
            else relevance
        )
        inputs = RankingInputs(
            catalog_pos=catalog_pos,
            category_code=facts.category_code[rows],
            relevance=relevance,
            p_accept=p_accept,
            effective_price=facts.effective_price[rows],
            unit_margin=facts.unit_margin[rows],
            return_rate=facts.return_rate[rows],
            fulfilment_cost=facts.fulfilment_cost[rows],
            stock_units=stock_units.astype(np.int64),
        )
        parts = score(inputs, compiled, query.channel)
        order = rank(
            parts.final,
            catalog_pos,
            inputs.category_code,
            limit=query.limit,
            max_per_category=compiled.policy.ranking.max_per_category,
            restricted_pairs=compiled.restricted_pairs,
        )
        return parts, p_accept, order

    async def _read_stock(
        self,
        serving: ServingSnapshot,
        catalog_pos: IntArray,
        nodes: EligibleNodes,
        degraded: list[str],
        *,
        now: datetime,
    ) -> tuple[IntArray, IntArray, npt.NDArray[np.bool_]]:
        """Available units (ATP minus safety stock, -1 where not ranged or not trusted),
        inbound, and ranged (an inventory row exists, trusted or not), shape (items, eligible
        nodes), in one round trip.

        Fails closed: when stock cannot be read, or a figure is older than the policy trusts,
        that stock does not exist for this request, and ``degraded`` says why. Under
        ``stock.on_unavailable: last_known`` a failed read falls back to the figures this
        replica read last for these cells (``service.store.last_known``), aged as any other.
        """
        shape = (len(catalog_pos), len(nodes.positions))
        if not shape[0] or not shape[1]:
            return _unseen_stock(shape)
        version = serving.meta.version
        mirrored = self._stock_mirror
        whole = mirrored.whole_figures(version) if mirrored is not None else None
        if whole is not None:  # the cells are picked as they are judged, not gathered first
            return self._trusted_stock(
                serving, whole, degraded, now=now, rows=catalog_pos, columns=nodes.positions
            )
        skus = tuple(map(serving.catalog.skus.__getitem__, catalog_pos.tolist()))
        node_ids = serving.nodes.ids(nodes.positions)
        remembering = serving.policy.policy.stock.on_unavailable == "last_known"
        try:
            stock = await self._store.read_stock(version, skus, node_ids)
        except StoreError as exc:
            log.warning("stock_read_failed", error=str(exc))
            if not remembering:
                degraded.append("stock unavailable: nothing recommended on unseen stock")
                return _unseen_stock(shape)
            degraded.append(
                "stock unavailable: last known figures used, nothing recommended on stock "
                "this replica has not seen"
            )
            # The mirror's copy, however old, is all this replica last knew of the version.
            stock = (
                mirrored.read(version, catalog_pos, nodes.positions, skus, stale_ok=True)
                if mirrored is not None
                else None
            ) or serving.last_known_stock.recall(
                catalog_pos, nodes.positions, skus=skus, node_ids=node_ids
            )
        else:
            if remembering:
                serving.last_known_stock.remember(catalog_pos, nodes.positions, stock)
        return self._trusted_stock(serving, stock, degraded, now=now)

    @staticmethod
    def _trusted_stock(
        serving: ServingSnapshot,
        stock: StockFigures | StockMatrix,
        degraded: list[str],
        *,
        now: datetime,
        rows: IntArray | None = None,
        columns: IntArray | None = None,
    ) -> tuple[IntArray, IntArray, npt.NDArray[np.bool_]]:
        """Available, inbound and ranged of ``stock`` (of its ``rows`` x ``columns``, by
        default all), figures too old for the policy left out."""
        max_age = serving.policy.policy.stock.max_age_seconds
        available, inbound, ranged, any_stale = trusted_stock_units(
            stock.atp,
            stock.safety_stock,
            stock.inbound,
            stock.ranged,
            stock.as_of_us,
            now_us=epoch_us(now),
            max_age_seconds=max_age,
            rows=rows,
            columns=columns,
        )
        if any_stale:
            degraded.append(
                f"stale stock: figures older than {max_age:g}s are not trusted, "
                "nothing recommended on them"
            )
        return available, inbound, ranged

    @staticmethod
    def _log_decision(
        query: RecommendationQuery,
        result: Recommendation,
        *,
        dropped_skus: dict[str, list[str]],
        personalized: bool,
    ) -> None:
        """The decision record: enough to answer "why", and no customer identifier."""
        log.info(
            "decision",
            channel=query.channel,
            basket_lines=len(query.basket),
            personalized=personalized,
            candidates=result.candidates_considered,
            # A guest's list reused from the memory: the same list the model would propose.
            candidates_remembered=result.candidates_remembered,
            dropped=result.dropped_by_rule,
            dropped_skus=dropped_skus,
            shown=[
                {"sku": item.sku, "kind": item.kind, **item.score_parts._asdict()}
                for item in result.items
            ],
            unknown_skus=len(result.unknown_skus),
            degraded=list(result.degraded),
            experiment=result.experiment.experiment if result.experiment else None,
            arm=result.experiment.arm if result.experiment else None,
            withheld=[item.sku for item in result.withheld],
            model_version=result.versions.model,
            snapshot_version=result.versions.snapshot,
            policy_version=result.versions.policy,
        )


def _unseen_stock(
    shape: tuple[int, int],
) -> tuple[IntArray, IntArray, npt.NDArray[np.bool_]]:
    """Unread stock: nothing to sell, but not "not ranged": an item that cannot be seen is
    out of stock for this request, not out of the store's assortment."""
    return (
        np.full(shape, -1, dtype=np.int64),
        np.zeros(shape, dtype=np.int64),
        np.ones(shape, dtype=np.bool_),
    )


def _subset(candidates: Candidates, mask: npt.NDArray[np.bool_]) -> Candidates:
    return Candidates(
        item_idx=candidates.item_idx[mask], score=candidates.score[mask], kind=candidates.kind[mask]
    )


def _request_region(serving: ServingSnapshot, query: RecommendationQuery) -> str | None:
    """The region popularity is read for: the request's, else the POS store's."""
    if query.region is not None:
        return query.region
    store = serving.nodes.index.get(query.store_id) if query.store_id is not None else None
    return serving.nodes.regions[store] if store is not None else None


def _unmodelled_categories(serving: ServingSnapshot, asked_pos: IntArray) -> tuple[str, ...]:
    """Categories of basket / PDP items the item master has and the model does not (new
    SKUs): cold-start popularity can still use them."""
    new_items = asked_pos[serving.catalog_to_model[asked_pos] < 0]
    if not new_items.size:
        return ()
    codes = sorted(set(serving.catalog.category_code[new_items].tolist()))
    return tuple(serving.catalog.categories[code] for code in codes)


def _concatenate(rounds: list[_Judged]) -> _Judged:
    if len(rounds) == 1:
        return rounds[0]
    facts = [judged.facts for judged in rounds]
    offsets = np.cumsum([0, *(len(f) for f in facts[:-1])])
    return _Judged(
        item_idx=np.concatenate([r.item_idx for r in rounds]),
        kind=np.concatenate([r.kind for r in rounds]),
        relevance=np.concatenate([r.relevance for r in rounds]),
        catalog_pos=np.concatenate([r.catalog_pos for r in rounds]),
        drop_reason=np.concatenate([r.drop_reason for r in rounds]),
        facts=CandidateFacts(
            **{
                name: np.concatenate([getattr(f, name) for f in facts])
                for name in CandidateFacts.__dataclass_fields__
            }
        ),
        fact_row=np.concatenate(
            [
                np.where(r.fact_row >= 0, r.fact_row + offset, -1)
                for r, offset in zip(rounds, offsets.tolist(), strict=True)
            ]
        ),
        node_column=np.concatenate([r.node_column for r in rounds]),
        anchor_pos=np.concatenate([r.anchor_pos for r in rounds]),
    )
