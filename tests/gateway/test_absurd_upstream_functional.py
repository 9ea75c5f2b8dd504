"""An upstream provider that answers absurdly (a Retry-After that is no number, tool-call
ids that are no text, token counts past what the store keeps, one huge event): the client
gets the answer or a clear error, the call is recorded, and what budgets, metrics and the
store count agree. Each of these failed before its fix (74353b8)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from fake_provider import FakeProviderThread
from prometheus_client.parser import text_string_to_metric_families
from servers import GatewayThread, wait_until

from gateway.proxy.forward import parse_retry_after

CHAT = "/v1/chat/completions"
FAST_RETRIES = {"attempts": 2, "backoff": {"initial": 0.01, "max": 0.02, "jitter": 0.0}}
SSE = {"Content-Type": "text/event-stream"}


def chat_body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return {**body, **extra}


def answer(usage: Any = None, **message: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "upstream-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok", **message},
                "finish_reason": "stop",
            }
        ],
        "usage": usage if usage is not None else {"prompt_tokens": 3, "completion_tokens": 2},
    }


def sse(*chunks: Any, done: bool = True) -> str:
    text = "".join(f"data: {orjson.dumps(c).decode()}\n\n" for c in chunks)
    return text + ("data: [DONE]\n\n" if done else "")


def chunk(delta: dict[str, Any], finish: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def spans_of(gateway: GatewayThread, rollout: str, count: int = 1) -> list[dict[str, Any]]:
    """The rollout's spans, once `count` of them are stored."""
    found: list[dict[str, Any]] = []

    def stored() -> bool:
        found[:] = gateway.spans(rollout_id=rollout)
        return len(found) >= count

    wait_until(stored, timeout=10, what=f"{count} span(s) of {rollout}")
    return found


