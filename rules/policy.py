"""The policy schema: margin floors, ranking knobs, restrictions, fulfilment and stock rules,
and the holdout experiments that measure what they earn.

Loaded from versioned YAML and validated whole by pydantic; its hash (over the validated
content, so formatting does not change it) goes into every response and decision record.
Scoped settings (floors, ranking knobs) resolve to the most specific match:
category and channel > category > channel > neither.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Literal, TypeVar

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rules.errors import PolicyError

Channel = Literal["cart", "pdp", "pos", "contact_center"]
CHANNELS: tuple[Channel, ...] = ("cart", "pdp", "pos", "contact_center")
Objective = Literal["margin", "sell_through", "revenue", "relevance"]
# What an experiment arm does to ranking: ``holdout`` shows nothing (the exposure is still
# recorded, with the items it would have shown), ``relevance`` ranks by relevance alone
# (margin_weight 0 everywhere), ``policy`` uses the policy's own knobs, ``margin_weight``
# sets every knob's weight to the arm's ``margin_weight``.
ArmStrategy = Literal["holdout", "relevance", "policy", "margin_weight"]
# Experiment and arm names go into every response, exposure and report: short and plain.
EXPERIMENT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
# Shares are written as decimals in YAML; this much rounding slack still sums to one.
_SHARE_TOLERANCE = 1e-6


class _Scoped(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    category: str | None = None
    channel: Channel | None = None

    @property
    def specificity(self) -> int:
        return (2 if self.category is not None else 0) + (1 if self.channel is not None else 0)


Scoped = TypeVar("Scoped", bound=_Scoped)


class MarginFloor(_Scoped):
    """A floor on unit margin: at least ``absolute`` (currency units) and at least
    ``percent`` of the effective price, after any incremental fulfilment cost."""

    absolute: float = Field(default=0.0, ge=0)
    percent: float = Field(default=0.0, ge=0, le=1)


class RankingKnob(_Scoped):
    """How far ranking leans from relevance towards the objective, in a bounded range.

    ``margin_weight`` 0 ranks by relevance alone; 1 by the objective alone. Retailers and the
    big platforms expose levels, not a switch, because pure margin-pushing erodes trust.
    """

    objective: Objective = "margin"
    margin_weight: float = Field(default=0.0, ge=0, le=1)


class RankingPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    knobs: tuple[RankingKnob, ...] = Field(default=(RankingKnob(),), min_length=1)
    max_per_category: int = Field(
        default=3, ge=1, le=50, description="Diversity cap; relaxed only to fill the list."
    )
    return_handling_cost: float = Field(
        default=0.0, ge=0, description="Cost of handling one returned unit, beyond the margin lost."
    )
    low_stock_units: int = Field(
        default=0, ge=0, description="Available plus inbound below this: low stock."
    )
    low_stock_factor: float = Field(
        default=1.0, ge=0, le=1, description="Contribution multiplier for low stock."
    )
    overstock_units: int = Field(
        default=0, ge=0, description="Available plus inbound at or above this: overstock (0: off)."
    )
    sell_through_boost: float = Field(
        default=0.0, ge=0, le=0.5, description="Bounded boost to overstocked items' contribution."
    )


class Restrictions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    category_pairs: tuple[tuple[str, str], ...] = Field(
        default=(), description="Categories never recommended with each other (both ways)."
    )
    age_verified_channels: tuple[Channel, ...] = Field(
        default=("pos",),
        description="Channels that verify age: only they show age-restricted items.",
    )
    excluded_brands: tuple[str, ...] = Field(default=(), description="Vendors never recommended.")


class Fulfilment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pos_ships_from_region_dcs: bool = Field(
        default=True,
        description="POS may sell items flagged ship_to_home from the DCs of the store's region.",
    )
    charge_split_shipments: bool = Field(
        default=True,
        description="Charge a node's fulfillment_cost to a candidate that ships apart.",
    )


class GeneratorWeights(BaseModel):
    """How much each candidate generator counts in the hybrid (0 leaves it out).

    The names are those of ``models.generators.HybridWeights``; the service builds the
    hybrid from these, so a reload can retune the mix without a new model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cross_sell: float = Field(default=1.0, ge=0, description="Co-occurrence item-item.")
    personal: float = Field(default=1.0, ge=0, description="ALS, for a consenting customer.")
    popular: float = Field(default=0.2, ge=0, description="Overall popularity: the backfill.")
    factor_cross_sell: float = Field(default=0.0, ge=0, description="ALS item-factor neighbours.")
    bundle: float = Field(default=0.0, ge=0, description="Frequently bought together (lift).")
    upgrade: float = Field(default=0.0, ge=0, description="Premium alternatives in the category.")
    replenish: float = Field(default=0.0, ge=0, description="Regular purchases due again.")
    segment_popular: float = Field(
        default=0.0, ge=0, description="Popularity in the basket's categories and the region."
    )

    @model_validator(mode="after")
    def _usable(self) -> GeneratorWeights:
        chosen = [name for name, weight in self.model_dump().items() if weight > 0]
        if not chosen:
            raise ValueError("at least one generator weight must be positive")
        if len(chosen) > 1 and self.popular <= 0:
            raise ValueError("popular: must be positive when several generators are mixed")
        return self


