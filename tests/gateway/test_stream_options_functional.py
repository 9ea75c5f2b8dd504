"""An upstream that refuses the `stream_options` the gateway adds: the client never sees it.

The gateway asks streams for usage (`stream_options.include_usage`) so spans have tokens. An
upstream that rejects the argument gets the same call again at once without it, is
remembered, and the span's tokens are then estimated; a client that sent the field itself
gets the upstream's refusal as it is.
"""

from __future__ import annotations

import openai
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread

MESSAGES = [{"role": "user", "content": "count to three for me"}]


def _stream_text(client: openai.OpenAI, **extra: object) -> str:
    stream = client.chat.completions.create(
        model="gpt-test", messages=MESSAGES, stream=True, **extra
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_a_refused_stream_options_is_dropped_at_once_and_remembered(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    fake_provider.state.rejected_fields.add("stream_options")
    client = openai.OpenAI(base_url=gateway.url("so-1"), api_key="k", max_retries=0)

    assert _stream_text(client) == "echo: count to three for me"
    sent = fake_provider.state.snapshot()
    assert [("stream_options" in r.body) for r in sent] == [True, False]

    fake_provider.state.requests.clear()
    assert _stream_text(client) == "echo: count to three for me"
    again = fake_provider.state.snapshot()
    assert len(again) == 1 and "stream_options" not in again[0].body

    first, second = gateway.spans(rollout_id="so-1")
    for span in (first, second):
        assert span["status"] == "ok" and span["http_status"] == 200
        assert span["input_tokens"] > 0 and span["output_tokens"] > 0
        assert span["attributes"]["spangate.usage_estimated"] is True
        # Retried within the one try, not through the backoff retry budget.
        assert span["retries"] == 0
    assert first["attributes"]["spangate.tries"][0]["stream_options_refused"] is True
    assert "stream_options_refused" not in second["attributes"]["spangate.tries"][0]


def test_a_stream_options_the_client_sent_is_refused_as_the_upstream_says(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    fake_provider.state.rejected_fields.add("stream_options")
    client = openai.OpenAI(base_url=gateway.url("so-2"), api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        _stream_text(client, stream_options={"include_usage": True})
    assert "Unrecognized request argument supplied: stream_options" in str(caught.value)
    assert len(fake_provider.state.snapshot()) == 1
    (span,) = gateway.spans(rollout_id="so-2")
    assert span["status"] == "error" and span["http_status"] == 400


def test_usage_the_upstream_reports_is_not_estimated(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    client = openai.OpenAI(base_url=gateway.url("so-3"), api_key="k", max_retries=0)
    assert _stream_text(client) == "echo: count to three for me"
    (span,) = gateway.spans(rollout_id="so-3")
    assert span["input_tokens"] and span["output_tokens"]
    assert "spangate.usage_estimated" not in span["attributes"]
