"""The proxy on its own, the way httpx tests with `MockTransport`: a plain async function is
the provider, so retries, fallbacks, breakers and the span record are checked with no aiohttp
app, no network and no database."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from config import parse_settings
from gateway.errors import Unavailable, UpstreamUnreachable
from gateway.providers.base import UpstreamRequest, UpstreamResponse
from gateway.proxy.attribution import Attribution
from gateway.proxy.call import Call, number_call
from gateway.proxy.context import ProxyContext
from gateway.proxy.forward import Job, forward
from gateway.proxy.recorder import Recorder
from gateway.proxy.router import Router
from gateway.proxy.sequencer import Sequencer

Provider = Callable[[UpstreamRequest], Any]


def completion(text: str = "hi") -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "up",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )


def context(provider: Provider, **overrides: Any) -> tuple[ProxyContext, list[dict[str, Any]]]:
    data: dict[str, Any] = {
        "models": [
            {
                "name": "main",
                "deployments": [{"provider": "fn", "model": "up", "api_base": "http://a/v1"}],
                "fallbacks": ["spare"],
            },
            {
                "name": "spare",
                "deployments": [{"provider": "fn", "model": "spare-up", "api_base": "http://b/v1"}],
            },
        ],
        "retries": {"attempts": 3, "backoff": {"initial": 0.001, "max": 0.002, "jitter": 0}},
        **overrides,
    }
    settings = parse_settings(data, env={})

    async def no_history(rollout_id: str) -> tuple[int, str | None]:
        return 0, None

    recorder = Recorder()
    published: list[dict[str, Any]] = []
    recorder.subscribe(published.append)
    ctx = ProxyContext(
        settings=settings,
        router=Router(settings),
        recorder=recorder,
        sequencer=Sequencer(no_history, capacity=100),
        providers={"fn": provider},
    )
    return ctx, published


def job(ctx: ProxyContext, text: str = "hello") -> Job:
    payload = {"model": "main", "messages": [{"role": "user", "content": text}]}
    raw = orjson.dumps(payload)
    return Job("chat", raw, payload, False, ctx.router.group("main"), {})


def test_a_plain_answer_comes_back_unchanged_with_the_body_forwarded_as_is() -> None:
    sent: list[UpstreamRequest] = []

    async def provider(request: UpstreamRequest) -> UpstreamResponse:
        sent.append(request)
        return UpstreamResponse(200, {"content-type": "application/json"}, body=completion())

    ctx, _ = context(provider)
    outcome = asyncio.run(forward(ctx, job(ctx)))
    assert outcome.response.status == 200 and outcome.response.body == completion()
    assert orjson.loads(sent[0].body)["model"] == "up"  # only the model is rewritten
    assert outcome.group.name == "main"


def test_a_failing_upstream_is_retried_then_the_fallback_group_answers() -> None:
    seen: list[str] = []

    async def provider(request: UpstreamRequest) -> UpstreamResponse:
        seen.append(request.deployment.model)
        if request.deployment.model == "up":
            return UpstreamResponse(503, {}, body=b'{"error": {"message": "busy"}}')
        return UpstreamResponse(200, {}, body=completion("from spare"))

    ctx, _ = context(provider)
    the_job = job(ctx)
    outcome = asyncio.run(forward(ctx, the_job))
    assert seen == ["up", "up", "up", "spare-up"]
    assert outcome.group.name == "spare" and the_job.fallback == "spare"
    assert [t["status"] for t in the_job.tries] == [503, 503, 503, 200]


def test_an_unreachable_upstream_opens_the_breaker_and_later_calls_fail_fast() -> None:
    calls = 0

    async def provider(request: UpstreamRequest) -> UpstreamResponse:
        nonlocal calls
        calls += 1
        raise UpstreamUnreachable("connection refused")

    ctx, _ = context(
        provider,
        retries={"attempts": 1},
        circuit_breaker={"fail_max": 2, "reset_timeout": 60},
    )
    for _ in range(2):
        with pytest.raises(UpstreamUnreachable):
            asyncio.run(forward(ctx, job(ctx)))
    before = calls
    with pytest.raises(Unavailable):
        asyncio.run(forward(ctx, job(ctx)))
    assert calls == before  # neither group's deployment was tried again


def test_a_published_record_carries_usage_seq_and_tries() -> None:
    async def provider(request: UpstreamRequest) -> UpstreamResponse:
        return UpstreamResponse(200, {}, body=completion())

    ctx, published = context(provider)

    async def one_call() -> None:
        the_job = job(ctx)
        payload = the_job.payload
        call = Call(ctx, "chat", Attribution(rollout_id="r1"), the_job.raw, payload, "main", 0, 1)
        await number_call(ctx, call, "r1", None)
        call.job = the_job
        call.outcome = await forward(ctx, the_job)
        call.fields.update(http_status=200, input_tokens=3, output_tokens=1)
        call.publish(call.outcome.response.body)

    asyncio.run(one_call())
    asyncio.run(one_call())
    assert [r["seq"] for r in published] == [1, 2]
    record = published[0]
    assert record["rollout_id"] == "r1" and record["attempt_id"] == "1"
    assert record["status"] == "ok" and record["input_tokens"] == 3
    assert record["model_group"] == "main" and record["deployment"]
