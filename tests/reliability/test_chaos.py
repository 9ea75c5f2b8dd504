"""Chaos upstream at load: random 5xx, resets, slow headers, stalled and truncated streams and
malformed JSON across ~200 calls from 16 threads. Every client-visible error is a well-formed
OpenAI error, every call has a span, and no socket or task outlives the run."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from fake_provider import FakeProviderThread, Fault
from servers import GatewayThread, wait_until

from config.loader import parse_settings
from config.models import Settings

from .support import (
    CHAT_PATH,
    DONE_LINE,
    UPSTREAM_KEY,
    chat_body,
    is_complete_completion,
    open_sockets,
    openai_error,
    socket_ports,
    stream_error_event,
)

WORKERS = 16
CALLS = 208  # 13 per worker
SEED = 5
ROLLOUT = "chaos"
FIRST_TOKEN_TIMEOUT = 0.5
TOTAL_TIMEOUT = 1.5
SETTLE_TIMEOUT = 15.0
SOCKET_TOLERANCE = 4
TASK_TOLERANCE = 2
# Statuses a client may see: the upstream's own answers (passed on after retries) and ours.
EXPECTED_ERROR_STATUSES = frozenset({400, 429, 500, 502, 503, 504})


def chaos_settings(provider_url: str, attempts: int = 2) -> Settings:
    """Short timeouts, two tries with a tiny backoff, and a breaker that never opens (so every
    call reaches the faulty upstream instead of being turned away)."""
    return parse_settings(
        {
            "models": [
                {
                    "name": "gpt-test",
                    "deployments": [
                        {
                            "provider": "openai",
                            "model": "upstream-model",
                            "api_base": provider_url,
                            "api_key": UPSTREAM_KEY,
                            "timeout": {
                                "connect": 1.0,
                                "first_token": FIRST_TOKEN_TIMEOUT,
                                "total": TOTAL_TIMEOUT,
                            },
                        }
                    ],
                }
            ],
            "retries": {
                "attempts": attempts,
                "backoff": {"initial": 0.01, "max": 0.05, "jitter": 0.01},
            },
            "circuit_breaker": {"fail_max": 100_000},
        },
        env={},
    )


FAULTS: list[tuple[int, Callable[[random.Random], Fault]]] = [
    (40, lambda _: Fault()),
    (12, lambda r: Fault(status=r.choice([500, 502, 503]))),
    (4, lambda _: Fault(status=429, headers={"retry-after-ms": "10"})),
    (4, lambda _: Fault(status=400, message="bad request from upstream")),
    (9, lambda _: Fault(reset=True)),
    (6, lambda _: Fault(delay=FIRST_TOKEN_TIMEOUT + 0.2)),  # slow headers
    (2, lambda _: Fault(delay=TOTAL_TIMEOUT + 0.2)),  # no answer within the total timeout
    (8, lambda r: Fault(truncate_after=r.choice([0, 2]))),
    (6, lambda _: Fault(chunk_delay=0.4)),  # a stream that stalls past the total timeout
    (6, lambda _: Fault(malformed=True)),
]


def random_faults(count: int, rng: random.Random) -> list[Fault]:
    weights = [weight for weight, _ in FAULTS]
    makers = rng.choices([make for _, make in FAULTS], weights=weights, k=count)
    return [make(rng) for make in makers]


@dataclass
class Outcomes:
    """Per call: its span id and status as the client saw them, and how it ended."""

    kinds: Counter[str] = field(default_factory=Counter)
    span_status: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, kind: str, span_id: str | None, status: int, problem: str | None) -> None:
        with self.lock:
            self.calls += 1
            self.kinds[kind] += 1
            if span_id is None:
                self.problems.append(f"{kind}: no X-Span-Id header")
            else:
                self.span_status[span_id] = status
            if problem is not None:
                self.problems.append(problem)


def call_once(client: httpx.Client, rollout: str, stream: bool, outcomes: Outcomes) -> None:
    body = chat_body(stream=stream)
    headers = {"X-Rollout-Id": rollout}
    if not stream:
        response = client.post(CHAT_PATH, json=body, headers=headers)
        span_id, status = response.headers.get("X-Span-Id"), response.status_code
        if status == 200:
            ok = is_complete_completion(response.content)
            outcomes.note("plain ok", span_id, status, None if ok else "plain 200, bad body")
        elif status in EXPECTED_ERROR_STATUSES and openai_error(response.content):
            outcomes.note(f"plain {status}", span_id, status, None)
        else:
            outcomes.note("plain bad", span_id, status, f"plain {status}: {response.text[:200]}")
        return
    lines: list[str] = []
    with client.stream("POST", CHAT_PATH, json=body, headers=headers) as response:
        span_id, status = response.headers.get("X-Span-Id"), response.status_code
        if status != 200:
            response.read()
            good = status in EXPECTED_ERROR_STATUSES and openai_error(response.content)
            problem = None if good else f"stream {status}: {response.text[:200]}"
            outcomes.note(f"stream {status}", span_id, status, problem)
            return
        try:
            for count, line in enumerate(response.iter_lines()):
                assert count < 10_000, "endless stream"
                if line:
                    lines.append(line)
        except httpx.RemoteProtocolError:
            outcomes.note("stream closed", span_id, status, None)
            return
    if lines and lines[-1] == DONE_LINE:
        outcomes.note("stream complete", span_id, status, None)
    elif stream_error_event(lines) is not None:
        outcomes.note("stream error event", span_id, status, None)
    else:
        outcomes.note("stream bad", span_id, status, f"stream ended oddly: {lines[-3:]}")


def run_clients(base: str, rollout: str, calls_per_worker: int, outcomes: Outcomes) -> None:
    def worker(index: int) -> None:
        with httpx.Client(base_url=base, timeout=15) as client:
            for number in range(calls_per_worker):
                call_once(client, rollout, (index + number) % 2 == 0, outcomes)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a chaos client never finished"


def gateway_tasks(gateway: GatewayThread) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    return asyncio.run_coroutine_threadsafe(count(), gateway.loop).result(timeout=5)


def socket_summary(gateway: GatewayThread, provider: FakeProviderThread) -> Counter[str]:
    """Sockets by role, for a readable failure message."""
    roles: Counter[str] = Counter()
    for local, remote in socket_ports():
        if gateway.port in (local, remote):
            roles["client<->gateway"] += 1
        elif provider.port in (local, remote):
            roles["gateway<->upstream"] += 1
        else:
            roles["other"] += 1
    return roles


@pytest.fixture
def chaos_gateway(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> GatewayThread:
    return make_gateway(settings=chaos_settings(fake_provider.url))


def test_chaos_upstream_gives_openai_errors_spans_for_every_call_and_no_leaks(
    chaos_gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    gateway = chaos_gateway
    # Warm up at the same concurrency, so the upstream keep-alive pool is already at its size.
    fake_provider.state.latency = 0.1
    run_clients(gateway.base, "warm-up", 1, Outcomes())
    fake_provider.state.latency = 0.0
    gateway.flush()
    baseline_sockets, baseline_tasks = open_sockets(), gateway_tasks(gateway)
    baseline_roles = socket_summary(gateway, fake_provider)

    for fault in random_faults(CALLS * 2, random.Random(SEED)):
        fake_provider.state.add_fault(fault)
    outcomes = Outcomes()
    run_clients(gateway.base, ROLLOUT, CALLS // WORKERS, outcomes)

    assert not outcomes.problems, outcomes.problems[:10]
    assert outcomes.calls == CALLS
    spans = gateway.spans(rollout_id=ROLLOUT)
    print(
        f"\nchaos: {outcomes.calls} calls, {len(spans)} spans, "
        f"{len(fake_provider.state.requests)} upstream requests; outcomes {dict(outcomes.kinds)}"
    )
    assert len(spans) == CALLS
    assert sorted(s["seq"] for s in spans) == list(range(spans[0]["seq"], spans[0]["seq"] + CALLS))
    by_id = {s["span_id"]: s for s in spans}
    assert set(by_id) == set(outcomes.span_status)
    for span_id, status in outcomes.span_status.items():
        span = by_id[span_id]
        if status != 200:
            assert (span["status"], span["http_status"]) == ("error", status), span
    assert outcomes.kinds["plain ok"] and outcomes.kinds["stream complete"]
    assert len(outcomes.kinds) >= 5, "the faults did not produce a mix of outcomes"

    def settled() -> bool:
        return (
            open_sockets() <= baseline_sockets + SOCKET_TOLERANCE
            and gateway_tasks(gateway) <= baseline_tasks + TASK_TOLERANCE
        )

    try:
        wait_until(settled, timeout=SETTLE_TIMEOUT, interval=0.1, what="sockets and tasks")
    finally:
        print(
            f"sockets {baseline_sockets} -> {open_sockets()} "
            f"({dict(baseline_roles)} -> {dict(socket_summary(gateway, fake_provider))}); "
            f"gateway tasks {baseline_tasks} -> {gateway_tasks(gateway)}"
        )


# Well-formed JSON with the wrong types: the record-keeping must cope, the client must not notice.
ODD_CHUNKS: dict[str, list[Any]] = {
    "content is a number": [{"choices": [{"index": 0, "delta": {"content": 5}}]}],
    "tool name is a number": [
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": 5}}]}}
            ]
        },
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": {}}}]}}
            ]
        },
    ],
    "choices is a number": [{"choices": 5}],
    "choices holds a number": [{"choices": [5]}],
    "delta is a list": [{"choices": [{"index": 0, "delta": [1]}]}],
    "usage is a string": [{"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": "x"}],
    "event is an array": [[1, 2]],
}
ODD_BODIES: dict[str, Any] = {
    "choices is a number": {"choices": 5},
    "choices holds a number": {"choices": [5]},
    "message is a string": {"choices": [{"message": "x"}]},
    "tool_calls is a string": {"choices": [{"message": {"role": "assistant", "tool_calls": "x"}}]},
    "tool_calls holds a number": {"choices": [{"message": {"tool_calls": [5]}}]},
    "usage is a string": {"choices": [], "usage": "x"},
}


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def gateway_log() -> Iterator[list[str]]:
    """Everything the gateway logs during the test, formatted (tracebacks included)."""
    lines: list[str] = []
    handler = _Lines(lines)
    logger = logging.getLogger("spangate")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


@pytest.fixture
def plain_gateway(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> GatewayThread:
    return make_gateway(settings=chaos_settings(fake_provider.url, attempts=1))


@pytest.mark.parametrize("name", list(ODD_CHUNKS))
def test_stream_chunks_of_unexpected_types_reach_the_client_intact(
    name: str,
    plain_gateway: GatewayThread,
    fake_provider: FakeProviderThread,
    gateway_log: list[str],
) -> None:
    """The upstream finished its stream, so the client gets all of it, [DONE] included,
    whatever the gateway's own bookkeeping makes of the chunks."""
    events = [orjson.dumps(chunk).decode() for chunk in ODD_CHUNKS[name]]
    body = "".join(f"data: {event}\n\n" for event in events) + "data: [DONE]\n\n"
    fake_provider.state.add_fault(
        status=200, body=body, headers={"Content-Type": "text/event-stream"}
    )
    with (
        httpx.Client(base_url=plain_gateway.base, timeout=10) as client,
        client.stream("POST", CHAT_PATH, json=chat_body(stream=True)) as response,
    ):
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200
    assert lines == [*(f"data: {event}" for event in events), DONE_LINE]
    assert plain_gateway.spans(span_id=response.headers["X-Span-Id"])
    assert not [line for line in gateway_log if UPSTREAM_KEY in line], "a log shows the key"


@pytest.mark.parametrize("name", list(ODD_BODIES))
def test_replies_of_unexpected_types_are_passed_on_or_reported_as_bad_upstream(
    name: str,
    plain_gateway: GatewayThread,
    fake_provider: FakeProviderThread,
    gateway_log: list[str],
) -> None:
    upstream_body = orjson.dumps(ODD_BODIES[name])
    fake_provider.state.add_fault(status=200, body=upstream_body.decode())
    with httpx.Client(base_url=plain_gateway.base, timeout=10) as client:
        response = client.post(CHAT_PATH, json=chat_body())
    if response.status_code == 200:
        assert response.content == upstream_body
    else:
        assert response.status_code == 502 and openai_error(response.content), response.text
    assert plain_gateway.spans(span_id=response.headers["X-Span-Id"])
    assert not [line for line in gateway_log if UPSTREAM_KEY in line], "a log shows the key"


def test_settings_never_show_keys_in_their_repr() -> None:
    """Error logs print deployments and settings; a key must not come along."""
    settings = chaos_settings("http://127.0.0.1:9/v1")
    for shown in (repr(settings), str(settings), repr(settings.models[0].deployments[0])):
        assert UPSTREAM_KEY not in shown
