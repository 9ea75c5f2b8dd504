"""`GET /openapi.json` describes every `/api` route, and the API keeps the promises it makes.

The second half is a schemathesis run against a live gateway seeded with rollouts, calls and
rewards: for each operation (except the never-ending event stream) a bounded, derandomized
set of generated requests, valid and invalid, once with free-form path parameters and once
aimed at ids that exist, must produce no 5xx and only responses that match the documented
schema (body, status code and content type).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import GatewayThread

from gateway.web.routes_api import ROUTES, ApiRoute

schemathesis = pytest.importorskip("schemathesis")
import requests  # noqa: E402  (schemathesis's HTTP client, installed with it)
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 25
STREAM_PATH = "/api/spans/stream"
FUZZED_ROUTES = [route for route in ROUTES if route.path != STREAM_PATH]
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
_PATH_PARAM = re.compile(r"{([^}]+)}")


@pytest.fixture
def spec(gateway: GatewayThread) -> dict[str, Any]:
    response = httpx.get(f"{gateway.base}/openapi.json", timeout=10.0)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def test_openapi_lists_every_api_route_with_its_method(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    missing = [
        f"{route.method} {route.path}"
        for route in ROUTES
        if route.method.lower() not in paths.get(route.path, {})
    ]
    assert missing == []


def test_openapi_lists_every_api_route_the_server_answers(
    gateway: GatewayThread, spec: dict[str, Any]
) -> None:
    assert gateway.app is not None
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in gateway.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/")
        and route.method not in ("HEAD", "OPTIONS")
    }
    described = {
        (method, path)
        for path, operations in spec["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert served - described == set(), "served but not described"
    assert described - served == set(), "described but not served"


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_each_operation_documents_its_parameters_body_and_responses(
    spec: dict[str, Any], route: ApiRoute
) -> None:
    operation = spec["paths"][route.path][route.method.lower()]
    assert operation["summary"]
    assert operation["operationId"]
    params = {(p["in"], p["name"]) for p in operation.get("parameters", [])}
    for name in _PATH_PARAM.findall(route.path):
        assert ("path", name) in params
    if route.query is not None:
        for name in route.query.model_fields:
            assert ("query", name) in params
    if route.body is not None:
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{route.body.__name__}"}
    else:
        assert "requestBody" not in operation
    responses = operation["responses"]
    assert str(route.status) in responses
    for status in (*route.errors, 401, 403):
        error = responses[str(status)]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/Error"}


def test_every_schema_reference_resolves(spec: dict[str, Any]) -> None:
    components = spec["components"]["schemas"]
    refs: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                refs.add(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    prefix = "#/components/schemas/"
    assert refs, "no references at all"
    assert {ref for ref in refs if not ref.startswith(prefix)} == set()
    assert {ref[len(prefix) :] for ref in refs} - set(components) == set()


def test_openapi_needs_no_key_when_keys_are_configured(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    secured = make_gateway(auth={"keys": [{"key": "sk-gw-read-0001", "scopes": ["read"]}]})
    response = httpx.get(f"{secured.base}/openapi.json", timeout=10.0)
    assert response.status_code == 200
    assert "bearer" in response.json()["components"]["securitySchemes"]


# -- schemathesis -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """A gateway with data in it, and ids that exist, for aiming generated requests."""

    gateway: GatewayThread
    ids: dict[str, str]


@pytest.fixture(scope="module")
def seeded(
    fake_provider_server: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    """Rollouts in several states, calls (mock model: no upstream needed) and rewards."""
    gateway = GatewayThread(
        gateway_settings(fake_provider_server.url),
        tmp_path_factory.mktemp("openapi") / "spangate.db",
    ).start()
    try:
        with (
            httpx.Client(base_url=gateway.base, timeout=10.0) as api,
            openai.OpenAI(base_url=gateway.url(), api_key="x", max_retries=0) as sdk,
        ):
            for rollout, agent in (("seed-1", "solver"), ("seed-2", "solver"), ("seed-3", "b")):
                created = api.post(
                    "/api/rollouts",
                    json={"id": rollout, "agent": agent, "input": {"q": 1}, "tags": ["seed"]},
                )
                assert created.status_code == 201, created.text
            span_ids = []
            for rollout in ("seed-1", "seed-1", "seed-2", "seed-3"):
                raw = sdk.with_options(
                    base_url=gateway.url(rollout, "1")
                ).chat.completions.with_raw_response.create(
                    model="mock", messages=[{"role": "user", "content": "seed"}]
                )
                raw.parse()
                span_ids.append(raw.headers["x-span-id"])
            gateway.flush()
            rewards = [
                {"id": "seed-reward", "rollout_id": "seed-1", "value": 1, "final": True},
                {"span_id": span_ids[0], "value": 0.5, "name": "step"},
            ]
            for reward in rewards:
                assert api.post("/api/rewards", json=reward).status_code == 201
            assert api.patch("/api/rollouts/seed-2", json={"status": "failed"}).status_code == 200
        yield Seeded(gateway, {"rollout_id": "seed-1", "attempt_id": "1", "span_id": span_ids[1]})
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def api_schema(seeded: Seeded) -> Any:
    return schemathesis.openapi.from_url(f"{seeded.gateway.base}/openapi.json")


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as made:
        yield made


def test_the_schema_loads_with_every_operation_valid(api_schema: Any) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        (route.method, route.path) for route in ROUTES
    }


@pytest.mark.parametrize("route", FUZZED_ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_generated_requests_get_no_server_error_and_documented_responses(
    api_schema: Any, seeded: Seeded, session: requests.Session, route: ApiRoute
) -> None:
    operation = api_schema[route.path][route.method]
    names = _PATH_PARAM.findall(route.path)
    strategies = [
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    ]
    if names:
        real = {name: seeded.ids[name] for name in names}
        strategies.append(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=real)
        )

    @given(case=st.one_of(strategies))
    @settings(
        max_examples=MAX_EXAMPLES * len(strategies),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(
            base_url=seeded.gateway.base, session=session, checks=CHECKS, timeout=10
        )

    run()
