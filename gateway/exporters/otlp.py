"""Sends every span to the user's tracing backend over OTLP/HTTP, off the request path.

A recorder-bus subscriber: it only appends to a bounded queue (full: the span is dropped
from the export, never from the store, and counted). One background task batches,
encodes on a worker thread, compresses and posts, retrying only what the spec says is
transient.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from config.models import OtlpSettings, Settings
from config.version import package_version
from gateway.exporters.otlp_mapping import (
    evaluation_span,
    export_request,
    resource,
    root_span,
    span_bytes,
    to_otlp_json,
    upstream_addresses,
)
from gateway.proxy.attribution import rollout_trace

log = logging.getLogger("spangate.otlp")

# What the OTLP spec calls transient; anything else (400 above all) is never retried.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
GZIP_LEVEL = 5
# Span id -> trace id of recently exported spans, so a later reward lands in the right trace.
TRACES_REMEMBERED = 50_000
# Rollout rewards held for the root span, which is sent when the rollout ends.
ROLLOUTS_PENDING = 10_000
REWARDS_PER_ROLLOUT = 100
ROOTS_REMEMBERED = 50_000
# A rollout's root span is sent once it reaches one of these (store.schema's final states).
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timeout"})


class RetryableStatus(Exception):
    """The receiver answered 429/502/503/504; `retry_after` is its `Retry-After`, if any."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"OTLP receiver answered {status}")
        self.status = status
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(moment.timestamp() - time.time(), 0.0)


@dataclass
class ExportStats:
    exported: int = 0
    dropped: int = 0
    failed: int = 0
    retries: int = 0
    requests: int = 0


