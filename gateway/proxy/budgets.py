"""Per-rollout and per-attempt budgets: which limits hold for a call, reserving before it goes
upstream, settling with real usage after, the `max_tokens` clamp and the remaining headers.

Counters live in a `BudgetState` the composition root injects (in-process, PostgreSQL or
Redis), so the check-and-reserve is one atomic step wherever the state is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

import orjson
import pybreaker

from config.models import DEFAULT_MAX_TOKENS_ESTIMATE, BudgetSettings, ModelGroup
from gateway.errors import BudgetExceeded, BudgetUnavailable, InvalidRequest
from gateway.proxy.cost import Price
from gateway.proxy.resilience import prompt_tokens

if TYPE_CHECKING:
    from gateway.proxy.call import Call

log = logging.getLogger("spangate.budgets")
LIMIT_NAMES = ("max_calls", "max_tokens", "max_cost_usd", "max_seconds")
SCOPES = ("rollout", "attempt")
# Headers that lower the rollout's limits for the call that sends them.
LOWERING_HEADERS = {
    "X-Budget-Max-Calls": "max_calls",
    "X-Budget-Max-Tokens": "max_tokens",
    "X-Budget-Max-Cost-Usd": "max_cost_usd",
}
REMAINING_HEADERS = {
    "max_calls": "X-Budget-Remaining-Calls",
    "max_tokens": "X-Budget-Remaining-Tokens",
    "max_cost_usd": "X-Budget-Remaining-Cost-Usd",
    "max_seconds": "X-Budget-Remaining-Seconds",
}
# The reply field a clamp sets when the client set none, per operation.
REPLY_CAP_FIELD = {
    "chat": "max_completion_tokens",
    "text_completion": "max_tokens",
    "responses": "max_output_tokens",
}
REPLY_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Rollouts whose budget JSON is cached here, and reservations tried against a changing one.
KNOWN_BUDGETS = 10_000
RESERVE_TRIES = 3
# Without the clamp a call is let through while anything at all is left.
MIN_COST = 1e-9

Limits = dict[str, float | None]
Usage = dict[str, float]
# `rollout_id -> {"budget": {...}, "agent": ..., "usage": Usage, "attempts": {id: Usage}}`.
BudgetLookup = Callable[[str], Awaitable[dict[str, Any]]]


class ReserveAsk(TypedDict):
    """One call's reservation in both scopes, as `BudgetState.reserve` takes it: the call
    holds `tokens` and `cost` and needs `need_tokens` and `need_cost` left to go ahead,
    under the budget text `expect` (`store.budget_state` declares the same keys)."""

    rollout_id: str
    attempt_id: str
    limits: tuple[Limits, Limits]
    tokens: float
    cost: float
    need_tokens: float
    need_cost: float
    now: float
    expect: str


class BudgetState(Protocol):
    """Where the counters live; every method is one atomic step on them."""

    async def budget(self, rollout_id: str) -> str | None: ...

    async def seed(
        self, rollout_id: str, budget: str, usage: Usage, attempts: dict[str, Usage]
    ) -> None: ...

    async def set_budget(self, rollout_id: str, budget: str) -> None: ...

    async def reserve(self, ask: ReserveAsk) -> dict[str, Any] | None: ...

    async def settle(
        self, rollout_id: str, attempt_id: str, *, tokens: float, cost: float
    ) -> None: ...

    async def read(self, rollout_id: str) -> dict[str, Any] | None: ...

    async def close(self) -> None: ...


class LocalBudgetState(BudgetState, Protocol):
    """A state in this process's memory: it never waits, so these are called plainly."""

    def count_now(self, rollout_id: str, attempt_id: str, expect: str, now: float) -> bool: ...

    def settle_now(
        self, rollout_id: str, attempt_id: str, *, tokens: float, cost: float
    ) -> None: ...


