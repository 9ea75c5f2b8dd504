"""Where budget counters live: in this process (exact under asyncio) or in Redis (one Lua
script per reservation, so replicas share one budget); `budget_state_pg.py` keeps them in
PostgreSQL. All speak plain dicts and floats.

A rollout's own budget is kept as the JSON text the caller gave; `reserve` takes the text
its limits came from and answers `{"stale": current}` instead of reserving when it changed,
so a caller can cache budgets and still never reserve under an outdated one.

A scope's usage is `{"calls", "tokens", "cost", "started"}`: tokens and cost include what
calls still in flight hold. Limits are `{"max_calls", "max_tokens", "max_cost_usd",
"max_seconds"}`, a missing or None one not applying.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, TypedDict

LIMIT_NAMES = ("max_calls", "max_tokens", "max_cost_usd", "max_seconds")
Usage = dict[str, float]
Limits = dict[str, float | None]
# Seconds a Redis command may take: a call waits no longer to learn its budget.
DEFAULT_REDIS_TIMEOUT = 2.0
# Rollouts whose counters one process keeps; older ones are seeded from the store again.
DEFAULT_MEMORY_CAPACITY = 100_000


class ReserveAsk(TypedDict):
    """One call's reservation in both its scopes (rollout, attempt): it holds `tokens` and
    `cost` and needs `need_tokens` and `need_cost` left to go ahead, under the budget text
    `expect` (`gateway.proxy.budgets` builds the same keys: store imports none of it)."""

    rollout_id: str
    attempt_id: str
    limits: tuple[Limits, Limits]
    tokens: float
    cost: float
    need_tokens: float
    need_cost: float
    now: float
    expect: str


def empty_usage() -> Usage:
    return {"calls": 0, "tokens": 0, "cost": 0.0, "started": 0.0}


def _refusal(usage: Usage, limits: Limits, ask: ReserveAsk) -> str | None:
    """The first limit this scope cannot take another call under, or None."""
    max_calls, max_tokens = limits.get("max_calls"), limits.get("max_tokens")
    max_cost, max_seconds = limits.get("max_cost_usd"), limits.get("max_seconds")
    if max_calls is not None and usage["calls"] + 1 > max_calls:
        return "max_calls"
    if max_tokens is not None and usage["tokens"] + ask["need_tokens"] > max_tokens:
        return "max_tokens"
    if max_cost is not None and usage["cost"] + ask["need_cost"] > max_cost:
        return "max_cost_usd"
    started = usage["started"]
    if max_seconds is not None and started and ask["now"] - started > max_seconds:
        return "max_seconds"
    return None


class _Rollout:
    __slots__ = ("attempts", "budget", "usage")

    def __init__(self, budget: str, usage: Usage) -> None:
        self.budget = budget
        self.usage = usage
        self.attempts: dict[str, Usage] = {}


class MemoryBudgetState:
    """Counters in this process. No method awaits inside, so each runs whole on the event
    loop: concurrent reservations are exact. Holds per process only."""

    def __init__(self, capacity: int = DEFAULT_MEMORY_CAPACITY) -> None:
        self._capacity = capacity
        self._rollouts: OrderedDict[str, _Rollout] = OrderedDict()

    def _get(self, rollout_id: str) -> _Rollout | None:
        entry = self._rollouts.get(rollout_id)
        if entry is not None:
            self._rollouts.move_to_end(rollout_id)
        return entry

    async def budget(self, rollout_id: str) -> str | None:
        entry = self._get(rollout_id)
        return None if entry is None else entry.budget

    async def seed(
        self, rollout_id: str, budget: str, usage: Usage, attempts: dict[str, Usage]
    ) -> None:
        if rollout_id in self._rollouts:
            return
        entry = self._rollouts[rollout_id] = _Rollout(budget, dict(usage))
        entry.attempts = {aid: dict(u) for aid, u in attempts.items()}
        if len(self._rollouts) > self._capacity:
            self._rollouts.popitem(last=False)

    async def set_budget(self, rollout_id: str, budget: str) -> None:
        entry = self._get(rollout_id)
        if entry is not None:
            entry.budget = budget

    async def reserve(self, ask: ReserveAsk) -> dict[str, Any] | None:
        """None when the rollout is not seeded; `{"stale": budget}` when its budget is no
        longer `expect`; else `{"refused": (scope, limit) | None, "usage": [rollout usage,
        attempt usage]}`, usage as it was before this call."""
        entry = self._get(ask["rollout_id"])
        if entry is None:
            return None
        if entry.budget != ask["expect"]:
            return {"stale": entry.budget}
        scopes = [entry.usage, entry.attempts.setdefault(ask["attempt_id"], empty_usage())]
        before = [dict(u) for u in scopes]
        for index, (usage, scope_limits) in enumerate(zip(scopes, ask["limits"], strict=True)):
            limit = _refusal(usage, scope_limits, ask)
            if limit is not None:
                return {"refused": (index, limit), "usage": before}
        for usage in scopes:
            usage["calls"] += 1
            usage["tokens"] += ask["tokens"]
            usage["cost"] += ask["cost"]
            usage["started"] = usage["started"] or ask["now"]
        return {"refused": None, "usage": before}

    def count_now(self, rollout_id: str, attempt_id: str, expect: str, now: float) -> bool:
        """Count a call no limit holds (nothing reserved: `settle_now` adds what it used);
        False, counting nothing, when the rollout is not seeded or its budget is not `expect`."""
        entry = self._get(rollout_id)
        if entry is None or entry.budget != expect:
            return False
        attempt = entry.attempts.get(attempt_id)
        if attempt is None:
            attempt = entry.attempts[attempt_id] = empty_usage()
        for usage in (entry.usage, attempt):
            usage["calls"] += 1
            if not usage["started"]:
                usage["started"] = now
        return True

    async def settle(self, rollout_id: str, attempt_id: str, *, tokens: float, cost: float) -> None:
        """Replace a call's reserved tokens and cost by what it really used (the difference)."""
        self.settle_now(rollout_id, attempt_id, tokens=tokens, cost=cost)

    def settle_now(self, rollout_id: str, attempt_id: str, *, tokens: float, cost: float) -> None:
        entry = self._rollouts.get(rollout_id)
        if entry is None:
            return
        for usage in (entry.usage, entry.attempts.get(attempt_id)):
            if usage is not None:
                usage["tokens"] = max(usage["tokens"] + tokens, 0)
                usage["cost"] = max(usage["cost"] + cost, 0.0)

    async def read(self, rollout_id: str) -> dict[str, Any] | None:
        entry = self._rollouts.get(rollout_id)
        if entry is None:
            return None
        return {
            "budget": entry.budget,
            "usage": dict(entry.usage),
            "attempts": {aid: dict(u) for aid, u in entry.attempts.items()},
        }

    async def close(self) -> None:
        return None


