"""A litellm-routed provider behind the real gateway: the client speaks OpenAI, Anthropic answers."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import respx
from servers import GatewayThread

from config.loader import parse_settings

ANTHROPIC_REPLY = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5-20251001",
    "content": [{"type": "text", "text": "Bonjour!"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 12, "output_tokens": 4},
}


def test_anthropic_deployment_answers_in_openai_shape_and_is_recorded(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    settings = parse_settings(
        {
            "models": [
                {
                    "name": "claude",
                    "deployments": [
                        {
                            "provider": "anthropic",
                            "model": "claude-haiku-4-5-20251001",
                            "api_key": "sk-ant-secret",
                        }
                    ],
                }
            ]
        },
        env={},
    )
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