@dataclass(slots=True)
class Reservation:
    """What one call reserved (or was refused), and what it really used once known."""

    rollout_id: str
    attempt_id: str
    limits: tuple[Limits, Limits]
    usage: list[Usage]
    admitted: bool
    tokens: float = 0.0
    cost: float = 0.0
    now: float = 0.0
    used_tokens: float | None = None
    used_cost: float | None = None
    # `(scope, limit)` that refused the call; the reply caps a clamp changed.
    refused: tuple[str, str] | None = None
    clamp: dict[str, Any] | None = None

    @property
    def limited(self) -> bool:
        """Whether any limit holds for the call (`merge` and `lowered` keep only those)."""
        return bool(self.limits[0] or self.limits[1])

    def remaining(self) -> dict[str, float]:
        """Per limit in force, the least left over both scopes after this call."""
        left: dict[str, float] = {}
        if not self.limited:
            return left
        calls = 1 if self.admitted else 0
        tokens = self.tokens if self.used_tokens is None else self.used_tokens
        cost = self.cost if self.used_cost is None else self.used_cost
        for limits, usage in zip(self.limits, self.usage, strict=True):
            if not limits:
                continue  # `merge` and `lowered` keep only limits in force
            spent = {
                "max_calls": usage["calls"] + calls,
                "max_tokens": usage["tokens"] + (tokens if self.admitted else 0),
                "max_cost_usd": usage["cost"] + (cost if self.admitted else 0),
                "max_seconds": self.now - (usage["started"] or self.now),
            }
            for name, limit in limits.items():
                if limit is not None:
                    value = max(limit - spent[name], 0)
                    left[name] = min(left.get(name, value), value)
        return left

    def headers(self) -> dict[str, str]:
        out = {}
        for name, value in self.remaining().items():
            if name == "max_cost_usd":
                out[REMAINING_HEADERS[name]] = f"{value:.6f}"
            elif name == "max_seconds":
                out[REMAINING_HEADERS[name]] = f"{value:.1f}"
            else:
                out[REMAINING_HEADERS[name]] = str(int(value))
        return out


def encode(budget: Mapping[str, Any]) -> str:
    """One text per budget, so states can compare budgets as strings."""
    return orjson.dumps(budget, option=orjson.OPT_SORT_KEYS).decode()


def merge(*layers: Mapping[str, Any] | None) -> Limits:
    """Later layers replace earlier ones limit by limit; an unset limit leaves it alone."""
    limits: Limits = {}
    for layer in layers:
        for name, value in (layer or {}).items():
            if name in LIMIT_NAMES and value is not None:
                limits[name] = value
    return limits


def lowered(limits: Limits, headers: Mapping[str, str]) -> Limits:
    """`limits` with each `X-Budget-Max-*` header applied, only ever downwards; `limits`
    itself when no such header came (callers never change a limits dict)."""
    out = limits
    for header, name in LOWERING_HEADERS.items():
        raw = headers.get(header)
        if raw is None:
            continue
        if out is limits:
            out = dict(limits)
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise InvalidRequest(f"{header} must be a number >= 0, not {raw!r}", param=header)
        current = out.get(name)
        out[name] = value if current is None else min(current, value)
    return out


def _reply_cap(call: Call) -> int:
    for name in REPLY_CAP_FIELDS:
        value = call.payload.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return 0 if call.operation == "embeddings" else DEFAULT_MAX_TOKENS_ESTIMATE


def _amount(name: str, value: float) -> str:
    if name == "max_cost_usd":
        return f"${value:.6f}"
    if name == "max_seconds":
        return f"{value:.1f}s"
    return f"{int(value)} {'calls' if name == 'max_calls' else 'tokens'}"


def refusal_message(scope: str, who: str, limit: str, cap: float, usage: Usage, now: float) -> str:
    if limit == "max_seconds":
        spent = now - usage["started"]
        return (
            f"{scope} {who} budget exceeded: {limit} is {_amount(limit, cap)} and its first "
            f"call was {_amount(limit, spent)} ago"
        )
    used = {
        "max_calls": usage["calls"],
        "max_tokens": usage["tokens"],
        "max_cost_usd": usage["cost"],
    }
    return (
        f"{scope} {who} budget exceeded: {limit} is {_amount(limit, cap)} and "
        f"{_amount(limit, used[limit])} are used or held by calls in flight"
    )