class CandidatePolicy(BaseModel):
    """Where candidates come from, before any constraint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: GeneratorWeights = GeneratorWeights()
    substitutes_per_item: int = Field(
        default=10,
        ge=0,
        le=200,
        description="In-stock alternatives proposed for each basket item that cannot be "
        "fulfilled at an eligible node (0: none).",
    )


class StockPolicy(BaseModel):
    """How far stock figures are trusted: by age, and when the stock store cannot be read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_age_seconds: float | None = Field(
        default=None, gt=0, description="ATP older than this is not trusted (None: no limit)."
    )
    on_unavailable: Literal["closed", "last_known"] = Field(
        default="closed",
        description="When stock cannot be read: 'closed' recommends nothing on it; "
        "'last_known' uses the figures this replica read recently that are at most "
        "max_age_seconds old (by their as_of), never stock it has not seen.",
    )

    @model_validator(mode="after")
    def _last_known_needs_an_age_limit(self) -> StockPolicy:
        if self.on_unavailable == "last_known" and self.max_age_seconds is None:
            raise ValueError(
                "on_unavailable: last_known needs max_age_seconds, the age past which "
                "remembered figures are no longer trusted"
            )
        return self


class ExperimentArm(BaseModel):
    """One arm: its share of the experiment's units and what it does to ranking."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=EXPERIMENT_NAME_PATTERN)
    share: float = Field(gt=0, le=1, description="Share of the experiment's units (0..1].")
    strategy: ArmStrategy
    margin_weight: float | None = Field(
        default=None, ge=0, le=1, description="Every knob's weight; strategy margin_weight only."
    )

    @model_validator(mode="after")
    def _weight_with_its_strategy(self) -> ExperimentArm:
        if self.strategy == "margin_weight" and self.margin_weight is None:
            raise ValueError("margin_weight: required by strategy margin_weight")
        if self.strategy != "margin_weight" and self.margin_weight is not None:
            raise ValueError(
                f"margin_weight: only strategy margin_weight takes one (this arm is "
                f"{self.strategy!r})"
            )
        return self


class ExperimentScope(BaseModel):
    """Which requests an experiment takes; an empty list does not restrict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: tuple[Channel, ...] = ()
    categories: tuple[str, ...] = Field(
        default=(), description="A basket or PDP item is of one of these categories."
    )
    store_clusters: tuple[str, ...] = Field(
        default=(), description="The request's store is in one of these clusters."
    )


