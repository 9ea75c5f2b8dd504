"""Prometheus metrics: a recorder subscriber counting per-call numbers, read out with live state
at scrape time."""

from __future__ import annotations

import asyncio
import logging
import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.web.limits import LabelCap
from gateway.web.state import Gateway

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
LIMITER_WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10)
SPAN_STATUSES = ("ok", "error", "cancelled")
TOKEN_KINDS = ("input", "output", "cached", "reasoning")
# Spans are counted in batches, off the call's own path: a loop over many runs on warm
# caches, at about a third of the CPU of counting each as it comes (bench/results/half/).
# A scrape counts whatever is pending first, so it never shows less than was published.
OBSERVE_BATCH = 64
OBSERVE_DELAY_SECONDS = 1.0

log = logging.getLogger("spangate.metrics")


class _LiveState(Collector):
    """Values read at scrape time: breaker states, queue depth, writer counters."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        gw = self.gw
        breaker = GaugeMetricFamily(
            "spangate_circuit_breaker_state",
            "Circuit breaker per deployment: 0 closed, 1 half-open, 2 open.",
            labels=["model_group", "deployment"],
        )
        in_flight = GaugeMetricFamily(
            "spangate_upstream_in_flight",
            "Calls in flight per deployment.",
            labels=["model_group", "deployment"],
        )
        for group, guards in gw.router.guards.items():
            for guard in guards:
                labels = [group, guard.deployment.label]
                breaker.add_metric(labels, BREAKER_STATES.get(guard.state, 2))
                in_flight.add_metric(labels, guard.in_flight)
        yield breaker
        yield in_flight
        yield GaugeMetricFamily(
            "spangate_recorder_queue_depth",
            "Spans not yet stored: queued, journaled in a burst and held, or being written.",
            value=gw.writer.depth,
        )
        for name, help_text, value in (
            ("spans_written", "Spans written to the store.", gw.writer.written),
            (
                "spans_spilled",
                "Spans spilled to the journal, to be replayed from it.",
                gw.writer.spilled,
            ),
            ("spans_replayed", "Spans replayed from the journal.", gw.writer.replayed),
            (
                "spans_quarantined",
                "Spans the store refused for good, kept in the dead-letter file.",
                gw.writer.quarantined,
            ),
            (
                "spans_lost",
                "Spans lost: neither database, journal nor memory buffer could take them.",
                gw.writer.lost,
            ),
            (
                "spans_held",
                "Spans held in memory while the journal is not writable.",
                gw.writer.held,
            ),
            ("writer_faults", "Unexpected errors the writer survived.", gw.writer.faults),
            ("writer_restarts", "Times the guard restarted the writer thread.", gw.writer.restarts),
        ):
            family = GaugeMetricFamily(f"spangate_{name}", help_text)
            family.add_metric([], value)
            yield family
        yield GaugeMetricFamily(
            "spangate_store_healthy", "1 when the store takes writes.", value=int(gw.writer.healthy)
        )
        yield GaugeMetricFamily(
            "spangate_journal_healthy",
            "1 when the spill journal takes writes.",
            value=int(gw.writer.journal_error is None),
        )


class Histogram:
    """One labelled histogram's bucket counts and sum as plain numbers: the event loop is its
    only writer and reader, so it needs none of prometheus_client's per-value locks (a call
    took 13 of them, and metrics cost 23 µs a call with them, 4 without)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last for values past every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # A bucket holds values "less than or equal" to its bound: the first bound not below.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per `le` bound, as the exposition format has them."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            out.append((floatToGoString(bound), float(running)))
        return out


