"""The objects one running gateway shares across requests, kept on the app under one AppKey."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from config.models import Deployment, Settings
from gateway.providers.base import Provider
from gateway.proxy.attribution import Sequencer
from gateway.proxy.cost import Price, Prices, deployment_prices
from gateway.proxy.recorder import Recorder
from gateway.proxy.redact import Redactor
from gateway.proxy.router import Router
from gateway.proxy.tool_spans import ToolTracker
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