def metric(gateway: GatewayThread, name: str, **labels: str) -> float:
    text = httpx.get(f"{gateway.base}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def still_serving(gateway: GatewayThread, fake_provider: FakeProviderThread, rollout: str) -> None:
    """A later normal call is answered and recorded, and the gateway says it is ready."""
    response = httpx.post(f"{gateway.base}/rollout/{rollout}/v1/chat/completions", json=chat_body())
    assert response.status_code == 200, response.text
    assert gateway.spans(span_id=response.headers["X-Span-Id"])[0]["status"] == "ok"
    assert httpx.get(f"{gateway.base}/health/ready").status_code == 200


# -- Retry-After --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["soon", "Mon, 32 Foo 2024 99:99:99 GMT", "nan", "NaN"])
def test_a_retry_after_that_is_no_number_of_seconds_reads_as_none_or_a_finite_number(
    value: str,
) -> None:
    """`parse_retry_after` feeds tenacity's sleep: it must never raise, nor give NaN."""
    for header in ("retry-after", "retry-after-ms"):
        seconds = parse_retry_after({header: value})
        assert seconds is None or math.isfinite(seconds), (header, value, seconds)


@pytest.mark.parametrize("value", ["soon", "nan"])
def test_a_429_with_an_absurd_retry_after_is_passed_on_and_recorded(
    value: str, make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """The upstream said 429 twice: the client gets that 429 (not a 500, not a hang), the span
    says so, and the next call is served."""
    gateway = make_gateway(retries=FAST_RETRIES)
    fake_provider.state.add_fault(status=429, headers={"retry-after": value}, times=2)
    response = httpx.post(
        f"{gateway.base}/rollout/ra-{value}/v1/chat/completions", json=chat_body(), timeout=10
    )
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    [span] = spans_of(gateway, f"ra-{value}")
    assert (span["status"], span["http_status"]) == ("error", 429)
    still_serving(gateway, fake_provider, f"ra-{value}-after")


# -- tool call ids that are not strings -----------------------------------------------------

ODD_IDS = {"object": {"a": 1}, "list": [1]}


@pytest.mark.parametrize("kind", list(ODD_IDS))
def test_a_plain_answer_whose_tool_call_id_is_not_a_string_reaches_the_client(
    kind: str, gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    tool_calls = [
        {"id": ODD_IDS[kind], "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
    upstream = orjson.dumps(answer(tool_calls=tool_calls))
    fake_provider.state.add_fault(status=200, body=upstream.decode())
    response = httpx.post(
        f"{gateway.base}/rollout/tid-{kind}/attempt/a/v1/chat/completions", json=chat_body()
    )
    assert response.status_code == 200, response.text
    assert response.content == upstream
    [span] = spans_of(gateway, f"tid-{kind}")
    assert (span["status"], span["http_status"]) == ("ok", 200)
    still_serving(gateway, fake_provider, f"tid-{kind}-after")


@pytest.mark.parametrize("kind", list(ODD_IDS))
def test_a_stream_whose_tool_call_id_is_not_a_string_reaches_the_client_whole(
    kind: str, gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    call = {"index": 0, "id": ODD_IDS[kind], "type": "function"}
    call["function"] = {"name": "f", "arguments": "{}"}
    events = sse(chunk({"role": "assistant", "tool_calls": [call]}), chunk({}, finish="tool_calls"))
    fake_provider.state.add_fault(status=200, body=events, headers=SSE)
    url = f"{gateway.base}/rollout/tids-{kind}/attempt/a/v1/chat/completions"
    with httpx.stream("POST", url, json=chat_body(stream=True)) as response:
        received = b"".join(response.iter_bytes())
    assert response.status_code == 200
    assert received == events.encode()
    [span] = spans_of(gateway, f"tids-{kind}")
    assert span["status"] == "ok"
    still_serving(gateway, fake_provider, f"tids-{kind}-after")


# -- usage counts the store will not keep ---------------------------------------------------


@pytest.mark.parametrize("tokens", [-1_000_000, 2**64 - 1], ids=["negative", "u64-max"])
def test_usage_the_store_drops_does_not_count_in_metrics_or_budgets(
    tokens: int, make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """An upstream's `prompt_tokens` the store nulls as absurd (negative, past 2**63 - 1)
    must not move the numbers the gateway derives from the same span: the token counter
    and the rollout's token budget agree with what was recorded."""
    gateway = make_gateway()
    rollout = f"usage-{tokens}"
    created = httpx.post(
        f"{gateway.base}/api/rollouts", json={"id": rollout, "budget": {"max_tokens": 1000}}
    )
    assert created.status_code == 201, created.text
    url = f"{gateway.base}/rollout/{rollout}/attempt/a/v1/chat/completions"
    fake_provider.state.add_fault(
        status=200,
        body=orjson.dumps(answer({"prompt_tokens": 300, "completion_tokens": 10})).decode(),
    )
    assert httpx.post(url, json=chat_body()).status_code == 200
    odd = orjson.dumps(answer({"prompt_tokens": tokens, "completion_tokens": 10}))
    fake_provider.state.add_fault(status=200, body=odd.decode())
    response = httpx.post(url, json=chat_body())
    assert response.status_code == 200 and response.content == odd
    spans = spans_of(gateway, rollout, 2)
    recorded = sum((s["input_tokens"] or 0) + (s["output_tokens"] or 0) for s in spans)
    assert spans[1]["input_tokens"] is None  # the store's verdict on the absurd count

    problems = []
    detail = httpx.get(f"{gateway.base}/api/rollouts/{rollout}")
    if detail.status_code != 200:
        problems.append(f"GET /api/rollouts/{rollout} answers {detail.status_code}")
    elif (used := detail.json()["budget_usage"]["used"])["tokens"] != recorded:
        problems.append(f"budget counts {used['tokens']} tokens, the spans hold {recorded}")
    counted = metric(gateway, "spangate_tokens_total", model_group="gpt-test", kind="input")
    if counted != 300:
        problems.append(f"spangate_tokens_total{{kind=input}} is {counted}, the spans hold 300")
    # The rollout has 1000 - 320 tokens left as far as its spans go: a third call is let in.
    third = httpx.post(url, json=chat_body())
    if third.status_code != 200:
        problems.append(f"the next call is refused: {third.status_code} {third.text[:200]}")
    assert not problems, problems


# -- one huge SSE event ---------------------------------------------------------------------


def test_one_huge_sse_event_is_relayed_whole_and_recorded(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    """A 24 MB event (within limits.max_stream_bytes, 64 MB). The splitter copied and searched
    everything buffered on each read (5.4 s of CPU for 16 MB in 64 KB reads); its cost is
    measured in tests/proxy/test_sse_splitter.py's terms, not timed here."""
    big = chunk({"content": "x" * (24 * 1024 * 1024)})
    events = sse(big)
    fake_provider.state.add_fault(status=200, body=events, headers=SSE)
    url = f"{gateway.base}/rollout/huge-event/attempt/a/v1/chat/completions"
    with httpx.stream("POST", url, json=chat_body(stream=True), timeout=120) as response:
        received = sum(len(piece) for piece in response.iter_bytes())
    assert response.status_code == 200 and received == len(events)
    [span] = spans_of(gateway, "huge-event")
    assert span["status"] == "ok"


def test_a_responses_answer_whose_hosted_tool_id_is_not_a_string_reaches_the_client(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    """No rollout needed: `executed_in` looks the id up in a dict on every Responses answer."""
    upstream = orjson.dumps(
        {
            "id": "resp_1",
            "object": "response",
            "status": "completed",
            "model": "upstream-model",
            "output": [{"type": "web_search_call", "id": {"a": 1}, "status": "completed"}],
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )
    fake_provider.state.add_fault(status=200, body=upstream.decode())
    response = httpx.post(f"{gateway.base}/v1/responses", json={"model": "gpt-test", "input": "hi"})
    assert response.status_code == 200, response.text
    assert response.content == upstream


def test_under_uvloop_as_served_a_nan_retry_after_passes_the_429_on(
    fake_provider: FakeProviderThread, tmp_path: Any
) -> None:
    """`spangate serve` runs on uvloop (gateway/server.py), whose sleep refuses NaN outright:
    the upstream's 429 became our 500 (on the stdlib loop of the tests, a hang instead)."""
    import asyncio

    import uvloop
    from conftest import gateway_settings

    class UvloopGateway(GatewayThread):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.loop.close()
            self.loop = uvloop.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    settings = gateway_settings(
        fake_provider.url, retries={"attempts": 2, "backoff": {"initial": 0.01, "max": 0.02}}
    )
    gateway = UvloopGateway(settings, tmp_path / "uv.db").start()
    try:
        assert isinstance(gateway.loop, uvloop.Loop) and not isinstance(
            gateway.loop, asyncio.BaseEventLoop
        )
        fake_provider.state.add_fault(status=429, headers={"retry-after": "nan"}, times=2)
        response = httpx.post(f"{gateway.base}/v1/chat/completions", json=chat_body(), timeout=10)
        assert response.status_code == 429, response.text
    finally:
        gateway.stop()
