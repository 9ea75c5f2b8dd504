"""Resilience as a user of the gateway sees it: retries, breakers, fallbacks, limits, timeouts.

Every call goes through the official `openai` SDK with `max_retries=0`, so any retry is the
gateway's. Each test checks what a user can check: the reply or the SDK's exception, the
response headers, what the fake upstream actually received, and the recorded span (its
`retries` column and the `spangate.tries` / `spangate.fallback` attributes).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, wait_until

from config.loader import parse_settings
from config.models import Settings

UPSTREAM_MODEL = "upstream-model"
UPSTREAM_KEY = "sk-upstream-secret"
CLIENT_KEY = "sk-client-key-for-tests"
MESSAGES = [{"role": "user", "content": "one two three four five"}]
REPLY = "echo: one two three four five"
NO_RETRIES: dict[str, Any] = {"attempts": 1}
FAST_BACKOFF: dict[str, Any] = {"initial": 0.01, "max": 0.05, "jitter": 0}
FAST_RETRIES: dict[str, Any] = {"attempts": 3, "backoff": FAST_BACKOFF}
SERVER_ERROR_MESSAGE = "The server had an error while processing your request."
CONTEXT_WINDOW_MESSAGE = (
    "This model's maximum context length is 8192 tokens. However, your messages resulted "
    "in 9000 tokens. Please reduce the length of the messages."
)


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_provider_server() -> Iterator[FakeProviderThread]:
    server = FakeProviderThread().start()
    yield server
    server.stop()


@pytest.fixture
def backup_provider(second_provider_server: FakeProviderThread) -> FakeProviderThread:
    """A second fake upstream (fallback group, or a group's second deployment), cleared."""
    second_provider_server.state.reset()
    second_provider_server.state.latency = 0.0
    return second_provider_server


@pytest.fixture(scope="module", autouse=True)
def warm_sdk(fake_provider_server: FakeProviderThread) -> None:
    """The SDK imports lazily on its first request (about a second); pay that before timing."""
    with openai.OpenAI(
        base_url=fake_provider_server.url, api_key=UPSTREAM_KEY, max_retries=0
    ) as client:
        client.chat.completions.with_raw_response.create(model=UPSTREAM_MODEL, messages=MESSAGES)


def deployment(url: str, model: str = UPSTREAM_MODEL, **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "model": model, "api_base": url, "api_key": UPSTREAM_KEY, **extra}


def group(name: str, *deployments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "deployments": list(deployments), **extra}


def settings_with(*groups: dict[str, Any], **top: Any) -> Settings:
    return parse_settings({"models": list(groups), **top}, env={})


def single_group(url: str, *, retries: dict[str, Any] | None = None, **extra: Any) -> Settings:
    """`gpt-test` with one deployment at `url`, deployment keys from `extra`."""
    return settings_with(group("gpt-test", deployment(url, **extra)), retries=retries or NO_RETRIES)


def openai_client(gateway: GatewayThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url(), api_key=CLIENT_KEY, max_retries=0, timeout=30)


def chat(client: openai.OpenAI, model: str = "gpt-test", **kwargs: Any) -> Any:
    return client.chat.completions.create(model=model, messages=MESSAGES, **kwargs)


def raw_chat(client: openai.OpenAI, model: str = "gpt-test", **kwargs: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, **kwargs
    )


def tries(span: dict[str, Any]) -> list[dict[str, Any]]:
    return list(span["attributes"].get("spangate.tries") or [])


def statuses(span: dict[str, Any]) -> list[int | None]:
    return [t["status"] for t in tries(span)]


def only_span(gateway: GatewayThread) -> dict[str, Any]:
    spans = gateway.spans()
    assert len(spans) == 1, f"expected one span, got {len(spans)}"
    return spans[0]


def upstream_count(provider: FakeProviderThread) -> int:
    return len(provider.state.requests_to("/v1/chat/completions"))


def ready_status(gateway: GatewayThread) -> int:
    return httpx.get(f"{gateway.base}/health/ready", timeout=5).status_code


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def call_error(fn: Callable[[], Any]) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        fn()
    return caught.value


# --- retries -------------------------------------------------------------------------------


def test_429_with_retry_after_waits_the_advertised_second_then_succeeds(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=FAST_RETRIES)
    fake_provider.state.add_fault(status=429, headers={"Retry-After": "1"})

    with openai_client(gateway) as client:
        raw, elapsed = timed(lambda: raw_chat(client))
    reply = raw.parse()

    assert reply.choices[0].message.content == REPLY
    # The backoff alone would be 10 ms; the second try waited for the upstream's Retry-After.
    assert elapsed >= 0.95
    assert raw.headers["X-Upstream-Retries"] == "1"
    assert upstream_count(fake_provider) == 2
    span = only_span(gateway)
    assert span["status"] == "ok"
    assert span["retries"] == 1
    assert statuses(span) == [429, 200]
    assert tries(span)[0]["wait_ms"] == 0
    assert tries(span)[1]["wait_ms"] == pytest.approx(1000, abs=50)


def test_retry_after_ms_is_honoured_for_sub_second_waits(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    # A 3 s backoff proves the 250 ms came from the header, not from the backoff.
    slow_backoff = {"attempts": 2, "backoff": {"initial": 3, "max": 3, "jitter": 0}}
    gateway = make_gateway(retries=slow_backoff)
    fake_provider.state.add_fault(status=429, headers={"retry-after-ms": "250"})

    with openai_client(gateway) as client:
        raw, elapsed = timed(lambda: raw_chat(client))

    assert raw.parse().choices[0].message.content == REPLY
    assert 0.24 <= elapsed < 2.0
    assert raw.headers["X-Upstream-Retries"] == "1"
    span = only_span(gateway)
    assert statuses(span) == [429, 200]
    assert tries(span)[1]["wait_ms"] == pytest.approx(250, abs=20)


def test_retry_after_beyond_the_cap_passes_the_upstream_429_through_without_waiting(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries={**FAST_RETRIES, "retry_after_cap": 2})
    fake_provider.state.add_fault(status=429, headers={"Retry-After": "60"})

    with openai_client(gateway) as client:
        error, elapsed = timed(lambda: call_error(lambda: chat(client)))

    assert isinstance(error, openai.RateLimitError)
    assert elapsed < 1.0
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.response.headers["retry-after"] == "60"
    assert error.response.headers["X-Upstream-Retries"] == "0"
    assert upstream_count(fake_provider) == 1
    span = only_span(gateway)
    assert span["status"] == "error"
    assert span["http_status"] == 429
    assert span["retries"] == 0
    assert statuses(span) == [429]


def test_gateway_overhead_excludes_the_wait_before_a_retry(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=FAST_RETRIES)
    fake_provider.state.add_fault(status=429, headers={"retry-after-ms": "600"})

    with openai_client(gateway) as client:
        raw = raw_chat(client)

    assert raw.headers["X-Upstream-Retries"] == "1"
    # 600 ms went to honouring Retry-After: the upstream's doing, not the gateway's.
    assert float(raw.headers["X-Gateway-Overhead-Ms"]) < 300
    span = only_span(gateway)
    assert span["duration_ms"] >= 600
    assert span["overhead_ms"] < 300


def test_two_500s_then_200_succeeds_on_the_third_try(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=FAST_RETRIES)
    fake_provider.state.add_fault(status=500, times=2)

    with openai_client(gateway) as client:
        raw = raw_chat(client)

    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["X-Upstream-Retries"] == "2"
    assert upstream_count(fake_provider) == 3
    span = only_span(gateway)
    assert span["status"] == "ok"
    assert span["http_status"] == 200
    assert span["retries"] == 2
    assert statuses(span) == [500, 500, 200]
    assert all(t["deployment"] == f"openai/{UPSTREAM_MODEL}" for t in tries(span))
    # Exponential backoff: 10 ms, then 20 ms.
    assert [t["wait_ms"] for t in tries(span)] == pytest.approx([0, 10, 20], abs=1)


def test_500s_beyond_the_attempts_return_the_upstream_500_and_an_error_span(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=FAST_RETRIES)
    fake_provider.state.add_fault(status=500, times=4)

    with openai_client(gateway) as client, pytest.raises(openai.InternalServerError) as caught:
        chat(client)

    error = caught.value
    assert error.status_code == 500
    assert error.body["message"] == SERVER_ERROR_MESSAGE  # type: ignore[index]
    assert error.type == "server_error"
    assert error.response.headers["X-Upstream-Retries"] == "2"
    assert upstream_count(fake_provider) == 3
    span = only_span(gateway)
    assert span["status"] == "error"
    assert span["http_status"] == 500
    assert span["retries"] == 2
    assert statuses(span) == [500, 500, 500]
    assert span["error_message"] == SERVER_ERROR_MESSAGE


def test_400_is_not_retried(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=FAST_RETRIES)
    fake_provider.state.add_fault(status=400, message="bad temperature", param="temperature")

    with openai_client(gateway) as client, pytest.raises(openai.BadRequestError) as caught:
        chat(client)

    assert caught.value.param == "temperature"
    assert caught.value.response.headers["X-Upstream-Retries"] == "0"
    assert upstream_count(fake_provider) == 1
    span = only_span(gateway)
    assert span["status"] == "error"
    assert span["http_status"] == 400
    assert span["retries"] == 0
    assert statuses(span) == [400]


def test_connection_reset_is_retried_and_the_call_succeeds(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=FAST_RETRIES)
    fake_provider.state.add_fault(reset=True)

    with openai_client(gateway) as client:
        raw = raw_chat(client)

    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["X-Upstream-Retries"] == "1"
    assert upstream_count(fake_provider) == 2
    span = only_span(gateway)
    assert span["status"] == "ok"
    assert span["retries"] == 1
    first, second = tries(span)
    assert first["error"] == "upstream_unreachable"
    assert second["status"] == 200
    assert second["error"] is None


SLOW_BACKOFF: dict[str, Any] = {"initial": 30, "max": 30, "jitter": 0}


def span_of(gateway: GatewayThread, span_id: str) -> dict[str, Any]:
    return next(span for span in gateway.spans() if span["span_id"] == span_id)


def test_a_kept_alive_connection_dropped_before_any_answer_is_retried_at_once(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries={"attempts": 2, "backoff": SLOW_BACKOFF})
    with openai_client(gateway) as client:
        raw_chat(client)  # leaves a kept-alive connection to the upstream in the pool
        fake_provider.state.add_fault(reset=True)  # read on that connection, then dropped
        raw = raw_chat(client)

    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["X-Upstream-Retries"] == "1"
    span = span_of(gateway, raw.headers["X-Span-Id"])
    first, second = tries(span)
    assert first["error"] == "upstream_unreachable"
    # Not the 30 s backoff: the connection, not the upstream, is what failed.
    assert second["wait_ms"] == 0 and second["status"] == 200


def test_a_kept_alive_connection_dropped_before_any_answer_is_not_resent_without_retries(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=NO_RETRIES)
    with openai_client(gateway) as client:
        raw_chat(client)
        fake_provider.state.add_fault(reset=True)
        with pytest.raises(openai.InternalServerError) as failed:
            raw_chat(client)

    # The upstream read the request before it dropped the line: it may have done the work,
    # so the gateway sends it no second time behind the retry policy's back.
    assert upstream_count(fake_provider) == 2
    assert failed.value.status_code == 502
    span = span_of(gateway, failed.value.response.headers["X-Span-Id"])
    assert span["error_type"] == "upstream_unreachable" and span["retries"] == 0


def test_a_409_is_retried_like_every_status_in_the_default_on_status(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """A 409 (a conflict the upstream expects to clear) is in the default `on_status`, though
    it says nothing against the deployment's health."""
    gateway = make_gateway(retries=FAST_RETRIES)
    fake_provider.state.add_fault(status=409, message="conflict, try again")

    with openai_client(gateway) as client:
        reply = chat(client)

    assert reply.choices[0].message.content == REPLY
    assert upstream_count(fake_provider) == 2
    assert statuses(only_span(gateway)) == [409, 200]


def test_a_404_added_to_on_status_is_retried(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """`on_status` is the user's list: a 404 listed there (vLLM still loading the model)."""
    gateway = make_gateway(retries={**FAST_RETRIES, "on_status": [404, 500]})
    fake_provider.state.add_fault(status=404, message="model is loading")

    with openai_client(gateway) as client:
        reply = chat(client)

    assert reply.choices[0].message.content == REPLY
    assert upstream_count(fake_provider) == 2


def test_a_200_with_an_unreadable_body_is_not_sent_again(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """The upstream answered 200 (it generated, and billed, the completion) with cut JSON:
    sending the prompt again would bill it twice."""
    gateway = make_gateway(retries=FAST_RETRIES)
    fake_provider.state.add_fault(malformed=True)

    with openai_client(gateway) as client:
        error = call_error(lambda: chat(client))

    assert error.status_code == 502
    assert upstream_count(fake_provider) == 1
    assert statuses(only_span(gateway)) == [502]


# --- circuit breaker -----------------------------------------------------------------------


def breaker_gateway(
    make_gateway: Callable[..., GatewayThread], reset_timeout: float
) -> GatewayThread:
    return make_gateway(
        retries=NO_RETRIES, circuit_breaker={"fail_max": 5, "reset_timeout": reset_timeout}
    )


def open_breaker(gateway: GatewayThread, provider: FakeProviderThread) -> None:
    """Five failing calls in a row; each reaches the upstream and gets its 500."""
    provider.state.add_fault(status=500, times=5)
    with openai_client(gateway) as client:
        for _ in range(5):
            with pytest.raises(openai.InternalServerError):
                chat(client)


def assert_fails_fast(gateway: GatewayThread, provider: FakeProviderThread) -> None:
    """The next call is refused with 503 by the gateway itself, the upstream never sees it."""
    before = upstream_count(provider)
    with openai_client(gateway) as client:
        error, elapsed = timed(lambda: call_error(lambda: chat(client)))
    assert error.status_code == 503
    assert error.code == "no_healthy_deployment"
    assert int(error.response.headers["retry-after"]) >= 1
    assert elapsed < 1.0
    assert upstream_count(provider) == before


def wait_for_half_open(gateway: GatewayThread) -> None:
    wait_until(lambda: ready_status(gateway) == 200, timeout=5, what="the breaker's reset timeout")


def test_five_failures_open_the_breaker_and_the_sixth_call_fails_fast(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = breaker_gateway(make_gateway, reset_timeout=30)
    assert ready_status(gateway) == 200

    open_breaker(gateway, fake_provider)
    assert upstream_count(fake_provider) == 5

    with openai_client(gateway) as client:
        error = call_error(lambda: chat(client))
    assert isinstance(error, openai.InternalServerError)
    assert error.status_code == 503
    assert error.code == "no_healthy_deployment"
    assert 25 <= int(error.response.headers["retry-after"]) <= 30
    assert upstream_count(fake_provider) == 5

    ready = httpx.get(f"{gateway.base}/health/ready", timeout=5)
    assert ready.status_code == 503
    assert any("gpt-test" in problem for problem in ready.json()["problems"])

    spans = gateway.spans()
    assert [s["http_status"] for s in spans] == [500] * 5 + [503]
    refused = spans[-1]
    assert refused["status"] == "error"
    assert refused["error_type"] == "no_healthy_deployment"


def test_after_reset_timeout_a_successful_probe_closes_the_breaker(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = breaker_gateway(make_gateway, reset_timeout=1)
    open_breaker(gateway, fake_provider)
    assert_fails_fast(gateway, fake_provider)

    wait_for_half_open(gateway)
    with openai_client(gateway) as client:
        probe = chat(client)
        assert probe.choices[0].message.content == REPLY
        assert upstream_count(fake_provider) == 6
        assert ready_status(gateway) == 200
        for _ in range(3):
            assert chat(client).choices[0].message.content == REPLY
        # Closed again, with a fresh failure count: one 500 does not reopen it.
        fake_provider.state.add_fault(status=500)
        with pytest.raises(openai.InternalServerError):
            chat(client)
        assert chat(client).choices[0].message.content == REPLY
    assert upstream_count(fake_provider) == 11


def test_after_reset_timeout_a_failed_probe_reopens_the_breaker(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = breaker_gateway(make_gateway, reset_timeout=1)
    open_breaker(gateway, fake_provider)

    wait_for_half_open(gateway)
    fake_provider.state.add_fault(status=500)
    with openai_client(gateway) as client, pytest.raises(openai.InternalServerError):
        chat(client)
    assert upstream_count(fake_provider) == 6

    assert_fails_fast(gateway, fake_provider)
    assert ready_status(gateway) == 503


def test_half_open_breaker_lets_only_one_concurrent_call_through(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = breaker_gateway(make_gateway, reset_timeout=1)
    open_breaker(gateway, fake_provider)
    wait_for_half_open(gateway)
    # The probe is slow, so the other calls arrive while it is still in flight.
    fake_provider.state.add_fault(delay=0.8)
    callers = 4
    barrier = threading.Barrier(callers)

    def call(client: openai.OpenAI) -> Any:
        barrier.wait(timeout=5)
        try:
            return chat(client)
        except openai.APIStatusError as exc:
            return exc

    with openai_client(gateway) as client, ThreadPoolExecutor(callers) as pool:
        results = list(pool.map(call, [client] * callers))

    answered = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(answered) == 1
    assert answered[0].choices[0].message.content == REPLY
    assert [(r.status_code, r.code) for r in refused] == [(503, "no_healthy_deployment")] * 3
    assert upstream_count(fake_provider) == 6
    # The probe succeeded: the breaker is closed again.
    assert ready_status(gateway) == 200


def test_a_200_that_arrives_after_another_call_opened_the_breaker_reaches_its_client(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """A slow call is in flight when another call's 500 opens the breaker (fail_max 1). The
    slow call's 200 still reaches its client: the upstream answered (and billed) it."""
    gateway = make_gateway(retries=NO_RETRIES, circuit_breaker={"fail_max": 1, "reset_timeout": 30})
    fake_provider.state.add_fault(delay=3)  # the first request: slow, then a normal 200
    fake_provider.state.add_fault(status=500)  # the second: a failure that opens the breaker
    result: dict[str, Any] = {}

    def slow_call() -> None:
        with openai_client(gateway) as client:
            try:
                result["reply"] = chat(client)
            except openai.APIStatusError as exc:
                result["error"] = exc

    thread = threading.Thread(target=slow_call)
    thread.start()
    wait_until(lambda: upstream_count(fake_provider) == 1, timeout=5, what="the slow call sent")
    with openai_client(gateway) as client, pytest.raises(openai.InternalServerError):
        chat(client)
    assert ready_status(gateway) == 503  # the breaker is open now
    thread.join(timeout=15)

    assert "error" not in result, f"the client got {result['error'].status_code}"
    assert result["reply"].choices[0].message.content == REPLY
    assert sorted(s["http_status"] for s in gateway.spans()) == [200, 500]


def test_a_breaker_that_opens_during_retries_passes_on_the_upstreams_last_answer(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """Two 500s open the breaker (fail_max 2) before the third of three tries: the client gets
    the upstream's 500, not a 503 saying no upstream was healthy."""
    gateway = make_gateway(
        retries=FAST_RETRIES, circuit_breaker={"fail_max": 2, "reset_timeout": 30}
    )
    fake_provider.state.add_fault(status=500, message="upstream exploded", times=3)

    with openai_client(gateway) as client:
        error = call_error(lambda: chat(client))

    assert upstream_count(fake_provider) == 2
    assert error.status_code == 500
    assert "upstream exploded" in error.message


def test_a_probe_whose_client_hangs_up_does_not_keep_the_breaker_open(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=NO_RETRIES, circuit_breaker={"fail_max": 1, "reset_timeout": 1})
    fake_provider.state.add_fault(status=500)
    with openai_client(gateway) as client, pytest.raises(openai.InternalServerError):
        chat(client)
    wait_until(lambda: ready_status(gateway) == 200, timeout=5, what="the reset timeout")
    fake_provider.state.add_fault(delay=5)  # the probe hangs; its client gives up
    impatient = openai.OpenAI(
        base_url=gateway.url(), api_key=CLIENT_KEY, max_retries=0, timeout=0.5
    )
    with impatient, pytest.raises(openai.APITimeoutError):
        chat(impatient)

    def next_call_succeeds() -> bool:
        with openai_client(gateway) as client:
            try:
                return bool(chat(client).choices[0].message.content == REPLY)
            except openai.APIStatusError:
                return False

    wait_until(next_call_succeeds, timeout=10, what="a call through the breaker after the probe")
    assert ready_status(gateway) == 200


def test_client_errors_do_not_open_the_breaker(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=NO_RETRIES, circuit_breaker={"fail_max": 1, "reset_timeout": 30})
    fake_provider.state.add_fault(status=400, times=3)
    with openai_client(gateway) as client:
        for _ in range(3):
            with pytest.raises(openai.BadRequestError):
                chat(client)
        assert chat(client).choices[0].message.content == REPLY
    assert ready_status(gateway) == 200


# --- fallbacks -----------------------------------------------------------------------------


def fallback_settings(
    primary_url: str,
    backup_url: str,
    *,
    primary: dict[str, Any] | None = None,
    backup: dict[str, Any] | None = None,
) -> Settings:
    return settings_with(
        group(
            "primary",
            deployment(primary_url, "primary-model"),
            fallbacks=["backup"],
            **(primary or {}),
        ),
        group("backup", deployment(backup_url, "backup-model"), **(backup or {})),
        retries=FAST_RETRIES,
    )


def test_fallback_group_answers_when_the_primary_keeps_failing(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    backup_provider: FakeProviderThread,
) -> None:
    gateway = make_gateway(
        settings=fallback_settings(
            fake_provider.url,
            backup_provider.url,
            primary={"retries": {"attempts": 2, "backoff": FAST_BACKOFF}},
        )
    )
    fake_provider.state.add_fault(status=500, times=10)

    with openai_client(gateway) as client:
        raw = raw_chat(client, model="primary")
    reply = raw.parse()

    assert reply.choices[0].message.content == REPLY
    assert reply.model == "backup-model"
    assert upstream_count(fake_provider) == 2
    assert upstream_count(backup_provider) == 1
    span = only_span(gateway)
    assert span["status"] == "ok"
    assert span["request_model"] == "primary"
    assert span["model_group"] == "backup"
    assert span["deployment"] == "openai/backup-model"
    assert span["attributes"]["spangate.fallback"] == "backup"
    assert [(t["group"], t["status"]) for t in tries(span)] == [
        ("primary", 500),
        ("primary", 500),
        ("backup", 200),
    ]
    assert [t["deployment"] for t in tries(span)] == [
        "openai/primary-model",
        "openai/primary-model",
        "openai/backup-model",
    ]


def test_fallback_group_answers_at_once_when_the_primary_breaker_is_open(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    backup_provider: FakeProviderThread,
) -> None:
    gateway = make_gateway(
        settings=fallback_settings(
            fake_provider.url,
            backup_provider.url,
            primary={
                "retries": NO_RETRIES,
                "circuit_breaker": {"fail_max": 1, "reset_timeout": 30},
            },
        )
    )
    fake_provider.state.add_fault(status=500)
    with openai_client(gateway) as client:
        first = chat(client, model="primary")  # trips primary's breaker, backup answers
        second, elapsed = timed(lambda: chat(client, model="primary"))

    assert first.model == second.model == "backup-model"
    assert second.choices[0].message.content == REPLY
    assert elapsed < 1.0
    assert upstream_count(fake_provider) == 1
    assert upstream_count(backup_provider) == 2
    span = gateway.spans()[-1]
    assert span["status"] == "ok"
    assert span["model_group"] == "backup"
    assert span["attributes"]["spangate.fallback"] == "backup"
    assert [t["group"] for t in tries(span) if t["status"] is not None] == ["backup"]


def test_context_window_error_falls_back_to_the_next_group(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    backup_provider: FakeProviderThread,
) -> None:
    gateway = make_gateway(settings=fallback_settings(fake_provider.url, backup_provider.url))
    fake_provider.state.add_fault(
        status=400,
        message=CONTEXT_WINDOW_MESSAGE,
        error_type="invalid_request_error",
        code="context_length_exceeded",
        param="messages",
    )

    with openai_client(gateway) as client:
        reply = chat(client, model="primary")

    assert reply.choices[0].message.content == REPLY
    assert reply.model == "backup-model"
    # A prompt that does not fit is not retried on the same group.
    assert upstream_count(fake_provider) == 1
    assert upstream_count(backup_provider) == 1
    span = only_span(gateway)
    assert span["status"] == "ok"
    assert span["model_group"] == "backup"
    assert span["attributes"]["spangate.fallback"] == "backup"
    assert [(t["group"], t["status"]) for t in tries(span)] == [("primary", 400), ("backup", 200)]


def test_every_breaker_open_answers_503_with_retry_after_without_upstream_calls(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    backup_provider: FakeProviderThread,
) -> None:
    trip_at_once = {"fail_max": 1, "reset_timeout": 30}
    gateway = make_gateway(
        settings=fallback_settings(
            fake_provider.url,
            backup_provider.url,
            primary={"retries": NO_RETRIES, "circuit_breaker": trip_at_once},
            backup={"retries": NO_RETRIES, "circuit_breaker": trip_at_once},
        )
    )
    fake_provider.state.add_fault(status=500)
    backup_provider.state.add_fault(status=500)
    with openai_client(gateway) as client:
        with pytest.raises(openai.InternalServerError) as tripped:
            chat(client, model="primary")
        assert tripped.value.status_code == 500  # the last upstream's own answer
        error, elapsed = timed(lambda: call_error(lambda: chat(client, model="primary")))

    assert elapsed < 1.0
    assert error.status_code == 503
    assert error.code == "no_healthy_deployment"
    assert 25 <= int(error.response.headers["retry-after"]) <= 30
    assert upstream_count(fake_provider) == 1
    assert upstream_count(backup_provider) == 1
    assert ready_status(gateway) == 503
    span = gateway.spans()[-1]
    assert span["status"] == "error"
    assert span["http_status"] == 503


def test_a_rate_limited_group_with_an_open_fallback_answers_429_with_its_retry_after(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """`primary` is out of rpm, `backup`'s breaker is open: not "every breaker is open, retry
    after 1 s" (primary's is closed, and a retry in a second meets the limit again)."""
    settings = settings_with(
        group("primary", deployment(fake_provider.url, rpm=1), fallbacks=["backup"]),
        group("backup", deployment(fake_provider.url, model="other")),
        retries=NO_RETRIES,
        rate_limit_wait=0,
        circuit_breaker={"fail_max": 1, "reset_timeout": 60},
    )
    gateway = make_gateway(settings=settings)
    fake_provider.state.add_fault(status=500)
    with openai_client(gateway) as client:
        with pytest.raises(openai.InternalServerError):
            chat(client, model="backup")  # opens backup's breaker
        assert chat(client, model="primary").choices[0].message.content == REPLY  # spends rpm
        error = call_error(lambda: chat(client, model="primary"))

    assert error.status_code == 429
    assert int(error.response.headers["retry-after"]) >= 30


# --- rate limits ---------------------------------------------------------------------------


def test_rpm_exhausted_answers_429_in_openai_shape_and_the_upstream_never_sees_it(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(
        settings=settings_with(
            group("gpt-test", deployment(fake_provider.url, rpm=3)),
            retries=FAST_RETRIES,
            rate_limit_wait=0,
        )
    )
    with openai_client(gateway) as client:
        answers = [raw_chat(client) for _ in range(3)]
        with pytest.raises(openai.RateLimitError) as caught:
            chat(client)

    assert [a.headers["x-ratelimit-limit-requests"] for a in answers] == ["3"] * 3
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
    error = caught.value
    assert error.status_code == 429
    assert error.type == "requests"
    assert error.code == "rate_limit_exceeded"
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["content-type"].startswith("application/json")
    assert set(error.response.json()["error"]) == {"message", "type", "param", "code"}
    assert upstream_count(fake_provider) == 3
    spans = gateway.spans()
    assert [s["http_status"] for s in spans] == [200, 200, 200, 429]
    assert spans[-1]["status"] == "error"
    assert spans[-1]["error_type"] == "rate_limit_exceeded"


def test_tpm_exhausted_by_recorded_usage_answers_429_for_tokens(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(
        settings=settings_with(
            group("gpt-test", deployment(fake_provider.url, tpm=200)),
            retries=FAST_RETRIES,
            rate_limit_wait=0,
        )
    )
    long_prompt = [{"role": "user", "content": "word " * 60}]  # 300 characters
    with openai_client(gateway) as client:

        def call() -> Any:
            return client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=long_prompt, max_tokens=2
            )

        first, second = call(), call()
        used = first.parse().usage.total_tokens
        # Two calls fit in 200 tokens a minute, a third does not.
        assert 2 * used <= 200 < 3 * used
        with pytest.raises(openai.RateLimitError) as caught:
            call()

    assert first.headers["x-ratelimit-limit-tokens"] == "200"
    assert 200 - used - 3 <= int(first.headers["x-ratelimit-remaining-tokens"]) <= 200 - used + 3
    assert int(second.headers["x-ratelimit-remaining-tokens"]) < int(
        first.headers["x-ratelimit-remaining-tokens"]
    )
    assert caught.value.type == "tokens"
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert upstream_count(fake_provider) == 2


def test_limiter_holds_a_burst_to_the_configured_rate(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    # 60 rpm: a burst of 60 passes at once, after that one call per second.
    gateway = make_gateway(
        settings=settings_with(
            group("gpt-test", deployment(fake_provider.url, rpm=60)),
            retries=FAST_RETRIES,
            rate_limit_wait=10,
        )
    )
    burst = 3
    with openai_client(gateway) as client:
        for _ in range(60):
            chat(client)
        started = time.perf_counter()
        with ThreadPoolExecutor(burst) as pool:
            replies = list(pool.map(lambda _: chat(client), range(burst)))
        elapsed = time.perf_counter() - started

    assert [r.choices[0].message.content for r in replies] == [REPLY] * burst
    arrivals = sorted(r.at for r in fake_provider.state.requests_to("/v1/chat/completions"))
    assert len(arrivals) == 60 + burst
    held = arrivals[-burst:]
    gaps = [later - earlier for earlier, later in itertools.pairwise(held)]
    # At 1 call/s the held calls reach the upstream about a second apart.
    assert all(gap >= 0.6 for gap in gaps), gaps
    assert held[-1] - held[0] >= 1.5, gaps
    assert elapsed >= 1.8
    waits = sorted(s["attributes"]["spangate.limiter_wait_ms"] for s in gateway.spans())
    assert waits[-1] >= 1500
    assert all(w > 0 for w in waits[-burst:])
    assert all(w < 50 for w in waits[:-burst]), "the first 60 calls should not have waited"


def test_a_retried_500_gives_its_token_estimate_back_to_the_tpm_budget(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """A try answered 500 used no tokens: after a 500 then a 200 the budget holds only the
    200's usage, as after one clean call, so a second call of the same size fits."""
    settings = settings_with(
        group("gpt-test", deployment(fake_provider.url, tpm=600)),
        retries=FAST_RETRIES,
        rate_limit_wait=0,
    )
    gateway = make_gateway(settings=settings)
    long_prompt = [{"role": "user", "content": "word " * 60}]  # estimate ~76 + 256 tokens
    fake_provider.state.add_fault(status=500)

    with openai_client(gateway) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=long_prompt
        )
        used = raw.parse().usage.total_tokens
        remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
        assert statuses(only_span(gateway)) == [500, 200]
        assert remaining >= 600 - used - 5  # a few tokens of leak either way
        second = client.chat.completions.create(model="gpt-test", messages=long_prompt)
        assert second.usage.total_tokens == used


def test_rpm_is_shared_by_replicas_with_redis(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    redis_server: Any,
) -> None:
    settings = settings_with(
        group("gpt-test", deployment(fake_provider.url, rpm=1, name=f"d-{uuid.uuid4().hex}")),
        retries=NO_RETRIES,
        rate_limit_wait=0,
        shared={"redis_url": redis_server.url, "sync_seconds": 0.1},
    )
    codes = []
    for gateway in (make_gateway(settings=settings), make_gateway(settings=settings)):
        with openai_client(gateway) as client:
            try:
                chat(client)
                codes.append(200)
            except openai.APIStatusError as exc:
                codes.append(exc.status_code)
    assert codes == [200, 429]


# --- timeouts ------------------------------------------------------------------------------


def test_total_timeout_answers_504_in_openai_shape_and_records_an_error_span(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(settings=single_group(fake_provider.url, timeout={"total": 0.3}))
    fake_provider.state.add_fault(delay=1.5)

    with openai_client(gateway) as client:
        error, elapsed = timed(lambda: call_error(lambda: chat(client)))

    assert error.status_code == 504
    assert error.code == "upstream_timeout"
    assert set(error.response.json()["error"]) == {"message", "type", "param", "code"}
    assert elapsed < 1.2
    span = only_span(gateway)
    assert span["status"] == "error"
    assert span["http_status"] == 504
    assert span["error_type"] == "upstream_timeout"
    assert [t["error"] for t in tries(span)] == ["upstream_timeout"]


def test_stream_without_a_first_token_in_time_answers_504_before_any_byte(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(
        settings=single_group(fake_provider.url, timeout={"first_token": 0.3, "total": 10})
    )
    fake_provider.state.add_fault(delay=1.5)

    with openai_client(gateway) as client:
        error, elapsed = timed(lambda: call_error(lambda: chat(client, stream=True)))

    # The status line itself is the 504: nothing of a stream was sent.
    assert error.status_code == 504
    assert error.code == "upstream_timeout"
    assert error.response.headers["content-type"].startswith("application/json")
    assert elapsed < 1.2
    span = only_span(gateway)
    assert span["status"] == "error"
    assert span["http_status"] == 504
    assert span["stream"] == 1


def test_stream_first_token_timeout_is_retried_when_attempts_allow(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(
        settings=single_group(
            fake_provider.url,
            retries={"attempts": 2, "backoff": FAST_BACKOFF},
            timeout={"first_token": 0.3, "total": 10},
        )
    )
    fake_provider.state.add_fault(delay=1.5)

    with openai_client(gateway) as client:
        started = time.perf_counter()
        with chat(client, stream=True) as stream:
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        elapsed = time.perf_counter() - started

    assert text == REPLY
    assert elapsed < 1.2
    assert upstream_count(fake_provider) == 2
    span = only_span(gateway)
    assert span["status"] == "ok"
    assert span["retries"] == 1
    assert [t["error"] for t in tries(span)] == ["upstream_timeout", None]
    assert statuses(span)[-1] == 200


def test_stream_broken_midway_raises_in_the_sdk_and_records_what_arrived(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries=FAST_RETRIES)
    # Role, "echo:", " one", then hang up. The pause between events makes sure the first
    # bytes have reached the client before the break is noticed.
    fake_provider.state.add_fault(truncate_after=3, chunk_delay=0.05)

    received: list[str] = []
    with (
        openai_client(gateway) as client,
        pytest.raises(openai.APIError) as caught,
        chat(client, stream=True) as stream,
    ):
        for chunk in stream:
            received.extend(c.delta.content or "" for c in chunk.choices)

    assert not isinstance(caught.value, openai.APIStatusError)  # it came as a stream event
    seen = "".join(received)
    assert seen
    assert REPLY.startswith(seen)
    assert seen != REPLY
    # Bytes had reached the client: no retry.
    assert upstream_count(fake_provider) == 1
    span = only_span(gateway)
    assert span["status"] == "error"
    assert span["stream"] == 1
    assert span["error_type"]
    assert span["response_body"]["choices"][0]["message"]["content"] == seen


# --- routing -------------------------------------------------------------------------------


def test_weighted_routing_splits_traffic_by_weight(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    backup_provider: FakeProviderThread,
) -> None:
    gateway = make_gateway(
        settings=settings_with(
            group(
                "gpt-test",
                deployment(fake_provider.url, "model-a", weight=3),
                deployment(backup_provider.url, "model-b", weight=1),
            ),
            retries=NO_RETRIES,
        )
    )
    calls = 200
    with openai_client(gateway) as client:
        for _ in range(calls):
            chat(client)

    to_a, to_b = upstream_count(fake_provider), upstream_count(backup_provider)
    assert to_a + to_b == calls
    # Expected 150 : 50 (standard deviation about 6).
    assert 125 <= to_a <= 175, (to_a, to_b)
    spans = gateway.spans()
    assert sum(s["deployment"] == "openai/model-a" for s in spans) == to_a
    assert sum(s["deployment"] == "openai/model-b" for s in spans) == to_b


def test_least_busy_routing_sends_calls_to_the_idle_deployment(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    backup_provider: FakeProviderThread,
) -> None:
    # By weight nearly everything would go to A; least-busy must avoid A while it is busy.
    gateway = make_gateway(
        settings=settings_with(
            group(
                "gpt-test",
                deployment(fake_provider.url, "model-a", weight=1000),
                deployment(backup_provider.url, "model-b", weight=0.001),
                routing="least-busy",
            ),
            retries=NO_RETRIES,
        )
    )
    fake_provider.state.add_fault(delay=1.0)

    with openai_client(gateway) as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, client)
        wait_until(lambda: upstream_count(fake_provider) == 1, what="the slow call to reach A")
        quick = [chat(client) for _ in range(5)]
        assert not slow.done(), "A's call should still be in flight"
        slow_reply = slow.result(timeout=10)

    assert slow_reply.model == "model-a"
    assert [r.model for r in quick] == ["model-b"] * 5
    assert upstream_count(fake_provider) == 1
    assert upstream_count(backup_provider) == 5


# --- upstream URLs -------------------------------------------------------------------------


def test_an_api_base_with_a_query_string_keeps_it_after_the_operation_path(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    """An Azure-style `api_base` (`...?api-version=...`): the operation path goes before the
    query."""
    settings = single_group(fake_provider.url + "?api-version=2024-02-01")
    gateway = make_gateway(settings=settings)

    with openai_client(gateway) as client:
        reply = chat(client)

    assert reply.choices[0].message.content == REPLY
    request = fake_provider.state.last_request
    assert request.path == "/v1/chat/completions"
    assert request.query == {"api-version": "2024-02-01"}
