"""The one place where errors become HTTP problems (see ``rules.errors`` for the tree)."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rules.errors import InputError, NotReadyError, StoreError, UpsellError
from service.api.schemas import FieldProblem, Problem
from service.request_id import current_request_id

log = structlog.get_logger(__name__)


def _problem(status: int, title: str, detail: str, errors: list[FieldProblem]) -> JSONResponse:
    body = Problem(
        title=title,
        status=status,
        detail=detail,
        request_id=current_request_id(),
        errors=errors,
    )
    return JSONResponse(
        body.model_dump(), status_code=status, media_type="application/problem+json"
    )


def problem_response(status: int, title: str, detail: str) -> JSONResponse:
    """A problem body for middleware answering before the routes (no field list)."""
    return _problem(status, title, detail, [])


def _field_name(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(part) for part in location]
    if parts and parts[0] == "body":
        parts = parts[1:]
        # A body that is not JSON at all is located at a character offset, not a field.
        if len(parts) == 1 and parts[0].isdigit():
            return "body"
    return ".".join(parts) or "body"


async def validation_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        message = str(error.get("msg", "invalid"))
        field = _field_name(error.get("loc", ()))
        # Cross-field checks name their field at the start of the message ("sku: ...").
        if error.get("type") == "value_error" and ": " in message:
            named, _, rest = message.removeprefix("Value error, ").partition(": ")
            if " " not in named:
                field, message = named, rest
        errors.append(FieldProblem(field=field, message=message))
    detail = "; ".join(f"{problem.field}: {problem.message}" for problem in errors)
    return _problem(422, "Invalid request", detail, errors)


async def upsell_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UpsellError)
    if isinstance(exc, InputError):
        message = str(exc)
        field, _, rest = message.partition(": ")
        errors = [FieldProblem(field=field, message=rest)] if rest and " " not in field else []
        return _problem(422, "Invalid request", message, errors)
    if isinstance(exc, NotReadyError):
        return _problem(503, "Not ready", str(exc), [])
    if isinstance(exc, StoreError):
        log.warning("store_error", error=str(exc))
        return _problem(503, "Snapshot store unavailable", str(exc), [])
    log.error("unexpected_domain_error", error=str(exc))
    return _problem(500, "Internal error", "unexpected error; see logs", [])


async def http_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = _problem(exc.status_code, _TITLES.get(exc.status_code, "Error"), str(exc.detail), [])
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    413: "Content too large",
    429: "Too many requests",
}


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_problem)
    app.add_exception_handler(RequestValidationError, validation_problem)
    app.add_exception_handler(UpsellError, upsell_problem)
    document_problems(app)


PROBLEM_MEDIA_TYPE = "application/problem+json"
_PROBLEM_REF = "#/components/schemas/Problem"
# FastAPI's own 422 document (a list of pydantic errors): the handler above answers a Problem.
_FASTAPI_VALIDATION_REF = "#/components/schemas/HTTPValidationError"


def document_problems(app: FastAPI) -> None:
    """Make the OpenAPI document say what the handlers send: error answers are a
    ``Problem`` as ``application/problem+json`` (FastAPI documents every response model as
    ``application/json``, and its default 422 as a list of pydantic errors)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                for code, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    json_body = content.get("application/json", {})
                    reference = json_body.get("schema", {}).get("$ref")
                    if code[:1] in "45" and reference in (_PROBLEM_REF, _FASTAPI_VALIDATION_REF):
                        del content["application/json"]
                        content[PROBLEM_MEDIA_TYPE] = {"schema": {"$ref": _PROBLEM_REF}}
        components = schema.get("components", {}).get("schemas", {})
        if "Problem" not in components:
            components["Problem"] = Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
