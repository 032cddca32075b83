"""Wire schemas of the HTTP API (pydantic v2). Bounds here are the API's input limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_BASKET_LINES = 200


class BasketLineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: str = Field(min_length=1, max_length=64, description="Item id as in the item master.")
    quantity: int = Field(default=1, ge=1, le=10_000)


class RecommendationRequest(BaseModel):
    """Ask for recommendations for a basket (cart, pos, contact_center) or a product page."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "channel": "cart",
                    "basket": [{"sku": "85123A", "quantity": 1}],
                    "region": "UK",
                    "limit": 5,
                }
            ]
        },
    )

    channel: Literal["cart", "pdp", "pos", "contact_center"]
    basket: list[BasketLineIn] = Field(default_factory=list, max_length=MAX_BASKET_LINES)
    sku: str | None = Field(
        default=None, min_length=1, max_length=64, description="The product on screen (pdp)."
    )
    customer_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Known customer; used for personalization only with consent.",
    )
    consent: bool = Field(default=False, description="Customer consented to personalization.")
    session_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Session (device, visit) id: keeps a guest in one experiment arm.",
    )
    store_id: str | None = Field(
        default=None, min_length=1, max_length=64, description="Store (required for pos)."
    )
    region: str | None = Field(
        default=None, min_length=1, max_length=64, description="Customer's delivery region."
    )
    limit: int = Field(default=5, ge=1, le=50)
    quantity: int | None = Field(
        default=None, ge=1, le=1000, description="Units of each recommended item to promise."
    )
    locale: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2}(-[A-Z]{2})?$",
        description="Language of the explanations, e.g. en or de-DE (en and de are written; "
        "others read English); unset = UPSELL_EXPLAIN_LOCALE.",
    )
    debug: bool = Field(
        default=False,
        description="Include the trace: every dropped candidate with its rule, and the score "
        "parts of every item shown. Needs a key with the admin scope.",
    )

    @model_validator(mode="after")
    def _channel_needs(self) -> RecommendationRequest:
        if self.channel == "pdp" and self.sku is None:
            raise ValueError("sku: required on the pdp channel (the product on screen)")
        if self.channel == "pos" and self.store_id is None:
            raise ValueError("store_id: required on the pos channel")
        return self


class RecommendedItemOut(BaseModel):
    sku: str
    name: str
    kind: str = Field(description="Generator: cross_sell, personal or popular.")
    score: float = Field(
        description="Ranking score: relevance blended with the policy's objective."
    )
    unit_price: float = Field(description="Effective price (promotion price when live).")
    unit_margin: float = Field(description="Effective price minus unit cost.")
    fulfillment_node: str
    reason_codes: list[str]
    explanation: str = Field(description="One sentence on why the item is shown.")
    explanation_source: Literal["template", "cache", "llm"] = Field(
        description="llm: written by the LLM within this request; cache: LLM text written "
        "earlier; template: from the reason codes."
    )


class ScorePartsOut(BaseModel):
    relevance: float
    p_accept: float = Field(description="Calibrated probability the item is bought when shown.")
    unit_margin: float
    return_cost: float = Field(description="Expected cost of returns per unit.")
    fulfilment_cost: float = Field(description="Incremental shipment cost of the chosen node.")
    contribution: float = Field(description="p_accept x (margin - return cost - fulfilment).")
    margin_weight: float = Field(description="The policy knob that blended the two.")
    final: float


class ItemTraceOut(BaseModel):
    sku: str
    score_parts: ScorePartsOut


class DroppedOut(BaseModel):
    sku: str
    kind: str
    rule: str = Field(description="Reason code of the first rule that dropped it.")


class TraceOut(BaseModel):
    candidates_considered: int
    dropped_by_rule: dict[str, int]
    dropped: list[DroppedOut]
    shown: list[ItemTraceOut]


class VersionsOut(BaseModel):
    model: str
    snapshot: str
    policy: str


class ExperimentOut(BaseModel):
    name: str = Field(description="The experiment (policy experiments.running).")
    arm: str = Field(description="The arm this customer (or session) is in.")


class RecommendationResponse(BaseModel):
    request_id: str
    channel: str
    items: list[RecommendedItemOut]
    unknown_skus: list[str] = Field(description="Requested SKUs the item master does not know.")
    degraded: list[str] = Field(description="Why this answer is narrower than usual, if it is.")
    versions: VersionsOut
    experiment: ExperimentOut | None = Field(
        default=None, description="The experiment arm that shaped this answer; null: none."
    )
    trace: TraceOut | None = Field(default=None, description="Only with debug=true.")


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadinessResponse(BaseModel):
    ready: bool
    checks: dict[str, str]


class FieldProblem(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """Error body (RFC 9457 problem details, plus the fields at fault)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    request_id: str | None = None
    errors: list[FieldProblem] = Field(default_factory=list)
