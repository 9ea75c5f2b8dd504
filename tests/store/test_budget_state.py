"""Every budget state, in-process, Redis and PostgreSQL, holds the same counters under the same
calls."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from pg import PostgresServer
from redis_server import RedisServer

from store.budget_state import MemoryBudgetState, RedisBudgetState, empty_usage
from store.budget_state_pg import PostgresBudgetState

NO_LIMITS: dict[str, Any] = {}
pytestmark = pytest.mark.asyncio


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's real redis-server, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@pytest_asyncio.fixture(params=["memory", "redis", "postgresql"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        chosen: Any = MemoryBudgetState()
    elif request.param == "redis":
        chosen = RedisBudgetState(request.getfixturevalue("redis_url"), ttl=60)
        await chosen._redis.flushdb()
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres")
        chosen = PostgresBudgetState(postgres.new_database())
        await chosen.open()
    yield chosen
    await chosen.close()


async def reserve(state: Any, rollout: str, attempt: str, limits: Any, **amounts: Any) -> Any:
    values = {"tokens": 10, "cost": 0.01, "need_tokens": 1, "need_cost": 1e-9, "now": 1000.0}
    values["expect"] = "{}"
    ask = {"rollout_id": rollout, "attempt_id": attempt, "limits": limits}
    return await state.reserve({**ask, **values, **amounts})


async def test_an_unseeded_rollout_is_reported_missing(state: Any) -> None:
    assert await reserve(state, "r", "1", (NO_LIMITS, NO_LIMITS)) is None
    assert await state.budget("r") is None
    assert await state.read("r") is None


async def test_reserve_counts_until_a_limit_refuses(state: Any) -> None:
    await state.seed("r", '{"agent":"a"}', empty_usage(), {})
    limits = ({"max_calls": 2}, NO_LIMITS)
    expect = '{"agent":"a"}'
    first = await reserve(state, "r", "1", limits, expect=expect)
    second = await reserve(state, "r", "1", limits, now=1005.0, expect=expect)
    third = await reserve(state, "r", "1", limits, expect=expect)
    assert first["refused"] is None and second["refused"] is None
    assert second["usage"][0] == {"calls": 1, "tokens": 10, "cost": 0.01, "started": 1000.0}
    assert third["refused"] == (0, "max_calls")
    assert third["usage"][0]["calls"] == 2
    read = await state.read("r")
    assert read["usage"]["calls"] == 2 and read["attempts"]["1"]["calls"] == 2
    assert read["budget"] == '{"agent":"a"}'


async def test_attempt_limits_refuse_only_their_attempt(state: Any) -> None:
    await state.seed("r:x", "{}", empty_usage(), {})
    limits = (NO_LIMITS, {"max_tokens": 15})
    assert (await reserve(state, "r:x", "a", limits))["refused"] is None
    assert (await reserve(state, "r:x", "a", limits))["refused"] is None  # 10 held < 15
    assert (await reserve(state, "r:x", "a", limits))["refused"] == (1, "max_tokens")
    assert (await reserve(state, "r:x", "b", limits))["refused"] is None


async def test_settle_replaces_estimates_with_real_usage(state: Any) -> None:
    await state.seed("r", "{}", empty_usage(), {})
    await reserve(state, "r", "1", (NO_LIMITS, NO_LIMITS), tokens=100, cost=1.0)
    await state.settle("r", "1", tokens=-60, cost=-0.75)
    usage = (await state.read("r"))["usage"]
    assert usage["tokens"] == 40 and usage["cost"] == pytest.approx(0.25)
    result = await reserve(state, "r", "1", ({"max_cost_usd": 0.25}, NO_LIMITS))
    assert result["refused"] == (0, "max_cost_usd")


async def test_seed_keeps_existing_counters_and_set_budget_needs_a_seeded_rollout(
    state: Any,
) -> None:
    await state.set_budget("r", "{}")
    assert await state.budget("r") is None
    await state.seed("r", "{}", {"calls": 3, "tokens": 7, "cost": 0.5, "started": 10.0}, {})
    await state.seed("r", "{}", empty_usage(), {})
    assert (await state.read("r"))["usage"]["calls"] == 3
    await state.set_budget("r", '{"rollout":{"max_calls":1}}')
    assert await state.budget("r") == '{"rollout":{"max_calls":1}}'


async def test_a_reservation_under_a_stale_budget_is_not_made(state: Any) -> None:
    await state.seed("r", "{}", empty_usage(), {})
    await state.set_budget("r", '{"rollout":{"max_calls":0}}')
    result = await reserve(state, "r", "1", (NO_LIMITS, NO_LIMITS), expect="{}")
    assert result == {"stale": '{"rollout":{"max_calls":0}}'}
    assert (await state.read("r"))["usage"]["calls"] == 0


async def test_max_seconds_counts_from_the_first_call(state: Any) -> None:
    await state.seed("r", "{}", empty_usage(), {})
    limits = ({"max_seconds": 30}, NO_LIMITS)
    assert (await reserve(state, "r", "1", limits, now=1000.0))["refused"] is None
    assert (await reserve(state, "r", "1", limits, now=1030.0))["refused"] is None
    assert (await reserve(state, "r", "1", limits, now=1031.0))["refused"] == (0, "max_seconds")


async def test_concurrent_reservations_are_exact(state: Any) -> None:
    await state.seed("r", "{}", empty_usage(), {})
    limits = ({"max_calls": 7}, NO_LIMITS)
    results = await asyncio.gather(*(reserve(state, "r", "1", limits) for _ in range(50)))
    assert sum(1 for r in results if r["refused"] is None) == 7


async def test_two_postgresql_states_on_one_store_share_exact_counters(
    postgres: PostgresServer,
) -> None:
    # Two pools stand for two replicas; the rows outlive both.
    url = postgres.new_database()
    replicas = [PostgresBudgetState(url), PostgresBudgetState(url)]
    try:
        for replica in replicas:
            await replica.open()
        seeded = {"calls": 2, "tokens": 20, "cost": 0.0, "started": 5.0}
        await asyncio.gather(*(r.seed("r", "{}", seeded, {"1": seeded}) for r in replicas))
        limits = ({"max_calls": 20}, {"max_calls": 12})
        attempt_of = ["1" if i % 3 else "2" for i in range(60)]
        results = await asyncio.gather(
            *(reserve(replicas[i % 2], "r", attempt_of[i], limits) for i in range(60))
        )
    finally:
        for replica in replicas:
            await replica.close()
    admitted = Counter(attempt_of[i] for i, r in enumerate(results) if r["refused"] is None)
    # The rollout had 2 calls and may take 18 more; no attempt goes past 12.
    assert sum(admitted.values()) == 18
    assert admitted["1"] <= 10 and admitted["2"] <= 12

    restarted = PostgresBudgetState(url)
    await restarted.open()
    try:
        read = await restarted.read("r")
    finally:
        await restarted.close()
    assert read is not None
    assert read["usage"]["calls"] == 20 and read["usage"]["started"] == 5.0
    assert read["attempts"]["1"]["calls"] == 2 + admitted["1"]
    assert read["attempts"]["2"]["calls"] == admitted["2"]
