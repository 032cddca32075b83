"""The recommendation route writes its JSON straight from the result (``response_body``):
it must be the document the response models give (``to_response``), field for field."""

from __future__ import annotations

import orjson
import pytest

from rules.experiments import Assignment
from service.api.routes import response_body, to_response
from service.api.schemas import RecommendationResponse
from service.pipeline import Recommendation, RecommendedItem, ScoreTrace, Versions


def _item(sku: str, *, source: str = "template") -> RecommendedItem:
    return RecommendedItem(
        sku=sku,
        name=f'Item {sku} \u00e9 "quoted"',
        kind="cross_sell",
        score=0.123457,
        unit_price=12.5,
        unit_margin=1e-05,
        fulfillment_node="DC-1",
        reason_codes=("CO_PURCHASED", "IN_STOCK_TO_SHIP", "MARGIN_FLOOR_MET"),
        explanation="Goes with what is in the basket.",
        explanation_source=source,  # type: ignore[arg-type]
        score_parts=ScoreTrace(
            relevance=0.5,
            p_accept=0.01,
            unit_margin=1e-05,
            return_cost=0.0,
            fulfilment_cost=0.25,
            contribution=0.002,
            margin_weight=0.7,
            final=0.123457,
        ),
        category="Kitchen",
    )


RESULTS = [
    Recommendation(
        request_id="r-1",
        channel="cart",
        items=(_item("A"), _item("B", source="llm")),
        unknown_skus=("NOPE",),
        degraded=("stale stock: figures older than 60s are not trusted",),
        versions=Versions(model="m1", snapshot="s1", policy="p1"),
        candidates_considered=40,
        dropped_by_rule={"NO_STOCK": 3},
    ),
    Recommendation(
        request_id="",
        channel="pos",
        items=(),
        unknown_skus=(),
        degraded=(),
        versions=Versions(model="m1", snapshot="s1", policy="p1"),
        candidates_considered=0,
        experiment=Assignment(
            experiment="margin-test",
            arm="holdout",
            strategy="holdout",
            margin_weight=None,
            unit="customer",
        ),
        withheld=(_item("C"),),
    ),
]


@pytest.mark.parametrize("result", RESULTS, ids=["items", "holdout"])
def test_response_body_is_the_models_document(result: Recommendation) -> None:
    written = orjson.loads(response_body(result))
    assert written == to_response(result, debug=False).model_dump(mode="json")
    # And it is a valid response by the schema the OpenAPI document publishes.
    assert RecommendationResponse.model_validate(written).model_dump(mode="json") == written
