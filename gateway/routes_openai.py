"""The OpenAI-compatible routes: parse once, forward, answer unchanged, record a span."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from config.models import Deployment
from gateway.attribution import (
    Attribution,
    new_span_id,
    new_trace_id,
    read_attribution,
    rollout_trace,
)
from gateway.auth import forwarded_client_headers
from gateway.cost import cost_usd
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    RolloutRequired,
    UpstreamError,
    error_response,
)
from gateway.forward import Job, Outcome, forward
from gateway.spans import error_fields, reply_fields, request_attributes
from gateway.state import GATEWAY, Gateway
from gateway.streaming import (
    SSESplitter,
    loads_or_none,
    new_assembler,
    parse_event,
    strip_usage_null,
)
from gateway.tool_spans import tool_span

log = logging.getLogger("spangate.proxy")

# Path after `/v1` -> operation name (gen_ai.operation.name).
OPERATIONS = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "responses",
}
STREAMABLE = frozenset({"chat", "text_completion", "responses"})
PREFIXES = ("", "/rollout/{rollout_id}", "/rollout/{rollout_id}/attempt/{attempt_id}")
_DONE = b"[DONE]"


def _check_fields(operation: str, payload: dict[str, Any]) -> None:
    """The fields each operation cannot do without, checked as OpenAI checks them."""
    if operation == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("`messages` must be a non-empty array", param="messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(
                    f"`messages[{index}]` must be an object with a string `role`",
                    param=f"messages[{index}]",
                )
        _check_tools(payload.get("tools"))
        return
    name = {"text_completion": "prompt", "embeddings": "input", "responses": "input"}.get(operation)
    if name is None:
        return
    value = payload.get(name)
    if not isinstance(value, str | list) or (operation == "embeddings" and not value):
        raise InvalidRequest(f"`{name}` must be a string or an array", param=name)


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest("`tools` must be an array", param="tools")
    for index, tool in enumerate(tools):
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        function = tool.get("function") if isinstance(tool, dict) else None
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        schema = function.get("parameters", {}) if isinstance(function, dict) else {}
        if not isinstance(schema, dict):
            raise InvalidRequest(
                f"`tools[{index}].function.parameters` must be a JSON Schema object",
                param=f"tools[{index}].function.parameters",
            )
        if not isinstance(kind, str) or (kind == "function" and not named):
            raise InvalidRequest(
                f"`tools[{index}]` must be an object with a `function` that has a `name`",
                param=f"tools[{index}]",
            )


def parse_payload(raw: bytes, operation: str | None = None) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    if "stream" in payload and not isinstance(payload["stream"], bool | None):
        raise InvalidRequest("`stream` must be a boolean", param="stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object", param="stream_options")
    if operation is not None:
        _check_fields(operation, payload)
    return payload


def _has_token(operation: str, obj: dict[str, Any]) -> bool:
    if operation == "responses":
        return str(obj.get("type", "")).endswith(".delta")
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") if operation == "chat" else choice
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("tool_calls") or delta.get("text")
        ):
            return True
    return False


@dataclass(slots=True)
class Call:
    """One call's span while it is being built; `publish()` hands it to the recorder once."""

    gw: Gateway
    operation: str
    attribution: Attribution
    raw_request: bytes
    payload: dict[str, Any]
    group_name: str
    t0: int
    start_ns: int
    stream: bool = False
    span_id: str = field(default_factory=new_span_id)
    trace_id: str = ""
    seq: int | None = None
    attempt_id: str | None = None
    job: Job | None = None
    outcome: Outcome | None = None
    upstream_done_ns: int | None = None
    first_token_ns: int | None = None
    processing_ns: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    published: bool = False

    @property
    def deployment(self) -> Deployment | None:
        if self.outcome is not None:
            return self.outcome.guard.deployment
        guard = self.job.guard if self.job else None
        return guard.deployment if guard else None

    def overhead_ms(self, now: int | None = None) -> float:
        """Time spent in the gateway itself: not upstream, not backoff, not rate-limit waits."""
        now = now or time.perf_counter_ns()
        job = self.job
        if job is None or job.sent_ns is None:
            return (now - self.t0) / 1e6
        # Before the last send: rate-limit waits, every backoff pause, and earlier tries.
        waited_ms = (
            job.limiter_wait * 1000
            + sum(t.get("wait_ms", 0.0) for t in job.tries)
            + sum(t.get("duration_ms", 0.0) for t in job.tries[:-1])
        )
        before = (job.sent_ns - self.t0) / 1e6 - waited_ms
        after = (now - self.upstream_done_ns) / 1e6 if self.upstream_done_ns else 0.0
        return max(before, 0.0) + after + self.processing_ns / 1e6

    def headers(self) -> dict[str, str]:
        headers = {
            "X-Span-Id": self.span_id,
            "X-Trace-Id": self.trace_id,
            "X-Gateway-Overhead-Ms": f"{self.overhead_ms():.3f}",
            "X-Upstream-Retries": str(self.job.retries if self.job else 0),
        }
        if self.attribution.rollout_id:
            headers["X-Rollout-Id"] = self.attribution.rollout_id
        if self.attempt_id:
            headers["X-Attempt-Id"] = self.attempt_id
        if self.outcome is not None:
            # The upstream's own limits, when it sends them, are what the client should see.
            ours = self.outcome.guard.ratelimit_headers()
            if ours:
                sent = {name.lower() for name in self.outcome.response.headers}
                headers.update((k, v) for k, v in ours.items() if k not in sent)
        return headers

    def fail(self, http_status: int, error_type: str | None, message: str | None) -> None:
        self.fields.update(
            status="error", http_status=http_status, error_type=error_type, error_message=message
        )

    def publish(self, response_body: Any = None) -> None:
        if self.published:
            return
        self.published = True
        now = time.perf_counter_ns()
        fields = self.fields
        attribution = self.attribution
        deployment = self.deployment
        job = self.job
        attributes = request_attributes(self.payload)
        if attribution.agent_id:
            attributes["gen_ai.agent.id"] = attribution.agent_id
        if attribution.metadata:
            attributes["metadata"] = attribution.metadata
        if job is not None and job.tries:
            attributes["spangate.tries"] = job.tries
            attributes["spangate.limiter_wait_ms"] = round(job.limiter_wait * 1000, 3)
            if job.fallback:
                attributes["spangate.fallback"] = job.fallback
        store_bodies = self.gw.settings.recorder.store_bodies
        duration_ns = now - self.t0
        sent_ns = job.sent_ns if job else None
        record = {
            "span_id": self.span_id,
            "trace_id": self.trace_id,
            "parent_span_id": attribution.parent_span_id,
            "rollout_id": attribution.rollout_id,
            "attempt_id": self.attempt_id,
            "seq": self.seq,
            "name": f"{self.operation} {self.payload.get('model')}",
            "operation": self.operation,
            "provider": deployment.provider if deployment else None,
            "deployment": deployment.label if deployment else None,
            "model_group": self.outcome.group.name if self.outcome else self.group_name,
            "request_model": self.payload.get("model"),
            "status": fields.get("status", "ok"),
            "http_status": fields.get("http_status"),
            "error_type": fields.get("error_type"),
            "error_message": fields.get("error_message"),
            "stream": int(self.stream),
            "start_ns": self.start_ns,
            "end_ns": self.start_ns + duration_ns,
            "duration_ms": duration_ns / 1e6,
            "ttft_ms": (self.first_token_ns - self.t0) / 1e6 if self.first_token_ns else None,
            "upstream_ms": ((self.upstream_done_ns or now) - sent_ns) / 1e6 if sent_ns else None,
            "overhead_ms": self.overhead_ms(now),
            "retries": job.retries if job else 0,
            "request_body": self.raw_request if store_bodies else None,
            "response_body": response_body if store_bodies else None,
            "attributes": attributes,
            "tags": attribution.tags,
            "agent": attribution.agent_id,
            "metadata": attribution.metadata,
            "response_id": fields.get("response_id"),
            "response_model": fields.get("response_model"),
            "input_tokens": fields.get("input_tokens"),
            "output_tokens": fields.get("output_tokens"),
            "cached_tokens": fields.get("cached_tokens"),
            "reasoning_tokens": fields.get("reasoning_tokens"),
            "finish_reasons": fields.get("finish_reasons"),
            "tool_calls": fields.get("tool_calls"),
        }
        if deployment is not None:
            record["cost_usd"] = cost_usd(
                self.gw.prices_for(deployment),
                record["input_tokens"],
                record["output_tokens"],
                record["cached_tokens"],
            )
            guard = self.outcome.guard if self.outcome is not None else None
            if guard is not None and guard.tpm is not None and job is not None:
                guard.correct_tokens(
                    job.estimated_tokens(),
                    (record["input_tokens"] or 0) + (record["output_tokens"] or 0),
                )
        else:
            record["cost_usd"] = None
        self.gw.recorder.publish(record)
        if record["tool_calls"]:
            self.gw.tools.note(record)


