"""State that replicas of one gateway share: rollout sequence counters (PostgreSQL or Redis),
and the Redis adapters for rate limits, breaker state and the live span feed.

Everything here talks to an existing engine through its well-kept client (psycopg_pool,
redis-py, `limits`, pybreaker); nothing is kept in this process that another replica needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pybreaker

from store.backend import libpq_url, mask_url
from store.errors import StoreUnavailable

log = logging.getLogger("spangate.shared")

COUNTER_POOL_SIZE = 4
REDIS_SEQ_PREFIX = "spangate:seq:"
# A rollout's counter outlives any plausible gap between two of its calls.
REDIS_SEQ_TTL_SECONDS = 30 * 86400

# One statement, atomic under concurrency: the row starts at the caller's floor (what the
# store and this replica already numbered), then only ever rises.
PG_NEXT_SEQ_SQL = """
INSERT INTO rollout_counters (rollout_id, seq)
VALUES (%(rid)s, %(floor)s + %(n)s)
ON CONFLICT (rollout_id) DO UPDATE SET seq = greatest(rollout_counters.seq, %(floor)s) + %(n)s
RETURNING seq
"""
COUNTER_CONNECT_TIMEOUT = 1.0

# INCRBY that never lands at or below the floor; the key expires long after its last use.
REDIS_NEXT_SEQ_LUA = """
local value = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[2])
if value < floor then value = floor end
value = value + tonumber(ARGV[1])
redis.call('SET', KEYS[1], value, 'EX', ARGV[3])
return value
"""


def autocommit_pool(url: str, size: int, name: str) -> Any:
    """An async pool of autocommit connections of this replica's own (opened by the caller),
    named so `pg_stat_activity` says what each is for."""
    from psycopg_pool import AsyncConnectionPool

    return AsyncConnectionPool(
        libpq_url(url),
        min_size=1,
        max_size=size,
        kwargs={"autocommit": True, "application_name": name},
        open=False,
    )


class PostgresCounter:
    """Sequence numbers from the `rollout_counters` row of each rollout (UPDATE ... RETURNING
    through an upsert), over a small pool of connections of their own."""

    def __init__(self, url: str, *, size: int = COUNTER_POOL_SIZE) -> None:
        self.url = url
        self.pool = autocommit_pool(url, size, "spangate-seq")

    async def open(self) -> None:
        try:
            await self.pool.open(wait=True, timeout=10)
        except Exception as exc:
            raise StoreUnavailable(
                f"cannot open {mask_url(self.url)} for sequence numbers: {exc}"
            ) from None

    async def allocate(self, rollout_id: str, count: int, floor: int = 0) -> int:
        async with self.pool.connection(timeout=COUNTER_CONNECT_TIMEOUT) as conn:
            cursor = await conn.execute(
                PG_NEXT_SEQ_SQL, {"rid": rollout_id, "n": count, "floor": floor}
            )
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def close(self) -> None:
        await self.pool.close()


class RedisCounter:
    """Sequence numbers from one Redis key per rollout (a script: INCRBY above a floor)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.script = redis.register_script(REDIS_NEXT_SEQ_LUA)

    async def allocate(self, rollout_id: str, count: int, floor: int = 0) -> int:
        key = REDIS_SEQ_PREFIX + rollout_id
        return int(await self.script(keys=[key], args=[count, floor, REDIS_SEQ_TTL_SECONDS]))


