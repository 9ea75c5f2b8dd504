"""What every call shares: settings, routing, the recorder, sequence numbers, providers and
prices. The web layer extends it with the store; the proxy never sees more than this."""

from __future__ import annotations

from dataclasses import dataclass, field

from config.models import (
    DEFAULT_MAX_HOLD_SECONDS,
    DEFAULT_PAUSE_RETRY_AFTER,
    Deployment,
    ModelGroup,
    Settings,
)
from gateway.providers.base import Provider
from gateway.proxy.budgets import Budgets
from gateway.proxy.cost import Price, Prices, deployment_prices
from gateway.proxy.experiments import Experiments
from gateway.proxy.gate import Gate
from gateway.proxy.recorder import Recorder
from gateway.proxy.redact import Redactor
from gateway.proxy.router import Router
from gateway.proxy.sequencer import Sequencer
from gateway.proxy.tool_spans import ToolTracker
from gateway.proxy.training import RolloutModes


@dataclass
class ProxyContext:
    settings: Settings
    router: Router
    recorder: Recorder
    sequencer: Sequencer
    tools: ToolTracker = field(default_factory=ToolTracker)
    providers: dict[str, Provider] = field(default_factory=dict)
    # Keys that must never be recorded or answered, should an upstream echo one back.
    redactor: Redactor = field(default_factory=lambda: Redactor(()))
    prices: dict[int, Price | None] = field(default_factory=dict)
    experiments: Experiments = field(default_factory=lambda: Experiments([]))
    gate: Gate = field(
        default_factory=lambda: Gate(DEFAULT_MAX_HOLD_SECONDS, DEFAULT_PAUSE_RETRY_AFTER)
    )
    modes: RolloutModes = field(default_factory=RolloutModes)
    # Set by the composition root, with the budget state it chose (in-process or Redis).
    budgets: Budgets | None = None

    def price_all(self, cost_map: Prices) -> None:
        """Look every deployment's prices up once, so a call's cost is two multiplications."""
        for group in self.settings.models:
            for deployment in group.deployments:
                self.prices[id(deployment)] = deployment_prices(deployment, cost_map)

    def prices_for(self, deployment: Deployment) -> Price | None:
        return self.prices.get(id(deployment))

    def group_prices(self, group: ModelGroup) -> Price | None:
        """The dearest prices among the group's deployments: a budget estimate errs high."""
        known = [p for d in group.deployments if (p := self.prices_for(d)) is not None]
        return max(known, key=lambda p: (p[1], p[0])) if known else None