class Budgets:
    """Budget checks for one gateway: limits resolved per call, counters in `state`."""

    def __init__(
        self,
        settings: BudgetSettings,
        state: BudgetState,
        lookup: BudgetLookup,
        prices: Callable[[ModelGroup], Price | None],
        *,
        shared: bool = False,
    ) -> None:
        self.settings = settings
        self.state = state
        self._lookup = lookup
        self._prices = prices
        # None: the state is shared (Redis, PostgreSQL); else this process's own memory,
        # whose methods never wait.
        self._local = None if shared else cast(LocalBudgetState, state)
        self.refusals: Counter[tuple[str, str]] = Counter()
        self._settling: dict[str, set[asyncio.Task[None]]] = {}
        # Budget JSON per rollout as last seen; `reserve` refuses to use a stale one.
        self._known: OrderedDict[str, str] = OrderedDict()
        self._limits_of: dict[tuple[str, str | None], tuple[Limits, Limits]] = {}
        # Config limits per agent ("" for the defaults), merged once rather than per call.
        defaults = (settings.rollout.model_dump(), settings.attempt.model_dump())
        self._configured: dict[str, tuple[Limits, Limits]] = {
            "": (merge(defaults[0]), merge(defaults[1]))
        }
        for name, own in settings.agents.items():
            self._configured[name] = (
                merge(defaults[0], own.rollout.model_dump()),
                merge(defaults[1], own.attempt.model_dump()),
            )

    @property
    def shared(self) -> bool:
        return self._local is None

    def limits(self, budget: Mapping[str, Any], agent: str | None) -> tuple[Limits, Limits]:
        """Config defaults, then the agent's, then the rollout's own (set over the API)."""
        rollout, attempt = self._configured.get(agent or "", self._configured[""])
        return merge(rollout, budget.get("rollout")), merge(attempt, budget.get("attempt"))

    def _decoded(self, budget: str, agent_id: str | None) -> tuple[Limits, Limits]:
        """`limits` for a rollout's budget text and the call's agent, worked out once per
        pair: nearly every call of a rollout brings the same two (callers never change them)."""
        key = (budget, agent_id)
        found = self._limits_of.get(key)
        if found is None:
            given = orjson.loads(budget)
            found = self.limits(given, agent_id or given.get("agent"))
            if len(self._limits_of) >= KNOWN_BUDGETS:
                self._limits_of.clear()
            self._limits_of[key] = found
        return found

    async def _budget(self, rollout_id: str) -> str:
        """The rollout's budget (JSON) as last seen here, else from the state, seeding the
        state from the store on first sight; a stale copy is caught by `reserve`."""
        budget = self._known.get(rollout_id)
        if budget is None:
            budget = await self.state.budget(rollout_id)
            if budget is None:
                await self._seed(rollout_id)
                budget = await self.state.budget(rollout_id) or "{}"
            self._remember(rollout_id, budget)
        return budget

    def _remember(self, rollout_id: str, budget: str) -> None:
        self._known[rollout_id] = budget
        self._known.move_to_end(rollout_id)
        if len(self._known) > KNOWN_BUDGETS:
            self._known.popitem(last=False)

    async def _seed(self, rollout_id: str) -> None:
        found = await self._lookup(rollout_id)
        budget = encode({**(found.get("budget") or {}), "agent": found.get("agent")})
        await self.state.seed(rollout_id, budget, found["usage"], found["attempts"])

    async def admit(
        self, call: Call, group: ModelGroup, headers: Mapping[str, str]
    ) -> tuple[bytes, dict[str, Any]]:
        """Reserve the call in its rollout's budget, or raise BudgetExceeded; the body to send
        (its reply cap lowered when the clamp is on)."""
        rollout_id, attempt_id = call.attribution.rollout_id, call.attempt_id
        if rollout_id is None or attempt_id is None:
            return call.raw_request, call.payload
        if self._counted(call, rollout_id, attempt_id, headers):
            return call.raw_request, call.payload
        try:
            return await self._admit(call, rollout_id, attempt_id, group, headers)
        except (BudgetExceeded, InvalidRequest):
            raise
        except Exception as exc:
            # A state whose breaker is open fails at once: its failure was logged when it opened.
            if not isinstance(exc, pybreaker.CircuitBreakerError):
                log.warning("budget state failed for rollout %r: %r", rollout_id, exc)
            if not self._may_limit(call, rollout_id, headers):
                # Nothing to enforce as far as this replica knows: the call goes on uncounted
                # rather than fail with the state (a PostgreSQL store being away, say).
                return call.raw_request, call.payload
            # Fail closed: a budget that cannot be checked is not spent blindly.
            raise BudgetUnavailable(
                f"the budget of rollout {rollout_id!r} cannot be checked right now",
                retry_after=1.0,
            ) from exc

    def _counted(
        self, call: Call, rollout_id: str, attempt_id: str, headers: Mapping[str, str]
    ) -> bool:
        """Count a call no limit holds in this process's state, without a reservation: what it
        used is added when it settles. False when the state is shared, a limit holds, or the
        state must be asked first (the rollout not seeded here, or its budget changed)."""
        budget = self._known.get(rollout_id)
        if self._local is None or budget is None:
            return False
        rollout_limits, attempt_limits = self._decoded(budget, call.attribution.agent_id)
        limits = (lowered(rollout_limits, headers), attempt_limits)
        if limits[0] or limits[1]:
            return False
        now = time.time()
        if not self._local.count_now(rollout_id, attempt_id, budget, now):
            return False
        # Nothing held while the call is in flight: with no limit, nothing reads it. A budget
        # set meanwhile sees the call counted at once, its tokens and cost when it settles.
        call.budget = Reservation(rollout_id, attempt_id, limits, [{}, {}], True, now=now)
        return True

    def _may_limit(self, call: Call, rollout_id: str, headers: Mapping[str, str]) -> bool:
        """Whether a limit may hold for the call: from config, its headers, or the rollout's
        budget as last seen here (the state could not be asked)."""
        known = orjson.loads(self._known.get(rollout_id, "{}"))
        rollout, attempt = self.limits(known, call.attribution.agent_id or known.get("agent"))
        return any(
            value is not None for value in (*lowered(rollout, headers).values(), *attempt.values())
        )

    async def _admit(
        self,
        call: Call,
        rollout_id: str,
        attempt_id: str,
        group: ModelGroup,
        headers: Mapping[str, str],
    ) -> tuple[bytes, dict[str, Any]]:
        pending = self._settling.get(rollout_id)
        if pending:
            # This process's earlier calls are counted at their real usage first.
            await asyncio.gather(*pending, return_exceptions=True)
        budget = await self._budget(rollout_id)
        price = self._prices(group)
        given, taken = (price[0], price[1]) if price else (0.0, 0.0)
        prompt, reply = prompt_tokens(call.payload), _reply_cap(call)
        clamp = self.settings.clamp_max_tokens and call.operation in REPLY_CAP_FIELD
        # `limits` and `expect` are filled per try, from the budget as it then stands.
        ask: ReserveAsk = {
            "rollout_id": rollout_id,
            "attempt_id": attempt_id,
            "limits": ({}, {}),
            "tokens": prompt + reply,
            "cost": prompt * given + reply * taken,
            "need_tokens": prompt + 1 if clamp else 1,
            "need_cost": prompt * given + taken if clamp else MIN_COST,
            "now": time.time(),
            "expect": budget,
        }
        for _ in range(RESERVE_TRIES):
            rollout_limits, attempt_limits = self._decoded(budget, call.attribution.agent_id)
            # Reserved even with no limit in force (a rollout's first call here, or a shared
            # state): a budget set later starts from true counts.
            limits = (lowered(rollout_limits, headers), attempt_limits)
            result = await self.state.reserve({**ask, "limits": limits, "expect": budget})
            if result is None:
                # The state forgot the rollout (evicted or expired): seed it again.
                self._known.pop(rollout_id, None)
                budget = await self._budget(rollout_id)
            elif "stale" in result:
                # Another replica (or the API) changed the budget since we cached it.
                budget = result["stale"]
                self._remember(rollout_id, budget)
            else:
                break
        else:
            raise RuntimeError(f"the budget of {rollout_id!r} kept changing under the call")
        refused = result["refused"]
        reservation = call.budget = Reservation(
            rollout_id,
            attempt_id,
            limits,
            result["usage"],
            refused is None,
            ask["tokens"],
            ask["cost"],
            ask["now"],
        )
        if refused is not None:
            raise self._refusal(reservation, *refused)
        if not clamp:
            return call.raw_request, call.payload
        allowed = self._allowed_reply(limits, result["usage"], prompt, given, taken)
        if allowed is None or (allowed >= reply and _has_cap(call.payload)):
            return call.raw_request, call.payload
        raw, payload, reservation.clamp = _clamped(call, allowed)
        return raw, payload

    def _refusal(self, reservation: Reservation, index: int, limit: str) -> BudgetExceeded:
        scope = SCOPES[index]
        self.refusals[(scope, limit)] += 1
        reservation.refused = (scope, limit)
        rollout_id, attempt_id = reservation.rollout_id, reservation.attempt_id
        who = repr(rollout_id) if index == 0 else f"{attempt_id!r} of rollout {rollout_id!r}"
        cap = reservation.limits[index][limit] or 0
        message = refusal_message(scope, who, limit, cap, reservation.usage[index], reservation.now)
        return BudgetExceeded(message, scope=scope, limit=limit)

    @staticmethod
    def _allowed_reply(
        limits: tuple[Limits, Limits], usage: list[Usage], prompt: int, given: float, taken: float
    ) -> int | None:
        allowed: float | None = None
        for scope_limits, scope_usage in zip(limits, usage, strict=True):
            caps = []
            max_tokens = scope_limits.get("max_tokens")
            if max_tokens is not None:
                caps.append(max_tokens - scope_usage["tokens"] - prompt)
            max_cost = scope_limits.get("max_cost_usd")
            if max_cost is not None and taken > 0:
                left = max_cost - scope_usage["cost"] - prompt * given
                caps.append(left / taken)
            for cap in caps:
                allowed = cap if allowed is None else min(allowed, cap)
        return None if allowed is None else max(math.floor(allowed), 1)

    def settle(self, reservation: Reservation, record: Mapping[str, Any]) -> None:
        """Note the budget on the call's record and replace the reservation with the call's
        real tokens and cost."""
        note: dict[str, Any] = {}
        if reservation.refused is not None:
            note["scope"], note["limit"] = reservation.refused
        if reservation.clamp is not None:
            note["clamp"] = reservation.clamp
        if note:
            record["attributes"]["spangate.budget"] = note
        if not reservation.admitted:
            return
        reservation.used_tokens = (record.get("input_tokens") or 0) + (
            record.get("output_tokens") or 0
        )
        reservation.used_cost = record.get("cost_usd") or 0.0
        tokens = reservation.used_tokens - reservation.tokens
        cost = reservation.used_cost - reservation.cost
        if self._local is not None:
            # The in-process state never waits: settled here, so no later call has a task
            # to wait for (one each, gathered by every call of the rollout, cost ~8% of a
            # call's CPU at concurrency 64).
            self._local.settle_now(
                reservation.rollout_id, reservation.attempt_id, tokens=tokens, cost=cost
            )
            return
        settling = self.state.settle(
            reservation.rollout_id, reservation.attempt_id, tokens=tokens, cost=cost
        )
        task = asyncio.ensure_future(settling)
        pending = self._settling.setdefault(reservation.rollout_id, set())
        pending.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            pending.discard(finished)
            if not pending:
                self._settling.pop(reservation.rollout_id, None)
            if not finished.cancelled() and finished.exception() is not None:
                # A lost settle leaves the call counted at its estimate: over, never under.
                log.warning("budget settle failed: %r", finished.exception())

        task.add_done_callback(done)

    async def set_budget(
        self, rollout_id: str, budget: Mapping[str, Any] | None, agent: str | None
    ) -> None:
        """A budget set over the API reaches the state (the store already holds it)."""
        encoded = encode({**(budget or {}), "agent": agent})
        self._known.pop(rollout_id, None)
        await self.state.set_budget(rollout_id, encoded)

    async def view(self, rollout_id: str) -> dict[str, Any]:
        """Limits in force, used and remaining for the rollout and each attempt it has."""
        self._known.pop(rollout_id, None)
        await self._budget(rollout_id)
        read = await self.state.read(rollout_id) or {"budget": "{}", "usage": {}, "attempts": {}}
        budget = orjson.loads(read["budget"])
        rollout_limits, attempt_limits = self.limits(budget, budget.get("agent"))
        now = time.time()
        return {
            "limits": {"rollout": rollout_limits, "attempt": attempt_limits},
            "shared": self.shared,
            **_used_and_left(rollout_limits, read["usage"], now),
            "attempts": {
                aid: _used_and_left(attempt_limits, usage, now)
                for aid, usage in read["attempts"].items()
            },
        }

    async def close(self) -> None:
        pending = [task for tasks in self._settling.values() for task in tasks]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await self.state.close()


