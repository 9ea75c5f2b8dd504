"""The objects one running gateway shares across requests, kept on the app under one AppKey:
the proxy's context plus the store and what the web layer itself tracks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from gateway.proxy.context import ProxyContext
from store.reader import Reader
from store.writer import StoreWriter


@dataclass(kw_only=True)
class Gateway(ProxyContext):
    writer: StoreWriter
    reader: Reader
    # Where this gateway answers, once it listens (the judge calls itself through it).
    base_url: str = ""
    # Requests being handled, and an event set whenever there are none (graceful stop).
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def request_began(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def request_ended(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()


GATEWAY = web.AppKey("gateway", Gateway)
