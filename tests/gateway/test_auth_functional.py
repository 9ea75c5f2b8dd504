"""Gateway keys and scopes over real HTTP, and which key reaches the provider.

With `auth.keys` configured every route but the health checks and `/openapi.json` needs a
key (`Authorization: Bearer` or `X-Api-Key`); `proxy` opens the OpenAI routes, `read` the
API's GETs, `write` its POST/PATCH, `admin` everything. Refusals are 401/403 in the error
shape. The gateway key sent as the SDK's `api_key` is never forwarded upstream: a deployment
without its own key gets the client's provider key only from `X-Provider-Authorization` (or
from `Authorization` when the gateway key came in `X-Api-Key`). No key is ever stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, read_rows
from shapes import assert_openai_error

PROXY_KEY = "sk-gw-proxy-0001"
READ_KEY = "sk-gw-read-0001"
WRITE_KEY = "sk-gw-write-0001"
ADMIN_KEY = "sk-gw-admin-0001"
KEYS = [
    {"key": PROXY_KEY, "name": "agent", "scopes": ["proxy"]},
    {"key": READ_KEY, "name": "dashboard", "scopes": ["read"]},
    {"key": WRITE_KEY, "name": "trainer", "scopes": ["read", "write"]},
    {"key": ADMIN_KEY, "name": "ops", "scopes": ["admin"]},
]
UPSTREAM_KEY = "sk-upstream-secret"
USER_PROVIDER_KEY = "sk-user-own-provider-key-77"
MESSAGES = [{"role": "user", "content": "hello"}]


def models(provider_url: str) -> list[dict[str, Any]]:
    """`gpt-test` has its own upstream key; `byok` has none (the client brings one)."""
    return [
        {
            "name": "gpt-test",
            "deployments": [
                {
                    "provider": "openai",
                    "model": "upstream-model",
                    "api_base": provider_url,
                    "api_key": UPSTREAM_KEY,
                }
            ],
        },
        {
            "name": "byok",
            "deployments": [
                {"provider": "openai", "model": "upstream-model", "api_base": provider_url}
            ],
        },
    ]


@pytest.fixture
def secured(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> GatewayThread:
    return make_gateway(models=models(fake_provider.url), auth={"keys": KEYS})


@pytest.fixture
def open_gateway(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> GatewayThread:
    return make_gateway(models=models(fake_provider.url))


@pytest.fixture
def http(secured: GatewayThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured.base, timeout=10.0) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sdk_chat(
    gateway: GatewayThread,
    api_key: str,
    *,
    model: str = "gpt-test",
    headers: dict[str, str] | None = None,
    rollout: str = "auth-1",
) -> str:
    """One chat call through the SDK; returns the reply text."""
    with openai.OpenAI(
        base_url=gateway.url(rollout, "1"),
        api_key=api_key,
        max_retries=0,
        default_headers=headers,
    ) as client:
        reply = client.chat.completions.create(model=model, messages=MESSAGES)
        return reply.choices[0].message.content or ""


# -- refusals ---------------------------------------------------------------------------------


def test_no_key_is_401_in_the_error_shape(http: httpx.Client) -> None:
    error = assert_openai_error(http.get("/api/rollouts"), 401, type_="authentication_error")
    assert "key" in error["message"]
    assert_openai_error(http.post("/api/rollouts", json={}), 401, type_="authentication_error")
    assert_openai_error(
        http.post("/v1/chat/completions", json={"model": "gpt-test", "messages": MESSAGES}),
        401,
        type_="authentication_error",
    )
    assert_openai_error(http.get("/v1/models"), 401, type_="authentication_error")
    assert_openai_error(http.get("/api/spans/stream"), 401, type_="authentication_error")


def test_a_wrong_or_malformed_key_is_401(http: httpx.Client) -> None:
    for headers in (
        bearer("sk-gw-nope-0001"),
        bearer(READ_KEY + "x"),
        bearer(READ_KEY[:-1]),
        {"X-Api-Key": "sk-gw-nope-0001"},
        {"Authorization": f"Basic {READ_KEY}"},
        {"Authorization": "Bearer"},
    ):
        assert_openai_error(
            http.get("/api/rollouts", headers=headers), 401, type_="authentication_error"
        )


def test_sdk_with_a_wrong_key_gets_an_authentication_error(secured: GatewayThread) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk_chat(secured, "sk-gw-wrong-0001")


def test_read_key_reads_but_cannot_write(http: httpx.Client) -> None:
    assert http.get("/api/rollouts", headers=bearer(READ_KEY)).status_code == 200
    assert http.get("/api/stats", headers=bearer(READ_KEY)).status_code == 200
    error = assert_openai_error(
        http.post("/api/rollouts", json={"id": "r"}, headers=bearer(READ_KEY)),
        403,
        type_="permission_error",
    )
    assert "write" in error["message"]
    assert_openai_error(
        http.post("/api/rewards", json={"rollout_id": "r", "value": 1}, headers=bearer(READ_KEY)),
        403,
        type_="permission_error",
    )
    assert_openai_error(
        http.patch("/api/rollouts/r", json={"status": "failed"}, headers=bearer(READ_KEY)),
        403,
        type_="permission_error",
    )


def test_read_key_cannot_call_the_model(secured: GatewayThread) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        sdk_chat(secured, READ_KEY)


def test_write_key_creates_and_reads(http: httpx.Client) -> None:
    created = http.post("/api/rollouts", json={"id": "w-1"}, headers=bearer(WRITE_KEY))
    assert created.status_code == 201, created.text
    assert http.get("/api/rollouts/w-1", headers=bearer(WRITE_KEY)).status_code == 200
    reward = http.post(
        "/api/rewards", json={"rollout_id": "w-1", "value": 1}, headers=bearer(WRITE_KEY)
    )
    assert reward.status_code == 201, reward.text


def test_proxy_key_calls_the_model_but_not_the_api(
    secured: GatewayThread, http: httpx.Client
) -> None:
    assert sdk_chat(secured, PROXY_KEY) == "echo: hello"
    assert_openai_error(
        http.get("/api/rollouts", headers=bearer(PROXY_KEY)), 403, type_="permission_error"
    )
    assert_openai_error(
        http.post("/api/rollouts", json={}, headers=bearer(PROXY_KEY)),
        403,
        type_="permission_error",
    )
    assert_openai_error(
        http.get("/metrics", headers=bearer(PROXY_KEY)), 403, type_="permission_error"
    )
    # The call was recorded all the same, and a read key sees it.
    secured.flush()
    spans = http.get("/api/spans", headers=bearer(READ_KEY)).json()["data"]
    assert [s["rollout_id"] for s in spans] == ["auth-1"]


def test_admin_key_may_do_everything(secured: GatewayThread, http: httpx.Client) -> None:
    assert sdk_chat(secured, ADMIN_KEY, rollout="adm-1") == "echo: hello"
    secured.flush()
    headers = bearer(ADMIN_KEY)
    assert http.get("/api/rollouts/adm-1", headers=headers).status_code == 200
    patched = http.patch("/api/rollouts/adm-1", json={"status": "succeeded"}, headers=headers)
    assert patched.status_code == 200, patched.text
    assert http.get("/metrics", headers=headers).status_code == 200


def test_x_api_key_header_works_for_the_api_and_the_model(
    secured: GatewayThread, http: httpx.Client
) -> None:
    assert http.get("/api/rollouts", headers={"X-Api-Key": READ_KEY}).status_code == 200
    assert_openai_error(
        http.post("/api/rollouts", json={}, headers={"X-Api-Key": READ_KEY}),
        403,
        type_="permission_error",
    )
    # The SDK's own Authorization then carries something else entirely.
    reply = sdk_chat(secured, "not-a-gateway-key", headers={"X-Api-Key": PROXY_KEY})
    assert reply == "echo: hello"


def test_health_and_openapi_need_no_key(http: httpx.Client) -> None:
    assert http.get("/health/live").status_code == 200
    assert http.get("/health/ready").status_code == 200
    spec = http.get("/openapi.json")
    assert spec.status_code == 200 and "/api/rollouts" in spec.json()["paths"]
    assert_openai_error(http.get("/metrics"), 401, type_="authentication_error")
    assert http.get("/metrics", headers=bearer(READ_KEY)).status_code == 200


def test_the_event_stream_needs_the_read_scope(http: httpx.Client) -> None:
    assert_openai_error(http.get("/api/spans/stream"), 401, type_="authentication_error")
    assert_openai_error(
        http.get("/api/spans/stream", headers=bearer(PROXY_KEY)), 403, type_="permission_error"
    )
    # Past the key check the stream itself answers (here: a 422 for a bad Last-Event-ID,
    # which keeps the test from holding a live stream open).
    response = http.get(
        "/api/spans/stream", headers={**bearer(READ_KEY), "Last-Event-ID": "not-an-id"}
    )
    assert response.status_code == 422, response.text


# -- what reaches the provider ----------------------------------------------------------------


def test_gateway_key_is_not_forwarded_to_a_deployment_without_a_key(
    secured: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    assert sdk_chat(secured, PROXY_KEY, model="byok") == "echo: hello"
    seen = fake_provider.state.last_request
    assert "authorization" not in seen.headers, seen.headers
    assert PROXY_KEY not in json.dumps(seen.headers)


def test_provider_key_passes_in_x_provider_authorization(
    secured: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    headers = {"X-Provider-Authorization": f"Bearer {USER_PROVIDER_KEY}"}
    assert sdk_chat(secured, PROXY_KEY, model="byok", headers=headers) == "echo: hello"
    seen = fake_provider.state.last_request
    assert seen.header("authorization") == f"Bearer {USER_PROVIDER_KEY}"
    assert PROXY_KEY not in json.dumps(seen.headers)


def test_provider_key_passes_in_authorization_when_the_gateway_key_is_in_x_api_key(
    secured: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    reply = sdk_chat(secured, USER_PROVIDER_KEY, model="byok", headers={"X-Api-Key": PROXY_KEY})
    assert reply == "echo: hello"
    seen = fake_provider.state.last_request
    assert seen.header("authorization") == f"Bearer {USER_PROVIDER_KEY}"
    assert PROXY_KEY not in json.dumps(seen.headers)


def test_a_deployment_with_its_own_key_always_uses_it(
    secured: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    headers = {"X-Provider-Authorization": f"Bearer {USER_PROVIDER_KEY}"}
    assert sdk_chat(secured, PROXY_KEY, model="gpt-test", headers=headers) == "echo: hello"
    assert fake_provider.state.last_request.header("authorization") == f"Bearer {UPSTREAM_KEY}"


def test_without_keys_the_clients_authorization_reaches_a_keyless_deployment(
    open_gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    assert sdk_chat(open_gateway, USER_PROVIDER_KEY, model="byok") == "echo: hello"
    seen = fake_provider.state.last_request
    assert seen.header("authorization") == f"Bearer {USER_PROVIDER_KEY}"
    # The deployment with its own key still gets only its own.
    assert sdk_chat(open_gateway, USER_PROVIDER_KEY, model="gpt-test") == "echo: hello"
    assert fake_provider.state.last_request.header("authorization") == f"Bearer {UPSTREAM_KEY}"


def test_without_keys_the_api_is_open(open_gateway: GatewayThread) -> None:
    with httpx.Client(base_url=open_gateway.base, timeout=10.0) as client:
        assert client.post("/api/rollouts", json={"id": "o-1"}).status_code == 201
        assert client.get("/api/rollouts/o-1").status_code == 200


def test_no_key_is_ever_stored(
    secured: GatewayThread, fake_provider: FakeProviderThread, http: httpx.Client
) -> None:
    provider_header = {"X-Provider-Authorization": f"Bearer {USER_PROVIDER_KEY}"}
    sdk_chat(secured, PROXY_KEY, model="byok", headers=provider_header, rollout="keys-1")
    sdk_chat(secured, USER_PROVIDER_KEY, model="byok", headers={"X-Api-Key": ADMIN_KEY})
    sdk_chat(secured, ADMIN_KEY, model="gpt-test", rollout="keys-3")
    fake_provider.state.add_fault(status=401, message="Incorrect API key provided.")
    with pytest.raises(openai.AuthenticationError):
        sdk_chat(secured, PROXY_KEY, model="byok", headers=provider_header, rollout="keys-4")
    reward = http.post(
        "/api/rewards", json={"rollout_id": "keys-1", "value": 1}, headers=bearer(WRITE_KEY)
    )
    assert reward.status_code == 201
    secured.flush()

    rows = read_rows(secured.db_path, "select * from spans")
    assert len(rows) == 4
    stored = json.dumps(rows, default=str)
    for secret in (PROXY_KEY, READ_KEY, WRITE_KEY, ADMIN_KEY, USER_PROVIDER_KEY, UPSTREAM_KEY):
        assert secret not in stored, secret
    # Nor anywhere in the database files (rewards, rollouts, the WAL, the journal).
    for path in Path(secured.db_path).parent.iterdir():
        if path.is_file():
            data = path.read_bytes()
            for secret in (PROXY_KEY, ADMIN_KEY, USER_PROVIDER_KEY, UPSTREAM_KEY):
                assert secret.encode() not in data, (secret, path.name)


# -- keys in several headers, keys echoed back -------------------------------------------------

LITELLM_KEY = "sk-litellm-upstream-secret"
# The gateway key in every header it may ride in, `Authorization` twice.
KEY_EVERYWHERE = [
    ("Authorization", f"Bearer {PROXY_KEY}"),
    ("Authorization", f"Bearer {PROXY_KEY}"),
    ("X-Api-Key", PROXY_KEY),
    ("api-key", PROXY_KEY),
]


@pytest.fixture
def echoing(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> GatewayThread:
    """`gpt-test` (its own key), `byok` (none) and `lite`, routed through litellm's
    OpenAI-compatible `hosted_vllm` provider, all in front of the fake."""
    lite = {
        "name": "lite",
        "deployments": [
            {
                "provider": "hosted_vllm",
                "model": "upstream-model",
                "api_base": fake_provider.url,
                "api_key": LITELLM_KEY,
            }
        ],
    }
    return make_gateway(models=[*models(fake_provider.url), lite], auth={"keys": KEYS})


def stored_span(gateway: GatewayThread, span_id: str) -> str:
    """The span as `/api/spans/{id}` serves it, once written."""
    gateway.flush()
    response = httpx.get(f"{gateway.base}/api/spans/{span_id}", headers=bearer(ADMIN_KEY))
    assert response.status_code == 200, response.text
    return response.text


def chat_with_headers(
    gateway: GatewayThread, model: str, headers: list[tuple[str, str]], *, stream: bool
) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "stream": stream}
    response = httpx.post(f"{gateway.base}/v1/chat/completions", json=body, headers=headers)
    response.read()
    return response


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("model", "provider_key"),
    [("gpt-test", UPSTREAM_KEY), ("byok", None), ("lite", LITELLM_KEY)],
    ids=["own-key", "keyless", "litellm"],
)
def test_gateway_key_in_several_headers_reaches_neither_the_upstream_nor_the_store(
    echoing: GatewayThread,
    fake_provider: FakeProviderThread,
    model: str,
    provider_key: str | None,
    stream: bool,
) -> None:
    fake_provider.state.add_fault(echo_headers=True)
    response = chat_with_headers(echoing, model, KEY_EVERYWHERE, stream=stream)
    assert response.status_code == 200, response.text

    seen = fake_provider.state.last_request.headers
    assert PROXY_KEY not in json.dumps(seen), seen
    if provider_key is not None:
        # The upstream got the deployment's key, and echoed it back.
        assert seen["authorization"] == f"Bearer {provider_key}"
        assert "[redacted]" in response.text
    stored = stored_span(echoing, response.headers["X-Span-Id"])
    for secret in (PROXY_KEY, UPSTREAM_KEY, LITELLM_KEY):
        assert secret not in response.text, secret
        assert secret not in stored, secret


def test_provider_key_sent_by_the_client_beside_the_gateway_key_is_forwarded_but_not_stored(
    echoing: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    fake_provider.state.add_fault(echo_headers=True)
    headers = [*KEY_EVERYWHERE, ("X-Provider-Authorization", f"Bearer {USER_PROVIDER_KEY}")]
    response = chat_with_headers(echoing, "byok", headers, stream=False)
    assert response.status_code == 200, response.text
    seen = fake_provider.state.last_request.headers
    assert seen["authorization"] == f"Bearer {USER_PROVIDER_KEY}"
    assert PROXY_KEY not in json.dumps(seen)
    stored = stored_span(echoing, response.headers["X-Span-Id"])
    assert USER_PROVIDER_KEY not in stored and USER_PROVIDER_KEY not in response.text


@pytest.mark.parametrize(("model", "key"), [("gpt-test", UPSTREAM_KEY), ("lite", LITELLM_KEY)])
def test_provider_key_echoed_in_an_upstream_error_is_redacted(
    echoing: GatewayThread, fake_provider: FakeProviderThread, model: str, key: str
) -> None:
    fake_provider.state.add_fault(
        status=401, message=f"Incorrect API key provided: {key}. Find yours elsewhere."
    )
    response = chat_with_headers(echoing, model, list(bearer(PROXY_KEY).items()), stream=False)
    assert response.status_code == 401, response.text
    assert "Incorrect API key provided" in response.text
    stored = stored_span(echoing, response.headers["X-Span-Id"])
    assert "Incorrect API key provided" in stored
    for secret in (UPSTREAM_KEY, LITELLM_KEY, PROXY_KEY):
        assert secret not in response.text and secret not in stored, secret
