"""Bounds on what a client or an upstream can make the gateway hold: endless and oversized
streams, oversized stored bodies, slow request bodies, too many event-stream subscribers,
client-given metric labels, and clients that leave mid-call."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx
import orjson
from fake_provider import FakeProviderThread
from servers import GatewayThread, wait_until

CHAT = "/v1/chat/completions"
TOOL_NAMES = 20_000
TOOLS_PER_CALL = 2_000
LABEL_CAP = 50
METRICS_BOUND = 64 * 1024


def chat(text: str = "hi", *, stream: bool = False, model: str = "gpt-test") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}


def test_an_endless_stream_is_cut_after_max_stream_seconds_and_recorded_as_an_error(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(limits={"max_stream_seconds": 1.0})
    fake_provider.state.add_fault(endless=True, chunk_delay=0.01)
    with httpx.Client(base_url=gateway.base, timeout=30) as client:
        response = client.post(f"/rollout/endless{CHAT}", json=chat(stream=True))
    assert response.status_code == 200
    errors = [
        orjson.loads(line[6:])
        for line in response.text.splitlines()
        if line.startswith("data: {") and '"error"' in line
    ]
    assert errors and errors[-1]["error"]["code"] == "upstream_timeout"
    [span] = gateway.spans(rollout_id="endless")
    assert span["status"] == "error"
    assert span["error_type"] == "upstream_timeout"
    assert "max_stream_seconds" in span["error_message"]


def test_a_stream_over_max_stream_bytes_is_cut_and_recorded_as_an_error(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(limits={"max_stream_bytes": 64 * 1024})
    fake_provider.state.add_fault(endless=True)
    with httpx.Client(base_url=gateway.base, timeout=30) as client:
        response = client.post(f"/rollout/big-stream{CHAT}", json=chat(stream=True))
    assert response.status_code == 200
    assert len(response.content) < 128 * 1024
    assert "upstream_too_large" in response.text
    [span] = gateway.spans(rollout_id="big-stream")
    assert (span["status"], span["error_type"]) == ("error", "upstream_too_large")


def test_an_upstream_body_over_the_limit_is_a_502_and_an_error_span(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(limits={"max_upstream_body_bytes": 1024 * 1024})
    fake_provider.state.add_fault(huge_body=8 * 1024 * 1024)
    with httpx.Client(base_url=gateway.base, timeout=30) as client:
        response = client.post(f"/rollout/huge{CHAT}", json=chat())
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_too_large"
    # Not retried: the same answer would be as large again.
    assert len(fake_provider.state.requests) == 1
    [span] = gateway.spans(rollout_id="huge")
    assert (span["status"], span["http_status"]) == ("error", 502)
    assert span["error_type"] == "upstream_too_large"


def test_stored_bodies_over_the_limit_are_cut_with_their_size_recorded(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway(limits={"max_stored_body_bytes": 200})
    long_text = "word " * 2_000
    with httpx.Client(base_url=gateway.base, timeout=30) as client:
        plain = client.post(f"/rollout/cut{CHAT}", json=chat(long_text))
        streamed = client.post(f"/rollout/cut{CHAT}", json=chat(long_text, stream=True))
        small = client.post(f"/rollout/cut{CHAT}", json=chat("short"))
    assert plain.status_code == streamed.status_code == small.status_code == 200
    first, second, third = gateway.spans(rollout_id="cut")
    for span in (first, second):
        attributes = span["attributes"]
        assert attributes["spangate.request_body.truncated"] is True
        assert attributes["spangate.request_body.size"] > 10_000
        assert attributes["spangate.response_body.truncated"] is True
        assert attributes["spangate.response_body.size"] > 200
        for name in ("request_body", "response_body"):
            assert len(str(span[name]).encode()) <= 200
    assert len(plain.content) == first["attributes"]["spangate.response_body.size"]
    assert "spangate.request_body.truncated" not in third["attributes"]


def test_a_body_that_trickles_in_gets_a_408(make_gateway: Callable[..., GatewayThread]) -> None:
    gateway = make_gateway(server={"body_timeout": 0.5})
    body = orjson.dumps(chat(model="mock"))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: spangate\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        sock.sendall(body[:5])  # and nothing more
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    error = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout"


def test_event_stream_subscribers_past_the_cap_get_a_503_with_retry_after(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway(server={"max_sse_subscribers": 2})
    with httpx.Client(base_url=gateway.base, timeout=10) as client:
        with (
            client.stream("GET", "/api/spans/stream") as first,
            client.stream("GET", "/api/spans/stream") as second,
        ):
            assert first.status_code == second.status_code == 200
            wait_until(lambda: gateway.app is not None and _feed_count(gateway) == 2)
            refused = client.get("/api/spans/stream")
            assert refused.status_code == 503
            assert refused.headers["Retry-After"].isdigit()
            assert refused.json()["error"]["code"] == "too_many_subscribers"
        # Room again once subscribers leave.
        wait_until(lambda: _feed_count(gateway) == 0, what="subscribers to be let go")
        with client.stream("GET", "/api/spans/stream") as again:
            assert again.status_code == 200


def _feed_count(gateway: GatewayThread) -> int:
    from gateway.web.routes_api import FEED

    assert gateway.app is not None
    return gateway.app[FEED].subscribers


def _answer_with_tools(names: list[str]) -> str:
    calls = [
        {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": "{}"}}
        for name in names
    ]
    return orjson.dumps(
        {
            "id": "chatcmpl-tools",
            "object": "chat.completion",
            "created": 0,
            "model": "upstream-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, "tool_calls": calls},
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).decode()


def test_20000_distinct_tool_names_keep_metrics_small(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(limits={"max_label_values": LABEL_CAP})
    with httpx.Client(base_url=gateway.url("tools"), timeout=30) as client:
        for batch in range(TOOL_NAMES // TOOLS_PER_CALL):
            names = [f"tool_{batch}_{i}" for i in range(TOOLS_PER_CALL)]
            fake_provider.state.add_fault(status=200, body=_answer_with_tools(names))
            asked = client.post("/chat/completions", json=chat("use tools"))
            assert asked.status_code == 200, asked.text
            results = [
                {"role": "tool", "tool_call_id": f"call_{name}", "content": "ok"} for name in names
            ]
            answered = client.post(
                "/chat/completions",
                json={
                    "model": "gpt-test",
                    "messages": [{"role": "user", "content": "go"}, *results],
                },
            )
            assert answered.status_code == 200, answered.text
        gateway.flush()
        metrics = httpx.get(f"{gateway.base}/metrics", timeout=10).text
    tool_lines = [line for line in metrics.splitlines() if line.startswith("spangate_tool_")]
    print(f"\n/metrics after {TOOL_NAMES} tool names: {len(metrics.encode())} bytes")
    assert len(metrics.encode()) < METRICS_BOUND
    assert any('tool="other"' in line for line in tool_lines)
    assert len({line.split('tool="')[1].split('"')[0] for line in tool_lines}) == LABEL_CAP + 1
    assert len(gateway.spans(operation="execute_tool")) == TOOL_NAMES


def test_a_client_that_leaves_during_the_upstream_wait_is_recorded_as_cancelled(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway()
    for index, stream in enumerate((False, True)):
        fake_provider.state.add_fault(delay=30)
        rollout = f"left-{index}"
        with (
            httpx.Client(base_url=gateway.base, timeout=0.5) as client,
            _expect_timeout(),
        ):
            client.post(f"/rollout/{rollout}{CHAT}", json=chat(stream=stream))
        span = wait_until(lambda r=rollout: gateway.spans(rollout_id=r), timeout=10)[0]
        assert (span["status"], span["http_status"]) == ("cancelled", 499)
        assert span["error_type"] == "client_closed"


def test_a_client_that_leaves_mid_stream_is_recorded_as_cancelled(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway()
    fake_provider.state.add_fault(endless=True, chunk_delay=0.02)
    with (
        httpx.Client(base_url=gateway.base, timeout=10) as client,
        client.stream("POST", f"/rollout/mid{CHAT}", json=chat(stream=True)) as response,
    ):
        for _ in response.iter_raw():
            break  # one chunk is enough: hang up
    span = wait_until(lambda: gateway.spans(rollout_id="mid"), timeout=10)[0]
    assert (span["status"], span["http_status"], span["error_type"]) == (
        "cancelled",
        499,
        "client_closed",
    )
    assert span["stream"] == 1


class _expect_timeout:
    """The client gives up (read timeout) while the gateway still waits on the upstream."""

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        assert kind is not None and issubclass(kind, httpx.TimeoutException), kind
        return True
