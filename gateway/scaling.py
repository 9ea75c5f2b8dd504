"""What changes when replicas share one store: sequence numbers come from a counter they all
see (Redis when `shared.redis_url` is set, else the PostgreSQL counter row), a rollout's
drawn experiment variant from a claim they all see (the same choice), and with Redis
rate limits and breaker state are shared too; one SQLite process keeps all that in memory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from config.models import Settings
from gateway.proxy.experiments import VariantClaim
from gateway.proxy.sequencer import SeqAllocator
from gateway.web.routes_api import FEED
from gateway.web.state import GATEWAY
from store.backend import is_postgres
from store.shared_state import (
    SPANS_CHANNEL,
    PostgresClaims,
    PostgresCounter,
    RedisClaims,
    RedisCounter,
    RedisRateLimits,
    listen,
    redis_breaker_storage,
    redis_client,
)
from store.writes import ATTEMPTS_CHANNEL


class SharedCounters:
    """The allocator handed to the proxy's Sequencer, opened and closed with the app."""

    def __init__(self, settings: Settings, db: str | Path) -> None:
        self.db = db
        self.redis: Any = None
        # PostgreSQL pools of this replica's own (sequence numbers, claims).
        self.pools: list[PostgresCounter | PostgresClaims] = []
        self.counter: RedisCounter | PostgresCounter | None = None
        self.claims: RedisClaims | PostgresClaims | None = None
        self.rate_limits: RedisRateLimits | None = None
        self.breaker_storage: Callable[[str], Any] | None = None
        # Only an experiment that draws needs replicas to agree on a draw.
        draws = any(e.policy == "thompson" for e in settings.experiments)
        if settings.shared.redis_url:
            url = settings.shared.redis_url
            self.redis = redis_client(url)
            self.counter = RedisCounter(self.redis)
            self.claims = RedisClaims(self.redis) if draws else None
            self.rate_limits = RedisRateLimits(url)
            self.breaker_storage = redis_breaker_storage(url)
        elif is_postgres(db):
            self.counter = PostgresCounter(str(db))
            self.claims = PostgresClaims(str(db)) if draws else None
            self.pools = [pool for pool in (self.counter, self.claims) if pool is not None]

    def router_options(self) -> dict[str, Any]:
        """What the Router's guards share: rpm/tpm budgets and breaker state (Redis only)."""
        if self.rate_limits is None:
            return {}
        return {"shared_rate": self.rate_limits.acquire, "breaker_storage": self.breaker_storage}

    @property
    def allocate(self) -> SeqAllocator | None:
        return self.counter.allocate if self.counter is not None else None

    @property
    def claim_variant(self) -> VariantClaim | None:
        return self.claims.claim_variant if self.claims is not None else None

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """A `cleanup_ctx`: connections open at start, close at stop."""
        for pool in self.pools:
            await pool.open()
        listener = None
        if is_postgres(self.db):
            listener = asyncio.create_task(listen(str(self.db), _handlers(app)))
        yield
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        for pool in self.pools:
            await pool.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.rate_limits is not None:
            await self.rate_limits.close()


def _handlers(app: web.Application) -> dict[str, Callable[[str], None]]:
    """What other replicas' commits tell this one: new spans wake its live streams within a
    commit, and a new attempt moves its calls that name none."""
    sequencer = app[GATEWAY].sequencer

    def attempt(payload: str) -> None:
        sequencer.attempt_opened(*orjson.loads(payload))

    handlers: dict[str, Callable[[str], None]] = {ATTEMPTS_CHANNEL: attempt}
    if FEED in app:
        feed = app[FEED]
        handlers[SPANS_CHANNEL] = lambda payload: feed.notify()
    return handlers
