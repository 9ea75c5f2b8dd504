"""The OpenAI-compatible routes: parse once, forward, answer unchanged, record a span."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import (
    GatewayError,
    RolloutRequired,
    UpstreamError,
    UpstreamProtocolError,
)
from gateway.proxy.attribution import new_trace_id, read_attribution, rollout_trace
from gateway.proxy.call import Call, number_call
from gateway.proxy.experiments import enter_experiment
from gateway.proxy.forward import Job, Outcome, forward
from gateway.proxy.limits import bounded_stream
from gateway.proxy.operations import binary_answer, parse_request
from gateway.proxy.spans import error_fields, failure_of, reply_fields
from gateway.proxy.stream_usage import estimate_missing_usage
from gateway.proxy.streaming import (
    INCOMPLETE,
    UPSTREAM_FAILED_STATUS,
    Assembler,
    ChatAssembler,
    CompletionAssembler,
    SSESplitter,
    has_token,
    loads_or_none,
    new_assembler,
    parse_event,
    strip_usage_null,
)
from gateway.proxy.training import rollout_mode
from gateway.web.auth import forwarded_client_headers
from gateway.web.exchange import AiohttpExchange, Exchange
from gateway.web.responses import Plain, error_plain, web_response
from gateway.web.routes_surface import add_surface_routes
from gateway.web.state import GATEWAY

log = logging.getLogger("spangate.proxy")

# Path after `/v1` -> operation name (gen_ai.operation.name).
OPERATIONS = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "responses",
    "moderations": "moderations",
    "audio/speech": "audio_speech",
    "audio/transcriptions": "audio_transcription",
    "audio/translations": "audio_translation",
    "images/generations": "image_generation",
    "images/edits": "image_edit",
    "images/variations": "image_variation",
    "responses/input_tokens": "input_tokens",
}
STREAMABLE = frozenset({"chat", "text_completion", "responses"})
PREFIXES = ("", "/rollout/{rollout_id}", "/rollout/{rollout_id}/attempt/{attempt_id}")
_DONE = b"[DONE]"
# How long the rest of an upstream body may take after its `[DONE]` (most often the chunked
# body's last five bytes) before its connection is hung up on rather than kept.
FINISH_SECONDS = 5.0
# Upstream bodies being read to their end after `[DONE]` (the loop holds tasks weakly).
_finishing: set[asyncio.Task[None]] = set()


async def _answer_plain(call: Call, outcome: Outcome) -> Plain:
    response = outcome.response
    # Audio is recorded as its type and size, and is no place for a secret to be redacted.
    binary = binary_answer(response.headers, response.body) if response.ok else None
    body = response.body or b"" if binary else call.redact(response.body or b"")
    call.fields["http_status"] = call.fields["upstream_status"] = response.status
    if response.ok:
        if outcome.capture is not None and outcome.capture.take(outcome.parsed):
            body = call.redact(orjson.dumps(outcome.parsed))
        call.fields.update(reply_fields(call.operation, outcome.parsed))
        if failed := failure_of(call.operation, outcome.parsed):
            call.fail_after_answer(*failed, UPSTREAM_FAILED_STATUS)
    else:
        kind, message = error_fields(outcome.parsed)
        call.fail(response.status, kind or f"http_{response.status}", message)
    # The body the client gets is redacted already; a binary one is described, not kept.
    call.publish(binary or body, redacted=True)
    await call.record_executed_tools()
    return Plain(response.status, {**response.headers, **call.headers()}, body)


async def _answer_stream(ex: Exchange, call: Call, outcome: Outcome) -> None:
    response, injected = outcome.response, outcome.injected_usage
    assert response.chunks is not None
    call.fields["http_status"] = call.fields["upstream_status"] = response.status
    try:
        await ex.begin_stream(response.status, {**response.headers, **call.headers()})
    except BaseException:
        # No byte of it will be relayed: the upstream's connection goes, its call ends.
        await response.chunks.aclose()
        raise
    splitter = SSESplitter()
    assembler = new_assembler(call.operation)
    held: list[bytes] = []
    operation = call.operation
    capture = outcome.capture
    limits = call.gw.settings.limits
    write_timeout = call.gw.settings.server.write_timeout
    chunks = bounded_stream(
        response.chunks, max_bytes=limits.max_stream_bytes, max_seconds=limits.max_stream_seconds
    )
    # Events that arrived together leave together: one write, not one per event.
    outgoing: list[bytes] = []
    at_done = False
    try:
        async for chunk in chunks:
            call.stream_bytes += len(chunk)
            token_in_batch = False
            for raw_event in splitter.feed(chunk):
                mark = time.perf_counter_ns()
                _, data = parse_event(raw_event)
                if data == _DONE:
                    # Held back until the span is published, so a client that acts on
                    # [DONE] (say, posts a reward) always finds the span.
                    held.append(raw_event)
                    if isinstance(assembler, ChatAssembler | CompletionAssembler):
                        # A chat or completion stream ends here: what an upstream sends
                        # after it reaches no SDK, and a connection kept open holds nothing.
                        assembler.done = at_done = True
                        break
                    continue
                obj = loads_or_none(data)
                forward = True
                if isinstance(obj, dict):
                    if capture is not None and capture.take(obj):
                        raw_event = b"data: " + orjson.dumps(obj) + b"\n\n"
                    assembler.add(obj)
                    if injected and "usage" in obj:
                        if obj["usage"] is None:
                            raw_event = strip_usage_null(raw_event)
                        elif obj.get("choices") == []:
                            forward = False
                call.processing_ns += time.perf_counter_ns() - mark
                if not forward:
                    continue
                outgoing.append(call.redact(raw_event))
                if not token_in_batch and call.first_token_ns is None and isinstance(obj, dict):
                    token_in_batch = has_token(operation, obj)
            if outgoing:
                batch = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
                outgoing.clear()
                await ex.send(batch, write_timeout)
                if token_in_batch:
                    call.first_token_ns = time.perf_counter_ns()
            if at_done:
                break
        else:
            rest = splitter.rest()
            if parse_event(rest)[1] == _DONE and isinstance(
                assembler, ChatAssembler | CompletionAssembler
            ):
                # A last `[DONE]` without its blank line still says the answer is whole.
                assembler.done = True
                held.append(rest)
            elif rest.strip():
                await ex.send(rest, write_timeout)
        call.upstream_done_ns = time.perf_counter_ns()
    except UpstreamError as exc:
        call.upstream_done_ns = time.perf_counter_ns()
        # The client got its 200 already; the status is the upstream's failure (502, 504).
        call.fail_after_answer(exc.code or exc.type, exc.message, exc.status)
        call.publish(_assembled(call, assembler))
        with contextlib.suppress(ConnectionError):
            error_event = b"data: " + orjson.dumps(exc.body()) + b"\n\n"
            await ex.send(call.redact(error_event), write_timeout)
            await ex.end(write_timeout)
        return
    except ConnectionError as exc:
        # Also a client that stopped reading (ClientTooSlow): it gets no more of the answer.
        call.client_closed(f"the client went away mid-stream: {exc}")
        call.publish(_assembled(call, assembler))
        return
    except asyncio.CancelledError:
        call.cancel(client_gone=ex.client_gone())
        call.publish(_assembled(call, assembler))
        raise
    except Exception as exc:
        # Headers are gone already: a 500 now would corrupt the stream, so end it with an
        # error event the SDK raises, and keep the record.
        deployment = call.deployment
        log.exception(
            "stream from %s failed in the gateway", deployment.label if deployment else "?"
        )
        error = GatewayError(f"the gateway could not relay this stream: {type(exc).__name__}")
        call.fail_after_answer("gateway_error", str(exc))
        call.publish(_assembled(call, assembler))
        # The events of this read that came before the failure go out first, as they came.
        outgoing.append(b"data: " + orjson.dumps(error.body()) + b"\n\n")
        with contextlib.suppress(ConnectionError):
            await ex.send(b"".join(outgoing), write_timeout)
            await ex.end(write_timeout)
        return
    finally:
        await chunks.aclose()
        if not at_done:
            await response.chunks.aclose()
    try:
        result = _assembled(call, assembler)
        if failed := assembler.failure():
            call.fail_after_answer(*failed, UPSTREAM_FAILED_STATUS)
            if failed[0] == INCOMPLETE:
                # The SDK raises on this event, as it would on the upstream's own error.
                error = UpstreamProtocolError(failed[1] or "the upstream's stream ended early")
                error.code = INCOMPLETE
                held.append(b"data: " + orjson.dumps(error.body()) + b"\n\n")
        call.publish(result)
        await call.record_executed_tools()
        # The call is recorded: a client that stops reading now is only dropped.
        with contextlib.suppress(ConnectionError):
            for raw_event in held:
                await ex.send(raw_event, write_timeout)
            await ex.end(write_timeout)
    finally:
        if at_done:
            finishing = asyncio.ensure_future(_finish_upstream(response.chunks))
            _finishing.add(finishing)
            finishing.add_done_callback(_finishing.discard)


def _assembled(call: Call, assembler: Assembler) -> dict[str, Any]:
    """The answer assembled so far, its span fields taken (tokens estimated when the stream
    reported none), whether the stream ended well or not."""
    result = assembler.result()
    fields = reply_fields(call.operation, result)
    call.fields.update({k: v for k, v in fields.items() if v is not None})
    estimate_missing_usage(call.operation, call.payload, result, call.fields, call.extra_attributes)
    return result


async def _finish_upstream(chunks: AsyncGenerator[bytes, None]) -> None:
    """Read an upstream body to its end after its `[DONE]`, so its connection is kept; one
    that lingers past FINISH_SECONDS, or fails, is hung up on."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(FINISH_SECONDS):
            async for _ in chunks:
                pass
    await chunks.aclose()


