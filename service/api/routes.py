"""HTTP routes: recommendations, health and readiness."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from service.api.auth import Caller, CallerDep, accepted_caller, authorize, identify
from service.api.observe import note
from service.api.schemas import (
    DroppedOut,
    ExperimentOut,
    HealthResponse,
    ItemTraceOut,
    Problem,
    ReadinessResponse,
    RecommendationRequest,
    RecommendationResponse,
    RecommendedItemOut,
    ScorePartsOut,
    TraceOut,
    VersionsOut,
)
from service.api.timing import arrived_at
from service.api_keys import ADMIN
from service.explain.explainer import channel_budget_seconds
from service.metrics import Metrics
from service.pipeline import BasketLine, Recommendation, RecommendationQuery
from service.request_id import current_request_id
from service.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

router = APIRouter()

_JSON = "application/json"
_JSON_PARAMETERS = "application/json;"  # e.g. a charset

_PROBLEMS: dict[int | str, dict[str, object]] = {
    401: {"model": Problem, "description": "API key missing or unknown."},
    403: {
        "model": Problem,
        "description": "The key lacks the channel's scope (or admin, for "
        "debug=true), or no keys are configured; `detail` names the scope.",
    },
    413: {"model": Problem, "description": "Body larger than UPSELL_MAX_BODY_BYTES."},
    422: {"model": Problem, "description": "Invalid request; `errors` names each field."},
    429: {"model": Problem, "description": "The key's rate limit is reached; see Retry-After."},
    503: {"model": Problem, "description": "No snapshot or model yet, or the store is down."},
}


class RecommendationRoute(APIRoute):
    """``/v1/recommendations`` with a fast path for the requests that pass: a known key (or
    none under UPSELL_AUTH=off) and a JSON body that validates, parsed by pydantic-core from
    the bytes (``model_validate_json``). FastAPI's own handler (stdlib json, then validation,
    then dependencies resolved one by one) cost 60-170 us more worker CPU per cart request,
    5-15% of it (benchmarks/README.md, the load section).

    Every other request (no key, an unknown one, bad JSON, another content type, a body that
    fails validation) goes to that handler, so refusals and their bodies are FastAPI's,
    exactly as declared in the schema. So do all requests while ``app.dependency_overrides``
    holds anything (a test's stand-ins). The route may depend on ``identify`` only: building
    it with another dependency fails, since the fast path would skip it (dependencies given
    to ``include_router`` are not checked: give none). FastAPI's telemetry, when configured,
    sees only the requests of FastAPI's handler.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        declared = super().get_route_handler()
        # The fast path resolves the caller itself: a dependency added to the route (or its
        # router) would be skipped, so refuse to build one rather than serve without it.
        depends_on = [dependency.call for dependency in self.dependant.dependencies]
        if depends_on != [identify]:
            raise RuntimeError(
                f"{self.path}: the fast path knows the `identify` dependency only, this route "
                f"has {depends_on}; teach RecommendationRoute.handle the others first"
            )

        async def handle(request: Request) -> Response:
            if request.app.dependency_overrides:  # a test's stand-ins: FastAPI's path honours them
                return await declared(request)
            content_type = request.headers.get("content-type", "")
            if content_type == _JSON or content_type.startswith(_JSON_PARAMETERS):
                caller = await accepted_caller(request)
                if caller is not None:
                    try:
                        body = RecommendationRequest.model_validate_json(await request.body())
                    except HTTPException:
                        raise  # the body limit's 413, as the declared handler lets it through
                    except Exception:  # invalid, or unreadable: the declared handler says why
                        return await declared(request)
                    return await answer(body, request, caller)
            return await declared(request)

        return handle


async def recommend(
    body: RecommendationRequest,
    request: Request,
    caller: CallerDep,
) -> Response:
    """Upsell and cross-sell items for a basket or product page, under every constraint.

    Answered within the channel's server-side budget from the request's arrival, explanations
    included (``UPSELL_DEADLINE_*_MS``). Needs a key with the channel's scope. A debug trace
    (every dropped candidate, score parts) needs the admin scope: it shows margins and the
    rules' workings, which are the retailer's business, not the shopper's.
    """
    return await answer(body, request, caller)


router.add_api_route(
    "/v1/recommendations",
    recommend,
    methods=["POST"],
    response_model=RecommendationResponse,
    responses=_PROBLEMS,
    tags=["recommendations"],
    route_class_override=RecommendationRoute,
)


async def answer(body: RecommendationRequest, request: Request, caller: Caller) -> Response:
    """The route's work once the caller is known and the body valid (either path)."""
    # From the app's state, not by dependencies: each one FastAPI resolves costs more than
    # the lookup it wraps, on the hottest route.
    runtime: Runtime = request.app.state.runtime
    note(
        request,
        channel=body.channel,
        customer=runtime.pseudonymize(body.customer_id) if body.customer_id else None,
    )
    if body.debug:
        await authorize(request, caller, ADMIN, what="debug traces are admin-only")
    else:
        await authorize(request, caller, body.channel)
    recommender = runtime.require_recommender()
    deadline = arrived_at(request) + channel_budget_seconds(runtime.settings, body.channel)
    query = RecommendationQuery(
        request_id=current_request_id() or "",
        channel=body.channel,
        basket=tuple(BasketLine(sku=line.sku, quantity=line.quantity) for line in body.basket),
        pdp_sku=body.sku,
        customer_id=body.customer_id,
        consent=body.consent,
        session_id=body.session_id,
        store_id=body.store_id,
        region=body.region,
        limit=body.limit,
        quantity=body.quantity,
        locale=body.locale or runtime.settings.explain_locale,
        debug=body.debug,
    )
    result = await recommender.recommend(query, deadline=deadline)
    metrics: Metrics = request.app.state.metrics
    metrics.observe_recommendation(
        channel=result.channel,
        candidates=result.candidates_considered,
        dropped_by_rule=result.dropped_by_rule,
        explanation_sources=[item.explanation_source for item in result.items],
        candidates_remembered=result.candidates_remembered,
    )
    refresh_gauges(runtime, metrics)
    if body.debug:
        return Response(to_response(result, debug=True).model_dump_json(), media_type=_JSON)
    return Response(response_body(result), media_type=_JSON)


def refresh_gauges(runtime: Runtime, metrics: Metrics) -> None:
    """Snapshot age and versions as this process serves them now (each worker its own)."""
    serving = runtime.mirror.loaded if runtime.mirror is not None else None
    if serving is None or runtime.artifacts is None:
        return
    as_of = serving.meta.as_of
    as_of = as_of if as_of.tzinfo is not None else as_of.replace(tzinfo=UTC)  # naive = UTC
    age = (datetime.now(UTC) - as_of).total_seconds()
    metrics.snapshot_age.set(max(0.0, age))
    metrics.show_versions(
        runtime.artifacts.version, serving.meta.version, serving.policy.policy_version
    )


def response_body(result: Recommendation) -> bytes:
    """``RecommendationResponse`` of a non-debug answer as JSON, written by orjson straight
    from the result: building and validating the models cost more than the rest of the
    route. ``to_response`` is the same document through the models (a test holds them equal).
    """
    experiment = result.experiment
    return orjson.dumps(
        {
            "request_id": result.request_id,
            "channel": result.channel,
            "items": [
                {
                    "sku": item.sku,
                    "name": item.name,
                    "kind": item.kind,
                    "score": item.score,
                    "unit_price": item.unit_price,
                    "unit_margin": item.unit_margin,
                    "fulfillment_node": item.fulfillment_node,
                    "reason_codes": item.reason_codes,
                    "explanation": item.explanation,
                    "explanation_source": item.explanation_source,
                }
                for item in result.items
            ],
            "unknown_skus": result.unknown_skus,
            "degraded": result.degraded,
            "versions": {
                "model": result.versions.model,
                "snapshot": result.versions.snapshot,
                "policy": result.versions.policy,
            },
            "experiment": (
                {"name": experiment.experiment, "arm": experiment.arm}
                if experiment is not None
                else None
            ),
            "trace": None,
        }
    )


def to_response(result: Recommendation, *, debug: bool) -> RecommendationResponse:
    trace = (
        TraceOut(
            candidates_considered=result.candidates_considered,
            dropped_by_rule=result.dropped_by_rule,
            dropped=[
                DroppedOut(sku=entry.sku, kind=entry.kind, rule=entry.rule)
                for entry in result.dropped
            ],
            shown=[
                ItemTraceOut(sku=item.sku, score_parts=ScorePartsOut(**item.score_parts._asdict()))
                for item in result.items
            ],
        )
        if debug
        else None
    )
    return RecommendationResponse(
        request_id=result.request_id,
        channel=result.channel,
        items=[
            RecommendedItemOut(
                sku=item.sku,
                name=item.name,
                kind=item.kind,
                score=item.score,
                unit_price=item.unit_price,
                unit_margin=item.unit_margin,
                fulfillment_node=item.fulfillment_node,
                reason_codes=list(item.reason_codes),
                explanation=item.explanation,
                explanation_source=item.explanation_source,
            )
            for item in result.items
        ],
        unknown_skus=list(result.unknown_skus),
        degraded=list(result.degraded),
        versions=VersionsOut(
            model=result.versions.model,
            snapshot=result.versions.snapshot,
            policy=result.versions.policy,
        ),
        experiment=(
            ExperimentOut(name=result.experiment.experiment, arm=result.experiment.arm)
            if result.experiment is not None
            else None
        ),
        trace=trace,
    )


@router.get("/healthz", response_model=HealthResponse, tags=["operations"])
async def healthz() -> HealthResponse:
    """The process is up (liveness)."""
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    responses={503: {"model": ReadinessResponse, "description": "Not ready; see checks."}},
    tags=["operations"],
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready to serve: store reachable, model loaded, a snapshot mirrored."""
    checks = await runtime.readiness()
    ready = all(value == "ok" for value in checks.values())
    body = ReadinessResponse(ready=ready, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