class Experiment(BaseModel):
    """A randomised holdout test: units (customers, else sessions) split between arms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=EXPERIMENT_NAME_PATTERN)
    salt: str = Field(
        min_length=1,
        max_length=64,
        description="Mixed into the assignment hash; a new salt reshuffles every unit.",
    )
    arms: tuple[ExperimentArm, ...] = Field(min_length=2)
    scope: ExperimentScope = ExperimentScope()
    control: str | None = Field(
        default=None, description="The arm the others are compared with (default: the first)."
    )
    target_effect: float | None = Field(
        default=None,
        gt=0,
        description="Smallest uplift in gross margin per order worth detecting (currency "
        "units); the report flags the test underpowered while it cannot detect this much "
        "(default: 2% of the control arm's margin per order).",
    )

    @model_validator(mode="after")
    def _arms_consistent(self) -> Experiment:
        names = [arm.name for arm in self.arms]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"arms: names must be unique, repeated: {', '.join(repeated)}")
        total = sum(arm.share for arm in self.arms)
        if abs(total - 1.0) > _SHARE_TOLERANCE:
            raise ValueError(f"arms: shares must sum to 1, they sum to {total:g}")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control: {self.control!r} is not an arm ({', '.join(names)})")
        return self

    @property
    def control_arm(self) -> ExperimentArm:
        wanted = self.control or self.arms[0].name
        return next(arm for arm in self.arms if arm.name == wanted)


class ExperimentsPolicy(BaseModel):
    """Holdout experiments, the store clusters their scopes name, and outcome attribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attribution_window_hours: float = Field(
        default=168.0,
        gt=0,
        le=24 * 90,
        description="An item bought this long after it was shown counts as attached.",
    )
    store_clusters: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="Named groups of store ids, for experiment scopes."
    )
    running: tuple[Experiment, ...] = Field(
        default=(),
        description="A request joins the first experiment (in this order) whose scope it "
        "matches and that has a unit id for it.",
    )

    @model_validator(mode="after")
    def _references(self) -> ExperimentsPolicy:
        names = [experiment.name for experiment in self.running]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"running: experiment names must be unique: {', '.join(repeated)}")
        for cluster, stores in self.store_clusters.items():
            if not stores:
                raise ValueError(f"store_clusters.{cluster}: a cluster needs at least one store")
        for position, experiment in enumerate(self.running):
            unknown = [c for c in experiment.scope.store_clusters if c not in self.store_clusters]
            if unknown:
                raise ValueError(
                    f"running.{position}.scope.store_clusters: unknown cluster(s) "
                    f"{', '.join(unknown)}; define them under experiments.store_clusters"
                )
        return self

    def find(self, name: str) -> Experiment | None:
        return next((experiment for experiment in self.running if experiment.name == name), None)


class Policy(BaseModel):
    """A whole policy file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    margin_floors: tuple[MarginFloor, ...] = Field(min_length=1)
    candidate_pool: int = Field(default=300, ge=10, le=5000)
    max_candidate_pool: int = Field(default=1200, ge=10, le=20000)
    default_quantity: int = Field(default=1, ge=1, le=1000)
    candidates: CandidatePolicy = CandidatePolicy()
    ranking: RankingPolicy = RankingPolicy()
    restrictions: Restrictions = Restrictions()
    fulfilment: Fulfilment = Fulfilment()
    stock: StockPolicy = StockPolicy()
    experiments: ExperimentsPolicy = ExperimentsPolicy()

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        _one_default_per_scope("margin_floors", self.margin_floors)
        _one_default_per_scope("ranking.knobs", self.ranking.knobs)
        if self.max_candidate_pool < self.candidate_pool:
            raise ValueError("max_candidate_pool: must be at least candidate_pool")
        return self

    @property
    def content_hash(self) -> str:
        canonical = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()[:16]

    def floor_for(self, *, category: str, channel: Channel) -> MarginFloor:
        """The most specific floor matching ``category`` on ``channel``."""
        return _most_specific(self.margin_floors, category=category, channel=channel)

    def knob_for(self, *, category: str, channel: Channel) -> RankingKnob:
        """The most specific ranking knob matching ``category`` on ``channel``."""
        return _most_specific(self.ranking.knobs, category=category, channel=channel)


def _one_default_per_scope(name: str, entries: tuple[_Scoped, ...]) -> None:
    seen: set[tuple[str | None, str | None]] = set()
    for entry in entries:
        scope = (entry.category, entry.channel)
        if scope in seen:
            raise ValueError(
                f"{name}: two entries for category={entry.category!r}, channel={entry.channel!r}"
            )
        seen.add(scope)
    if (None, None) not in seen:
        raise ValueError(f"{name}: a default entry (no category, no channel) is required")


def _most_specific(entries: tuple[Scoped, ...], *, category: str, channel: Channel) -> Scoped:
    best: Scoped | None = None
    for entry in entries:
        if entry.category not in (None, category) or entry.channel not in (None, channel):
            continue
        if best is None or entry.specificity > best.specificity:
            best = entry
    assert best is not None  # the validator guarantees a default entry
    return best


def parse_policy(text: str, *, source: str) -> Policy:
    """Validate policy YAML; PolicyError names ``source`` and every bad field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: a policy is a YAML mapping, got {type(raw).__name__}")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise PolicyError(f"{source}: invalid policy: {problems}") from exc


def load_policy(path: Path | None = None) -> Policy:
    """Load a policy file, or the packaged default policy when ``path`` is None."""
    if path is None:
        text = resources.files("rules").joinpath("policies/default.yaml").read_text("utf-8")
        return parse_policy(text, source="rules/policies/default.yaml")
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from exc
    return parse_policy(text, source=str(path))
