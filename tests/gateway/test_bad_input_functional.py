"""Bad input a review of the API's error rule found getting through: each gets a clear 4xx in
the API's error shape, and nothing already recorded is lost or changed. Each docstring says
what the request got before its fix (8e5b595)."""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

import httpx
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread
from shapes import assert_openai_error

CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}


def _client(gateway: GatewayThread) -> httpx.Client:
    return httpx.Client(base_url=gateway.base, timeout=10)


def _post(client: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    """The answer, or a test failure naming what the client got instead of one."""
    try:
        return client.post(path, **kwargs)
    except httpx.HTTPError as exc:
        pytest.fail(f"POST {path}: no usable HTTP answer, the client got {exc!r}")


def _raw_request(port: int, request: bytes) -> bytes:
    """One request written as these exact bytes (httpx would re-encode header values)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


# -- ids with a trailing newline ----------------------------------------------------------


def test_rollout_id_with_a_trailing_newline_in_the_path_is_refused_with_400(
    gateway: GatewayThread,
) -> None:
    """`POST /rollout/task%0A/v1/chat/completions`: `_check_id` matched with `^...+$`, and
    Python's `$` also matches before a final newline, so `task\\n` passed. The call was recorded
    as `ok`/200 under rollout `task\\n` (an id `POST /api/rollouts` refuses with 422), then
    aiohttp refused the answer's `X-Rollout-Id: task\\n` header and closed the connection with
    no response at all."""
    with _client(gateway) as client:
        response = _post(client, "/rollout/task%0A/v1/chat/completions", json=CHAT)
        assert_openai_error(response, 400, code="invalid_id", param="rollout_id")
        gateway.flush()
        # No rollout the API itself would refuse to create.
        assert client.get("/api/rollouts/task%0A").status_code == 404


def test_attempt_id_with_a_trailing_newline_in_the_path_is_refused_with_400(
    gateway: GatewayThread,
) -> None:
    """Same as above for the attempt segment: `/rollout/r-nl/attempt/1%0A/v1/...`."""
    with _client(gateway) as client:
        response = _post(client, "/rollout/r-nl/attempt/1%0A/v1/chat/completions", json=CHAT)
        assert_openai_error(response, 400, code="invalid_id", param="attempt_id")


def test_streamed_call_with_a_newline_rollout_id_leaves_the_connection_usable(
    gateway: GatewayThread,
) -> None:
    """The streamed variant answered a 500 whose bytes followed a half-written chunked
    response; the next request on the same keep-alive connection then read garbage
    (`illegal status line: bytearray(b'll}}')`)."""
    with _client(gateway) as client:
        first = _post(
            client, "/rollout/task2%0A/v1/chat/completions", json={**CHAT, "stream": True}
        )
        assert first.status_code == 400, (first.status_code, first.text[:200])
        assert_openai_error(first, 400, code="invalid_id")
        try:
            second = client.get("/health/live")
        except httpx.HTTPError as exc:
            pytest.fail(f"the next request on the same connection failed: {exc!r}")
        assert second.status_code == 200
        assert second.json() == {"status": "ok"}


def test_otlp_span_naming_a_rollout_id_with_a_trailing_newline_is_rejected(
    gateway: GatewayThread,
) -> None:
    """`POST /v1/traces` with `rollout.id = "nl\\n"`: `ingest_otlp._valid_id` uses the same
    `valid_id`, so the span was accepted (no partialSuccess) and stored under `nl\\n`."""
    span = {
        "traceId": "ab" * 16,
        "spanId": "cd" * 8,
        "name": "agent step",
        "startTimeUnixNano": "1000",
        "endTimeUnixNano": "2000",
        "attributes": [{"key": "rollout.id", "value": {"stringValue": "nl\n"}}],
    }
    body = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
    with _client(gateway) as client:
        response = client.post("/v1/traces", json=body)
        assert response.status_code == 200, response.text
        assert response.json().get("partialSuccess", {}).get("rejectedSpans") in (1, "1"), (
            response.json()
        )
        gateway.flush()
        assert client.get("/api/rollouts/nl%0A").status_code == 404


# -- API keys that are not UTF-8 ----------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [b"X-Api-Key: \xff\xfe", b"Authorization: Bearer sk-\xc3\xa9\xff", b"api-key: \xff"],
    ids=["x-api-key", "bearer", "api-key"],
)
def test_api_key_that_is_not_utf8_is_401_not_500(make_gateway: Any, header: bytes) -> None:
    """`GET /api/rollouts` with a key header holding bytes that are not UTF-8: aiohttp keeps them
    as lone surrogates, and `find_key` (gateway/web/auth.py) called `presented.encode()`, which
    raised UnicodeEncodeError: 500 `internal gateway error` instead of 401 `invalid API key`."""
    gateway = make_gateway(auth={"keys": [{"key": "sk-the-real-key"}]})
    answer = _raw_request(
        gateway.port,
        b"GET /api/rollouts HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n",
    )
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 401"), answer[:400]
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["type"] == "authentication_error", body


def test_dashboard_cookie_that_is_not_utf8_is_not_a_500(make_gateway: Any) -> None:
    """`GET /api/rollouts` with `Cookie: spangate_key=\\xff` (the dashboard's cookie): the same
    `find_key` encode failed, 500 instead of 401."""
    gateway = make_gateway(auth={"keys": [{"key": "sk-the-real-key"}]})
    answer = _raw_request(
        gateway.port,
        b"GET /api/rollouts HTTP/1.1\r\nHost: x\r\nCookie: spangate_key=\xff\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:400]


# -- cursors ------------------------------------------------------------------------------


def _cursor(*key: Any) -> str:
    """A cursor as the API encodes one (url-safe base64 of a JSON array, unpadded)."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/api/rollouts", ({"a": 1}, "x")),
        ("/api/rollouts", ([1], "x")),
        ("/api/spans", ({"a": 1},)),
        ("/api/spans", (2**63,)),
        ("/api/rewards", ([1],)),
        ("/api/rewards", (2**63,)),
        ("/api/spans", ("abc",)),
        ("/api/rollouts", ("x", "y")),
        ("/api/rollouts", (1.5, "y")),
    ],
    ids=[
        "rollouts-object",
        "rollouts-array",
        "spans-object",
        "spans-2**63",
        "rewards-array",
        "rewards-2**63",
        "spans-text-for-a-number",
        "rollouts-text-for-a-time",
        "rollouts-float-for-a-time",
    ],
)
def test_cursor_with_the_right_length_but_wrong_types_is_422(
    gateway: GatewayThread, path: str, key: tuple[Any, ...]
) -> None:
    """`GET /api/spans?cursor=<base64 of [{"a": 1}]>` (or `[9223372036854775808]`):
    `store.queries.decode_cursor` checked only that the cursor was a JSON array of the right
    length, so SQLite got a dict/list to bind (ProgrammingError) or an int past 64 bits
    (OverflowError): 500, where `cursor=garbage` gets 422 `invalid cursor`. Text where a number
    belongs failed PostgreSQL's query the same way, and SQLite read it as another page."""
    with _client(gateway) as client:
        response = client.get(path, params={"cursor": _cursor(*key)})
    assert_openai_error(response, 422, param="cursor")