# Redis: a rollout is a hash (usage fields plus `budget`, its API-set budget as JSON); each
# attempt is a hash of usage fields; the rollout hash lists its attempts in `attempts`.
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local now = tonumber(ARGV[1])
local tokens, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local need_tokens, need_cost = tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local budget = redis.call('HGET', KEYS[1], 'budget') or '{}'
if budget ~= ARGV[16] then return {'stale', budget} end
local usage = {}
for i = 1, 2 do
  local h = redis.call('HMGET', KEYS[i], 'calls', 'tokens', 'cost', 'started')
  local u = {tonumber(h[1]) or 0, tonumber(h[2]) or 0, tonumber(h[3]) or 0, tonumber(h[4]) or 0}
  usage[i] = u
end
local out = {}
for i = 1, 2 do
  local u = usage[i]
  local base = 6 + (i - 1) * 4
  local max_calls, max_tokens = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local max_cost, max_seconds = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  for _, v in ipairs(u) do table.insert(out, string.format('%.17g', v)) end
  local limit = nil
  if max_calls and u[1] + 1 > max_calls then limit = 'max_calls'
  elseif max_tokens and u[2] + need_tokens > max_tokens then limit = 'max_tokens'
  elseif max_cost and u[3] + need_cost > max_cost then limit = 'max_cost_usd'
  elseif max_seconds and u[4] > 0 and now - u[4] > max_seconds then limit = 'max_seconds'
  end
  if limit then
    if i == 1 then
      local h = redis.call('HMGET', KEYS[2], 'calls', 'tokens', 'cost', 'started')
      for j = 1, 4 do table.insert(out, string.format('%.17g', tonumber(h[j]) or 0)) end
    end
    table.insert(out, tostring(i))
    table.insert(out, limit)
    return out
  end
