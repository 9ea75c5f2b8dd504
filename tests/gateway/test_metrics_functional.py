"""`GET /metrics` as a Prometheus scraper sees it after real calls through the `openai` SDK.

Counters and histograms must agree with what happened (and with the recorded spans):
requests by model group, deployment and status; latency, upstream, overhead and
time-to-first-token histograms; tokens and cost; retries and fallbacks; the breaker state
per deployment; and the recorder's queue depth and spans written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import closed_after_test
from fake_provider import FakeProviderThread
from prometheus_client.parser import text_string_to_metric_families
from servers import GatewayThread, wait_until

from config.loader import parse_settings
from config.models import Settings

UPSTREAM_MODEL = "upstream-model"
DEPLOYMENT = f"openai/{UPSTREAM_MODEL}"
MESSAGES = [{"role": "user", "content": "one two three four five"}]
REPLY = "echo: one two three four five"
NO_RETRIES: dict[str, Any] = {"attempts": 1}
FAST_RETRIES: dict[str, Any] = {
    "attempts": 2,
    "backoff": {"initial": 0.01, "max": 0.05, "jitter": 0},
}
INPUT_PRICE = 1e-6
OUTPUT_PRICE = 2e-6


def settings_for(provider_url: str, **group_extra: Any) -> Settings:
    """`gpt-test` on the fake provider with set prices, and the built-in `mock` group."""
    return parse_settings(
        {
            "models": [
                {
                    "name": "gpt-test",
                    "deployments": [
                        {
                            "provider": "openai",
                            "model": UPSTREAM_MODEL,
                            "api_base": provider_url,
                            "api_key": "sk-upstream-secret",
                            "input_cost_per_token": INPUT_PRICE,
                            "output_cost_per_token": OUTPUT_PRICE,
                        }
                    ],
                    **group_extra,
                },
                {"name": "mock", "deployments": [{"provider": "mock", "model": "mock"}]},
            ],
            "retries": NO_RETRIES,
        },
        env={},
    )


@pytest.fixture
def client_for() -> Callable[[GatewayThread], openai.OpenAI]:
    def make(gateway: GatewayThread) -> openai.OpenAI:
        return closed_after_test(
            openai.OpenAI(base_url=gateway.url(), api_key="sk-client", max_retries=0, timeout=30)
        )

    return make


def scrape(gateway: GatewayThread) -> httpx.Response:
    response = httpx.get(f"{gateway.base}/metrics", timeout=5)
    assert response.status_code == 200
    return response


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`; None if absent."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return None


def metric(gateway: GatewayThread, name: str, **labels: str) -> float | None:
    return sample(scrape(gateway).text, name, **labels)


def chat(client: openai.OpenAI, model: str = "gpt-test") -> Any:
    return client.chat.completions.create(model=model, messages=MESSAGES)


def test_metrics_count_calls_latency_tokens_and_cost_per_model_group(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    client_for: Callable[[GatewayThread], openai.OpenAI],
) -> None:
    gateway = make_gateway(settings=settings_for(fake_provider.url))
    client = client_for(gateway)
    for _ in range(3):
        assert chat(client).choices[0].message.content == REPLY
    with client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True) as s:
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == REPLY
    fake_provider.state.add_fault(status=400, message="bad request")
    with pytest.raises(openai.BadRequestError):
        chat(client)

    response = scrape(gateway)
    text = response.text
    spans = gateway.spans()
    assert len(spans) == 5

    assert response.headers["content-type"].startswith("text/plain")
    assert "version=" in response.headers["content-type"]
    group = {"model_group": "gpt-test"}
    assert sample(text, "spangate_requests_total", **group, deployment=DEPLOYMENT, status="ok") == 4
    assert (
        sample(text, "spangate_requests_total", **group, deployment=DEPLOYMENT, status="error") == 1
    )
    assert sample(text, "spangate_requests_total", model_group="mock") is None
    assert sample(text, "spangate_request_duration_seconds_count", **group) == 5
    duration_sum = sample(text, "spangate_request_duration_seconds_sum", **group)
    assert duration_sum == pytest.approx(sum(s["duration_ms"] for s in spans) / 1000, rel=1e-6)
    assert (
        sample(text, "spangate_upstream_duration_seconds_count", **group, deployment=DEPLOYMENT)
        == 5
    )
    # Each bucket holds the calls that took at most its bound, as the spans say.
    (latency,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "spangate_request_duration_seconds"
    ]
    buckets = [b for b in latency.samples if b.name.endswith("_bucket")]
    assert len(buckets) == 15
    for bucket in buckets:
        bound = float(bucket.labels["le"])
        assert bucket.value == sum(1 for s in spans if s["duration_ms"] / 1000 <= bound)
    assert sample(text, "spangate_gateway_overhead_seconds_count") == 5
    assert sample(text, "spangate_gateway_overhead_seconds_bucket", le="+Inf") == 5
    assert sample(text, "spangate_time_to_first_token_seconds_count", **group) == 1

    input_tokens = sum(s["input_tokens"] or 0 for s in spans)
    output_tokens = sum(s["output_tokens"] or 0 for s in spans)
    assert input_tokens > 0
    assert output_tokens > 0
    assert sample(text, "spangate_tokens_total", **group, kind="input") == input_tokens
    assert sample(text, "spangate_tokens_total", **group, kind="output") == output_tokens
    cost = sample(text, "spangate_cost_usd_total", **group)
    assert cost == pytest.approx(input_tokens * INPUT_PRICE + output_tokens * OUTPUT_PRICE)
    assert cost == pytest.approx(sum(s["cost_usd"] or 0 for s in spans))


def test_metrics_count_retries_and_fallbacks(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    client_for: Callable[[GatewayThread], openai.OpenAI],
) -> None:
    gateway = make_gateway(
        settings=settings_for(fake_provider.url, retries=FAST_RETRIES, fallbacks=["mock"])
    )
    client = client_for(gateway)
    fake_provider.state.add_fault(status=500)
    assert chat(client).choices[0].message.content == REPLY  # one retry
    fake_provider.state.add_fault(status=500, times=2)
    chat(client)  # two tries on gpt-test, then the mock group answers

    text = scrape(gateway).text
    spans = gateway.spans()
    recorded_retries = sum(s["retries"] for s in spans)
    assert recorded_retries == 3
    counted = sum(
        found.value
        for family in text_string_to_metric_families(text)
        for found in family.samples
        if found.name == "spangate_upstream_retries_total"
    )
    assert counted == recorded_retries
    assert sample(text, "spangate_fallbacks_total", model_group="gpt-test", fallback="mock") == 1
    assert sample(text, "spangate_requests_total", model_group="mock", deployment="mock/mock") == 1


def test_breaker_state_gauge_shows_closed_open_and_half_open(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    client_for: Callable[[GatewayThread], openai.OpenAI],
) -> None:
    gateway = make_gateway(
        settings=settings_for(
            fake_provider.url, circuit_breaker={"fail_max": 2, "reset_timeout": 1}
        )
    )
    client = client_for(gateway)
    breaker = {"model_group": "gpt-test", "deployment": DEPLOYMENT}
    assert metric(gateway, "spangate_circuit_breaker_state", **breaker) == 0

    fake_provider.state.add_fault(status=500, times=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            chat(client)
    assert metric(gateway, "spangate_circuit_breaker_state", **breaker) == 2
    assert metric(gateway, "spangate_circuit_breaker_state", model_group="mock") == 0

    # After reset_timeout a slow probe goes through: half-open while it is in flight.
    wait_until(
        lambda: httpx.get(f"{gateway.base}/health/ready", timeout=5).status_code == 200,
        what="the breaker's reset timeout",
    )
    fake_provider.state.add_fault(delay=0.5)
    probe_reply: list[Any] = []
    probe = threading.Thread(target=lambda: probe_reply.append(chat(client)))
    probe.start()
    try:
        wait_until(
            lambda: metric(gateway, "spangate_circuit_breaker_state", **breaker) == 1,
            what="the half-open state",
        )
    finally:
        probe.join(timeout=10)
    assert probe_reply[0].choices[0].message.content == REPLY
    assert metric(gateway, "spangate_circuit_breaker_state", **breaker) == 0


def test_recorder_gauges_report_queue_depth_and_spans_written(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    client_for: Callable[[GatewayThread], openai.OpenAI],
) -> None:
    gateway = make_gateway(settings=settings_for(fake_provider.url))
    client = client_for(gateway)
    assert metric(gateway, "spangate_spans_written") == 0
    calls = 5
    for _ in range(calls):
        chat(client)

    wait_until(
        lambda: metric(gateway, "spangate_spans_written") == calls,
        what="the writer to report every span written",
    )
    text = scrape(gateway).text
    assert sample(text, "spangate_recorder_queue_depth") == 0
    assert sample(text, "spangate_spans_spilled") == 0
    assert sample(text, "spangate_store_healthy") == 1
    assert len(gateway.spans()) == calls