# -- reward dimensions that are not finite ------------------------------------------------


@pytest.fixture
def rollout(gateway: GatewayThread) -> str:
    with _client(gateway) as client:
        response = client.post("/api/rollouts", json={"id": "rv-dims"})
        assert response.status_code == 201, response.text
    return "rv-dims"


@pytest.mark.parametrize("value", ["Infinity", "-inf", "NaN", "1e400"])
def test_reward_dimension_that_is_not_finite_is_422(
    gateway: GatewayThread, rollout: str, value: str
) -> None:
    """`POST /api/rewards {"rollout_id": ..., "value": 1, "dimensions": {"a": "Infinity"}}`:
    `RewardCreate.dimensions` was `dict[str, float]` without `allow_inf_nan=False` (unlike
    `value`), so pydantic took the string as inf/nan, orjson wrote it as `null`, and the
    answer was 201 with `"dimensions": {"a": null}`: the number the client sent was gone."""
    body = {"rollout_id": rollout, "value": 1, "dimensions": {"a": value}}
    with _client(gateway) as client:
        response = client.post("/api/rewards", json=body)
        assert_openai_error(response, 422, param="dimensions.a")
        assert client.get("/api/rewards", params={"rollout_id": rollout}).json()["data"] == []


def test_reward_post_repeated_with_the_same_id_and_body_gets_the_same_answer(
    gateway: GatewayThread, rollout: str
) -> None:
    """A client-given id makes a reward post idempotent (DESIGN.md). Sent twice with a
    dimension "Infinity", the first answer was 201 (stored as null) and the identical retry
    409 `already exists with a different body`, since null != inf."""
    body = {"id": "rw-inf", "rollout_id": rollout, "value": 1, "dimensions": {"a": "Infinity"}}
    with _client(gateway) as client:
        first = client.post("/api/rewards", json=body)
        again = client.post("/api/rewards", json=body)
    assert first.status_code in (201, 422), first.text
    expected = 422 if first.status_code == 422 else 200
    assert again.status_code == expected, (first.text, again.text)


# -- model registry weights ---------------------------------------------------------------


def test_registering_a_deployment_with_an_infinite_weight_is_422(gateway: GatewayThread) -> None:
    """`POST /api/models {"model": "mock", "api_base": ..., "version": "v1", "weight":
    "Infinity"}`: `ModelRegistration.weight` was `float, gt=0` and took inf; the answer was 201
    with `"weight": null`, the registry kept inf, and from then on every call to `mock` was a
    500 (`random.choices`: "Total of weights must be finite", gateway/proxy/router.py)."""
    registration = {
        "model": "mock",
        "api_base": "http://127.0.0.1:9/v1",
        "version": "v1",
        "weight": "Infinity",
    }
    with _client(gateway) as client:
        response = client.post("/api/models", json=registration)
        call = client.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(response, 422, param="weight")
    assert call.status_code == 200, call.text


def test_large_finite_weights_never_make_a_model_group_answer_500(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    """Two deployments of one group registered with `"weight": 1e308` each (finite JSON
    numbers): both got 201, then every call to the group was a 500, since the weights' sum
    overflowed to inf in `random.choices`. Refusing such weights (422) is fine too."""
    port = fake_provider.port
    with _client(gateway) as client:
        answers = [
            client.post(
                "/api/models",
                json={"model": "heavy", "api_base": base, "version": "v1", "weight": 1e308},
            )
            for base in (f"http://127.0.0.1:{port}/v1", f"http://localhost:{port}/v1")
        ]
        if any(a.status_code == 422 for a in answers):
            for answer in answers:
                if answer.status_code == 422:
                    assert_openai_error(answer, 422, param="weight")
            return
        assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
        call = client.post("/v1/chat/completions", json={**CHAT, "model": "heavy"})
    assert call.status_code == 200, call.text
