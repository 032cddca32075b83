"""API keys, scopes, rate limits and input limits, over real HTTP (uvicorn in a thread).

One server per module: the sample's model and snapshot on the session's Redis (snapshot store
and rate-limit buckets under a prefix of this module's own), ``UPSELL_AUTH=keys`` and a keys
file with one key per role. Each rate-limit test uses a key of its own, so buckets never mix.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
import pytest
import redis
import redis.asyncio
import yaml
from fastapi import APIRouter, Depends, HTTPException
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from models.data.contract import read_snapshot_dir
from rules.errors import InputError
from service.api.auth import Caller, identify
from service.api.routes import RecommendationRoute, recommend
from service.api_keys import RateLimit, load_key_ring
from service.app import create_app
from service.metrics import Metrics
from service.rate_limit import RateLimiter, lease_size
from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_end_to_end import publish
from tests.service.test_faults import served
from tests.service.test_outcomes import order

REPO = Path(__file__).resolve().parents[2]
CART = {"channel": "cart", "basket": [{"sku": "85123A", "quantity": 1}], "limit": 3}
PDP = {"channel": "pdp", "sku": "85123A", "limit": 3}
KEYS: dict[str, tuple[list[str], dict[str, float] | None]] = {
    "web-shop": (["cart", "pdp"], {"per_second": 1000, "burst": 1000}),
    "pos-till": (["pos"], None),
    "ops": (["admin"], None),
    "orders-feed": (["events"], None),
    "tight": (["cart"], {"per_second": 0.01, "burst": 2}),  # refills one token per 100 s
    "tight-admin": (["admin"], {"per_second": 0.01, "burst": 1}),
    "tight-metrics": (["cart"], {"per_second": 0.01, "burst": 2}),
    "leased": (["cart"], {"per_second": 100, "burst": 24}),  # leases of 5 tokens
    "roomy": (["cart"], {"per_second": 100, "burst": 400}),  # leases of 5, never throttled
}


def raw_key(name: str) -> str:
    return f"test-key-{name}"


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw_key(name)}"}


def write_keys(path: Path, keys: dict[str, tuple[list[str], dict[str, float] | None]]) -> Path:
    entries = []
    for name, (scopes, limit) in keys.items():
        entry: dict[str, Any] = {
            "name": name,
            "sha256": hashlib.sha256(raw_key(name).encode()).hexdigest(),
            "scopes": scopes,
        }
        if limit is not None:
            entry["rate_limit"] = limit
        entries.append(entry)
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


@dataclass(frozen=True)
class Server:
    base: str
    settings: Settings
    prefix: str


@pytest.fixture(scope="module")
def server(
    demo_data: DemoData, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serving(demo_data, redis_url, tmp_path_factory.mktemp("guard"), auth="keys") as server:
        yield server


@contextmanager
def serving(
    demo_data: DemoData, redis_url: str, root: Path, *, auth: Literal["keys", "off"]
) -> Iterator[Server]:
    """The sample published under a fresh prefix, served with KEYS; the prefix is dropped
    after."""
    prefix = f"upsell-test:{uuid.uuid4().hex[:8]}"
    settings = Settings(
        auth=auth,
        api_keys_file=write_keys(root / "keys.yaml", KEYS),
        redis_url=redis_url,
        redis_prefix=prefix,
        state_dir=root / "state",
        artifacts_dir=demo_data.artifacts_dir,
        snapshot_refresh_seconds=0,
        explain_stats_log_seconds=0,
        log_level="warning",
    )
    publish(settings, read_snapshot_dir(demo_data.contract_dir))
    try:
        with served(create_app(settings)) as base:
            yield Server(base=base, settings=settings, prefix=prefix)
    finally:
        drop_prefix(redis_url, prefix)


def drop_prefix(redis_url: str, prefix: str) -> None:
    """Delete what a test's app wrote under its prefix (store, buckets, exposures)."""
    client = redis.Redis.from_url(redis_url)
    for pattern in (f"{prefix}:*", f"{{{prefix}}}:*", f"{{{prefix}:*"):
        for key in list(client.scan_iter(match=pattern, count=1000)):
            client.unlink(key)
    client.close()


def post(server: Server, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.base}{path}", timeout=10, **kwargs)


# -- auth -----------------------------------------------------------------------------------


