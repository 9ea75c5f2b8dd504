"""`/metrics` read-out of budget refusals, counted by the proxy's `Budgets` per scope and limit."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.proxy.budgets import Budgets


class BudgetCollector(Collector):
    """Calls refused because a rollout or attempt spent a limit."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "spangate_budget_refusals",
            "Calls refused by a budget, by scope (rollout, attempt) and limit.",
            labels=["scope", "limit"],
        )
        for (scope, limit), count in sorted(self.budgets.refusals.items()):
            family.add_metric([scope, limit], count)
        yield family
