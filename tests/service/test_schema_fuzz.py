"""schemathesis against the live OpenAPI schema (issue 7): no 5xx, responses match the schema.

A real uvicorn server on a free port, on the test Redis (a key prefix of its own) with the
bundled sample published, serves its own ``/openapi.json``; schemathesis reads it and sends
every operation examples it generates from the schema (valid and not), with the bench's
bearer token, which is the admin token today and a key with every scope once API keys land
(``UPSELL_AUTH=keys`` and the keys file are set for that already: settings ignore unknown
variables). Each example is checked for ``not_a_server_error`` and
``response_schema_conformance`` (the documented body of the status answered). Examples are
bounded per operation so the whole module takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import schemathesis
import structlog
import yaml
from hypothesis import HealthCheck, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error, response_schema_conformance

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_faults import fresh_snapshot, publish, served, settings_for

TOKEN = "schema-fuzz-token"
SCOPES = ["cart", "pdp", "pos", "contact_center", "admin", "events"]
MAX_EXAMPLES = 30


def keys_file(directory: Path) -> Path:
    """The API keys file of the agreed interface: one key with every scope, no real limit."""
    path = directory / "api_keys.yaml"
    key = {
        "name": "schema-fuzz",
        "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
        "scopes": SCOPES,
        "rate_limit": {"per_second": 100_000, "burst": 100_000},
    }
    path.write_text(yaml.safe_dump({"keys": [key]}))
    return path


@pytest.fixture(scope="module")
def live_url(
    redis_url: str, demo_data: DemoData, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Base URL of the app under uvicorn, the sample published to its own Redis prefix."""
    root = tmp_path_factory.mktemp("schema-fuzz")
    prefix = f"upsell-test:{uuid.uuid4().hex[:8]}"
    keys = keys_file(root)
    saved = {name: os.environ.get(name) for name in ("UPSELL_AUTH", "UPSELL_API_KEYS_FILE")}
    os.environ.update(UPSELL_AUTH="keys", UPSELL_API_KEYS_FILE=str(keys))
    try:
        app_settings = settings_for(
            redis_url, demo=demo_data, tmp_path=root, prefix=prefix
        ).model_copy(update={"admin_token": SecretStr(TOKEN)})
        publish(app_settings, fresh_snapshot(demo_data.contract_dir))
        with served(create_app(app_settings)) as url:
            yield url
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        client = redis.Redis.from_url(redis_url)
        try:
            for pattern in (f"{prefix}:*", f"{{{prefix}}}:*"):
                for key in list(client.scan_iter(match=pattern, count=1_000)):
                    client.unlink(key)
        finally:
            client.close()


def app_schema() -> dict[str, Any]:
    """The OpenAPI document the app builds (no lifespan runs: routes and models only).

    Called at collection: ``create_app`` configures structlog for the process, so the
    configuration found is put back, or tests that capture logs later would see none."""
    was_configured, saved = structlog.is_configured(), structlog.get_config()
    try:
        return create_app(Settings(log_level="error")).openapi()
    finally:
        if was_configured:
            structlog.configure(**saved)
        else:
            structlog.reset_defaults()


# Loaded at collection, from the app itself: schemathesis's lazy loader
# (``schemathesis.pytest.from_fixture``) reads ``request.node._nodeid``, which pytest 9.2 no
# longer has. The first test below holds this document to what the live server publishes.
schema = schemathesis.openapi.from_dict(app_schema())


def test_the_fuzzed_schema_is_the_one_the_live_server_publishes(live_url: str) -> None:
    """The document the examples come from is byte for byte what /openapi.json serves."""
    served_schema = httpx.get(f"{live_url}/openapi.json", timeout=10).json()
    assert served_schema == app_schema()
    assert {"/v1/recommendations", "/v1/ping"} <= set(served_schema["paths"])


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_answers_without_5xx_and_as_documented(case: Any, live_url: str) -> None:
    """Generated requests, valid or not, never get a 5xx, and every answer's body matches
    the schema documented for its status."""
    case.call_and_validate(
        base_url=live_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=[not_a_server_error, response_schema_conformance],
        timeout=10,
    )
