"""A real OTLP/HTTP trace receiver for tests: decodes with opentelemetry-proto, answers as told."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def attributes_of(pairs: Any) -> dict[str, Any]:
    """OTLP KeyValues as a dict of plain Python values."""
    out: dict[str, Any] = {}
    for kv in pairs:
        which = kv.value.WhichOneof("value")
        if which == "array_value":
            out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in kv.value.array_value.values]
        elif which is not None:
            out[kv.key] = getattr(kv.value, which)
    return out


@dataclass
class Received:
    span: Span
    resource: dict[str, Any]
    scope: str

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes_of(self.span.attributes)

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()


@dataclass
class ReceiverState:
    spans: list[Received] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    # Statuses to answer next, in order; then 200.
    answers: deque[int] = field(default_factory=deque)
    retry_after: str | None = None

    def named(self, name: str) -> list[Received]:
        return [r for r in self.spans if r.span.name == name]

    def by_id(self) -> dict[str, Received]:
        return {r.span_id: r for r in self.spans}


def _hex_to_b64(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in ("traceId", "spanId", "parentSpanId")
            else _hex_to_b64(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_hex_to_b64(v) for v in value]
    return value


class OtlpReceiver:
    """An aiohttp app on 127.0.0.1:0 in its own thread, taking `POST /v1/traces`."""

    def __init__(self) -> None:
        self.state = ReceiverState()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.state.requests.append(dict(request.headers))
        if self.state.answers:
            status = self.state.answers.popleft()
            headers = {"Retry-After": self.state.retry_after} if self.state.retry_after else {}
            return web.Response(status=status, text="not now", headers=headers)
        # aiohttp has already undone Content-Encoding (gzip); the header stays for tests.
        message = ExportTraceServiceRequest()
        if request.content_type == "application/json":
            json_format.ParseDict(_hex_to_b64(orjson.loads(body)), message)
        else:
            message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.state.spans.append(Received(span, resource, scope_spans.scope.name))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def stop(self) -> None:
        """Stop serving; safe to call twice (a test may take the receiver down itself)."""
        if self.loop.is_closed():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
