"""Schemathesis over `/openapi.json` against a live gateway: whatever the generated requests
hold (valid or not), no route answers a 5xx, and every answer matches the documented schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from servers import GatewayThread

from config.loader import parse_settings

# Small: the run must stay well under a minute on a shared two-core machine.
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzzed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    settings_ = parse_settings(
        {"models": [{"name": "mock", "deployments": [{"provider": "mock", "model": "mock"}]}]},
        env={},
    )
    gateway = GatewayThread(settings_, tmp_path_factory.mktemp("fuzz") / "spangate.db").start()
    yield gateway
    gateway.stop()


def operations(gateway: GatewayThread) -> list[Any]:
    """Every operation `/openapi.json` documents, but the event stream, which never ends by
    itself (its answers are checked in its own tests)."""
    schema = schemathesis.openapi.from_url(f"{gateway.base}/openapi.json")
    found = [result.ok() for result in schema.get_all_operations()]
    return [op for op in found if op.path != "/api/spans/stream"]


def test_the_schema_documents_the_api(fuzzed_gateway: GatewayThread) -> None:
    paths = {op.path for op in operations(fuzzed_gateway)}
    assert {"/api/rollouts", "/api/spans/{span_id}", "/api/rewards"} <= paths


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
def test_no_route_answers_5xx_or_breaks_its_schema(
    fuzzed_gateway: GatewayThread, mode: GenerationMode
) -> None:
    """Positive cases follow the schema; negative ones break it, and must get a 4xx."""
    failures: list[str] = []
    for operation in operations(fuzzed_gateway):

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            case.call_and_validate(
                checks=[not_a_server_error, response_schema_conformance], timeout=10
            )

        try:
            run()
        except Unsatisfiable:
            # Nothing to break: a path whose only parameter is any string has no wrong value.
            assert mode is GenerationMode.NEGATIVE, operation.path
        except Exception as exc:
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
