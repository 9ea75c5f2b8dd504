"""Budget counters in PostgreSQL (the `budget_usage` table), so replicas sharing one store
share budgets without Redis: one round trip per reservation and one per settle.

A reservation is one call of `spangate_budget_reserve` (migration 0006), which locks the
rollout's row and then checks and counts both scopes, so it is exact across replicas. The
rows outlive a restart; a rollout seen for the first time is seeded from what the store
recorded, as with the other states. Every statement runs on an asyncio connection pool and
under a deadline; a failure opens a breaker, so while the server is away calls learn it at
once instead of each waiting for a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pybreaker

from store.backend import mask_url
from store.budget_state import LIMIT_NAMES, USAGE_FIELDS, Limits, ReserveAsk, Usage
from store.errors import StoreUnavailable
from store.shared_state import autocommit_pool

T = TypeVar("T")
# Connections of one replica's budget pool: a reservation holds one for a round trip.
DEFAULT_PG_POOL_SIZE = 8
# Seconds one budget statement may take, waiting for a connection included.
DEFAULT_PG_TIMEOUT = 2.0
# Seconds a replica answers at once that the budget state is away, after a failure.
PG_RETRY_SECONDS = 2.0

RESERVE_SQL = """
select outcome, budget, scope, limit_name, usage
from spangate_budget_reserve(
    %(rollout)s, %(attempt)s, %(expect)s, %(now)s,
    %(tokens)s, %(cost)s, %(need_tokens)s, %(need_cost)s, %(limits)s::float8[]
)
"""

SETTLE_SQL = "select spangate_budget_settle(%(rollout)s, %(attempt)s, %(tokens)s, %(cost)s)"

# The rollout's row and its attempts' rows in one statement; attempts only when the rollout
# is new here, so a seed never overwrites counts another replica already made.
SEED_SQL = """
with seeded as (
    insert into budget_usage (rollout_id, attempt_id, budget, calls, tokens, cost, started)
    values (%(rollout)s, '', %(budget)s, %(calls)s, %(tokens)s, %(cost)s, %(started)s)
    on conflict (rollout_id, attempt_id) do nothing
    returning rollout_id
)
insert into budget_usage (rollout_id, attempt_id, calls, tokens, cost, started)
select seeded.rollout_id, a.attempt_id, a.calls, a.tokens, a.cost, a.started
from seeded,
     unnest(%(attempt_ids)s::text[], %(attempt_calls)s::bigint[], %(attempt_tokens)s::float8[],
            %(attempt_costs)s::float8[], %(attempt_starts)s::float8[])
         as a(attempt_id, calls, tokens, cost, started)
