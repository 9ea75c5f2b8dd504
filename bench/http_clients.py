"""CPU per upstream call of the HTTP clients the gateway could forward with, measured alike.

The upstream client is the largest stage of a proxied call (bench/cpu_per_call.py), so issue
19 asks to measure a faster library before adopting one. Each client sends the same chat
completion to tests/fake_provider.py (its own process, on the other core) at a fixed
concurrency under uvloop, and this process's CPU time (time.process_time) is divided by the
calls made. Rounds alternate between clients so drift on a shared machine hits all alike.

    python bench/http_clients.py [--calls 6000] [--rounds 3] [--concurrency 64] [--serial 200]

Results: bench/results/http_clients.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from _common import (
    BODY,
    CLIENT_CPU,
    GATEWAY_CPU,
    RESULTS_DIR,
    Placement,
    markdown_table,
    rotated,
    start_provider,
    temp_dir,
)

Send = Callable[[], Awaitable[bytes]]
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-upstream"}


async def aiohttp_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """aiohttp as gateway/providers/openai.py used it until issue 19 (a shared session)."""
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    timeout = aiohttp.ClientTimeout(total=600, sock_connect=10)
    body = BODY.encode()

    async def send() -> bytes:
        response = await session.post(url, data=body, headers=HEADERS, timeout=timeout)
        try:
            return await response.read()
        finally:
            response.release()

    return send, session.close


async def httpx_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None), timeout=600)
    body = BODY.encode()

    async def send() -> bytes:
        response = await client.post(url, content=body, headers=HEADERS)
        return response.content

    return send, client.aclose


async def aiosonic_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import aiosonic

    client = aiosonic.HTTPClient()
    body = BODY.encode()

    async def send() -> bytes:
        response = await client.post(url, data=body, headers=HEADERS)
        return await response.content()

    async def close() -> None:
        with contextlib.suppress(Exception):
            await client.connector.cleanup()

    return send, close


async def pyreqwest_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """pyreqwest: Rust's reqwest on its own tokio threads (their CPU counts too)."""
    from pyreqwest.client import ClientBuilder

    client = ClientBuilder().http1_only().tcp_nodelay(True).build()
    body = BODY.encode()

    async def send() -> bytes:
        builder = client.post(url).body_bytes(body)
        for name, value in HEADERS.items():
            builder = builder.header(name, value)
        response = await builder.build().send()
        return bytes(await response.bytes())

    return send, client.close


async def rnet_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """rnet: another Rust client (wreq/hyper) on its own runtime."""
    import rnet

    client = rnet.Client()
    body = BODY.encode()

    async def send() -> bytes:
        response = await client.post(url, body=body, headers=HEADERS)
        return bytes(await response.bytes())

    async def close() -> None:
        pass

    return send, close


async def spangate_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """What the gateway forwards with: gateway/providers/http1.py (httptools' parser)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gateway.providers.http1 import ConnectionPool, parse_target

    pool = ConnectionPool()
    target = parse_target(url)
    body = BODY.encode()

    async def send() -> bytes:
        response = await pool.request(
            "POST", target, headers=HEADERS, body=body, total=600, connect=10
        )
        try:
            return await response.read(1 << 26)
        finally:
            response.release()

    return send, pool.close


CLIENTS = {
    "aiohttp": aiohttp_client,
    "spangate": spangate_client,
    "httpx": httpx_client,
    "aiosonic": aiosonic_client,
    "pyreqwest": pyreqwest_client,
    "rnet": rnet_client,
}
# Imported under another name than the client's.
MODULES = {"spangate": "httptools"}


async def one_round(
    name: str, url: str, calls: int, concurrency: int, serial: int
) -> tuple[float, float]:
    """CPU µs per call at `concurrency`, then the median ms of `serial` calls one at a time
    (where a client's CPU turns into latency: the upstream's 20 ms are in it)."""
    send, close = await CLIENTS[name](url)
    try:
        await asyncio.gather(*(send() for _ in range(concurrency)))  # connections warm
        walls = []
        for _ in range(serial):
            started = time.perf_counter()
            await send()
            walls.append(time.perf_counter() - started)
        left = calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await send()

        before = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (time.process_time() - before) / calls * 1e6, statistics.median(walls) * 1000
    finally:
        await close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serial", type=int, default=200, help="calls one at a time per round")
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    placement = Placement.from_args("on", 0)
    # A client that is not installed (`pip install aiosonic pyreqwest rnet`) is left out.
    names = [
        n
        for n in args.clients.split(",")
        if importlib.util.find_spec(MODULES.get(n, n)) is not None
    ]
    results: dict[str, list[float]] = {name: [] for name in names}
    serial_ms: dict[str, list[float]] = {name: [] for name in names}
    with temp_dir("spangate-clients-") as tmp, contextlib.ExitStack() as stack:
        base, _ = start_provider(placement, tmp, stack, latency=args.latency)
        if placement.pin:
            os.sched_setaffinity(0, {GATEWAY_CPU})
        url = base + "/chat/completions"
        for index in range(args.rounds):
            for name in rotated(names, index):
                us, ms = uvloop.run(one_round(name, url, args.calls, args.concurrency, args.serial))
                results[name].append(us)
                serial_ms[name].append(ms)
                print(f"{name}: {us:.0f} µs CPU per call, {ms:.2f} ms one at a time", flush=True)
    rows = [
        [
            name,
            f"{statistics.median(v):.0f}",
            " ".join(f"{x:.0f}" for x in v),
            f"{statistics.median(serial_ms[name]):.2f}",
        ]
        for name, v in results.items()
    ]
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    text = "\n".join(
        [
            "# Upstream HTTP clients: CPU per call",
            "",
            f"{args.calls} chat completions per round at concurrency {args.concurrency} against "
            f"tests/fake_provider.py ({args.latency * 1000:g} ms, core {CLIENT_CPU}), uvloop, "
            f"client on core {GATEWAY_CPU}; CPU time of the client process per call, then "
            f"{args.serial} calls one at a time (wall clock, the upstream's latency included). "
            f"Load average at the end: {load}. Command: `{' '.join(sys.argv)}`.",
            "",
            markdown_table(
                ["client", "median µs/call", "rounds", "one at a time, median ms"], rows
            ),
            "",
        ]
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "http_clients.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