class Metrics:
    """Every metric of one gateway, in its own registry (no process-wide state). Per-call
    numbers are counted here by the recorder's subscriber and read out at scrape time."""

    def __init__(self, gw: Gateway) -> None:
        self.registry = CollectorRegistry()
        # Histograms and counter keys looked up once per (group, deployment), not per span.
        self._series: dict[tuple[str, str], _GroupSeries] = {}
        self.groups = frozenset(g.name for g in gw.settings.models)
        # Label values that come from clients, each capped (the rest count as `other`).
        cap = gw.settings.limits.max_label_values
        self.tool_names = LabelCap(cap)
        self.fallback_models = LabelCap(cap, self.groups)
        # Per metric: label values -> count, or -> histogram.
        self.requests: Counter[tuple[str, ...]] = Counter()
        self.latency: dict[tuple[str, ...], Histogram] = {}
        self.upstream: dict[tuple[str, ...], Histogram] = {}
        self.overhead = Histogram(OVERHEAD_BUCKETS)
        self.ttft: dict[tuple[str, ...], Histogram] = {}
        self.tokens: Counter[tuple[str, ...]] = Counter()
        self.cost: Counter[tuple[str, ...]] = Counter()
        self.retries: Counter[tuple[str, ...]] = Counter()
        self.fallbacks: Counter[tuple[str, ...]] = Counter()
        self.limiter_wait = Histogram(LIMITER_WAIT_BUCKETS)
        self.tools: Counter[tuple[str, ...]] = Counter()
        self._pending: list[dict[str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.registry.register(_Observed(self))
        self.registry.register(_LiveState(gw))

    def observe(self, span: dict[str, Any]) -> None:
        """Recorder subscriber: the span is counted with the next batch, at most
        `OBSERVE_BATCH` spans or `OBSERVE_DELAY_SECONDS` later, or at the next scrape."""
        pending = self._pending
        pending.append(span)
        if len(pending) >= OBSERVE_BATCH:
            self.count_pending()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.count_pending()  # no loop to come back on: counted now
                return
            self._timer = loop.call_later(OBSERVE_DELAY_SECONDS, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.count_pending()

    def count_pending(self) -> None:
        """Count every span observed and not yet counted."""
        pending, self._pending = self._pending, []
        for span in pending:
            try:
                self._count(span)
            except Exception:
                # One odd span costs its own numbers, not the batch's.
                log.exception("span %s not counted in the metrics", span.get("span_id"))

    def _count(self, span: dict[str, Any]) -> None:
        """A handful of in-memory increments for one span."""
        if span.get("operation") == "execute_tool":
            tool = self.tool_names(span["name"].removeprefix("execute_tool "))
            self.tools[(tool, span["status"])] += 1
            return
        if span.get("model_group") is None and (span.get("attributes") or {}).get(
            "spangate.source"
        ):
            return  # an agent's own span (OTLP ingest), not a call through the gateway
        group = span.get("model_group") or ""
        if group not in self.groups:
            # A model no group serves: one label for all, so clients cannot mint series.
            group = "(unknown)"
        deployment = span.get("deployment") or ""
        series = self._series.get((group, deployment))
        if series is None:
            series = self._series[(group, deployment)] = _GroupSeries(self, group, deployment)
        self.requests[(group, deployment, span["status"])] += 1
        series.latency.observe(span["duration_ms"] / 1000)
        if span.get("upstream_ms") is not None:
            series.upstream.observe(span["upstream_ms"] / 1000)
        if span.get("overhead_ms") is not None:
            self.overhead.observe(span["overhead_ms"] / 1000)
        if span.get("ttft_ms") is not None:
            series.ttft.observe(span["ttft_ms"] / 1000)
        tokens = self.tokens
        for field, key in series.tokens:
            value = span.get(field)
            if value:
                tokens[key] += value
        if span.get("cost_usd"):
            self.cost[(group,)] += span["cost_usd"]
        if span.get("retries"):
            self.retries[(group,)] += span["retries"]
        attributes = span.get("attributes") or {}
        if attributes.get("spangate.fallback"):
            asked = self.fallback_models(span.get("request_model") or "")
            self.fallbacks[(asked, attributes["spangate.fallback"])] += 1
        if attributes.get("spangate.limiter_wait_ms"):
            self.limiter_wait.observe(attributes["spangate.limiter_wait_ms"] / 1000)


class _GroupSeries:
    """One model group and deployment: its histograms, and its series shown from the first
    call on (every status and token kind at 0 until counted)."""

    __slots__ = ("latency", "tokens", "ttft", "upstream")

    def __init__(self, metrics: Metrics, group: str, deployment: str) -> None:
        for status in SPAN_STATUSES:
            metrics.requests.setdefault((group, deployment, status), 0)
        self.latency = metrics.latency.setdefault((group,), Histogram(LATENCY_BUCKETS))
        self.upstream = metrics.upstream.setdefault((group, deployment), Histogram(LATENCY_BUCKETS))
        self.ttft = metrics.ttft.setdefault((group,), Histogram(LATENCY_BUCKETS))
        # (span field, counter key) per token kind
        self.tokens = [(f"{kind}_tokens", (group, kind)) for kind in TOKEN_KINDS]
        for _, key in self.tokens:
            metrics.tokens.setdefault(key, 0)


class _Observed(Collector):
    """The per-call numbers `Metrics.observe` counted, as metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        m.count_pending()
        by_group, by_deployment = ["model_group"], ["model_group", "deployment"]
        yield _counter(
            "spangate_requests",
            "Calls by model group, deployment and status.",
            [*by_deployment, "status"],
            m.requests,
        )
        yield _histogram(
            "spangate_request_duration_seconds", "Total call latency.", by_group, m.latency
        )
        yield _histogram(
            "spangate_upstream_duration_seconds",
            "Upstream latency of the answering try.",
            by_deployment,
            m.upstream,
        )
        yield _histogram(
            "spangate_gateway_overhead_seconds",
            "Time spent in the gateway itself.",
            [],
            {(): m.overhead},
        )
        yield _histogram(
            "spangate_time_to_first_token_seconds",
            "Streams: time to the first token.",
            by_group,
            m.ttft,
        )
        yield _counter(
            "spangate_tokens",
            "Tokens by model group and kind (input, output, cached, reasoning).",
            [*by_group, "kind"],
            m.tokens,
        )
        yield _counter("spangate_cost_usd", "Cost in USD by model group.", by_group, m.cost)
        yield _counter(
            "spangate_upstream_retries", "Upstream tries beyond the first.", by_group, m.retries
        )
        yield _counter(
            "spangate_fallbacks",
            "Calls answered by a fallback group.",
            [*by_group, "fallback"],
            m.fallbacks,
        )
        yield _histogram(
            "spangate_rate_limit_wait_seconds",
            "Time calls waited for rpm/tpm budget.",
            [],
            {(): m.limiter_wait},
        )
        yield _counter(
            "spangate_tool_executions",
            "Tool executions seen in conversations, by tool and status.",
            ["tool", "status"],
            m.tools,
        )


def _counter(
    name: str, help_text: str, labels: list[str], counts: Mapping[tuple[str, ...], float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for values, count in counts.items():
        family.add_metric(values, count)
    return family


def _histogram(
    name: str,
    help_text: str,
    labels: list[str],
    histograms: Mapping[tuple[str, ...], Histogram],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=labels)
    for values, histogram in histograms.items():
        family.add_metric(values, histogram.buckets(), histogram.total)
    return family


METRICS = web.AppKey("metrics", Metrics)


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