async def _answer_plain(call: Call, outcome: Outcome) -> web.Response:
    response = outcome.response
    body = response.body or b""
    call.fields["http_status"] = response.status
    if response.ok:
        call.fields.update(reply_fields(call.operation, outcome.parsed))
    else:
        kind, message = error_fields(outcome.parsed)
        call.fail(response.status, kind or f"http_{response.status}", message)
    call.publish(body)
    return web.Response(
        status=response.status, body=body, headers={**response.headers, **call.headers()}
    )


async def _answer_stream(request: web.Request, call: Call, outcome: Outcome) -> web.StreamResponse:
    response, injected = outcome.response, outcome.injected_usage
    assert response.chunks is not None
    out = web.StreamResponse(status=response.status, headers={**response.headers, **call.headers()})
    call.fields["http_status"] = response.status
    await out.prepare(request)
    splitter = SSESplitter()
    assembler = new_assembler(call.operation)
    held: list[bytes] = []
    operation = call.operation
    try:
        async for chunk in response.chunks:
            for raw_event in splitter.feed(chunk):
                mark = time.perf_counter_ns()
                _, data = parse_event(raw_event)
                if data == _DONE:
                    # Held back until the span is published, so a client that acts on
                    # [DONE] (say, posts a reward) always finds the span.
                    held.append(raw_event)
                    continue
                obj = loads_or_none(data)
                forward = True
                if isinstance(obj, dict):
                    assembler.add(obj)
                    if injected and "usage" in obj:
                        if obj["usage"] is None:
                            raw_event = strip_usage_null(raw_event)
                        elif obj.get("choices") == []:
                            forward = False
                    if isinstance(obj.get("error"), dict):
                        kind, message = error_fields(obj)
                        call.fail(502, kind or "upstream_stream_error", message)
                call.processing_ns += time.perf_counter_ns() - mark
                if not forward:
                    continue
                await out.write(raw_event)
                if (
                    call.first_token_ns is None
                    and isinstance(obj, dict)
                    and _has_token(operation, obj)
                ):
                    call.first_token_ns = time.perf_counter_ns()
        rest = splitter.rest()
        if rest.strip():
            await out.write(rest)
        call.upstream_done_ns = time.perf_counter_ns()
    except UpstreamError as exc:
        call.upstream_done_ns = time.perf_counter_ns()
        call.fail(exc.status, exc.code or exc.type, exc.message)
        call.publish(assembler.result())
        await out.write(b"data: " + orjson.dumps(exc.body()) + b"\n\n")
        return out
    except ConnectionError as exc:
        call.fail(499, "client_disconnected", f"the client went away mid-stream: {exc}")
        call.publish(assembler.result())
        return out
    except Exception as exc:
        # Headers are gone already: a 500 now would corrupt the stream, so end it with an
        # error event the SDK raises, and keep the record.
        deployment = call.deployment
        log.exception(
            "stream from %s failed in the gateway", deployment.label if deployment else "?"
        )
        error = GatewayError(f"the gateway could not relay this stream: {type(exc).__name__}")
        call.fail(500, "gateway_error", str(exc))
        call.publish(assembler.result())
        with contextlib.suppress(ConnectionError):
            await out.write(b"data: " + orjson.dumps(error.body()) + b"\n\n")
        return out
    finally:
        await response.chunks.aclose()
    result = assembler.result()
    call.fields.update({k: v for k, v in reply_fields(operation, result).items() if v is not None})
    call.publish(result)
    for raw_event in held:
        await out.write(raw_event)
    await out.write_eof()
    return out