def test_channel_scopes(server: Server) -> None:
    """A key serves its channels only; 403 names the scope it lacks; X-API-Key works too."""
    cart = post(server, "/v1/recommendations", json=CART, headers=bearer("web-shop"))
    pdp = post(server, "/v1/recommendations", json=PDP, headers={"X-API-Key": raw_key("web-shop")})
    pos_key_on_cart = post(server, "/v1/recommendations", json=CART, headers=bearer("pos-till"))
    assert (cart.status_code, pdp.status_code) == (200, 200), cart.text
    assert cart.json()["items"]
    assert pos_key_on_cart.status_code == 403
    assert pos_key_on_cart.headers["content-type"] == "application/problem+json"
    detail = pos_key_on_cart.json()["detail"]
    assert "'pos-till'" in detail
    assert "'cart' scope" in detail


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/vnd.upsell+json"],
)
def test_the_fast_path_and_fastapis_handler_answer_alike(server: Server, content_type: str) -> None:
    """The route parses plain ``application/json`` itself; any other JSON type goes through
    FastAPI's handler. The answers are the same, bar the request id."""
    content = orjson.dumps(CART)
    answers = [
        post(
            server,
            "/v1/recommendations",
            content=content,
            headers={**bearer("web-shop"), "content-type": kind},
        )
        for kind in ("application/json", content_type)
    ]
    for response in answers:
        assert response.status_code == 200, response.text
    fast, declared = (response.json() for response in answers)
    assert fast["items"]
    assert fast["request_id"] != declared["request_id"]
    assert {**fast, "request_id": None} == {**declared, "request_id": None}


def test_the_fast_path_honours_dependency_overrides(server: Server) -> None:
    """With an override in place (a test's stand-in for ``identify``), FastAPI's handler
    answers, so the override is used, even for a request the fast path could answer."""
    app = create_app(server.settings)

    def refuse_everyone() -> Caller:
        raise HTTPException(418, "overridden")

    app.dependency_overrides[identify] = refuse_everyone
    with served(app) as base:
        answer = httpx.post(
            f"{base}/v1/recommendations", json=CART, headers=bearer("web-shop"), timeout=10
        )
    assert answer.status_code == 418, answer.text


def test_the_fast_path_refuses_a_route_with_dependencies_it_does_not_know() -> None:
    """A dependency added to the route would be skipped by the fast path: building it fails."""

    def audit() -> None:
        return None

    with pytest.raises(RuntimeError, match="the fast path knows the `identify` dependency only"):
        APIRouter().add_api_route(
            "/v1/recommendations",
            recommend,
            methods=["POST"],
            dependencies=[Depends(audit)],
            route_class_override=RecommendationRoute,
        )


def test_missing_or_unknown_key_is_401_before_the_body_is_judged(server: Server) -> None:
    """No key or a wrong key: 401 with WWW-Authenticate, even for a body that is invalid."""
    missing = post(server, "/v1/recommendations", json=CART)
    unknown = post(server, "/v1/recommendations", json=CART, headers=bearer("nobody"))
    invalid_body = post(server, "/v1/recommendations", json={"channel": "fax"})
    for response in (missing, unknown, invalid_body):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["detail"]
    assert "unknown" in unknown.json()["detail"]


def test_admin_and_events_scopes(server: Server) -> None:
    """Admin endpoints and debug traces need admin; order events need events (or admin)."""
    stats_by_shop = httpx.get(
        f"{server.base}/v1/admin/explanations", headers=bearer("web-shop"), timeout=10
    )
    stats_by_ops = httpx.get(
        f"{server.base}/v1/admin/explanations", headers=bearer("ops"), timeout=10
    )
    debug = {**CART, "debug": True}
    trace_by_shop = post(server, "/v1/recommendations", json=debug, headers=bearer("web-shop"))
    trace_by_ops = post(server, "/v1/recommendations", json=debug, headers=bearer("ops"))
    events = {"orders": [order(f"guard-{uuid.uuid4().hex[:6]}")]}
    events_by_shop = post(server, "/v1/events/orders", json=events, headers=bearer("web-shop"))
    events_by_feed = post(server, "/v1/events/orders", json=events, headers=bearer("orders-feed"))
    reload_by_feed = post(server, "/v1/admin/policy/reload", headers=bearer("orders-feed"))

    assert stats_by_shop.status_code == 403
    assert "'admin' scope" in stats_by_shop.json()["detail"]
    assert stats_by_ops.status_code == 200
    assert trace_by_shop.status_code == 403
    assert "debug traces are admin-only" in trace_by_shop.json()["detail"]
    assert trace_by_ops.status_code == 200
    assert trace_by_ops.json()["trace"]["candidates_considered"] > 0
    assert events_by_shop.status_code == 403
    assert "'events' scope" in events_by_shop.json()["detail"]
    assert events_by_feed.status_code == 200, events_by_feed.text
    assert events_by_feed.json()["orders"]["added"] == 1
    assert reload_by_feed.status_code == 403