async def proxy(ex: Exchange, operation: str) -> Plain | None:
    """The call, forwarded and recorded: its whole answer, or None once a stream went out
    through `ex`."""
    gw = ex.gw
    t0, start_ns = time.perf_counter_ns(), time.time_ns()
    attribution = read_attribution(ex.match_info, ex.headers)
    if gw.settings.require_rollout and attribution.rollout_id is None:
        raise RolloutRequired(
            "this gateway requires a rollout: call /rollout/{id}/v1/... or send X-Rollout-Id"
        )
    raw = await ex.body(gw.settings.server.body_timeout)
    raw, payload, form = parse_request(raw, operation, ex.headers.get("Content-Type"))
    stream = operation in STREAMABLE and payload.get("stream") is True
    call = Call(gw, operation, attribution, raw, payload, payload["model"], t0, start_ns, stream)
    if form is not None:
        call.request_record = payload
    gated = False
    if attribution.trace_id:
        call.trace_id = attribution.trace_id
    elif attribution.rollout_id is not None:
        # A rollout's calls share one trace, so a tracing backend shows the rollout whole.
        call.trace_id = rollout_trace(attribution.rollout_id)[0]
    else:
        call.trace_id = new_trace_id()
    try:
        if attribution.rollout_id is not None:
            # Numbered on arrival: a call a pause refuses is still the rollout's, in order.
            await number_call(gw, call, attribution.rollout_id, attribution.attempt_id)
        call.fields["held_ms"] = await gw.gate.enter() * 1000 or None
        gated = True
        if form is None:
            await enter_experiment(gw.experiments, call)
        raw, payload = call.raw_request, call.payload
        group = gw.router.group(payload["model"])
        if gw.budgets is not None:
            # Refused here (402) before anything goes upstream; the body may come back clamped.
            raw, payload = await gw.budgets.admit(call, group, ex.headers)
        gateway_keys = [key.key for key in gw.settings.auth.keys]
        client_headers = forwarded_client_headers(ex.headers, gateway_keys)
        call.redactor = gw.redactor.adding(_bearer_token(client_headers.get("authorization")))
        call.job = Job(operation, raw, payload, stream, group, client_headers)
        call.job.rollout_id = attribution.rollout_id
        call.job.form = form
        # A rollout created before a restart (or on another replica) is read once.
        if gw.modes.unknown(attribution.rollout_id):
            await gw.modes.resolve(attribution.rollout_id)
        call.job.mode = call.fields["mode"] = rollout_mode(
            gw.modes, ex.headers, attribution.rollout_id
        )
        call.outcome = outcome = await forward(gw, call.job)
        if outcome.response.chunks is None:
            call.upstream_done_ns = time.perf_counter_ns()
            return await _answer_plain(call, outcome)
        await _answer_stream(ex, call, outcome)
        return None
    except GatewayError as exc:
        if call.upstream_done_ns is None:
            call.upstream_done_ns = time.perf_counter_ns()
        call.fail(exc.status, exc.code or exc.type, exc.message)
        if isinstance(exc, UpstreamError):
            # No upstream answer: the status is the gateway's judgement of its failure.
            call.fields["upstream_status"] = exc.status
        call.publish(exc.body())
        return error_plain(exc, headers=call.headers())
    except asyncio.CancelledError:
        call.cancel(client_gone=ex.client_gone())
        raise
    except Exception as exc:
        # The middleware answers 500; the span says so instead of the `ok` it started as.
        call.fail(500, "gateway_error", f"internal gateway error: {type(exc).__name__}")
        raise
    finally:
        call.publish()
        if gated:
            gw.gate.leave()


def _bearer_token(authorization: str | None) -> str | None:
    """The key in an `Authorization` value (the whole value when it is not a bearer token)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip() or None
    return authorization


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
        ex = AiohttpExchange(request)
        plain = await proxy(ex, operation)
        if plain is not None:
            return web_response(plain)
        assert ex.response is not None
        return ex.response

    handler.__name__ = f"proxy_{operation}"
    return handler


def add_routes(app: web.Application) -> None:
    # An operation under every prefix before the next operation: aiohttp tries the routes
    # under `/rollout` one by one, so a chat call with an attempt in its path is matched on
    # the second try instead of the eighteenth (5 µs instead of 26).
    for path, operation in OPERATIONS.items():
        for prefix in PREFIXES:
            app.router.add_post(f"{prefix}/v1/{path}", _handler(operation))
    for prefix in PREFIXES:
        app.router.add_get(f"{prefix}/v1/models", list_models)
        add_surface_routes(app, prefix)