end
for i = 1, 2 do
  redis.call('HINCRBY', KEYS[i], 'calls', 1)
  redis.call('HINCRBYFLOAT', KEYS[i], 'tokens', tokens)
  redis.call('HINCRBYFLOAT', KEYS[i], 'cost', cost)
  if usage[i][4] == 0 then redis.call('HSET', KEYS[i], 'started', ARGV[1]) end
  redis.call('EXPIRE', KEYS[i], ttl)
end
redis.call('HSET', KEYS[1], 'attempt:' .. ARGV[15], '1')
-- Every attempt of the rollout lives as long as the rollout does: an attempt's counters
-- expiring while its rollout goes on would read as an attempt that never spent anything.
local prefix = string.sub(KEYS[2], 1, #KEYS[2] - #ARGV[15])
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 8) == 'attempt:' then
    redis.call('EXPIRE', prefix .. string.sub(field, 9), ttl)
  end
end
return out
"""

_SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ttl = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'budget', ARGV[2], 'calls', ARGV[3], 'tokens', ARGV[4],
           'cost', ARGV[5], 'started', ARGV[6])
redis.call('EXPIRE', KEYS[1], ttl)
local i = 7
local k = 2
while ARGV[i] do
  redis.call('DEL', KEYS[k])
  redis.call('HSET', KEYS[k], 'calls', ARGV[i + 1], 'tokens', ARGV[i + 2], 'cost', ARGV[i + 3],
             'started', ARGV[i + 4])
  redis.call('EXPIRE', KEYS[k], ttl)
  redis.call('HSET', KEYS[1], 'attempt:' .. ARGV[i], '1')
  i = i + 5
  k = k + 1
end
return 1
"""

_SET_BUDGET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'budget', ARGV[1])
return 1
"""

_SETTLE = """
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local t = redis.call('HINCRBYFLOAT', KEYS[i], 'tokens', ARGV[1])
    if tonumber(t) < 0 then redis.call('HSET', KEYS[i], 'tokens', 0) end
    local c = redis.call('HINCRBYFLOAT', KEYS[i], 'cost', ARGV[2])
    if tonumber(c) < 0 then redis.call('HSET', KEYS[i], 'cost', 0) end
  end
