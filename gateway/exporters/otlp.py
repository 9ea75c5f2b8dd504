"""Sends every span to the user's tracing backend over OTLP/HTTP, off the request path.

A recorder-bus subscriber: it only appends to a bounded queue (full: the span is dropped
from the export, never from the store, and counted). One background task batches,
encodes on a worker thread, compresses and posts, retrying only what the spec says is
transient.

What must survive a restart is read from the store, not kept in memory: a rollout's
rewards when its root span is built, whether a rollout has ended when a reward for it
comes, and the trace of a span a reward targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
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
# Span id -> trace id of recently exported spans, so a later reward lands in the right trace
# without a store read.
TRACES_REMEMBERED = 50_000
# Rollout rewards given before the end ride on the root span as events, up to this many
# (backends cap events per span; OpenTelemetry SDKs at 128); the rest go as evaluation spans.
REWARDS_PER_ROLLOUT = 100
# Rollout id -> when it ended, for recently ended rollouts: a late reward needs no store read.
ROOTS_REMEMBERED = 50_000
# A rollout's root span is sent once it reaches one of these (store.schema's final states).
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timeout"})
# The span fields an export never reads without `content: true`: a queued span without
# them is a few hundred bytes, with them up to twice `limits.max_stored_body_bytes`.
BODY_FIELDS = ("request_body", "response_body")
# With `content: true`, the most body bytes the queue holds (a receiver outage must not
# take the gateway's memory); past it spans are dropped from the export and counted.
QUEUE_BODY_BYTES = 256 * 2**20

# `Reader.run`: `fn(db, *args)` on a read thread, awaited.
StoreRead = Callable[..., Awaitable[Any]]


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


def _in(ids: list[str]) -> tuple[str, dict[str, str]]:
    """`(:p0, :p1, …)` and its parameters, for `where x in` on either store backend."""
    params = {f"p{index}": value for index, value in enumerate(ids)}
    return "(" + ", ".join(f":{name}" for name in params) + ")", params


def span_traces(db: Any, span_ids: list[str]) -> dict[str, str]:
    """Trace id of each stored span of `span_ids`."""
    holes, params = _in(span_ids)
    sql = f"select span_id, trace_id from spans where span_id in {holes}"
    return {row[0]: row[1] for row in db.execute(sql, params).fetchall()}


def rollout_ends(db: Any, rollout_ids: list[str]) -> dict[str, int | None]:
    """When each stored rollout of `rollout_ids` ended (None: it has not)."""
    holes, params = _in(rollout_ids)
    sql = f"select id, status, ended_ns from rollouts where id in {holes}"
    return {
        row[0]: (row[2] if row[1] in TERMINAL_STATUSES else None)
        for row in db.execute(sql, params).fetchall()
    }


def rollout_rewards(db: Any, rollout_id: str, ended_ns: int) -> list[dict[str, Any]]:
    """The rollout and attempt rewards given until the rollout ended, oldest first."""
    cursor = db.execute(
        """
        select * from rewards
        where rollout_id = :rollout_id and span_id is null and created_ns <= :ended_ns
        order by created_ns
        """,
        {"rollout_id": rollout_id, "ended_ns": ended_ns},
    )
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def ends_here(rollout: Mapping[str, Any]) -> bool:
    """This rollout row is the change that ended it. The store sets `ended_ns` once, to the
    `updated_ns` of the update that made the status final; a later change (tags, metadata)
    moves `updated_ns` only, and must not send the root again."""
    return (
        rollout.get("status") in TERMINAL_STATUSES
        and rollout.get("ended_ns") is not None
        and rollout.get("ended_ns") == rollout.get("updated_ns")
    )


@dataclass
class Known:
    """What a batch needs from the store, read (on the reader's threads) before the batch
    is encoded."""

    # Rollout id -> its rewards for the root span, for the rollouts that end in the batch.
    root_rewards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Rollout id -> when it ended (None: running), for the rollouts rewards in the batch name.
    ends: dict[str, int | None] = field(default_factory=dict)
    # Span id -> trace id, for the spans rewards in the batch name.
    traces: dict[str, str] = field(default_factory=dict)


def rejected_of(body: bytes, content_type: str) -> tuple[int, str]:
    """`partial_success` of an ExportTraceServiceResponse (protobuf or JSON, as its
    content type says): spans the receiver refused and its message."""
    if not body:
        return 0, ""
    try:
        if "json" in content_type:
            answer = orjson.loads(body)
            partial = answer.get("partialSuccess") or {} if isinstance(answer, dict) else {}
            # An int64 is a string in OTLP/JSON.
            return int(partial.get("rejectedSpans") or 0), str(partial.get("errorMessage") or "")
        message = ExportTraceServiceResponse.FromString(body)
    except Exception:
        # An answer that is not OTLP's (a proxy's page; protobuf's DecodeError, bad JSON):
        # the 2xx is all there is to go by.
        return 0, ""
    return message.partial_success.rejected_spans, message.partial_success.error_message


def _body_size(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bytes | bytearray | str):
        return len(value)
    # A decoded body (a stream's assembled answer, usually small).
    return len(orjson.dumps(value, default=str))


@dataclass
class ExportStats:
    exported: int = 0
    dropped: int = 0
    failed: int = 0
    retries: int = 0
    requests: int = 0


class OtlpExporter:
    """Subscribe `on_span`, `on_rollout` and `on_reward`; `start()` and `close()` on the loop."""

    def __init__(
        self,
        settings: OtlpSettings,
        *,
        addresses: Mapping[str, tuple[str, int]],
        read: StoreRead,
    ) -> None:
        assert settings.endpoint, "an exporter needs otlp.endpoint"
        self.settings = settings
        self.read = read
        self.endpoint = settings.endpoint
        self.addresses = dict(addresses)
        self.version = package_version()
        self.resource = resource(settings.service_name, self.version, socket.gethostname())
        self.stats = ExportStats()
        # (kind, record, bytes of bodies it holds)
        self._queue: deque[tuple[str, dict[str, Any], int]] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # Filled by the encoder and read before it runs, one batch at a time: never at once.
        self._traces: OrderedDict[str, str] = OrderedDict()
        self._ended: OrderedDict[str, int] = OrderedDict()
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
    def from_settings(cls, settings: Settings, *, read: StoreRead) -> OtlpExporter | None:
        if not settings.otlp.endpoint:
            return None
        return cls(settings.otlp, addresses=upstream_addresses(settings), read=read)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- subscribers (called on the request path: append and return) ------------

    def _put(self, kind: str, item: dict[str, Any], size: int = 0) -> None:
        if (
            self._closing
            or len(self._queue) >= self.settings.queue_size
            or (size and self._queued_bytes + size > QUEUE_BODY_BYTES)
        ):
            self.stats.dropped += 1
            return
        self._queue.append((kind, item, size))
        self._queued_bytes += size
        if len(self._queue) >= self.settings.batch_size:
            self._wake.set()

    def on_span(self, record: dict[str, Any]) -> None:
        if not self.settings.content:
            self._put("span", {k: v for k, v in record.items() if k not in BODY_FIELDS})
            return
        self._put("span", record, sum(_body_size(record.get(k)) for k in BODY_FIELDS))

    def on_rollout(self, rollout: dict[str, Any]) -> None:
        if ends_here(rollout):
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
        self._queued_bytes = 0
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
        items = []
        for _ in range(count):
            kind, item, size = self._queue.popleft()
            self._queued_bytes -= size
            items.append((kind, item))
        try:
            known = await self._look_up(items)
            loop = asyncio.get_running_loop()
            # Mapping, serialising and gzip cost milliseconds per batch: not on the loop.
            body, spans = await loop.run_in_executor(None, self._encode, items, known)
            if spans:
                await self._send(body, spans)
        except asyncio.CancelledError:
            # Shutdown's deadline passed with this batch out of the queue: counted with
            # what the queue still holds.
            self.stats.dropped += count
            raise

    async def _look_up(self, items: list[tuple[str, dict[str, Any]]]) -> Known:
        """What the store knows and memory may not (it starts empty at every restart)."""
        known = Known()
        for kind, item in items:
            if kind == "rollout":
                known.root_rewards[item["id"]] = await self._read_or_log(
                    [], rollout_rewards, item["id"], item["ended_ns"]
                )
        rewards = [item for kind, item in items if kind == "reward"]
        in_batch = {item["span_id"] for kind, item in items if kind == "span"}
        span_ids = {r["span_id"] for r in rewards if r.get("span_id")}
        span_ids -= in_batch | self._traces.keys()
        rollout_ids = {r["rollout_id"] for r in rewards if r.get("rollout_id")}
        rollout_ids -= self._ended.keys()
        if span_ids:
            known.traces = await self._read_or_log({}, span_traces, sorted(span_ids))
        if rollout_ids:
            known.ends = await self._read_or_log({}, rollout_ends, sorted(rollout_ids))
        return known

    async def _read_or_log(self, default: Any, query: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self.read(query, *args)
        except Exception:
            # The export goes on with what memory knows; the store keeps every reward.
            log.exception("OTLP export: cannot read %s from the store", query.__name__)
            return default

    # -- encoding (worker thread) ------------------------------------------------

    def _encode(self, items: list[tuple[str, dict[str, Any]]], known: Known) -> tuple[bytes, int]:
        spans = list(self._spans_of(items, known))
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

    def _spans_of(
        self, items: list[tuple[str, dict[str, Any]]], known: Known
    ) -> Iterator[Span | bytes]:
        content = self.settings.content
        for kind, item in items:
            try:
                if kind == "span":
                    self._remember(
                        self._traces, item["span_id"], item["trace_id"], TRACES_REMEMBERED
                    )
                    yield span_bytes(item, content=content, addresses=self.addresses)
                elif kind == "rollout":
                    yield from self._root_spans(item, known.root_rewards.get(item["id"], []))
                else:
                    span = self._reward_span(item, known)
                    if span is not None:
                        yield span
            except Exception:
                # One odd record must not cost the batch.
                self.stats.failed += 1
                log.exception("OTLP export: cannot map a %s", kind)

    def _root_spans(self, rollout: dict[str, Any], rewards: list[dict[str, Any]]) -> Iterator[Span]:
        """The root span with the rewards given before the end, those past what one span
        carries as evaluation spans beneath it."""
        self._remember(self._ended, rollout["id"], rollout["ended_ns"], ROOTS_REMEMBERED)
        yield root_span(rollout, rewards[:REWARDS_PER_ROLLOUT])
        trace_id, root_id = rollout_trace(rollout["id"])
        for reward in rewards[REWARDS_PER_ROLLOUT:]:
            yield evaluation_span(reward, trace_id=trace_id, parent_id=root_id)

    def _reward_span(self, reward: dict[str, Any], known: Known) -> Span | None:
        rollout_id = reward.get("rollout_id")
        span_id = reward.get("span_id")
        if span_id:
            trace_id = (
                self._traces.get(span_id)
                or known.traces.get(span_id)
                or (rollout_trace(rollout_id)[0] if rollout_id else None)
            )
            if trace_id is None:
                return None
            return evaluation_span(reward, trace_id=trace_id, parent_id=span_id)
        if not rollout_id:
            return None
        ended = self._ended.get(rollout_id) or known.ends.get(rollout_id)
        if ended is None or int(reward.get("created_ns") or 0) <= ended:
            # Given before the end: the root span carries it, read from the store when the
            # rollout ends (or when it did, if that was earlier in this batch).
            return None
        trace_id, root_id = rollout_trace(rollout_id)
        return evaluation_span(reward, trace_id=trace_id, parent_id=root_id)

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
        rejected, message = 0, ""
        try:
            async for attempt in retrying:
                with attempt:
                    rejected, message = await self._post(body)
        except (RetryableStatus, aiohttp.ClientError, TimeoutError) as exc:
            self.stats.failed += spans
            log.warning("OTLP export to %s failed, %d spans lost: %s", self.endpoint, spans, exc)
        except _Rejected as exc:
            self.stats.failed += spans
            log.warning("OTLP receiver %s rejected %d spans: %s", self.endpoint, spans, exc)
        else:
            # A 2xx may still refuse some spans (`partial_success`): those are not exported.
            rejected = min(max(rejected, 0), spans)
            self.stats.exported += spans - rejected
            self.stats.failed += rejected
            if rejected or message:
                log.warning(
                    "OTLP receiver %s rejected %d of %d spans: %s",
                    self.endpoint,
                    rejected,
                    spans,
                    message or "no reason given",
                )

    def _count_retry(self, state: RetryCallState) -> None:
        self.stats.retries += 1

    async def _post(self, body: bytes) -> tuple[int, str]:
        """Spans the receiver refused in a 2xx answer, and why."""
        assert self._session is not None
        self.stats.requests += 1
        async with self._session.post(self.endpoint, data=body, headers=self._headers) as response:
            if response.status < 300:
                return rejected_of(await response.read(), response.content_type)
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