def test_health_metrics_and_docs_stay_open(server: Server) -> None:
    """Probes, metrics and the docs need no key."""
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(f"{server.base}{path}", timeout=10).status_code == 200, path


def test_keys_mode_without_keys_refuses_and_says_what_to_set(
    demo_data: DemoData, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """UPSELL_AUTH=keys and no keys file: every protected call is refused naming
    UPSELL_API_KEYS_FILE, and start-up says so once."""
    settings = Settings(
        state_dir=tmp_path / "state",
        artifacts_dir=demo_data.artifacts_dir,
        explain_stats_log_seconds=0,
    )
    with TestClient(create_app(settings)) as client:
        refused = client.post("/v1/recommendations", json=CART, headers=bearer("web-shop"))
        admin = client.post("/v1/admin/policy/reload")
        health = client.get("/healthz")
    assert (refused.status_code, admin.status_code, health.status_code) == (403, 403, 200)
    assert "UPSELL_API_KEYS_FILE" in refused.json()["detail"]
    assert "UPSELL_API_KEYS_FILE" in admin.json()["detail"]
    assert capfd.readouterr().err.count('"event":"auth_no_keys"') == 1


def test_auth_off_opens_channels_whatever_key_is_sent(
    demo_data: DemoData, redis_url: str, tmp_path: Path
) -> None:
    """UPSELL_AUTH=off: no key, an unknown key, a key of another scope or one whose bucket is
    empty all get recommendations; admin calls still need an admin key."""
    with serving(demo_data, redis_url, tmp_path, auth="off") as server:
        senders = [{}, bearer("nobody"), bearer("pos-till"), *[bearer("tight")] * 4]
        answers = [
            post(server, "/v1/recommendations", json=CART, headers=headers) for headers in senders
        ]
        admin_unknown = post(server, "/v1/admin/policy/reload", headers=bearer("nobody"))
        admin_shop = post(server, "/v1/admin/policy/reload", headers=bearer("web-shop"))
        admin_ops = post(server, "/v1/admin/policy/reload", headers=bearer("ops"))
    assert [answer.status_code for answer in answers] == [200] * len(senders)
    assert all(answer.json()["items"] for answer in answers)
    assert admin_unknown.status_code == 401
    assert "'admin' scope" in admin_unknown.json()["detail"]
    assert admin_shop.status_code == 403
    assert admin_ops.status_code == 200, admin_ops.text


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ("keys: [{name: a, sha256: abc, scopes: [cart]}]", "keys[0] (a).sha256"),
        (f"keys: [{{name: a, sha256: '{'0' * 64}', scopes: [fax]}}]", "keys[0] (a).scopes"),
        (
            f"keys:\n- {{name: a, sha256: '{'0' * 64}', scopes: [cart]}}\n"
            f"- {{name: a, sha256: '{'1' * 64}', scopes: [pdp]}}",
            "keys[1].name: repeated",
        ),
        (
            f"keys: [{{name: a, sha256: '{'0' * 64}', scopes: [cart], rate_limit: {{burst: -1}}}}]",
            "keys[0] (a).rate_limit.per_second",
        ),
        ("keys: [{name: a, sha256: 1234, scopes: [cart]}]", "quote the hex digits"),
        ("keys: {a: 1}", "a `keys` list"),
        ("keys: [", "not valid YAML"),
    ],
)
def test_a_bad_keys_file_stops_start_up_naming_file_and_entry(
    tmp_path: Path, document: str, named: str
) -> None:
    """The whole file is refused at create_app, with the file and the entry at fault."""
    path = tmp_path / "keys.yaml"
    path.write_text(document)
    with pytest.raises(InputError) as refused:
        create_app(Settings(auth="keys", api_keys_file=path, state_dir=tmp_path / "state"))
    assert str(path) in str(refused.value)
    assert named in str(refused.value)


