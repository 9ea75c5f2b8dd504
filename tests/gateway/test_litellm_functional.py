"""A litellm-routed provider behind the real gateway: the client speaks OpenAI, Anthropic answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import respx
from servers import GatewayThread

from config.loader import parse_settings
from config.models import Settings

ANTHROPIC_REPLY = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5-20251001",
    "content": [{"type": "text", "text": "Bonjour!"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 12, "output_tokens": 4},
}


def claude_settings(**extra: Any) -> Settings:
    """One group, `claude`, on Anthropic through litellm (respx answers for Anthropic)."""
    deployment = {
        "provider": "anthropic",
        "model": "claude-haiku-4-5-20251001",
        "api_key": "sk-ant-secret",
    }
    return parse_settings(
        {"models": [{"name": "claude", "deployments": [deployment]}], **extra}, env={}
    )


def test_anthropic_deployment_answers_in_openai_shape_and_is_recorded(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    settings = claude_settings()
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="127.0.0.1").pass_through()
        upstream = mock.post("https://api.anthropic.com/v1/messages").mock(
            return_value=httpx.Response(200, json=ANTHROPIC_REPLY)
        )
        gateway = make_gateway(settings=settings)
        with openai.OpenAI(base_url=gateway.url("fr", "1"), api_key="x", max_retries=0) as client:
            reply = client.chat.completions.create(
                model="claude", messages=[{"role": "user", "content": "Say hello in French"}]
            )
    assert reply.choices[0].message.content == "Bonjour!"
    assert reply.usage is not None and reply.usage.prompt_tokens == 12
    assert upstream.calls.last.request.headers["x-api-key"] == "sk-ant-secret"
    (span,) = gateway.spans(rollout_id="fr")
    assert span["provider"] == "anthropic"
    assert span["input_tokens"] == 12 and span["output_tokens"] == 4
    assert span["cost_usd"] is not None and span["cost_usd"] > 0
    assert "sk-ant-secret" not in str(span)


def test_a_translated_answer_over_the_body_limit_is_a_502_and_an_error_span(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    # limits.max_upstream_body_bytes holds for litellm-routed providers as for OpenAI ones.
    settings = claude_settings(limits={"max_upstream_body_bytes": 4096})
    huge = {**ANTHROPIC_REPLY, "content": [{"type": "text", "text": "la " * 5000}]}
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="127.0.0.1").pass_through()
        upstream = mock.post("https://api.anthropic.com/v1/messages").mock(
            return_value=httpx.Response(200, json=huge)
        )
        gateway = make_gateway(settings=settings)
        response = httpx.post(
            gateway.url("huge", "1") + "/chat/completions",
            json={"model": "claude", "messages": [{"role": "user", "content": "Talk"}]},
            timeout=30,
        )
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_too_large"
    assert upstream.call_count == 1  # not retried: the same answer would be as large again
    (span,) = gateway.spans(rollout_id="huge")
    assert (span["status"], span["error_type"]) == ("error", "upstream_too_large")
