"""Failures, as the client and the record see them.

Upstream errors pass through with their status, body and headers and are recorded as error
spans; gateway-side failures (unreachable upstream, unknown model, bad input, unknown route,
oversized body) answer in OpenAI's error shape. After each one the gateway keeps serving.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, wait_until
from shapes import assert_openai_error

from config.loader import parse_settings

UPSTREAM_MODEL = "upstream-model"
MESSAGES = [{"role": "user", "content": "hello"}]
NO_RETRIES = {"attempts": 1}


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def models_with(provider_url: str, *extra_groups: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": "gpt-test",
            "deployments": [
                {
                    "provider": "openai",
                    "model": UPSTREAM_MODEL,
                    "api_base": provider_url,
                    "api_key": "sk-upstream-secret",
                }
            ],
        },
        *extra_groups,
    ]


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayThread]) -> GatewayThread:
    """No gateway retries here: each upstream failure must reach the client as it was."""
    return make_gateway(retries=NO_RETRIES)


@pytest.fixture(scope="module")
def input_gateway(
    fake_provider_server: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayThread]:
    """One gateway for the tests of bad client input, which never reaches the upstream."""
    settings = parse_settings({"models": models_with(fake_provider_server.url)}, env={})
    gateway = GatewayThread(settings, tmp_path_factory.mktemp("input") / "spangate.db").start()
    yield gateway
    gateway.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="anything", max_retries=0)


def assert_still_serves(gateway: GatewayThread) -> None:
    with client_for(gateway.url("after", "1")) as client:
        reply = client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert reply.choices[0].message.content == "echo: hello"


UPSTREAM_ERRORS = [
    pytest.param(
        429,
        openai.RateLimitError,
        {"message": "Rate limit reached, slow down.", "headers": {"Retry-After": "7"}},
        id="429",
    ),
    pytest.param(500, openai.InternalServerError, {"message": "The upstream fell over."}, id="500"),
    pytest.param(
        400,
        openai.BadRequestError,
        {"message": "temperature is out of range", "param": "temperature", "code": "bad_value"},
        id="400",
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("status", "error_class", "fault"), UPSTREAM_ERRORS)
def test_upstream_error_passes_through_unchanged_and_is_recorded(
    gateway: GatewayThread,
    fake_provider: FakeProviderThread,
    http: httpx.Client,
    status: int,
    error_class: type[openai.APIStatusError],
    fault: dict[str, Any],
    stream: bool,
) -> None:
    body = {"messages": MESSAGES, "stream": stream}
    fake_provider.state.add_fault(status=status, **fault)
    direct = http.post(
        f"{fake_provider.url}/chat/completions", json={"model": UPSTREAM_MODEL, **body}
    )
    fake_provider.state.add_fault(status=status, **fault)
    with client_for(gateway.url("errs", "1")) as client, pytest.raises(error_class) as caught:
        client.chat.completions.create(model="gpt-test", **body)

    error = caught.value
    assert error.status_code == status == direct.status_code
    assert fault["message"] in error.message
    assert error.response.json() == direct.json()
    assert error.body == direct.json()["error"]
    for name, value in fault.get("headers", {}).items():
        assert error.response.headers[name] == value
    (span,) = gateway.spans(rollout_id="errs")
    assert span["status"] == "error"
    assert span["http_status"] == status
    assert span["error_type"] == direct.json()["error"]["type"]
    assert span["error_message"] == fault["message"]
    assert span["stream"] == int(stream)
    assert span["response_body"] == direct.json()
    assert span["end_ns"] > span["start_ns"]
    assert_still_serves(gateway)


def test_non_json_upstream_error_passes_through_with_its_status_and_body(
    gateway: GatewayThread, fake_provider: FakeProviderThread, http: httpx.Client
) -> None:
    page = "<html><body>502 Bad Gateway (nginx)</body></html>"
    fake_provider.state.add_fault(status=503, body=page, headers={"Content-Type": "text/html"})
    response = http.post(
        f"{gateway.url('html', '1')}/chat/completions",
        json={"model": "gpt-test", "messages": MESSAGES},
    )

    assert response.status_code == 503
    assert response.text == page
    assert response.headers["content-type"].startswith("text/html")
    (span,) = gateway.spans(rollout_id="html")
    assert span["status"] == "error"
    assert span["http_status"] == 503
    assert span["error_type"]
    assert_still_serves(gateway)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_unreachable_upstream_answers_502_in_openai_shape_and_is_recorded(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread, stream: bool
) -> None:
    dead = {
        "name": "dead",
        "deployments": [
            {
                "provider": "openai",
                "model": "gone",
                "api_base": f"http://127.0.0.1:{closed_port()}/v1",
                "api_key": "sk-dead",
            }
        ],
    }
    gateway = make_gateway(models=models_with(fake_provider.url, dead), retries=NO_RETRIES)
    with (
        client_for(gateway.url("dead", "1")) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        client.chat.completions.create(model="dead", messages=MESSAGES, stream=stream)

    error = caught.value
    assert error.status_code == 502
    detail = assert_openai_error(error.response, 502)
    assert detail["type"] == "upstream_error"
    assert detail["code"] == "upstream_unreachable"
    assert "sk-dead" not in detail["message"]
    (span,) = gateway.spans(rollout_id="dead")
    assert span["status"] == "error"
    assert span["http_status"] == 502
    assert span["error_type"] == "upstream_unreachable"
    assert span["error_message"]
    assert span["provider"] == "openai"
    assert span["deployment"] == "openai/gone"
    assert_still_serves(gateway)


def test_upstream_slower_than_the_deployment_timeout_answers_504(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    slow = {
        "name": "slow",
        "deployments": [
            {
                "provider": "openai",
                "model": UPSTREAM_MODEL,
                "api_base": fake_provider.url,
                "api_key": "sk-upstream-secret",
                "timeout": 0.3,
            }
        ],
    }
    gateway = make_gateway(models=models_with(fake_provider.url, slow), retries=NO_RETRIES)
    fake_provider.state.add_fault(delay=1.0)
    with (
        client_for(gateway.url("slow", "1")) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        client.chat.completions.create(model="slow", messages=MESSAGES)

    detail = assert_openai_error(caught.value.response, 504)
    assert detail["code"] == "upstream_timeout"
    (span,) = gateway.spans(rollout_id="slow")
    assert span["status"] == "error"
    assert span["http_status"] == 504
    assert 250 <= span["duration_ms"] < 1000
    assert_still_serves(gateway)


def test_upstream_answering_broken_json_is_a_502_in_openai_shape(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    fake_provider.state.add_fault(malformed=True)
    with (
        client_for(gateway.url("broken", "1")) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    detail = assert_openai_error(caught.value.response, 502)
    assert detail["code"] == "upstream_bad_response"
    (span,) = gateway.spans(rollout_id="broken")
    assert span["status"] == "error"
    assert span["http_status"] == 502
    assert_still_serves(gateway)


def test_stream_cut_off_by_the_upstream_is_recorded_as_an_error_with_the_partial_text(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    # role chunk, "echo:", " one", then the upstream hangs up mid-stream.
    fake_provider.state.add_fault(truncate_after=3)
    received: list[str] = []
    with client_for(gateway.url("cut", "1")) as client, pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "one two three four"}],
            stream=True,
        ):
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == "echo: one"
    (span,) = gateway.spans(rollout_id="cut")
    assert span["status"] == "error"
    assert span["stream"] == 1
    assert span["error_message"]
    assert span["response_body"]["choices"][0]["message"]["content"] == "echo: one"
    assert_still_serves(gateway)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_unknown_model_answers_404_model_not_found(
    gateway: GatewayThread, fake_provider: FakeProviderThread, stream: bool
) -> None:
    with (
        client_for(gateway.url("typo", "1")) as client,
        pytest.raises(openai.NotFoundError) as caught,
    ):
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES, stream=stream)

    error = caught.value
    assert error.code == "model_not_found"
    detail = assert_openai_error(error.response, 404, code="model_not_found")
    assert "gpt-nope" in detail["message"]
    assert fake_provider.state.snapshot() == []
    (span,) = gateway.spans(rollout_id="typo")
    assert span["status"] == "error"
    assert span["http_status"] == 404
    assert span["request_model"] == "gpt-nope"
    assert_still_serves(gateway)


@pytest.mark.parametrize(
    ("content", "param"),
    [
        pytest.param(b'{"model": "gpt-test", "messages": [', None, id="malformed-json"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b'["gpt-test"]', None, id="array"),
        pytest.param(b'"gpt-test"', None, id="string"),
        pytest.param(b'{"messages": [{"role": "user", "content": "x"}]}', "model", id="no-model"),
        pytest.param(b'{"model": 42, "messages": []}', "model", id="model-not-string"),
        pytest.param(
            b'{"model": "gpt-test", "messages": [], "stream": "yes"}',
            "stream",
            id="stream-not-bool",
        ),
    ],
)
def test_invalid_request_body_answers_400_in_openai_shape(
    input_gateway: GatewayThread,
    fake_provider: FakeProviderThread,
    http: httpx.Client,
    content: bytes,
    param: str | None,
) -> None:
    for route in ("chat/completions", "completions", "embeddings", "responses"):
        response = http.post(
            f"{input_gateway.url('bad', '1')}/{route}",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        error = assert_openai_error(response, 400, type_="invalid_request_error")
        if param is not None:
            assert error["param"] == param

    assert fake_provider.state.snapshot() == []
    assert_still_serves(input_gateway)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nope"),
        ("POST", "/v1/chat/complete"),
        ("POST", "/rollout/r1/attempt/a1/v1/imagine"),
        ("GET", "/rollout/r1/v1/files"),
        ("POST", "/v2/chat/completions"),
    ],
)
def test_unknown_route_answers_404_in_openai_shape(
    input_gateway: GatewayThread, http: httpx.Client, method: str, path: str
) -> None:
    response = http.request(method, f"{input_gateway.base}{path}", json={"model": "gpt-test"})

    error = assert_openai_error(response, 404)
    assert path in error["message"]
    assert_still_serves(input_gateway)


def test_wrong_method_on_a_known_route_answers_405_in_openai_shape(
    input_gateway: GatewayThread, http: httpx.Client
) -> None:
    response = http.get(f"{input_gateway.url()}/chat/completions")

    assert_openai_error(response, 405)
    assert "POST" in response.headers["Allow"]
    assert_still_serves(input_gateway)


def test_body_over_max_body_bytes_answers_413_in_openai_shape(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    http: httpx.Client,
) -> None:
    gateway = make_gateway(server={"max_body_bytes": 1000}, retries=NO_RETRIES)
    big = {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 2000}], "input": "y"}
    for route in ("chat/completions", "completions", "embeddings", "responses"):
        response = http.post(f"{gateway.url('big', '1')}/{route}", content=json.dumps(big))
        assert_openai_error(response, 413, code="request_too_large", type_="invalid_request_error")

    assert fake_provider.state.snapshot() == []
    assert_still_serves(gateway)
    # A body just under the limit is fine.
    small = {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 500}]}
    ok = http.post(f"{gateway.url('big', '1')}/chat/completions", json=small)
    assert ok.status_code == 200


LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


def test_api_writes_on_a_store_locked_by_another_process_answer_503_with_retry_after(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway(recorder={"api_write_timeout": 1.0})
    writes = [
        ("POST", "/api/rollouts", {"id": "locked-1"}),
        ("POST", "/api/rewards", {"rollout_id": "locked-1", "value": 1}),
        ("PATCH", "/api/rollouts/locked-1", {"status": "succeeded"}),
    ]
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(gateway.db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with httpx.Client(base_url=gateway.base, timeout=10) as http:
            for method, path, body in writes:
                started = time.monotonic()
                response = http.request(method, path, json=body)
                assert time.monotonic() - started < 5, (method, path)
                assert_openai_error(response, 503, code="store_busy", type_="service_unavailable")
                assert int(response.headers["Retry-After"]) >= 1
    finally:
        holder.communicate(timeout=10)
    with httpx.Client(base_url=gateway.base, timeout=10) as http:
        wait_until(
            lambda: http.post("/api/rollouts", json={"id": "locked-1"}).status_code in (200, 201),
            timeout=10,
            what="writes to go through once the lock is gone",
        )