end
return 1
"""

USAGE_FIELDS = ("calls", "tokens", "cost", "started")


def _rollout_key(rollout_id: str) -> str:
    return f"spangate:budget:r:{rollout_id}"


def _attempt_key(rollout_id: str, attempt_id: str) -> str:
    # The rollout id's length keeps `a:b` + `c` apart from `a` + `b:c`.
    return f"spangate:budget:a:{len(rollout_id)}:{rollout_id}:{attempt_id}"


def _limit_args(limits: Limits) -> list[str]:
    return ["" if limits.get(name) is None else repr(limits[name]) for name in LIMIT_NAMES]


def _usage_args(usage: Usage) -> list[str]:
    # `calls` must stay an integer for HINCRBY.
    return [str(int(usage["calls"])), *(repr(float(usage[n])) for n in USAGE_FIELDS[1:])]


def _usage(values: list[Any]) -> Usage:
    calls, tokens, cost, started = (float(v) if v is not None else 0.0 for v in values)
    return {"calls": calls, "tokens": tokens, "cost": cost, "started": started}


class RedisBudgetState:
    """Counters in Redis: every reservation is one Lua script, atomic across replicas."""

    def __init__(self, url: str, *, ttl: float) -> None:
        import redis.asyncio as aioredis

        from store.shared_state import reconnecting

        # Half the bound each: a command sent again on a new connection still fits in it.
        self._redis = aioredis.from_url(
            url,
            decode_responses=True,
            socket_timeout=DEFAULT_REDIS_TIMEOUT / 2,
            socket_connect_timeout=DEFAULT_REDIS_TIMEOUT / 2,
            **reconnecting(),
        )
        self._ttl = max(math.ceil(ttl), 1)
        self._reserve = self._redis.register_script(_RESERVE)
        self._seed = self._redis.register_script(_SEED)
        self._set_budget = self._redis.register_script(_SET_BUDGET)
        self._settle = self._redis.register_script(_SETTLE)

    async def budget(self, rollout_id: str) -> str | None:
        value = await self._redis.hget(_rollout_key(rollout_id), "budget")
        # decode_responses=True: redis-py's types still say bytes | str.
        return None if value is None else str(value)

    async def seed(
        self, rollout_id: str, budget: str, usage: Usage, attempts: dict[str, Usage]
    ) -> None:
        keys = [_rollout_key(rollout_id)]
        args: list[Any] = [self._ttl, budget]
        args += _usage_args(usage)
        for attempt_id, attempt in attempts.items():
            keys.append(_attempt_key(rollout_id, attempt_id))
            args += [attempt_id, *_usage_args(attempt)]
        await self._seed(keys=keys, args=args)

    async def set_budget(self, rollout_id: str, budget: str) -> None:
        await self._set_budget(keys=[_rollout_key(rollout_id)], args=[budget])

    async def reserve(self, ask: ReserveAsk) -> dict[str, Any] | None:
        rollout_id, attempt_id, limits = ask["rollout_id"], ask["attempt_id"], ask["limits"]
        keys = [_rollout_key(rollout_id), _attempt_key(rollout_id, attempt_id)]
        amounts = (ask["now"], ask["tokens"], ask["cost"], ask["need_tokens"], ask["need_cost"])
        args = [*map(repr, amounts), str(self._ttl), *_limit_args(limits[0])]
        args += [*_limit_args(limits[1]), attempt_id]
        out = await self._reserve(keys=keys, args=[*args, ask["expect"]])
        if out is None:
            return None
        if out[0] == "stale":
            return {"stale": out[1]}
        usage = [_usage(out[0:4]), _usage(out[4:8])]
        refused = (int(out[8]) - 1, out[9]) if len(out) > 8 else None
        return {"refused": refused, "usage": usage}

    async def settle(self, rollout_id: str, attempt_id: str, *, tokens: float, cost: float) -> None:
        keys = [_rollout_key(rollout_id), _attempt_key(rollout_id, attempt_id)]
        await self._settle(keys=keys, args=[repr(tokens), repr(cost)])

    async def read(self, rollout_id: str) -> dict[str, Any] | None:
        row = await self._redis.hgetall(_rollout_key(rollout_id))
        if not row:
            return None
        names = [str(name) for name in row]
        attempt_ids = [
            name.removeprefix("attempt:") for name in names if name.startswith("attempt:")
        ]
        attempts: dict[str, Usage] = {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for attempt_id in attempt_ids:
                pipe.hmget(_attempt_key(rollout_id, attempt_id), *USAGE_FIELDS)
            for attempt_id, values in zip(attempt_ids, await pipe.execute(), strict=True):
                if any(v is not None for v in values):
                    attempts[attempt_id] = _usage(values)
        return {
            "budget": row.get("budget") or "{}",
            "usage": _usage([row.get(name) for name in USAGE_FIELDS]),
            "attempts": attempts,
        }

    async def close(self) -> None:
        await self._redis.aclose()
