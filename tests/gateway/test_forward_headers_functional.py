"""Client headers reach the upstream as they would directly, bar hop-by-hop headers,
credentials and spangate's own; `forward_headers` narrows them per deployment."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
from conftest import UPSTREAM_MODEL
from fake_provider import FakeProviderThread
from servers import GatewayThread

MESSAGES = [{"role": "user", "content": "hi"}]
CLIENT_HEADERS = {
    "HTTP-Referer": "https://agents.example.com",
    "X-Title": "Example Agent",
    "X-Request-Id": "req-client-42",
    "OpenAI-Organization": "org-123",
    "OpenAI-Project": "proj-456",
    "OpenAI-Beta": "assistants=v2",
    "anthropic-version": "2023-06-01",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}
SPANGATE_HEADERS = {
    "X-Rollout-Id": "hdr-1",
    "X-Agent-Id": "planner",
    "X-Tags": "a,b",
    "X-Meta-Dataset": "gsm8k",
    "X-Budget-Max-Calls": "10",
    "X-Rollout-Mode": "val",
}
CREDENTIALS = {
    "api-key": "sk-azure-style",
    "x-api-key": "sk-anthropic-style",
    "Cookie": "session=abc",
    "Proxy-Authorization": "Basic Zm9vOmJhcg==",
}
HOP_BY_HOP = {"X-Forwarded-For": "10.0.0.7", "Via": "1.1 lb"}


def _group(name: str, url: str, **deployment: Any) -> dict[str, Any]:
    return {
        "name": name,
        "deployments": [
            {
                "provider": "openai",
                "model": UPSTREAM_MODEL,
                "api_base": url,
                "api_key": "sk-upstream-secret",
                **deployment,
            }
        ],
    }


def _seen_after_chat(
    gateway: GatewayThread, fake: FakeProviderThread, model: str, stream: bool = False
) -> dict[str, str]:
    client = openai.OpenAI(
        base_url=gateway.url(), api_key="sk-client", default_headers=CLIENT_HEADERS
    )
    extra = {**SPANGATE_HEADERS, **CREDENTIALS, **HOP_BY_HOP}
    if stream:
        stream_reply = client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_headers=extra
        )
        assert [c for c in stream_reply]
    else:
        client.chat.completions.create(model=model, messages=MESSAGES, extra_headers=extra)
    return fake.state.last_request.headers


def test_client_headers_reach_the_upstream_as_sent(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway()
    for stream in (False, True):
        seen = _seen_after_chat(gateway, fake_provider, "gpt-test", stream)
        for name, value in CLIENT_HEADERS.items():
            assert seen[name.lower()] == value, name
        # The SDK's own identification passes too, as it would reach OpenAI directly.
        assert seen["user-agent"].startswith("OpenAI/Python")
        assert seen["x-stainless-lang"] == "python"
        assert seen["authorization"] == "Bearer sk-upstream-secret"
        leaked = {*SPANGATE_HEADERS, *CREDENTIALS, *HOP_BY_HOP}
        assert not [name for name in leaked if name.lower() in seen]
        assert "sk-client" not in json.dumps(seen)


def test_forward_headers_allow_and_deny_narrow_what_a_deployment_gets(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    url = fake_provider.url
    gateway = make_gateway(
        models=[
            _group(
                "narrow",
                url,
                forward_headers={"allow": ["x-title", "openai-*", "x-stainless-*"]},
            ),
            _group("no-stainless", url, forward_headers={"deny": ["X-Stainless-*", "user-agent"]}),
            _group("none", url, forward_headers={"allow": []}),
        ]
    )
    seen = _seen_after_chat(gateway, fake_provider, "narrow")
    assert seen["x-title"] == "Example Agent" and seen["openai-project"] == "proj-456"
    assert "http-referer" not in seen and "anthropic-version" not in seen
    assert seen["x-stainless-lang"] == "python"
    assert not seen["user-agent"].startswith("OpenAI/Python")  # spangate's own instead

    seen = _seen_after_chat(gateway, fake_provider, "no-stainless")
    assert seen["http-referer"] == "https://agents.example.com"
    assert not [name for name in seen if name.startswith("x-stainless-")]
    assert not seen["user-agent"].startswith("OpenAI/Python")

    seen = _seen_after_chat(gateway, fake_provider, "none")
    assert "x-title" not in seen and "openai-organization" not in seen
    # Allowing nothing never costs the deployment its key.
    assert seen["authorization"] == "Bearer sk-upstream-secret"


def test_litellm_deployments_get_the_client_headers_as_extra_headers(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    lite = _group("lite", fake_provider.url, provider="hosted_vllm")
    gateway = make_gateway(models=[lite])
    seen = _seen_after_chat(gateway, fake_provider, "lite")
    assert seen["x-title"] == "Example Agent"
    assert seen["http-referer"] == "https://agents.example.com"
    assert seen["authorization"] == "Bearer sk-upstream-secret"
    leaked = {*SPANGATE_HEADERS, *CREDENTIALS, *HOP_BY_HOP}
    assert not [name for name in leaked if name.lower() in seen]


def test_cookies_an_upstream_sets_never_reach_another_call(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    # OpenAI's edge sets `__cf_bm`; a shared cookie jar would hand one client's cookie to all.
    answer = {
        "id": "chatcmpl-cookie",
        "object": "chat.completion",
        "created": 0,
        "model": UPSTREAM_MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    }
    fake_provider.state.add_fault(
        status=200,
        body=json.dumps(answer),
        headers={"Set-Cookie": "__cf_bm=client-one; Path=/; HttpOnly"},
    )
    # By name: a cookie jar (aiohttp's, for one) keeps no cookie from a bare IP address.
    url = fake_provider.url.replace("127.0.0.1", "localhost")
    gateway = make_gateway(models=[_group("gpt-test", url)])
    with openai.OpenAI(base_url=gateway.url(), api_key="sk-client") as first:
        answer_id = first.chat.completions.create(model="gpt-test", messages=MESSAGES).id
    assert answer_id == "chatcmpl-cookie"
    with openai.OpenAI(base_url=gateway.url(), api_key="sk-client") as second:
        second.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert "cookie" not in fake_provider.state.last_request.headers
