"""The service with its pipeline replayed: the floor of ``/v1/recommendations`` for bench_load.

``app()`` is the app ``upsell serve`` builds (``service.app.app_from_environment``), except
that once it has started, each worker's recommender answers every query with the first
recommendation it made. Everything else a recommendation request does still runs: uvicorn,
the middleware, the route's body parsing and validation, auth and the rate limit, metrics,
gauges and the response's serialisation. Its peak throughput is what ``/v1/recommendations``
could reach with a pipeline that cost nothing, so bench_load can say how much of each
request the pipeline takes and how much a ratio target leaves it.

A benchmark's instrument, not a way to serve: the answers are stale by construction.

    uvicorn floor_app:app --factory --app-dir benchmarks
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.app import app_from_environment
from service.pipeline import Recommendation, RecommendationQuery, Recommender


class ReplayedRecommender:
    """Makes one recommendation with ``recommender``, then answers every query with it."""

    def __init__(self, recommender: Recommender) -> None:
        self._recommender = recommender
        self._first: Recommendation | None = None

    async def recommend(self, query: RecommendationQuery, *, deadline: float) -> Recommendation:
        if self._first is None:
            self._first = await self._recommender.recommend(query, deadline=deadline)
        return self._first


def app() -> FastAPI:
    """``upsell serve``'s app, its recommender replayed once the lifespan has started it."""
    application = app_from_environment()
    serving = application.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with serving(app):
            runtime = app.state.runtime
            runtime.recommender = ReplayedRecommender(runtime.require_recommender())
            yield

    application.router.lifespan_context = lifespan
    return application
