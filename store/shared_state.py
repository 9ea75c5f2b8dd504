"""State that replicas of one gateway share: rollout sequence counters and experiment variant
claims (PostgreSQL or Redis), and the Redis adapters for rate limits, breaker state and the
live span feed.

Everything here talks to an existing engine through its well-kept client (psycopg_pool,
redis-py, `limits`, pybreaker); nothing is kept in this process that another replica needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

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
# A key that is gone (Redis restarted empty, flushed) is made again only when asked to
# (ARGV[4]): otherwise -1, and the caller finds a floor in the store first.
REDIS_NEXT_SEQ_LUA = """
local found = redis.call('GET', KEYS[1])
if not found and ARGV[4] ~= '1' then return -1 end
local value = tonumber(found or '0')
local floor = tonumber(ARGV[2])
if value < floor then value = floor end
value = value + tonumber(ARGV[1])
redis.call('SET', KEYS[1], value, 'EX', ARGV[3])
return value
"""

REDIS_VARIANT_PREFIX = "spangate:variant:"
# The first claim of a key stands; every later one reads it back.
REDIS_CLAIM_LUA = """
local found = redis.call('GET', KEYS[1])
if found then return found end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""
# The same in one statement: a second claim updates nothing and returns the first's variant.
PG_CLAIM_VARIANT_SQL = """
INSERT INTO experiment_assignments (rollout_id, experiment, variant, created_ns)
VALUES (%(rid)s, %(experiment)s, %(variant)s, %(now)s)
ON CONFLICT (rollout_id, experiment) DO UPDATE SET variant = experiment_assignments.variant
RETURNING variant
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


class _OwnPool:
    """A small pool of autocommit connections kept for one purpose, opened and closed with
    the app."""

    def __init__(self, url: str, size: int, name: str, purpose: str) -> None:
        self.url = url
        self.purpose = purpose
        self.pool = autocommit_pool(url, size, name)

    async def open(self) -> None:
        try:
            await self.pool.open(wait=True, timeout=10)
        except Exception as exc:
            raise StoreUnavailable(
                f"cannot open {mask_url(self.url)} for {self.purpose}: {exc}"
            ) from None

    async def close(self) -> None:
        await self.pool.close()


class PostgresCounter(_OwnPool):
    """Sequence numbers from the `rollout_counters` row of each rollout (UPDATE ... RETURNING
    through an upsert), over a small pool of connections of their own."""

    def __init__(self, url: str, *, size: int = COUNTER_POOL_SIZE) -> None:
        super().__init__(url, size, "spangate-seq", "sequence numbers")

    async def allocate(
        self, rollout_id: str, count: int, floor: int = 0, *, create: bool = True
    ) -> int | None:
        # A counter row is never lost as a Redis key can be: `create` changes nothing here.
        async with self.pool.connection(timeout=COUNTER_CONNECT_TIMEOUT) as conn:
            cursor = await conn.execute(
                PG_NEXT_SEQ_SQL, {"rid": rollout_id, "n": count, "floor": floor}
            )
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


class RedisCounter:
    """Sequence numbers from one Redis key per rollout (a script: INCRBY above a floor)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.script = redis.register_script(REDIS_NEXT_SEQ_LUA)

    async def allocate(
        self, rollout_id: str, count: int, floor: int = 0, *, create: bool = True
    ) -> int | None:
        """The last of `count` numbers; None when the rollout's key is gone and `create` is
        false (the numbers it held are lost: the caller must find a floor elsewhere)."""
        key = REDIS_SEQ_PREFIX + rollout_id
        args = [count, floor, REDIS_SEQ_TTL_SECONDS, "1" if create else "0"]
        last = int(await self.script(keys=[key], args=args))
        return None if last < 0 else last


CLAIM_POOL_SIZE = 2


class PostgresClaims(_OwnPool):
    """First-come variant claims in `experiment_assignments`, over a small pool of their own
    (a burst of new rollouts never takes connections sequence numbers wait for)."""

    def __init__(self, url: str, *, size: int = CLAIM_POOL_SIZE) -> None:
        super().__init__(url, size, "spangate-claims", "experiment claims")

    async def claim_variant(self, experiment: str, rollout_id: str, variant: str) -> str:
        params = {
            "rid": rollout_id,
            "experiment": experiment,
            "variant": variant,
            "now": time.time_ns(),
        }
        async with self.pool.connection(timeout=COUNTER_CONNECT_TIMEOUT) as conn:
            cursor = await conn.execute(PG_CLAIM_VARIANT_SQL, params)
            row = await cursor.fetchone()
        assert row is not None
        return str(row[0])


