"""The quickest end-to-end check: one call through the real gateway lands as a span."""

from __future__ import annotations

import openai
from servers import GatewayThread


def test_chat_call_through_gateway_is_recorded(gateway: GatewayThread) -> None:
    client = openai.OpenAI(base_url=gateway.url("task-42", "1"), api_key="anything", max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello there"}]
    )
    assert reply.choices[0].message.content == "echo: hello there"
    (span,) = gateway.spans(rollout_id="task-42")
    assert span["attempt_id"] == "1"
    assert span["seq"] == 1
    assert span["response_id"] == reply.id
    assert span["input_tokens"] == reply.usage.prompt_tokens
