"""`/metrics` read-out of online judging: rollouts judged, rollouts skipped on a full queue,
and how many wait. The judge service keeps the counts; this only reads them at scrape time
(gateway.web knows the service by this shape, not by import: the judge is the root's)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _Queue(Protocol):
    def qsize(self) -> int: ...


class OnlineJudging(Protocol):
    """What the collector reads of the judge service."""

    @property
    def dropped(self) -> int: ...

    @property
    def online_judged(self) -> int: ...

    @property
    def queue(self) -> _Queue: ...


class JudgeCollector(Collector):
    """Online judging's counts (all 0 when `judge.online` is not set)."""

    def __init__(self, service: OnlineJudging) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "spangate_judge_online_judged",
            "Finished rollouts judged online.",
            value=self.service.online_judged,
        )
        yield CounterMetricFamily(
            "spangate_judge_online_skipped",
            "Finished rollouts not judged online because the queue was full "
            "(judge.online.queue_size).",
            value=self.service.dropped,
        )
        yield GaugeMetricFamily(
            "spangate_judge_online_queue_depth",
            "Finished rollouts waiting to be judged online.",
            value=self.service.queue.qsize(),
        )
