"""The objects one running gateway shares across requests, kept on the app under one AppKey."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from config.models import Deployment, Settings
from gateway.attribution import Sequencer
from gateway.cost import Price, Prices, deployment_prices
from gateway.recorder import Recorder
from gateway.redact import Redactor
from gateway.router import Router
from gateway.tool_spans import ToolTracker
from gateway.upstream import Provider
from store.reader import Reader
from store.writer import StoreWriter


@dataclass
class Gateway:
    settings: Settings
    router: Router
    recorder: Recorder
    writer: StoreWriter
    reader: Reader
    sequencer: Sequencer
    tools: ToolTracker = field(default_factory=ToolTracker)
    providers: dict[str, Provider] = field(default_factory=dict)
    # Keys that must never be recorded or answered, should an upstream echo one back.
    redactor: Redactor = field(default_factory=lambda: Redactor(()))
    prices: dict[int, Price | None] = field(default_factory=dict)
    # Where this gateway answers, once it listens (the judge calls itself through it).
    base_url: str = ""
    # Requests being handled, and an event set whenever there are none (graceful stop).
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def price_all(self, cost_map: Prices) -> None:
        """Look every deployment's prices up once, so a call's cost is two multiplications."""
        for group in self.settings.models:
            for deployment in group.deployments:
                self.prices[id(deployment)] = deployment_prices(deployment, cost_map)

    def prices_for(self, deployment: Deployment) -> Price | None:
        return self.prices.get(id(deployment))


GATEWAY = web.AppKey("gateway", Gateway)
