"""Spans per second into PostgreSQL (the target: 20,000/s from one replica), against SQLite,
with two replicas writing at once, and the request-path cost of shared sequence numbers.

Starts its own PostgreSQL and redis-server (Debian packages, as the tests do) unless
`--url` is given. Each writer run: one process puts pre-built spans shaped like the
gateway's (1-2 KB bodies, 64 rollouts in flight) into a `StoreWriter` whose queue holds
them all; the clock stops when all are written.

    python bench/pg.py [--spans 100000] [--seq-calls 2000] [--url postgresql://...]

Results: bench/results/pg.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from store.writer import StoreWriter  # noqa: E402

RESULTS = REPO / "bench" / "results" / "pg.md"


def records(count: int) -> list[dict[str, Any]]:
    now = time.time_ns()
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 900}]}
    answer = {
        "id": "chatcmpl-1",
        "choices": [{"message": {"role": "assistant", "content": "y" * 600}}],
    }
    rollouts = [f"ro-{uuid.uuid4().hex[:12]}" for _ in range(64)]
    return [
        {
            "span_id": uuid.uuid4().hex[:16],
            "trace_id": uuid.uuid4().hex,
            "rollout_id": rollouts[i % 64],
            "attempt_id": "1",
            "seq": i // 64 + 1,
            "name": "chat m",
            "operation": "chat",
            "provider": "openai",
            "status": "ok",
            "http_status": 200,
            "start_ns": now + i,
            "end_ns": now + i + 1000,
            "duration_ms": 12.5,
            "input_tokens": 120,
            "output_tokens": 40,
            "request_body": body,
            "response_body": answer,
            "attributes": {"gen_ai.operation.name": "chat"},
            "tags": ["bench"],
        }
        for i in range(count)
    ]


def write_rate(target: str, count: int) -> float:
    """Spans/s of one writer into `target`, queue holding all (the writer's own speed)."""
    spans = records(count)
    writer = StoreWriter(
        target,
        queue_size=count + 1,
        batch_size=2000,
        flush_interval=0.05,
        max_unsaved_seconds=600,
        memory_buffer=1000,
        busy_timeout=5,
        journal_dir=tempfile.mkdtemp(),
    )
    writer.start()
    started = time.perf_counter()
    for span in spans:
        writer.put(span)
    while writer.written < count:
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    writer.close(60)
    return count / elapsed


def parallel_rate(target: str, count: int, processes: int) -> float:
    """Total spans/s of `processes` writer processes (replicas) into one store at once."""
    cmd = [sys.executable, __file__, "--child", target, "--spans", str(count)]
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE) for _ in range(processes)]
    for proc in procs:
        proc.wait()
    return processes * count / (time.perf_counter() - started)


async def seq_costs(url: str, redis_url: str, calls: int) -> dict[str, list[float]]:
    """ms per sequence number: in memory, PostgreSQL counter row, Redis INCRBY."""
    from gateway.proxy.sequencer import Sequencer
    from store.shared_state import PostgresCounter, RedisCounter, redis_client

    async def lookup(_: str) -> tuple[int, str | None]:
        return 0, None

    pg = PostgresCounter(url)
    await pg.open()
    redis = redis_client(redis_url)
    out: dict[str, list[float]] = {}
    for name, allocate in (
        ("in memory (one SQLite process)", None),
        ("PostgreSQL counter row", pg.allocate),
        ("Redis (INCRBY above a floor, one script)", RedisCounter(redis).allocate),
    ):
        seq = Sequencer(lookup, capacity=10_000, allocate=allocate)
        rollout = f"ro-{uuid.uuid4().hex[:8]}"
        await seq.attempt_of(rollout, None)
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            await seq.reserve(rollout)
            times.append((time.perf_counter() - t) * 1000)
        out[name] = times
    # The other shared state on the request path with Redis: one rpm budget draw (async),
    # and the breaker's state and failure count (pybreaker's storage is synchronous: it
    # runs on the loop).
    from store.shared_state import RedisRateLimits, redis_breaker_storage

    limits = RedisRateLimits(redis_url)
    draws = []
    for _ in range(calls):
        t = time.perf_counter()
        await limits.acquire("bench:requests", 10**9, 1, 0.0)
        draws.append((time.perf_counter() - t) * 1000)
    out["Redis rpm budget draw (limits, sliding window)"] = draws
    # The read a call pays (through the 0.2 s cache), and the blocking round trip behind it.
    for name, storage in (
        (
            "Redis breaker state read, as a call pays it (0.2 s cache)",
            redis_breaker_storage(redis_url)("bench"),
        ),
        (
            "Redis breaker state read, uncached (pybreaker, blocking)",
            redis_breaker_storage(redis_url, read_seconds=0)("bench"),
        ),
    ):
        reads = []
        for _ in range(calls):
            t = time.perf_counter()
            _ = storage.state
            _ = storage.counter
            reads.append((time.perf_counter() - t) * 1000)
        out[name] = reads
    await pg.close()
    await redis.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--seq-calls", type=int, default=2000)
    parser.add_argument("--url", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(write_rate(args.child, args.spans))
        return
    server = redis_server = None
    if args.url is None:
        from pg import start_postgres
        from redis_server import start_redis

        server = start_postgres()
        redis_server = start_redis()
    try:
        url = args.url or server.new_database()
        redis_url = redis_server.url if redis_server else "redis://127.0.0.1:6379/0"
        sqlite_path = str(Path(tempfile.mkdtemp()) / "bench.db")
        rows = [
            ("one writer, SQLite", write_rate(sqlite_path, args.spans)),
            ("one writer, PostgreSQL", write_rate(url, args.spans)),
            (
                "two writers (replicas) at once, PostgreSQL, total",
                parallel_rate(url, args.spans, 2),
            ),
        ]
        costs = asyncio.run(seq_costs(url, redis_url, args.seq_calls))
    finally:
        if server:
            server.stop()
        if redis_server:
            redis_server.stop()
    load = os.getloadavg()
    lines = [
        "# spangate on PostgreSQL",
        "",
        f"Machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "at the end (shared with other work: read the numbers as a floor). "
        f"{args.spans:,} spans a writer, 1-2 KB bodies, batch 2,000, PostgreSQL with fsync off "
        "(as the tests start it).",
        "",
        "## Writer throughput (target: 20,000 spans/s from one replica)",
        "",
        "| run | spans/s |",
        "|---|---|",
        *(f"| {name} | {rate:,.0f} |" for name, rate in rows),
        "",
        f"## Request-path cost of shared state ({args.seq_calls:,} calls, one at a time)",
        "",
        "| source | p50 ms | p99 ms |",
        "|---|---|---|",
        *(
            f"| {name} | {statistics.median(t):.3f} | {sorted(t)[int(len(t) * 0.99) - 1]:.3f} |"
            for name, t in costs.items()
        ),
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