class RedisClaims:
    """First-come variant claims, one Redis key per experiment and rollout."""

    def __init__(self, redis: Any) -> None:
        self.script = redis.register_script(REDIS_CLAIM_LUA)

    async def claim_variant(self, experiment: str, rollout_id: str, variant: str) -> str:
        # The name's length first: no experiment name and rollout id run into another pair.
        key = f"{REDIS_VARIANT_PREFIX}{len(experiment)}:{experiment}:{rollout_id}"
        found = await self.script(keys=[key], args=[variant, REDIS_SEQ_TTL_SECONDS])
        return found.decode() if isinstance(found, bytes) else str(found)


def redis_client(url: str) -> Any:
    """An asyncio redis-py client (connections are made on first use)."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(
        url, socket_connect_timeout=5, socket_timeout=5, **reconnecting()
    )


def reconnecting() -> dict[str, Any]:
    """asyncio redis-py options that send a command again, at once, on a new connection when
    its pooled one turns out dead (Redis restarted): `from_url` retries nothing by default,
    so the first command after a restart failed. Only a connection error is tried again, never
    a timeout: a slow Redis may still run the first copy, and an INCRBY run twice leaves a gap
    in a rollout's numbers. A command may then take two connect timeouts."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError

    return {"retry": Retry(NoBackoff(), 1, supported_errors=(ConnectionError,))}


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
                    try:
                        handlers[note.channel](note.payload)
                    except Exception:
                        # Anyone with the database can NOTIFY: one odd payload must not
                        # end this replica's listening.
                        log.exception("notification on %s not understood", note.channel)
        except psycopg.Error as exc:
            log.warning("notifications from %s lost (%s); listening again", mask_url(url), exc)
            await asyncio.sleep(LISTEN_RETRY_SECONDS)


# -- rate limits and breakers across replicas (Redis) ---------------------------------

RATE_WAIT_MAX_SECONDS = 1.0
# After Redis failed or was slow, how long a replica keeps to its own rate buckets and breaker
# state before asking Redis again: a Redis that is away costs nothing on every call.
REDIS_AWAY_SECONDS = 2.0
# The most one Redis command of the rate limiter or the breakers may take. Breaker reads block
# the event loop (pybreaker's storage is synchronous), so this bounds that block too.
REDIS_COMMAND_SECONDS = 0.25


