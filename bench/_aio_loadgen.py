"""Fallback closed-loop load generator for bench/overhead.py when `wrk` is not installed.

Runs in its own process: N workers share one aiohttp session, each sends the same chat
completion request back-to-back until the deadline, and the per-request latencies are summarised
as one JSON line on stdout with the same keys the wrk Lua script prints:

    python bench/_aio_loadgen.py --url URL --concurrency 16 --duration 10 --body '{...}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Tally:
    """What the workers observed; latencies are in microseconds."""

    sent: int = 0
    completed: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    latencies_us: list[float] = field(default_factory=list)


async def _worker(
    session: aiohttp.ClientSession, url: str, body: bytes, deadline: float, tally: Tally
) -> None:
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    while time.perf_counter() < deadline:
        tally.sent += 1
        start = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError):
            tally.socket_errors += 1
            continue
        tally.latencies_us.append((time.perf_counter() - start) * 1e6)
        tally.completed += 1
        if not 200 <= status < 300:
            tally.non_2xx += 1


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


def _summary(tally: Tally, elapsed_s: float) -> dict[str, float | int]:
    ordered = sorted(tally.latencies_us)
    return {
        "requests": tally.completed,
        "sent": tally.sent,
        "duration_us": round(elapsed_s * 1e6),
        "errors_status": tally.non_2xx,
        "errors_socket": tally.socket_errors,
        "p50_us": _percentile(ordered, 50),
        "p90_us": _percentile(ordered, 90),
        "p99_us": _percentile(ordered, 99),
        "mean_us": sum(ordered) / len(ordered) if ordered else 0.0,
        "max_us": ordered[-1] if ordered else 0.0,
    }


async def run(url: str, concurrency: int, duration: float, body: bytes) -> dict[str, float | int]:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(
            *(_worker(session, url, body, deadline, tally) for _ in range(concurrency))
        )
        elapsed = time.perf_counter() - start
    return _summary(tally, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--body", required=True)
    args = parser.parse_args()
    coro = run(args.url, args.concurrency, args.duration, args.body.encode())
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