def test_keys_new_prints_a_key_once_and_its_hash_entry(tmp_path: Path) -> None:
    """`upsell keys new`: the key alone on stdout, the entry (hash only) on stderr; the entry
    pasted into a keys file recognises the key."""
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "keys",
            "new",
            "--name",
            "till-7",
            "--scopes",
            "pos,contact_center",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert len(key) > 40
    assert "\n" not in key
    assert key not in made.stderr
    entry = made.stderr[made.stderr.index("- name:") :]
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n" + entry)
    found = load_key_ring(path).find(key)
    assert found is not None
    assert (found.name, found.scopes) == ("till-7", frozenset({"pos", "contact_center"}))


def test_the_documented_keys_file_loads(tmp_path: Path) -> None:
    """docs/operations.md's example keys file is valid and its keys are the ones it says."""
    text = (REPO / "docs" / "operations.md").read_text("utf-8")
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "keys.yaml"
    path.write_text(block)
    ring = load_key_ring(path)
    found = {raw: ring.find(raw) for raw in ("example-web-shop-key", "example-ops-key")}
    assert {raw: key.name if key else None for raw, key in found.items()} == {
        "example-web-shop-key": "web-shop",
        "example-ops-key": "ops",
    }
    assert found["example-web-shop-key"].rate_limit == RateLimit(per_second=200, burst=400)  # type: ignore[union-attr]


# -- rate limits ----------------------------------------------------------------------------


def test_rate_limit_429_with_retry_after(server: Server) -> None:
    """A key past its burst gets 429 with Retry-After in whole seconds and a body naming the
    key; its bucket is the hash-tagged key in Redis; other keys are unaffected."""
    answers = [
        post(server, "/v1/recommendations", json=CART, headers=bearer("tight")) for _ in range(3)
    ]
    other = post(server, "/v1/recommendations", json=CART, headers=bearer("web-shop"))
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    refused = answers[2]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["retry-after"].isdigit()
    assert "'tight'" in refused.json()["detail"]
    assert other.status_code == 200
    client = redis.Redis.from_url(server.settings.redis_url or "")
    try:
        assert client.exists(f"{{{server.prefix}:rl:tight}}") == 1
    finally:
        client.close()


def test_rate_limit_applies_to_admin_calls(server: Server) -> None:
    """Admin keys are limited like any other key."""
    first = post(server, "/v1/admin/policy/reload", headers=bearer("tight-admin"))
    second = post(server, "/v1/admin/policy/reload", headers=bearer("tight-admin"))
    assert (first.status_code, second.status_code) == (200, 429)