class _Away:
    """When Redis last failed, for the clients that fall back to this replica's own state."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.until = 0.0

    @property
    def now(self) -> bool:
        return time.monotonic() < self.until

    def failed(self, exc: BaseException) -> None:
        if not self.now:
            log.warning(
                "Redis failed for %s (%s); this replica's own for %gs",
                self.what,
                " ".join(str(exc).split()) or type(exc).__name__,
                REDIS_AWAY_SECONDS,
            )
        self.until = time.monotonic() + REDIS_AWAY_SECONDS


class RedisRateLimits:
    """Per-minute budgets every replica draws from (`limits`' sliding window counter on
    Redis: two counters a key, so a tpm budget costs no more than an rpm one)."""

    def __init__(self, url: str) -> None:
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import SlidingWindowCounterRateLimiter

        self.storage = RedisStorage(
            f"async+{url}",
            implementation="redispy",
            socket_connect_timeout=REDIS_COMMAND_SECONDS,
            socket_timeout=REDIS_COMMAND_SECONDS,
            **reconnecting(),
        )
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)
        self.away = _Away("rate limits")
        from redis.exceptions import RedisError

        self._failures = (TimeoutError, OSError, RedisError)

    async def close(self) -> None:
        """Close the Redis client `limits` made (it has no close of its own); left to the
        garbage collector, its sockets would be reported unclosed."""
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        if client is not None:
            await client.aclose()

    async def acquire(
        self, key: str, per_minute: int, amount: int, max_wait: float
    ) -> float | None:
        """Take `amount` of the `per_minute` budget under `key`, trying again (with backoff)
        for up to `max_wait` s; 0.0 once taken, else seconds until it could be, None when
        Redis cannot say (down, slow, refusing): the caller limits on its own meanwhile."""
        if self.away.now:
            return None
        try:
            async with asyncio.timeout(max_wait + REDIS_COMMAND_SECONDS):
                return await self._acquire(key, per_minute, amount, max_wait)
        except self._failures as exc:
            self.away.failed(exc)
            return None

    async def _acquire(self, key: str, per_minute: int, amount: int, max_wait: float) -> float:
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


class _BreakerRedis:
    """The breakers' Redis client: a command that fails marks Redis away, and while it is away
    commands fail at once, off the network (pybreaker's storage then falls back)."""

    def __init__(self, client: Any, away: _Away) -> None:
        from redis.exceptions import ConnectionError, RedisError

        self._client = client
        self.away = away
        self.errors, self._refused = RedisError, ConnectionError

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def command(*args: Any, **kwargs: Any) -> Any:
            if self.away.now:
                raise self._refused("Redis is away; breakers are this replica's own")
            try:
                return method(*args, **kwargs)
            except self.errors as exc:
                self.away.failed(exc)
                raise

        return command


# pybreaker logs a traceback for every Redis command that fails; `_Away` says it once.
_QUIET = logging.getLogger("spangate.breaker-redis")
_QUIET.disabled = True


def redis_breaker_storage(
    url: str, *, read_seconds: float = BREAKER_READ_SECONDS
) -> Callable[[str], Any]:
    """pybreaker's own Redis storage, one namespace per deployment, read through a short
    cache; the state a replica opens is what every replica reads within `read_seconds`.
    While Redis is away, each replica keeps its breakers on its own."""
    import redis

    # No second try on a dead connection here: this client blocks the event loop, and a
    # failure only means this replica's own breakers for a moment.
    client = redis.Redis.from_url(
        url, socket_connect_timeout=REDIS_COMMAND_SECONDS, socket_timeout=REDIS_COMMAND_SECONDS
    )
    shared_client = _BreakerRedis(client, _Away("breakers"))

    def storage(label: str) -> Any:
        def shared() -> pybreaker.CircuitBreakerStorage:
            made = pybreaker.CircuitRedisStorage(
                # Used as a Redis client: pybreaker only calls its commands.
                pybreaker.STATE_CLOSED,
                cast(Any, shared_client),
                namespace=f"spangate:{label}",
            )
            made.logger = _QUIET
            return made

        return ReadThroughStorage(shared, shared_client, read_seconds)

    return storage


class ReadThroughStorage(pybreaker.CircuitBreakerStorage):
    """A pybreaker storage that answers state and failure-count reads from what it read or
    wrote within `read_seconds`; every write goes to the shared storage at once. Every write
    also goes to a storage of this replica's own, which answers while Redis is away."""

    def __init__(
        self,
        make_shared: Callable[[], pybreaker.CircuitBreakerStorage],
        client: _BreakerRedis,
        read_seconds: float,
    ) -> None:
        super().__init__("redis")
        self._make_shared = make_shared
        self._shared_storage: pybreaker.CircuitBreakerStorage | None = None
        self._client = client
        self._away = client.away
        self._own = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._read_seconds = read_seconds
        self._state: tuple[float, str] | None = None
        self._counter: tuple[float, int] | None = None

    @property
    def _shared(self) -> pybreaker.CircuitBreakerStorage | None:
        """The Redis storage, made once Redis answers (its constructor writes); None while
        Redis is away."""
        if self._away.now:
            return None
        if self._shared_storage is None:
            try:
                self._shared_storage = self._make_shared()
            except self._client.errors:
                return None
        return self._shared_storage

    def _stale(self, cached: tuple[float, Any] | None) -> bool:
        return cached is None or time.monotonic() - cached[0] >= self._read_seconds

    def _read(self, name: str) -> Any:
        """A value from Redis, or this replica's own when Redis is away (or went away in
        the read: pybreaker answers a default then, or raises from a re-initialisation)."""
        shared = self._shared
        try:
            value = getattr(shared, name) if shared is not None else None
        except self._client.errors:
            shared = None
        if shared is None or self._away.now:
            return getattr(self._own, name)
        return value

    def _write(self, write: Callable[[pybreaker.CircuitBreakerStorage], None]) -> None:
        """`write` to this replica's own storage, and to Redis unless it is away."""
        write(self._own)
        shared = self._shared
        if shared is not None:
            with contextlib.suppress(self._client.errors):
                write(shared)

    @property
    def state(self) -> str:
        if self._stale(self._state):
            # Stamped once read: a slow read must not come back stale already.
            value = str(self._read("state"))
            self._state = (time.monotonic(), value)
        assert self._state is not None
        return self._state[1]

    @state.setter
    def state(self, state: str) -> None:
        self._write(lambda storage: setattr(storage, "state", state))
        self._state = (time.monotonic(), str(state))

    @property
    def counter(self) -> int:
        if self._stale(self._counter):
            value = int(self._read("counter"))
            self._counter = (time.monotonic(), value)
        assert self._counter is not None
        return self._counter[1]

    def increment_counter(self) -> None:
        self._write(lambda storage: storage.increment_counter())
        self._counter = None

    def reset_counter(self) -> None:
        self._write(lambda storage: storage.reset_counter())
        self._counter = (time.monotonic(), 0)

    def increment_success_counter(self) -> None:
        self._write(lambda storage: storage.increment_success_counter())

    def reset_success_counter(self) -> None:
        self._write(lambda storage: storage.reset_success_counter())

    @property
    def success_counter(self) -> int:
        return int(self._read("success_counter"))

    @property
    def opened_at(self) -> datetime | None:
        value: datetime | None = self._read("opened_at")
        return value

    @opened_at.setter
    def opened_at(self, when: datetime) -> None:
        self._write(lambda storage: setattr(storage, "opened_at", when))
