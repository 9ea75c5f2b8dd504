"""Prometheus metrics: a recorder subscriber for per-call numbers, read-outs for live state."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.web.limits import LabelCap
from gateway.web.state import Gateway

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
SPAN_STATUSES = ("ok", "error", "cancelled")


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
            "spangate_recorder_queue_depth", "Spans waiting for the writer.", value=gw.writer.depth
        )
        for name, help_text, value in (
            ("spans_written", "Spans written to the store.", gw.writer.written),
            ("spans_spilled", "Spans spilled to the journal.", gw.writer.spilled),
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


class Metrics:
    """Every metric of one gateway, in its own registry (no process-wide state)."""

    def __init__(self, gw: Gateway) -> None:
        self.registry = CollectorRegistry()
        # Label children looked up once per (group, deployment), not on every span.
        self._series: dict[tuple[str, str], _GroupSeries] = {}
        self.groups = frozenset(g.name for g in gw.settings.models)
        # Label values that come from clients, each capped (the rest count as `other`).
        cap = gw.settings.limits.max_label_values
        self.tool_names = LabelCap(cap)
        self.fallback_models = LabelCap(cap, self.groups)
        counter = partial(Counter, registry=self.registry)
        histogram = partial(Histogram, registry=self.registry, buckets=LATENCY_BUCKETS)
        by_group, by_deployment = ["model_group"], ["model_group", "deployment"]
        self.requests = counter(
            "spangate_requests",
            "Calls by model group, deployment and status.",
            [*by_deployment, "status"],
        )
        self.latency = histogram(
            "spangate_request_duration_seconds", "Total call latency.", by_group
        )
        self.upstream = histogram(
            "spangate_upstream_duration_seconds",
            "Upstream latency of the answering try.",
            by_deployment,
        )
        self.overhead = histogram(
            "spangate_gateway_overhead_seconds",
            "Time spent in the gateway itself.",
            buckets=OVERHEAD_BUCKETS,
        )
        self.ttft = histogram(
            "spangate_time_to_first_token_seconds", "Streams: time to the first token.", by_group
        )
        self.tokens = counter(
            "spangate_tokens",
            "Tokens by model group and kind (input, output, cached, reasoning).",
            [*by_group, "kind"],
        )
        self.cost = counter("spangate_cost_usd", "Cost in USD by model group.", by_group)
        self.retries = counter(
            "spangate_upstream_retries", "Upstream tries beyond the first.", by_group
        )
        self.fallbacks = counter(
            "spangate_fallbacks", "Calls answered by a fallback group.", [*by_group, "fallback"]
        )
        self.limiter_wait = histogram(
            "spangate_rate_limit_wait_seconds",
            "Time calls waited for rpm/tpm budget.",
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10),
        )
        self.tools = counter(
            "spangate_tool_executions",
            "Tool executions seen in conversations, by tool and status.",
            ["tool", "status"],
        )
        self.registry.register(_LiveState(gw))

    def observe(self, span: dict[str, Any]) -> None:
        """Recorder subscriber: a handful of in-memory increments per span."""
        if span.get("operation") == "execute_tool":
            tool = self.tool_names(span["name"].removeprefix("execute_tool "))
            self.tools.labels(tool, span["status"]).inc()
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
        series.requests[span["status"]].inc()
        series.latency.observe(span["duration_ms"] / 1000)
        if span.get("upstream_ms") is not None:
            series.upstream.observe(span["upstream_ms"] / 1000)
        if span.get("overhead_ms") is not None:
            self.overhead.observe(span["overhead_ms"] / 1000)
        if span.get("ttft_ms") is not None:
            series.ttft.observe(span["ttft_ms"] / 1000)
        for kind, counter in series.tokens.items():
            value = span.get(kind)
            if value:
                counter.inc(value)
        if span.get("cost_usd"):
            self.cost.labels(group).inc(span["cost_usd"])
        if span.get("retries"):
            self.retries.labels(group).inc(span["retries"])
        attributes = span.get("attributes") or {}
        if attributes.get("spangate.fallback"):
            self.fallbacks.labels(
                self.fallback_models(span.get("request_model") or ""),
                attributes["spangate.fallback"],
            ).inc()
        if attributes.get("spangate.limiter_wait_ms"):
            self.limiter_wait.observe(attributes["spangate.limiter_wait_ms"] / 1000)


class _GroupSeries:
    """The labelled children of one model group and deployment."""

    def __init__(self, metrics: Metrics, group: str, deployment: str) -> None:
        self.requests = {
            status: metrics.requests.labels(group, deployment, status) for status in SPAN_STATUSES
        }
        self.latency = metrics.latency.labels(group)
        self.upstream = metrics.upstream.labels(group, deployment)
        self.ttft = metrics.ttft.labels(group)
        self.tokens = {
            f"{kind}_tokens": metrics.tokens.labels(group, kind)
            for kind in ("input", "output", "cached", "reasoning")
        }


METRICS = web.AppKey("metrics", Metrics)


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