def _rate_limit_calls(base: str) -> float:
    """How many times the app asked Redis's bucket script, from its /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "upsell_redis_operation_duration_seconds_count"
                and sample.labels.get("operation") == "rate_limit"
            ):
                return sample.value
    return 0.0


def test_rate_limit_leases_hold_across_two_apps_sharing_redis(server: Server) -> None:
    """Issue 7: two app instances on one Redis bucket, each spending leased tokens locally,
    never allow a key more than the bucket gives (burst + rate x elapsed), refuse at most
    the unspent leases early, and answer 429 with Retry-After."""
    limit = RateLimit(per_second=100, burst=24)
    lease = lease_size(limit)
    assert lease == 5
    sent = 80
    with served(create_app(server.settings)) as other:
        answers, elapsed, _ = _alternate([server.base, other], key="leased", sent=sent, body=CART)
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 429}
    allowed = statuses.count(200)
    assert allowed <= limit.burst + limit.per_second * elapsed
    assert allowed >= min(sent, limit.burst - 2 * (lease - 1))
    for refused in (answer for answer in answers if answer.status_code == 429):
        assert refused.headers["retry-after"].isdigit()
        assert int(refused.headers["retry-after"]) >= 1


def test_leased_tokens_spare_redis_a_call_per_request(server: Server) -> None:
    """Within the burst every lease is whole, so two apps sharing the bucket ask Redis about
    once per lease of requests, not once a request, however slow the requests are. (Once a
    key is throttled, tokens come back one at a time and a call may fetch just one.)"""
    limit = RateLimit(per_second=100, burst=400)
    assert lease_size(limit) == 5
    sent = 80
    with served(create_app(server.settings)) as other:
        answers, _, calls = _alternate([server.base, other], key="roomy", sent=sent, body=CART)
    assert [answer.status_code for answer in answers] == [200] * sent
    assert calls <= sent / 2


def _alternate(
    bases: list[str], *, key: str, sent: int, body: dict[str, object]
) -> tuple[list[httpx.Response], float, int]:
    """``sent`` requests alternating between ``bases`` with ``key``: the answers, the seconds
    they took, and the rate-limit calls to Redis they made."""
    calls_before = sum(_rate_limit_calls(base) for base in bases)
    clients = [httpx.Client(base_url=base, timeout=10, headers=bearer(key)) for base in bases]
    try:
        started = time.monotonic()
        answers = [
            clients[index % len(clients)].post("/v1/recommendations", json=body)
            for index in range(sent)
        ]
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
    return answers, elapsed, sum(_rate_limit_calls(base) for base in bases) - calls_before


def test_rate_limiter_leases_tokens_from_the_shared_bucket(redis_url: str) -> None:
    """Each limiter (a process) takes a lease of tokens from the Redis bucket in one call and
    spends it without asking again; a second limiter leases from what is left."""
    calls: list[str] = []

    async def scenario() -> tuple[list[float], int]:
        client = redis.asyncio.Redis.from_url(redis_url)
        name = f"lease-{uuid.uuid4().hex[:8]}"
        observe = lambda operation, _s, _failed: calls.append(operation)  # noqa: E731
        first = RateLimiter(redis=client, prefix="upsell-test", observe=observe)
        second = RateLimiter(redis=client, prefix="upsell-test", observe=observe)
        limit = RateLimit(per_second=100, burst=20)  # leases of 5
        try:
            assert (await first.take(name, limit)).allowed
            left = [float(await client.hget(first.bucket_key(name), "tokens") or 0)]
            assert (await second.take(name, limit)).allowed
            left.append(float(await client.hget(first.bucket_key(name), "tokens") or 0))
            for _ in range(4):  # the rest of the first limiter's lease
                assert (await first.take(name, limit)).allowed
            return left, len(calls)
        finally:
            await client.delete(first.bucket_key(name))
            await client.aclose()

    left, redis_calls = asyncio.run(scenario())
    assert 15 <= left[0] < 16  # 20 - 5, plus what refilled in between
    assert 10 <= left[1] < 12
    assert redis_calls == 2


def test_lease_size_is_one_for_slow_keys() -> None:
    """Keys under 40/s, or with a small burst, ask Redis on every request (exact limits)."""
    assert lease_size(RateLimit(per_second=39, burst=1000)) == 1
    assert lease_size(RateLimit(per_second=0.01, burst=2)) == 1
    assert lease_size(RateLimit(per_second=1000, burst=8)) == 2
    assert lease_size(RateLimit(per_second=100_000, burst=100_000)) == 64


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_rate_limiter_falls_back_in_process_when_redis_fails() -> None:
    """Redis refusing connections: decisions come from the in-process bucket (still limiting),
    each fallback is counted, and nothing raises."""
    fallbacks: list[int] = []
    failures: list[str] = []

    async def scenario() -> list[bool]:
        client = redis.asyncio.Redis(
            host="127.0.0.1", port=_closed_port(), socket_connect_timeout=0.2
        )
        limiter = RateLimiter(
            redis=client,
            observe=lambda operation, _s, failed: failures.append(operation) if failed else None,
            on_fallback=lambda: fallbacks.append(1),
        )
        try:
            limit = RateLimit(per_second=0.01, burst=2)
            return [(await limiter.take("k", limit)).allowed for _ in range(3)]
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [True, True, False]
    assert len(fallbacks) == 3
    assert failures == ["rate_limit"] * 3


def test_rate_limit_script_on_redis_cluster(redis_cluster_url: str) -> None:
    """The one-key script runs on Redis Cluster (the bucket key is hash-tagged)."""
    from redis.asyncio.cluster import RedisCluster

    async def scenario() -> list[bool]:
        client = RedisCluster.from_url(redis_cluster_url.replace("redis+cluster", "redis", 1))
        name = f"cluster-{uuid.uuid4().hex[:8]}"
        limiter = RateLimiter(redis=client, prefix="upsell-test")
        try:
            limit = RateLimit(per_second=0.01, burst=2)
            decisions = [(await limiter.take(name, limit)).allowed for _ in range(3)]
            await client.delete(limiter.bucket_key(name))
            return decisions
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [True, True, False]


# -- input limits ---------------------------------------------------------------------------


def problem_fields(response: httpx.Response) -> list[str]:
    return [problem["field"] for problem in response.json()["errors"]]


def test_body_size_limit_on_content_length_and_chunked(server: Server) -> None:
    """Bodies over UPSELL_MAX_BODY_BYTES are 413 naming the limit, declared or streamed."""
    limit = server.settings.max_body_bytes
    padding = "x" * (limit + 10)
    declared = post(
        server,
        "/v1/recommendations",
        content=f'{{"channel": "cart", "region": "{padding}"}}'.encode(),
        headers={**bearer("web-shop"), "content-type": "application/json"},
    )

    def chunks() -> Iterator[bytes]:
        yield b'{"channel": "cart", "region": "'
        for _ in range(limit // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    streamed = post(
        server,
        "/v1/recommendations",
        content=chunks(),
        headers={**bearer("web-shop"), "content-type": "application/json"},
    )
    assert "content-length" not in streamed.request.headers
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert str(limit) in response.json()["detail"]
        assert "UPSELL_MAX_BODY_BYTES" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**CART, "basket": [{"sku": f"S{n}"} for n in range(201)]}, "basket"),
        ({**CART, "basket": [{"sku": "x" * 65}]}, "basket.0.sku"),
        ({**CART, "basket": [{"sku": "85123A", "quantity": 0}]}, "basket.0.quantity"),
        ({**CART, "limit": 0}, "limit"),
        ({**CART, "limit": 51}, "limit"),
        ({**CART, "customer_id": "c" * 129}, "customer_id"),
        ({**CART, "region": ""}, "region"),
        ({**CART, "channel": "fax"}, "channel"),
        ({**CART, "surprise": 1}, "surprise"),
        ({"channel": "pdp"}, "sku"),
        ({"channel": "pos", "basket": [{"sku": "85123A"}]}, "store_id"),
    ],
)
def test_field_limits_are_422_naming_the_field(
    server: Server, body: dict[str, Any], field: str
) -> None:
    """Basket length, string lengths, limit bounds, unknown fields: 422 naming the field."""
    response = post(server, "/v1/recommendations", json=body, headers=bearer("web-shop"))
    assert response.status_code == 422, response.text
    assert field in problem_fields(response)


@pytest.mark.parametrize(
    "content",
    [b'{"channel": "cart", ', b"\xff\xfe\x00garbage", b"[1, 2]", b"", b"null", b'"cart"'],
)
def test_malformed_bodies_are_client_errors(server: Server, content: bytes) -> None:
    """Broken JSON, bytes that are not UTF-8, the wrong JSON type: a 4xx problem, never 5xx."""
    response = post(
        server,
        "/v1/recommendations",
        content=content,
        headers={**bearer("web-shop"), "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["status"] == 422
    assert response.json()["detail"]


# -- metrics and logs -----------------------------------------------------------------------


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_metrics_show_the_series_with_their_labels(server: Server) -> None:
    """After a few requests /metrics has latency per route and channel, candidates, candidate
    lists generated and remembered, drops per rule, explanation sources, Redis timings,
    snapshot age, versions, 429s and auth failures."""
    for _ in range(3):
        assert post(server, "/v1/recommendations", json=CART, headers=bearer("web-shop")).is_success
    assert post(server, "/v1/recommendations", json=PDP, headers=bearer("web-shop")).is_success
    post(server, "/v1/recommendations", json=CART)  # 401
    for _ in range(3):
        post(server, "/v1/recommendations", json=CART, headers=bearer("tight-metrics"))
    response = httpx.get(f"{server.base}/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)

    latency = found["upsell_http_request_duration_seconds_count"]
    routes = {(labels["route"], labels["channel"]): value for labels, value in latency}
    assert routes[("/v1/recommendations", "cart")] >= 3
    assert routes[("/v1/recommendations", "pdp")] >= 1
    statuses = {
        (labels["channel"], labels["status"]) for labels, _ in found["upsell_http_requests_total"]
    }
    assert {("cart", "200"), ("pdp", "200"), ("none", "401"), ("cart", "429")} <= statuses
    candidates = {
        labels["channel"]: value for labels, value in found["upsell_candidates_generated_total"]
    }
    assert candidates["cart"] > 0
    # The same guest cart asked again and again (this module's server has served other
    # carts): remembered, not generated, after the first time.
    lists = {
        (labels["channel"], labels["origin"]): value
        for labels, value in found["upsell_candidate_lists_total"]
    }
    assert lists[("cart", "generated")] >= 1
    assert lists[("cart", "remembered")] >= 2
    assert found["upsell_candidates_dropped_total"]
    assert all(labels["rule"] for labels, _ in found["upsell_candidates_dropped_total"])
    sources = {
        (labels["channel"], labels["source"]) for labels, _ in found["upsell_explanations_total"]
    }
    assert ("cart", "template") in sources
    operations = {
        labels["operation"] for labels, _ in found["upsell_redis_operation_duration_seconds_count"]
    }
    assert {"read_stock", "rate_limit"} <= operations
    [(_, age)] = found["upsell_snapshot_age_seconds"]
    assert age > 0
    versions = [labels for labels, value in found["upsell_versions_info"] if value == 1]
    assert len(versions) == 1
    assert set(versions[0]) == {"model", "snapshot", "policy"}
    limited = {labels["key"]: value for labels, value in found["upsell_rate_limited_total"]}
    assert limited["tight-metrics"] >= 1
    reasons = {labels["reason"] for labels, _ in found["upsell_auth_failures_total"]}
    assert "missing" in reasons


def test_explanation_sources_are_counted_per_item() -> None:
    """Each item shown counts once under its source, however the counts are batched."""
    metrics = Metrics()
    metrics.observe_recommendation(
        channel="cart",
        candidates=12,
        dropped_by_rule={"stock": 3, "margin_floor": 0},
        explanation_sources=["template", "cache", "template", "template"],
    )
    found = samples(metrics.exposition().decode())
    explained = {
        labels["source"]: value
        for labels, value in found["upsell_explanations_total"]
        if labels["channel"] == "cart"
    }
    assert explained == {"template": 3.0, "cache": 1.0}
    dropped = {labels["rule"]: value for labels, value in found["upsell_candidates_dropped_total"]}
    assert dropped == {"stock": 3.0}


def test_log_lines_carry_the_request_id_and_never_the_raw_customer_id(
    demo_data: DemoData, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The request log line has the caller's X-Request-ID and the customer's keyed hash; no
    line of the run holds the raw customer id."""
    import orjson

    from service.exposures import pseudonymizer_for

    settings = Settings(
        auth="keys",
        api_keys_file=write_keys(tmp_path / "keys.yaml", KEYS),
        state_dir=tmp_path / "state",
        artifacts_dir=demo_data.artifacts_dir,
        customer_hash_key="a-secret-salt-of-enough-bytes",
        snapshot_refresh_seconds=0,
        explain_stats_log_seconds=0,
    )
    publish(settings, read_snapshot_dir(demo_data.contract_dir))
    customer = "customer-4711-jane.doe@example.com"
    body = {**CART, "customer_id": customer, "consent": True}
    with served(create_app(settings)) as base:
        answer = httpx.post(
            f"{base}/v1/recommendations",
            json=body,
            headers={**bearer("web-shop"), "X-Request-ID": "trace-abc.123"},
            timeout=10,
        )
    assert answer.status_code == 200
    assert answer.headers["x-request-id"] == "trace-abc.123"
    err = capfd.readouterr().err
    assert customer not in err
    lines = [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]
    [logged] = [line for line in lines if line.get("event") == "request"]
    assert logged["request_id"] == "trace-abc.123"
    assert logged["customer"] == pseudonymizer_for(settings)(customer)
    assert (logged["route"], logged["status"], logged["caller"]) == (
        "/v1/recommendations",
        200,
        "web-shop",
    )
    assert logged["channel"] == "cart"


def test_policy_reload_cli_sends_the_client_key(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``upsell policy reload`` authenticates with UPSELL_CLIENT_KEY: an admin key reloads,
    a key without the admin scope is refused with the service's reason (exit 2)."""
    from service import cli

    for name in [name for name in os.environ if name.startswith("UPSELL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("UPSELL_LOG_LEVEL", "warning")

    def reload(key: str) -> int:
        monkeypatch.setenv("UPSELL_CLIENT_KEY", raw_key(key))
        return cli.main(["policy", "reload", "--url", server.base])

    assert reload("ops") == 0
    assert "serving policy" in capsys.readouterr().out
    assert reload("web-shop") == 2
    assert "lacks the 'admin' scope" in capsys.readouterr().err
