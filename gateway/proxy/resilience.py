"""Per-deployment protection: a pybreaker circuit breaker and aiolimiter rpm/tpm buckets.

The pieces are the libraries'; this file only decides when a deployment may take a
call, lets one probe through a half-open breaker, and turns a long wait into a 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pybreaker
from aiolimiter import AsyncLimiter

from config.models import BreakerPolicy, Deployment
from gateway.errors import RateLimited
from gateway.proxy.bucket import adjust_bucket, bucket_level

MINUTE = 60.0

# `shared_rate(key, per_minute, amount, max_wait)`: take `amount` from a budget every replica
# shares, waiting at most `max_wait` s; 0.0 once taken, else the seconds until it could be, or
# None when the shared store cannot say (this replica's own buckets limit the call meanwhile).
SharedRate = Callable[[str, int, int, float], Awaitable[float | None]]


class _OpenedAt(pybreaker.CircuitBreakerListener):
    """Remembers when the breaker opened, on the monotonic clock, to compute Retry-After."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            self.guard.opened_at = time.monotonic()


@dataclass(eq=False)
class Guard:
    """The breaker, limiters and live counters of one deployment."""

    deployment: Deployment
    policy: BreakerPolicy
    breaker: pybreaker.CircuitBreaker = field(init=False)
    rpm: AsyncLimiter | None = field(init=False, default=None)
    tpm: AsyncLimiter | None = field(init=False, default=None)
    in_flight: int = 0
    probing: bool = False
    opened_at: float = 0.0
    # Until when (monotonic) streams here get no `stream_options` the client did not send.
    refuses_stream_options_until: float = 0.0
    # With `shared.redis_url`: limits and breaker state every replica sees.
    shared_rate: SharedRate | None = None
    breaker_storage: pybreaker.CircuitBreakerStorage | None = None

    def __post_init__(self) -> None:
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=self.policy.fail_max,
            reset_timeout=self.policy.reset_timeout,
            throw_new_error_on_trip=False,
            listeners=[_OpenedAt(self)],
            name=self.deployment.label,
            state_storage=self.breaker_storage,
        )
        # With a shared budget these are only what limits calls while it cannot answer.
        if self.deployment.rpm:
            self.rpm = AsyncLimiter(self.deployment.rpm, MINUTE)
        if self.deployment.tpm:
            self.tpm = AsyncLimiter(self.deployment.tpm, MINUTE)

    @property
    def state(self) -> str:
        return str(self.breaker.current_state)

    def reopens_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it already would)."""
        if self.state == pybreaker.STATE_CLOSED:
            return 0.0
        if self.breaker_storage is not None:
            # Opened by whichever replica: the shared storage keeps when (whole seconds).
            opened = self.breaker_storage.opened_at
            if opened is not None:
                return max(0.0, opened.timestamp() + self.policy.reset_timeout - time.time())
        return max(0.0, self.opened_at + self.policy.reset_timeout - time.monotonic())

    def available(self) -> bool:
        state = self.state
        return state == pybreaker.STATE_CLOSED or self._may_probe(state)

    def _may_probe(self, state: str) -> bool:
        """A breaker that is not closed lets one probe through once its timeout has run."""
        return not self.probing and (state == pybreaker.STATE_HALF_OPEN or self.reopens_in() <= 0)

    def has_budget(self) -> bool:
        """Whether a call could start now without waiting on rpm/tpm."""
        return all(limiter.has_capacity(1) for limiter in (self.rpm, self.tpm) if limiter)

    def succeeded(self) -> None:
        """Tell the breaker a call went well; a no-op for a closed breaker with no failures."""
        breaker = self.breaker
        state = breaker.current_state
        if state == pybreaker.STATE_OPEN:
            # Another call (or replica) opened it while this one was out: the answer is still
            # good, and whether the deployment is back is the next probe's to say.
            return
        if state != pybreaker.STATE_CLOSED or breaker.fail_counter:
            # A shared breaker may open between the read above and this call.
            with contextlib.suppress(pybreaker.CircuitBreakerError):
                breaker.call(_nothing)

    def failed(self, exc: BaseException) -> None:
        """Count a failure on the breaker (which may open it)."""
        # pybreaker re-raises what it counted; the caller is raising it already.
        with contextlib.suppress(Exception):
            self.breaker.call(_reraise, exc)

    def claim_probe(self) -> bool:
        """Take the single probe slot when the breaker is not closed; False if taken."""
        state = self.state
        if state == pybreaker.STATE_CLOSED:
            return True
        if not self._may_probe(state):
            return False
        if state == pybreaker.STATE_OPEN:
            # The probe runs half-open, so metrics and /health/ready show it as it happens.
            self.breaker.half_open()
        self.probing = True
        return True

    async def acquire(self, tokens: int, max_wait: float) -> float:
        """Wait for rpm/tpm budget, at most `max_wait` seconds in all; the seconds waited."""
        started = time.perf_counter()
        if self.shared_rate is not None and await self._acquire_shared(tokens, max_wait):
            return time.perf_counter() - started
        wanted: tuple[tuple[AsyncLimiter | None, float, str], ...] = (
            (self.rpm, 1, "requests"),
            (self.tpm, tokens, "tokens"),
        )
        for limiter, amount, kind in wanted:
            if limiter is None:
                continue
            amount = min(amount, limiter.max_rate)
            if limiter.has_capacity(amount):
                await limiter.acquire(amount)
                continue
            remaining = max_wait - (time.perf_counter() - started)
            try:
                await asyncio.wait_for(limiter.acquire(amount), max(remaining, 0.0))
            except TimeoutError:
                per_second = limiter.max_rate / limiter.time_period
                retry_after = max(1.0, math.ceil(amount / per_second))
                raise RateLimited(
                    f"rate limit of {self.deployment.label} reached "
                    f"({int(limiter.max_rate)} {kind} per minute); retry after {retry_after:.0f}s",
                    retry_after=retry_after,
                    kind=kind,
                ) from None
        return time.perf_counter() - started

    async def _acquire_shared(self, tokens: int, max_wait: float) -> bool:
        """Take from the budget every replica shares; False when it cannot say."""
        assert self.shared_rate is not None
        started = time.perf_counter()
        for per_minute, amount, kind in (
            (self.deployment.rpm, 1, "requests"),
            (self.deployment.tpm, tokens, "tokens"),
        ):
            if not per_minute:
                continue
            remaining = max(max_wait - (time.perf_counter() - started), 0.0)
            key = f"{self.deployment.label}:{kind}"
            retry_after = await self.shared_rate(
                key, per_minute, min(amount, per_minute), remaining
            )
            if retry_after is None:
                return False
            if retry_after > 0:
                raise RateLimited(
                    f"rate limit of {self.deployment.label} reached ({per_minute} {kind} per "
                    f"minute, shared by all replicas); retry after {math.ceil(retry_after)}s",
                    retry_after=max(1.0, math.ceil(retry_after)),
                    kind=kind,
                )
        return True

    def correct_tokens(self, estimated: int, actual: int) -> None:
        """Settle the token bucket with what the call really used instead of the estimate."""
        if self.tpm is None or actual == estimated or self.shared_rate is not None:
            # A shared budget is settled by its window, not here: the local bucket holds
            # only what was taken from it while the shared one could not answer.
            return
        adjust_bucket(self.tpm, actual - estimated)

    def ratelimit_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.shared_rate is not None:
            return headers  # the shared budget's level is in Redis, not in these buckets
        for limiter, kind in ((self.rpm, "requests"), (self.tpm, "tokens")):
            if limiter is None:
                continue
            remaining = max(0, int(limiter.max_rate - bucket_level(limiter)))
            headers[f"x-ratelimit-limit-{kind}"] = str(int(limiter.max_rate))
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
        return headers


def _nothing() -> None:
    return None


def _reraise(exc: BaseException) -> None:
    raise exc


def estimate_tokens(payload: dict[str, Any], default_max_tokens: int) -> int:
    """Rough tokens a call will use before it is made: prompt characters / 4 plus the reply cap."""
    cap = (
        payload.get("max_completion_tokens")
        or payload.get("max_tokens")
        or payload.get("max_output_tokens")
    )
    reply = cap if isinstance(cap, int) and cap > 0 else default_max_tokens
    return prompt_tokens(payload) + reply


def prompt_tokens(payload: Mapping[str, Any]) -> int:
    """Rough tokens of a request's prompt (`messages`, `input` or `prompt`): characters / 4."""
    return _prompt_chars(payload) // 4 + 1


def _prompt_chars(payload: Mapping[str, Any]) -> int:
    chars = 0
    for key in ("messages", "input", "prompt"):
        value = payload.get(key)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    content = item.get("content")
                    chars += len(content) if isinstance(content, str) else len(str(content or ""))
                else:
                    chars += len(str(item))
    return chars
