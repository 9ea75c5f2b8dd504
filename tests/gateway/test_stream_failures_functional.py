"""Every failure is an error span, and a span's two statuses say who failed: `http_status` is
what the client got, `upstream_status` what the upstream answered (or the gateway judged its
failure to be). Through the real `openai` SDK, against the fake provider taught each ending."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, wait_until

from gateway.exporters.otlp_mapping import span_proto
from gateway.web import routes_openai

MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]
NO_RETRIES = {"attempts": 1}


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="anything", max_retries=0)


def one_span(gateway: GatewayThread, rollout: str) -> dict[str, Any]:
    (span,) = gateway.spans(rollout_id=rollout)
    return span


def statuses(span: dict[str, Any]) -> tuple[Any, ...]:
    return span["status"], span["http_status"], span["upstream_status"]


def test_a_responses_stream_ending_in_response_failed_is_an_error_span(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    fake_provider.state.add_fault(
        responses_end="failed", code="server_error", message="The model crashed mid-way."
    )
    with client_for(module_gateway.url("r-failed", "1")) as client:
        events = list(client.responses.create(model="gpt-test", input="hi", stream=True))
    # The client saw the stream end in `response.failed`, with a 200.
    assert events[-1].type == "response.failed"
    span = one_span(module_gateway, "r-failed")
    assert statuses(span) == ("error", 200, 502)
    assert span["error_type"] == "server_error"
    assert span["error_message"] == "The model crashed mid-way."
    assert span["finish_reasons"] == ["failed"]
    assert span["stream"] == 1
    assert span["response_body"]["status"] == "failed"
    # Usage in the failed response is still counted.
    assert span["input_tokens"] and span["output_tokens"]


def test_a_responses_stream_ending_in_an_error_event_is_an_error_span(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    fake_provider.state.add_fault(
        responses_end="error", code="rate_limit_exceeded", message="Too many tokens, slow down."
    )
    with client_for(module_gateway.url("r-error", "1")) as client:
        events = list(client.responses.create(model="gpt-test", input="hi", stream=True))
    assert events[-1].type == "error"
    span = one_span(module_gateway, "r-error")
    assert statuses(span) == ("error", 200, 502)
    assert span["error_type"] == "rate_limit_exceeded"
    assert span["error_message"] == "Too many tokens, slow down."
    # What the client had of the answer (its text) is kept, marked failed.
    assert span["response_body"]["status"] == "failed"
    assert span["finish_reasons"] == ["failed"]


def test_an_incomplete_response_is_ok_with_its_reason_as_the_finish_reason(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    # As chat's `finish_reason: length`: a whole answer, cut where the client said to stop.
    fake_provider.state.add_fault(responses_end="incomplete")
    fake_provider.state.add_fault(responses_end="incomplete")
    with client_for(module_gateway.url("r-incomplete", "1")) as client:
        events = list(client.responses.create(model="gpt-test", input="hi", stream=True))
        plain = client.responses.create(model="gpt-test", input="hi")
    assert events[-1].type == "response.incomplete"
    assert plain.status == "incomplete"
    for span in module_gateway.spans(rollout_id="r-incomplete"):
        assert statuses(span) == ("ok", 200, 200)
        assert span["finish_reasons"] == ["max_output_tokens"]
        assert span["error_type"] is None


def test_a_plain_response_with_status_failed_is_an_error_span(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    fake_provider.state.add_fault(responses_end="failed", code="server_error", message="Nope.")
    with client_for(module_gateway.url("r-plain-failed", "1")) as client:
        answer = client.responses.create(model="gpt-test", input="hi")
    assert answer.status == "failed"
    span = one_span(module_gateway, "r-plain-failed")
    assert statuses(span) == ("error", 200, 502)
    assert (span["error_type"], span["error_message"]) == ("server_error", "Nope.")
    assert span["finish_reasons"] == ["failed"]


@pytest.mark.parametrize("route", ["chat", "responses"])
def test_a_stream_the_upstream_cuts_off_got_a_200_and_the_upstream_failed(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread, route: str
) -> None:
    rollout = f"cut-{route}"
    fake_provider.state.add_fault(truncate_after=3)
    with client_for(module_gateway.url(rollout, "1")) as client, pytest.raises(openai.APIError):
        if route == "chat":
            stream: Any = client.chat.completions.create(
                model="gpt-test", messages=MESSAGES, stream=True
            )
        else:
            stream = client.responses.create(model="gpt-test", input="hi", stream=True)
        for _ in stream:
            pass
    span = one_span(module_gateway, rollout)
    assert statuses(span) == ("error", 200, 502)
    assert span["error_type"] == "upstream_bad_response"


def test_plain_calls_record_both_statuses_on_every_path(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(retries={"attempts": 2, "backoff": {"initial": 0, "max": 0}})
    with client_for(gateway.url("plain", "1")) as client:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        # A 503, retried into a 200: the upstream's answer to the client is the 200.
        fake_provider.state.add_fault(status=503)
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        # A 400 is not retried: the client gets the upstream's own answer.
        fake_provider.state.add_fault(status=400, message="bad things")
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        # Refused by the gateway itself: no upstream answered.
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    ok, retried, refused_upstream, refused_here = gateway.spans(rollout_id="plain")
    assert statuses(ok) == ("ok", 200, 200)
    assert statuses(retried) == ("ok", 200, 200) and retried["retries"] == 1
    assert statuses(refused_upstream) == ("error", 400, 400)
    assert statuses(refused_here) == ("error", 404, None)


def test_after_a_fallback_the_upstream_status_is_the_answering_groups(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    def group(name: str, fallbacks: list[str]) -> dict[str, Any]:
        deployment = {"provider": "openai", "model": "m", "api_base": fake_provider.url}
        return {"name": name, "deployments": [deployment], "fallbacks": fallbacks}

    gateway = make_gateway(
        models=[group("primary", ["backup"]), group("backup", [])], retries=NO_RETRIES
    )
    with client_for(gateway.url("fallback", "1")) as client:
        fake_provider.state.add_fault(status=500)
        client.chat.completions.create(model="primary", messages=MESSAGES)
        fake_provider.state.add_fault(status=500, times=2)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="primary", messages=MESSAGES)
    rescued, failed = gateway.spans(rollout_id="fallback")
    assert statuses(rescued) == ("ok", 200, 200)
    assert rescued["attributes"]["spangate.fallback"] == "backup"
    assert statuses(failed) == ("error", 500, 500)


def test_a_client_that_leaves_mid_stream_is_499_while_the_upstream_answered_200(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    # A stream that never ends, so the gateway surely notices the client has gone.
    fake_provider.state.add_fault(endless=True, chunk_delay=0.02)
    with client_for(module_gateway.url("left", "1")) as client:
        stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        next(iter(stream))
        stream.close()
    span = wait_until(lambda: module_gateway.spans(rollout_id="left"), timeout=10)[0]
    assert statuses(span) == ("cancelled", 499, 200)


def test_the_otlp_span_reports_the_upstream_status_and_keeps_the_clients() -> None:
    record = {
        "span_id": "a" * 16,
        "trace_id": "b" * 32,
        "name": "responses gpt-test",
        "operation": "responses",
        "status": "error",
        "error_type": "server_error",
        "http_status": 200,
        "upstream_status": 502,
        "start_ns": 1,
        "end_ns": 2,
    }
    attributes = {kv.key: kv.value for kv in span_proto(record).attributes}
    assert attributes["http.response.status_code"].int_value == 502
    assert attributes["spangate.http_status"].int_value == 200
    assert attributes["error.type"].string_value == "server_error"


def test_events_before_a_gateway_failure_reach_the_client_before_its_error_event(
    make_gateway: Callable[..., GatewayThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = routes_openai.new_assembler

    def failing_on_the_third_event(operation: str) -> Any:
        assembler = real(operation)
        add, seen = assembler.add, []

        def add_or_fail(chunk: dict[str, Any]) -> None:
            seen.append(chunk)
            if len(seen) == 3:
                raise RuntimeError("a gateway bug on the third event")
            add(chunk)

        assembler.add = add_or_fail  # type: ignore[method-assign]
        return assembler

    # The fake provider writes a stream's events back to back, so they reach the gateway in
    # one read: the two before the failure must still go out, ahead of the error.
    monkeypatch.setattr(routes_openai, "new_assembler", failing_on_the_third_event)
    gateway = make_gateway(retries=NO_RETRIES)
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
    response = httpx.post(gateway.url("r-bug") + "/chat/completions", json=body, timeout=30)
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert len(events) == 3
    assert all('"error"' not in event for event in events[:2])
    assert "could not relay this stream: RuntimeError" in events[2]
    span = one_span(gateway, "r-bug")
    assert (span["status"], span["error_type"]) == ("error", "gateway_error")