async def proxy(request: web.Request, operation: str) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    t0, start_ns = time.perf_counter_ns(), time.time_ns()
    attribution = read_attribution(request.match_info, request.headers)
    if gw.settings.require_rollout and attribution.rollout_id is None:
        raise RolloutRequired(
            "this gateway requires a rollout: call /rollout/{id}/v1/... or send X-Rollout-Id"
        )
    raw = await request.read()
    payload = parse_payload(raw, operation)
    stream = operation in STREAMABLE and payload.get("stream") is True
    call = Call(gw, operation, attribution, raw, payload, payload["model"], t0, start_ns, stream)
    if attribution.trace_id:
        call.trace_id = attribution.trace_id
    elif attribution.rollout_id is not None:
        # A rollout's calls share one trace, so a tracing backend shows the rollout whole.
        call.trace_id = rollout_trace(attribution.rollout_id)[0]
    else:
        call.trace_id = new_trace_id()
    try:
        if attribution.rollout_id is not None:
            await _number_call(gw, call, attribution.rollout_id, attribution.attempt_id)
        group = gw.router.group(payload["model"])
        call.job = Job(operation, raw, payload, stream, group, forwarded_client_headers(request))
        call.outcome = outcome = await forward(gw, call.job)
        if outcome.response.chunks is None:
            call.upstream_done_ns = time.perf_counter_ns()
            return await _answer_plain(call, outcome)
        return await _answer_stream(request, call, outcome)
    except GatewayError as exc:
        if call.upstream_done_ns is None:
            call.upstream_done_ns = time.perf_counter_ns()
        call.fail(exc.status, exc.code or exc.type, exc.message)
        call.publish(exc.body())
        headers = call.headers()
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return error_response(exc, headers=headers)
    finally:
        call.publish()