def _clamped(call: Call, allowed: int) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """The body with its reply cap lowered to `allowed`, and what changed."""
    payload = dict(call.payload)
    names = [name for name in REPLY_CAP_FIELDS if isinstance(payload.get(name), int)]
    changed: dict[str, Any] = {}
    for name in names or [REPLY_CAP_FIELD[call.operation]]:
        before = payload.get(name)
        payload[name] = min(before, allowed) if isinstance(before, int | float) else allowed
        changed[name] = {"from": before, "to": payload[name]}
    return orjson.dumps(payload), payload, changed


def _has_cap(payload: Mapping[str, Any]) -> bool:
    return any(isinstance(payload.get(name), int) for name in REPLY_CAP_FIELDS)


def _used_and_left(limits: Limits, usage: Usage, now: float) -> dict[str, Any]:
    started = usage.get("started") or 0.0
    used = {
        "calls": int(usage.get("calls") or 0),
        "tokens": int(usage.get("tokens") or 0),
        "cost_usd": float(usage.get("cost") or 0.0),
        "seconds": now - started if started else 0.0,
    }
    spent = dict(zip(LIMIT_NAMES, used.values(), strict=True))
    remaining = {
        name: max(limit - spent[name], 0) for name, limit in limits.items() if limit is not None
    }
    return {"used": used, "remaining": remaining}
