"""What budgets cost on the request path: gateway overhead per call with no budget, an
in-process budget, a Redis budget, and on a PostgreSQL store a per-replica budget against one
kept in PostgreSQL, plus the raw reserve+settle rate of each state.

    python bench/budgets.py [--calls 2000] [--concurrency 1,16]

Prints a table and writes bench/results/budgets.md. Needs redis-server and PostgreSQL
(Debian's `postgresql`, started here as in the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp  # noqa: E402
from conftest import gateway_settings  # noqa: E402
from fake_provider import FakeProviderThread  # noqa: E402
from pg import PostgresServer, start_postgres  # noqa: E402
from redis_server import start_redis  # noqa: E402
from servers import GatewayThread  # noqa: E402

import gateway.compose  # noqa: E402
from store.budget_state import MemoryBudgetState, RedisBudgetState, empty_usage  # noqa: E402
from store.budget_state_pg import PostgresBudgetState  # noqa: E402

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]}
BIG = {"max_calls": 10**9, "max_tokens": 10**12, "max_cost_usd": 10**6}


async def drive(gateway: GatewayThread, calls: int, concurrency: int) -> list[float]:
    """Gateway overhead (X-Gateway-Overhead-Ms) of `calls` calls over 50 rollouts."""
    overheads: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(calls):
        queue.put_nowait(i)
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                url = f"{gateway.url(f'bench-{i % 50}')}/chat/completions"
                async with session.post(url, json=BODY) as response:
                    await response.read()
                    assert response.status == 200, response.status
                    overheads.append(float(response.headers["X-Gateway-Overhead-Ms"]))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return overheads


async def state_rate(state: Any, seconds: float = 2.0) -> tuple[float, float, float]:
    """Sequential reserve+settle pairs per second on one rollout, and the reserve's own
    median and p99 latency in ms."""
    await state.seed("rate", "{}", empty_usage(), {})
    limits = ({"max_calls": 10**12}, {})
    reserves: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        await state.reserve(
            {"rollout_id": "rate", "attempt_id": "1", "limits": limits, "tokens": 10,
             "cost": 0.001, "need_tokens": 1, "need_cost": 1e-9, "now": 1.0, "expect": "{}"}
        )  # fmt: skip
        reserves.append((time.perf_counter() - started) * 1000)
        await state.settle("rate", "1", tokens=-1, cost=-0.0001)
    await state.close()
    median, p99, _ = summary(reserves)
    return len(reserves) / seconds, median, p99


@contextlib.contextmanager
def budgets_in_process() -> Iterator[None]:
    """A PostgreSQL store whose budgets stay per replica, as before they could be shared:
    the baseline that the shared PostgreSQL budget is compared with."""
    chosen = gateway.compose.budget_state_for
    gateway.compose.budget_state_for = lambda settings, db: MemoryBudgetState()
    try:
        yield
    finally:
        gateway.compose.budget_state_for = chosen


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


def summary(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return (
        statistics.median(ordered),
        ordered[int(len(ordered) * 0.99) - 1],
        statistics.mean(ordered),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    rows: list[tuple[str, int, float, float, float]] = []
    rates: list[tuple[str, tuple[float, float, float]]] = []
    load_before = os.getloadavg()
    provider = FakeProviderThread().start()
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            redis_server() as redis_url,
            postgres_server() as postgres,
        ):
            budgeted = {"budgets": {"rollout": BIG}}
            # (name, settings overrides, store, budgets kept per replica on a shared store)
            modes: list[tuple[str, dict[str, Any], str | None, bool]] = [
                ("SQLite, no budget", {}, None, False),
                ("SQLite, in-process budget", budgeted, None, False),
                ("SQLite, Redis budget", {**budgeted, "shared": {"redis_url": redis_url}}, None, False),
                ("PostgreSQL store, per-replica budget", budgeted, "pg", True),
                ("PostgreSQL store, PostgreSQL budget", budgeted, "pg", False),
            ]  # fmt: skip
            for name, overrides, store, per_replica in modes:
                settings = gateway_settings(provider.url, **overrides)
                db = postgres.new_database() if store else Path(tmp) / f"{len(rows)}.db"
                with budgets_in_process() if per_replica else contextlib.nullcontext():
                    gateway = GatewayThread(settings, db).start()
                try:
                    asyncio.run(drive(gateway, 200, max(levels)))  # warm-up
                    for level in levels:
                        overheads = asyncio.run(drive(gateway, args.calls, level))
                        rows.append((name, level, *summary(overheads)))
                finally:
                    gateway.stop()
            rates.append(("in-process", asyncio.run(state_rate(MemoryBudgetState()))))

            async def redis_rate() -> tuple[float, float, float]:
                return await state_rate(RedisBudgetState(redis_url, ttl=60))

            async def postgres_rate() -> tuple[float, float, float]:
                state = PostgresBudgetState(postgres.new_database())
                await state.open()
                return await state_rate(state)

            rates.append(("Redis (loopback)", asyncio.run(redis_rate())))
            rates.append(("PostgreSQL (loopback)", asyncio.run(postgres_rate())))
    finally:
        provider.stop()
    load = os.getloadavg()
    lines = [
        "# Budgets: request-path cost",
        "",
        f"{args.calls} chat calls per level, over 50 rollouts; "
        f"gateway overhead from `X-Gateway-Overhead-Ms` (excludes the upstream). "
        f"{os.cpu_count()} cores, load average {load_before[0]:.2f} / {load_before[1]:.2f} / "
        f"{load_before[2]:.2f} before and {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} after "
        "(shared machine: numbers are pessimistic). The client, the fake upstream, the "
        "gateway and (for PostgreSQL) the server share the cores. On a PostgreSQL store every "
        "call also takes its sequence number from the store (both PostgreSQL modes pay it); "
        "the per-replica mode is the PostgreSQL store with budgets counted in each process, "
        "as before they could be shared.",
        "",
        "| mode | concurrency | overhead median ms | p99 ms | mean ms |",
        "|---|---|---|---|---|",
        *(f"| {n} | {c} | {m:.3f} | {p:.3f} | {a:.3f} |" for n, c, m, p, a in rows),
        "",
        "| state | reserve + settle pairs / s (one client, sequential) | reserve median ms | p99 ms |",
        "|---|---|---|---|",
        *(f"| {n} | {r:,.0f} | {m:.3f} | {p:.3f} |" for n, (r, m, p) in rates),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / "budgets.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