class OtlpExporter:
    """Subscribe `on_span`, `on_rollout` and `on_reward`; `start()` and `close()` on the loop."""

    def __init__(self, settings: OtlpSettings, *, addresses: Mapping[str, tuple[str, int]]) -> None:
        assert settings.endpoint, "an exporter needs otlp.endpoint"
        self.settings = settings
        self.endpoint = settings.endpoint
        self.addresses = dict(addresses)
        self.version = package_version()
        self.resource = resource(settings.service_name, self.version, socket.gethostname())
        self.stats = ExportStats()
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # Touched only by the encoder, which runs one batch at a time.
        self._traces: OrderedDict[str, str] = OrderedDict()
        self._pending: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._roots: OrderedDict[str, None] = OrderedDict()
        self._headers = {
            **settings.headers,
            "Content-Type": "application/json"
            if settings.protocol == "http/json"
            else "application/x-protobuf",
        }
        if settings.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        backoff = wait_exponential_jitter(
            multiplier=BACKOFF_INITIAL, max=BACKOFF_MAX, jitter=BACKOFF_INITIAL
        )

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, RetryableStatus) and exc.retry_after is not None:
                return min(exc.retry_after, settings.retry_after_cap)
            return float(backoff(state))

        self._wait = wait

    @classmethod
    def from_settings(cls, settings: Settings) -> OtlpExporter | None:
        if not settings.otlp.endpoint:
            return None
        return cls(settings.otlp, addresses=upstream_addresses(settings))

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- subscribers (called on the request path: append and return) ------------

    def _put(self, kind: str, item: dict[str, Any]) -> None:
        if self._closing or len(self._queue) >= self.settings.queue_size:
            self.stats.dropped += 1
            return
        self._queue.append((kind, item))
        if len(self._queue) >= self.settings.batch_size:
            self._wake.set()

    def on_span(self, record: dict[str, Any]) -> None:
        self._put("span", record)

    def on_rollout(self, rollout: dict[str, Any]) -> None:
        if rollout.get("status") in TERMINAL_STATUSES:
            self._put("rollout", rollout)

    def on_reward(self, reward: dict[str, Any]) -> None:
        self._put("reward", reward)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout)
        )
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Send what is queued within `shutdown_timeout`, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.settings.shutdown_timeout)
            except TimeoutError:
                log.warning("OTLP export: %d spans not sent before shutdown", len(self._queue))
            except Exception:
                log.exception("OTLP exporter failed")
        self.stats.dropped += len(self._queue)
        self._queue.clear()
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            if not self._closing and len(self._queue) < self.settings.batch_size:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.flush_interval)
            if not self._queue:
                if self._closing:
                    return
                continue
            try:
                await self._export_batch()
            except Exception:
                # Nothing may end this task: the next batch gets its own chance.
                log.exception("OTLP export of a batch failed")

    async def _export_batch(self) -> None:
        count = min(len(self._queue), self.settings.batch_size)
        items = [self._queue.popleft() for _ in range(count)]
        loop = asyncio.get_running_loop()
        # Mapping, serialising and gzip cost milliseconds per batch: not on the loop.
        body, spans = await loop.run_in_executor(None, self._encode, items)
        if spans:
            await self._send(body, spans)

    # -- encoding (worker thread) ------------------------------------------------

    def _encode(self, items: list[tuple[str, dict[str, Any]]]) -> tuple[bytes, int]:
        spans = list(self._spans_of(items))
        if not spans:
            return b"", 0
        request = export_request(spans, self.resource, self.version)
        if self.settings.protocol == "http/json":
            body = to_otlp_json(request)
        else:
            body = request.SerializeToString()
        if self.settings.compression == "gzip":
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
        return body, len(spans)

    def _spans_of(self, items: list[tuple[str, dict[str, Any]]]) -> Iterator[Span | bytes]:
        content = self.settings.content
        for kind, item in items:
            try:
                if kind == "span":
                    self._remember(
                        self._traces, item["span_id"], item["trace_id"], TRACES_REMEMBERED
                    )
                    yield span_bytes(item, content=content, addresses=self.addresses)
                elif kind == "rollout":
                    if item["id"] in self._roots:
                        continue  # a later change to a finished rollout; its root is out
                    self._remember(self._roots, item["id"], None, ROOTS_REMEMBERED)
                    yield root_span(item, self._pending.pop(item["id"], []))
                else:
                    span = self._reward_span(item)
                    if span is not None:
                        yield span
            except Exception:
                # One odd record must not cost the batch.
                self.stats.failed += 1
                log.exception("OTLP export: cannot map a %s", kind)

    def _reward_span(self, reward: dict[str, Any]) -> Span | None:
        rollout_id = reward.get("rollout_id")
        span_id = reward.get("span_id")
        if span_id:
            trace_id = self._traces.get(span_id) or (
                rollout_trace(rollout_id)[0] if rollout_id else None
            )
            if trace_id is None:
                return None
            return evaluation_span(reward, trace_id=trace_id, parent_id=span_id)
        if not rollout_id:
            return None
        trace_id, root_id = rollout_trace(rollout_id)
        if rollout_id in self._roots:
            return evaluation_span(reward, trace_id=trace_id, parent_id=root_id)
        held = self._pending.setdefault(rollout_id, [])
        self._pending.move_to_end(rollout_id)
        if len(held) < REWARDS_PER_ROLLOUT:
            held.append(reward)
        while len(self._pending) > ROLLOUTS_PENDING:
            self._pending.popitem(last=False)
        return None

    @staticmethod
    def _remember(table: OrderedDict[str, Any], key: str, value: Any, capacity: int) -> None:
        table[key] = value
        if len(table) > capacity:
            table.popitem(last=False)

    # -- sending -----------------------------------------------------------------

    async def _send(self, body: bytes, spans: int) -> None:
        assert self._session is not None
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retry_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(
                (RetryableStatus, aiohttp.ClientConnectionError, TimeoutError)
            ),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._post(body)
        except (RetryableStatus, aiohttp.ClientError, TimeoutError) as exc:
            self.stats.failed += spans
            log.warning("OTLP export to %s failed, %d spans lost: %s", self.endpoint, spans, exc)
        except _Rejected as exc:
            self.stats.failed += spans
            log.warning("OTLP receiver %s rejected %d spans: %s", self.endpoint, spans, exc)
        else:
            self.stats.exported += spans

    def _count_retry(self, state: RetryCallState) -> None:
        self.stats.retries += 1

    async def _post(self, body: bytes) -> None:
        assert self._session is not None
        self.stats.requests += 1
        async with self._session.post(self.endpoint, data=body, headers=self._headers) as response:
            if response.status < 300:
                await response.read()
                return
            text = (await response.content.read(500)).decode("utf-8", "replace")
            if response.status in RETRY_STATUSES:
                raise RetryableStatus(
                    response.status, retry_after_seconds(response.headers.get("Retry-After"))
                )
            raise _Rejected(f"{response.status} {text}")


class _Rejected(Exception):
    """The receiver refused the batch for good (400 and every other non-transient answer)."""


class ExportCollector(Collector):
    """`spangate_otlp_*` series, read at scrape time (zeros when export is off)."""

    def __init__(self, exporter: OtlpExporter | None) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        stats = self.exporter.stats if self.exporter else ExportStats()
        depth = self.exporter.depth if self.exporter else 0
        for name, help_text, value in (
            ("spans_exported", "Spans the OTLP receiver accepted.", stats.exported),
            (
                "spans_dropped",
                "Spans left out of the OTLP export because its queue was full (still stored).",
                stats.dropped,
            ),
            (
                "spans_failed",
                "Spans the OTLP receiver refused or that failed after every retry.",
                stats.failed,
            ),
            ("export_retries", "OTLP export requests tried again.", stats.retries),
            ("export_requests", "OTLP export requests sent.", stats.requests),
            ("queue_depth", "Spans waiting for OTLP export.", depth),
        ):
            yield GaugeMetricFamily(f"spangate_otlp_{name}", help_text, value=value)