on conflict (rollout_id, attempt_id) do nothing
"""

BUDGET_SQL = "select budget from budget_usage where rollout_id = %(rollout)s and attempt_id = ''"

SET_BUDGET_SQL = """
update budget_usage set budget = %(budget)s
where rollout_id = %(rollout)s and attempt_id = ''
"""

READ_SQL = """
select attempt_id, budget, calls, tokens, cost, started
from budget_usage
where rollout_id = %(rollout)s
"""


def _limit_args(limits: tuple[Limits, Limits]) -> list[float | None]:
    return [
        None if scope.get(name) is None else float(scope[name] or 0)
        for scope in limits
        for name in LIMIT_NAMES
    ]


def _usage(values: Any) -> Usage:
    calls, tokens, cost, started = (float(v or 0) for v in values)
    return {"calls": calls, "tokens": tokens, "cost": cost, "started": started}


def _reraise(exc: BaseException) -> None:
    raise exc


def _nothing() -> None:
    return None


class PostgresBudgetState:
    """Counters in the store's `budget_usage` table: one reservation is one function call,
    atomic across every replica on the same PostgreSQL."""

    def __init__(
        self,
        url: str,
        *,
        size: int = DEFAULT_PG_POOL_SIZE,
        timeout: float = DEFAULT_PG_TIMEOUT,
    ) -> None:
        self.url = url
        self._timeout = timeout
        self._pool = autocommit_pool(url, size, "spangate-budget")
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=1, reset_timeout=PG_RETRY_SECONDS, name="budget-state"
        )

    async def open(self) -> None:
        """Connect at start, so a store that cannot be reached is said once, with the URL."""
        try:
            await self._pool.open(wait=True, timeout=10)
        except Exception as exc:
            raise StoreUnavailable(f"cannot open {mask_url(self.url)} for budgets: {exc}") from None

    async def _run(self, statement: Callable[[Any], Awaitable[T]]) -> T:
        """`statement(connection)` under the deadline and the breaker: while it is open,
        `CircuitBreakerError` at once."""
        # Fails while open; once the retry time is up the breaker closes and this call tries.
        self._breaker.call(_nothing)
        try:
            async with asyncio.timeout(self._timeout):
                async with self._pool.connection() as conn:
                    return await statement(conn)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self._breaker.call(_reraise, exc)
            raise

    async def _one(self, sql: str, params: dict[str, Any]) -> Any:
        async def run(conn: Any) -> Any:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchone()

        return await self._run(run)

    async def budget(self, rollout_id: str) -> str | None:
        row = await self._one(BUDGET_SQL, {"rollout": rollout_id})
        return None if row is None else str(row[0] or "{}")

    async def seed(
        self, rollout_id: str, budget: str, usage: Usage, attempts: dict[str, Usage]
    ) -> None:
        params: dict[str, Any] = {"rollout": rollout_id, "budget": budget}
        params.update({name: float(usage[name]) for name in USAGE_FIELDS})
        params["calls"] = int(usage["calls"])
        params["attempt_ids"] = list(attempts)
        params["attempt_calls"] = [int(u["calls"]) for u in attempts.values()]
        params["attempt_tokens"] = [float(u["tokens"]) for u in attempts.values()]
        params["attempt_costs"] = [float(u["cost"]) for u in attempts.values()]
        params["attempt_starts"] = [float(u["started"]) for u in attempts.values()]

        async def run(conn: Any) -> None:
            await conn.execute(SEED_SQL, params)

        await self._run(run)

    async def set_budget(self, rollout_id: str, budget: str) -> None:
        async def run(conn: Any) -> None:
            await conn.execute(SET_BUDGET_SQL, {"rollout": rollout_id, "budget": budget})

        await self._run(run)

    async def reserve(self, ask: ReserveAsk) -> dict[str, Any] | None:
        params = {
            "rollout": ask["rollout_id"],
            "attempt": ask["attempt_id"],
            "expect": ask["expect"],
            "now": float(ask["now"]),
            "tokens": float(ask["tokens"]),
            "cost": float(ask["cost"]),
            "need_tokens": float(ask["need_tokens"]),
            "need_cost": float(ask["need_cost"]),
            "limits": _limit_args(ask["limits"]),
        }
        outcome, budget, scope, limit, usage = await self._one(RESERVE_SQL, params)
        if outcome == "missing":
            return None
        if outcome == "stale":
            return {"stale": budget}
        both = [_usage(usage[0:4]), _usage(usage[4:8])]
        refused = (int(scope), str(limit)) if outcome == "refused" else None
        return {"refused": refused, "usage": both}

    async def settle(self, rollout_id: str, attempt_id: str, *, tokens: float, cost: float) -> None:
        params = {
            "rollout": rollout_id,
            "attempt": attempt_id,
            "tokens": float(tokens),
            "cost": float(cost),
        }
        await self._one(SETTLE_SQL, params)

    async def read(self, rollout_id: str) -> dict[str, Any] | None:
        async def run(conn: Any) -> list[Any]:
            cursor = await conn.execute(READ_SQL, {"rollout": rollout_id})
            return list(await cursor.fetchall())

        rows = await self._run(run)
        found = {row[0]: row for row in rows}
        own = found.pop("", None)
        if own is None:
            return None
        return {
            "budget": own[1] or "{}",
            "usage": _usage(own[2:6]),
            "attempts": {aid: _usage(row[2:6]) for aid, row in found.items()},
        }

    async def close(self) -> None:
        await self._pool.close()