async def _number_call(gw: Gateway, call: Call, rollout_id: str, attempt_id: str | None) -> None:
    """Give the call its seq, after the tool executions whose results it carries."""
    call.attempt_id = attempt = await gw.sequencer.attempt_of(rollout_id, attempt_id)
    executed = gw.tools.resolve(rollout_id, attempt, call.payload)
    first = gw.sequencer.take(rollout_id, len(executed) + 1)
    for offset, (tool, result) in enumerate(executed):
        gw.recorder.publish(
            tool_span(
                tool,
                result,
                rollout_id=rollout_id,
                attempt_id=attempt,
                seq=first + offset,
                now_ns=call.start_ns,
            )
        )
    call.seq = first + len(executed)


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "spangate"}
        for name in gw.router.groups
    ]
    return web.json_response(
        {"object": "list", "data": data}, dumps=lambda o: orjson.dumps(o).decode()
    )


def _handler(operation: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await proxy(request, operation)

    handler.__name__ = f"proxy_{operation}"
    return handler


def add_routes(app: web.Application) -> None:
    for prefix in PREFIXES:
        for path, operation in OPERATIONS.items():
            app.router.add_post(f"{prefix}/v1/{path}", _handler(operation))
        app.router.add_get(f"{prefix}/v1/models", list_models)