def redis_client(url: str) -> Any:
    """An asyncio redis-py client (connections are made on first use)."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)


SPANS_CHANNEL = "spangate_spans"
LISTEN_RETRY_SECONDS = 1.0


async def listen(url: str, handlers: dict[str, Callable[[str], None]]) -> None:
    """Call `handlers[channel](payload)` for each notification on those channels (PostgreSQL
    LISTEN/NOTIFY: any replica's commits); runs until cancelled, opening the connection again
    after a failure."""
    import asyncio

    import psycopg

    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                libpq_url(url), autocommit=True, application_name="spangate-listen"
            )
            async with conn:
                for channel in handlers:
                    await conn.execute(f"LISTEN {channel}")
                async for note in conn.notifies():
                    handlers[note.channel](note.payload)
        except psycopg.Error as exc:
            log.warning("notifications from %s lost (%s); listening again", mask_url(url), exc)
            await asyncio.sleep(LISTEN_RETRY_SECONDS)


# -- rate limits and breakers across replicas (Redis) ---------------------------------

RATE_WAIT_MAX_SECONDS = 1.0


class RedisRateLimits:
    """Per-minute budgets every replica draws from (`limits`' sliding window counter on
    Redis: two counters a key, so a tpm budget costs no more than an rpm one)."""

    def __init__(self, url: str) -> None:
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import SlidingWindowCounterRateLimiter

        self.storage = RedisStorage(f"async+{url}", implementation="redispy")
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)

    async def acquire(self, key: str, per_minute: int, amount: int, max_wait: float) -> float:
        """Take `amount` of the `per_minute` budget under `key`, trying again (with backoff)
        for up to `max_wait` s; 0.0 once taken, else seconds until it could be."""
        import time

        from limits import RateLimitItemPerMinute
        from tenacity import AsyncRetrying, retry_if_result, stop_after_delay, wait_exponential

        item = RateLimitItemPerMinute(per_minute, namespace="spangate")
        retrying = AsyncRetrying(
            retry=retry_if_result(lambda taken: not taken),
            stop=stop_after_delay(max_wait),
            wait=wait_exponential(multiplier=0.05, max=RATE_WAIT_MAX_SECONDS),
            retry_error_callback=lambda state: False,
        )
        if await retrying(self.limiter.hit, item, key, cost=amount):
            return 0.0
        stats = await self.limiter.get_window_stats(item, key)
        return max(stats.reset_time - time.time(), 0.001)


# How long a replica trusts the breaker state and failure count it last read from Redis.
# Well inside the 1 s in which a breaker one replica opens must be open for all, and it
# takes the round trips (two to four a call, each blocking the event loop) off nearly
# every call.
BREAKER_READ_SECONDS = 0.2


def redis_breaker_storage(
    url: str, *, read_seconds: float = BREAKER_READ_SECONDS
) -> Callable[[str], Any]:
    """pybreaker's own Redis storage, one namespace per deployment, read through a short
    cache; the state a replica opens is what every replica reads within `read_seconds`."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)

    def storage(label: str) -> Any:
        shared = pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, client, namespace=f"spangate:{label}"
        )
        return ReadThroughStorage(shared, read_seconds)

    return storage


class ReadThroughStorage(pybreaker.CircuitBreakerStorage):
    """A pybreaker storage that answers state and failure-count reads from what it read or
    wrote within `read_seconds`; every write goes to the shared storage at once."""

    def __init__(self, shared: pybreaker.CircuitBreakerStorage, read_seconds: float) -> None:
        super().__init__(shared.name)
        self._shared = shared
        self._read_seconds = read_seconds
        self._state: tuple[float, str] | None = None
        self._counter: tuple[float, int] | None = None

    def _stale(self, cached: tuple[float, Any] | None) -> bool:
        return cached is None or time.monotonic() - cached[0] >= self._read_seconds

    @property
    def state(self) -> str:
        if self._state is None or self._stale(self._state):
            self._state = (time.monotonic(), self._shared.state)
        return self._state[1]

    @state.setter
    def state(self, state: str) -> None:
        self._shared.state = state
        self._state = (time.monotonic(), str(state))

    @property
    def counter(self) -> int:
        if self._counter is None or self._stale(self._counter):
            self._counter = (time.monotonic(), self._shared.counter)
        return self._counter[1]

    def increment_counter(self) -> None:
        self._shared.increment_counter()
        self._counter = None

    def reset_counter(self) -> None:
        self._shared.reset_counter()
        self._counter = (time.monotonic(), 0)

    def increment_success_counter(self) -> None:
        self._shared.increment_success_counter()

    def reset_success_counter(self) -> None:
        self._shared.reset_success_counter()

    @property
    def success_counter(self) -> int:
        return self._shared.success_counter

    @property
    def opened_at(self) -> datetime | None:
        return self._shared.opened_at

    @opened_at.setter
    def opened_at(self, when: datetime) -> None:
        self._shared.opened_at = when
