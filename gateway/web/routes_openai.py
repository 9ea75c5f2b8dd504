"""The OpenAI-compatible routes: parse once, forward, answer unchanged, record a span."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from config.models import Deployment
from gateway.errors import (
    GatewayError,
    RolloutRequired,
    UpstreamError,
    error_response,
    scrub,
)
from gateway.proxy.attribution import Attribution, new_span_id, new_trace_id, read_attribution
from gateway.proxy.cost import cost_usd
from gateway.proxy.forward import Job, Outcome, forward
from gateway.proxy.limits import bounded_stream, stored_body
from gateway.proxy.payload import parse_payload
from gateway.proxy.redact import Redactor
from gateway.proxy.spans import error_fields, reply_fields, request_attributes
from gateway.proxy.streaming import (
    SSESplitter,
    loads_or_none,
    new_assembler,
    parse_event,
    strip_usage_null,
)
from gateway.proxy.tool_spans import tool_span
from gateway.web.auth import forwarded_client_headers
from gateway.web.bodies import read_body
from gateway.web.limits import bound_send_buffer, write_within
from gateway.web.state import GATEWAY, Gateway

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
# A span's status when the client got no answer: it went away (http_status 499) or the
# gateway shut down under it (http_status null).
CANCELLED = "cancelled"


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
    # Bytes relayed from an upstream stream: tells `publish` whether its assembled answer
    # can be over the stored-body limit without serialising it to find out.
    stream_bytes: int = 0
    published: bool = False
    # The gateway's secrets plus any key this client sent for the provider.
    redactor: Redactor | None = None

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
            status="error",
            http_status=http_status,
            error_type=error_type,
            error_message=scrub(message) if message else message,
        )

    def redact(self, value: Any) -> Any:
        return self.redactor.value(value) if self.redactor is not None else value

    def cancel(self, request: web.Request) -> None:
        """The handler was cancelled: by the client leaving (499), or by shutdown (no answer)."""
        if request.transport is None or request.transport.is_closing():
            self.client_closed("the client went away before the answer was complete")
        else:
            self.fields.update(
                status=CANCELLED,
                http_status=None,
                error_type="gateway_shutdown",
                error_message="the gateway shut down before the answer was complete",
            )

    def client_closed(self, message: str) -> None:
        """The client went away (or stopped reading): what it got is no answer at all."""
        self.fields.update(
            status=CANCELLED, http_status=499, error_type="client_closed", error_message=message
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
        request_body: Any = None
        if store_bodies:
            limit = self.gw.settings.limits.max_stored_body_bytes
            request_body = self._stored(
                "request_body", self.redact(self.raw_request), limit, attributes
            )
            response_body = self._stored(
                "response_body",
                self.redact(response_body),
                limit,
                attributes,
                self.stream_bytes or None,
            )
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
            "error_message": self.redact(fields.get("error_message")),
            "stream": int(self.stream),
            "start_ns": self.start_ns,
            "end_ns": self.start_ns + duration_ns,
            "duration_ms": duration_ns / 1e6,
            "ttft_ms": (self.first_token_ns - self.t0) / 1e6 if self.first_token_ns else None,
            "upstream_ms": ((self.upstream_done_ns or now) - sent_ns) / 1e6 if sent_ns else None,
            "overhead_ms": self.overhead_ms(now),
            "retries": job.retries if job else 0,
            "request_body": request_body,
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

    @staticmethod
    def _stored(
        name: str, body: Any, limit: int, attributes: dict[str, Any], hint: int | None = None
    ) -> Any:
        """The body cut to `limit`, with its size and a flag in `attributes` if it was cut."""
        kept, size = stored_body(body, limit, size_hint=hint)
        if size is not None:
            attributes[f"spangate.{name}.size"] = size
            attributes[f"spangate.{name}.truncated"] = True
        return kept


async def _answer_plain(call: Call, outcome: Outcome) -> web.Response:
    response = outcome.response
    body = call.redact(response.body or b"")
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
    bound_send_buffer(request)
    await out.prepare(request)
    splitter = SSESplitter()
    assembler = new_assembler(call.operation)
    held: list[bytes] = []
    operation = call.operation
    limits = call.gw.settings.limits
    write_timeout = call.gw.settings.server.write_timeout
    chunks = bounded_stream(
        response.chunks, max_bytes=limits.max_stream_bytes, max_seconds=limits.max_stream_seconds
    )
    try:
        async for chunk in chunks:
            call.stream_bytes += len(chunk)
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
                await write_within(request, out, call.redact(raw_event), write_timeout)
                if (
                    call.first_token_ns is None
                    and isinstance(obj, dict)
                    and _has_token(operation, obj)
                ):
                    call.first_token_ns = time.perf_counter_ns()
        rest = splitter.rest()
        if rest.strip():
            await write_within(request, out, rest, write_timeout)
        call.upstream_done_ns = time.perf_counter_ns()
    except UpstreamError as exc:
        call.upstream_done_ns = time.perf_counter_ns()
        call.fail(exc.status, exc.code or exc.type, exc.message)
        call.publish(assembler.result())
        with contextlib.suppress(ConnectionError):
            error_event = b"data: " + orjson.dumps(exc.body()) + b"\n\n"
            await write_within(request, out, call.redact(error_event), write_timeout)
        return out
    except ConnectionError as exc:
        # Also a client that stopped reading (ClientTooSlow): it gets no more of the answer.
        call.client_closed(f"the client went away mid-stream: {exc}")
        call.publish(assembler.result())
        return out
    except asyncio.CancelledError:
        call.cancel(request)
        call.publish(assembler.result())
        raise
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
        await chunks.aclose()
        await response.chunks.aclose()
    result = assembler.result()
    call.fields.update({k: v for k, v in reply_fields(operation, result).items() if v is not None})
    call.publish(result)
    for raw_event in held:
        await write_within(request, out, raw_event, write_timeout)
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
    raw = await read_body(request, gw.settings.server.body_timeout)
    payload = parse_payload(raw, operation)
    stream = operation in STREAMABLE and payload.get("stream") is True
    call = Call(gw, operation, attribution, raw, payload, payload["model"], t0, start_ns, stream)
    call.trace_id = attribution.trace_id or new_trace_id()
    try:
        if attribution.rollout_id is not None:
            await _number_call(gw, call, attribution.rollout_id, attribution.attempt_id)
        group = gw.router.group(payload["model"])
        gateway_keys = [key.key for key in gw.settings.auth.keys]
        client_headers = forwarded_client_headers(request, gateway_keys)
        call.redactor = gw.redactor.adding(_bearer_token(client_headers.get("authorization")))
        call.job = Job(operation, raw, payload, stream, group, client_headers)
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
        return error_response(exc, headers=call.headers())
    except asyncio.CancelledError:
        call.cancel(request)
        raise
    except Exception as exc:
        # The middleware answers 500; the span says so instead of the `ok` it started as.
        call.fail(500, "gateway_error", f"internal gateway error: {type(exc).__name__}")
        raise
    finally:
        call.publish()


def _bearer_token(authorization: str | None) -> str | None:
    """The key in an `Authorization` value (the whole value when it is not a bearer token)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip() or None
    return authorization


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
