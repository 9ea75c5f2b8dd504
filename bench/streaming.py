"""Streaming through the gateway vs straight to the upstream: added time to first token, added
total time, and proof that chunks are forwarded as they arrive (not held back).

Starts two upstreams and `spangate serve` (recording on, bodies stored) as processes; an
aiohttp client in this process (uvloop, on the upstreams' core) sends `stream: true` chat
completions one at a time, alternating direct and through the gateway so drift hits both alike.

1. TTFT and total, against tests/fake_provider.py: `--requests` pairs, each a stream of
   `--chunks` content chunks sent back-to-back. TTFT is the arrival of the first event that
   carries content; total is the end of the body. Added = gateway percentile - direct
   percentile (and the median of the per-pair differences).
2. Chunk timing, against bench/_stamped_upstream.py: `--timing-runs` pairs of streams of
   `--chunks` content chunks `--chunk-delay` apart, each chunk stamped with its send time
   (CLOCK_MONOTONIC, shared by all processes). The client notes each chunk's arrival on the
   same clock, so every chunk has a *transit* time, upstream write -> client read. Per chunk
   index: transit direct vs through the gateway; the difference is what forwarding added to
   that chunk. A gateway that held chunks back (buffered them, or waited for the next one)
   would show it growing along the stream or jumping to a chunk delay.
   (With the fake provider's `chunk_delay` fault instead, each stream carries the jitter of
   the provider's own timers, which on a shared machine swamps a millisecond.)

The client asks for `stream_options.include_usage` itself, so both streams carry the same
events (otherwise the gateway asks the upstream for usage and drops that extra event).

    /work/venv/bin/python bench/streaming.py [--requests 300] [--chunks 20] [--timing-runs 10]
        [--chunk-delay 0.05] [--latency 0] [--pin on|off] [--nice N] [--quiet-wait 30]
        [--profile]

Results: bench/results/streaming.{csv,md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _common import (
    CLIENT_CPU,
    HOST,
    MODEL,
    QUIET_THRESHOLD,
    Busy,
    BusyMeter,
    Placement,
    Section,
    TargetCheck,
    add_common_args,
    begin_run,
    common_options,
    free_port,
    machine_info,
    percentile,
    process_cpu_s,
    profile_pid,
    read_only_values,
    start_gateway,
    start_provider,
    start_upstream,
    temp_dir,
    wait_drained,
    write_results,
)

TARGET_TTFT_ADDED_P50_MS = 1.0
HOLD_BOUND_MS = 2.0  # "not held back": no chunk's median transit grows by more than this
REQUEST_TIMEOUT_S = 30.0
STAMPED_MODEL = "stamped-model"
STAMPED_UPSTREAM = Path(__file__).resolve().with_name("_stamped_upstream.py")


@dataclass
class StreamSample:
    """One streamed response. Times in ms after the request was sent; `transit_ms[i]` is
    arrival - send time for events that carry a send stamp (None for the others)."""

    status: int
    events_ms: list[float]
    ttft_ms: float
    total_ms: float
    transit_ms: list[float | None] = field(default_factory=list)


def request_body(chunks: int, model: str = MODEL) -> bytes:
    """A prompt whose echo reply (fake provider) streams as exactly `chunks` content chunks."""
    words = " ".join(f"w{i}" for i in range(1, chunks))
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": words}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )


def _event_json(event: bytes) -> dict[str, Any] | None:
    data = event.partition(b"data: ")[2].strip()
    if not data or data == b"[DONE]":
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _has_content(obj: dict[str, Any] | None) -> bool:
    return obj is not None and any(
        (c.get("delta") or {}).get("content") for c in obj.get("choices") or ()
    )


async def stream_once(session: aiohttp.ClientSession, url: str, body: bytes) -> StreamSample:
    """Send one streaming request; time each complete SSE event as its last byte arrives."""
    arrivals: list[int] = []
    events: list[bytes] = []
    buffer = b""
    start = time.monotonic_ns()
    async with session.post(
        url,
        data=body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"},
    ) as resp:
        async for chunk in resp.content.iter_any():
            now = time.monotonic_ns()
            buffer += chunk
            while (end := buffer.find(b"\n\n")) >= 0:
                events.append(buffer[: end + 2])
                buffer = buffer[end + 2 :]
                arrivals.append(now)
        total = time.monotonic_ns() - start
        status = resp.status
    # Parsing after the stream keeps the client's per-event work out of the timings.
    ttft = math.nan
    transit: list[float | None] = []
    for event, arrived in zip(events, arrivals, strict=True):
        obj = _event_json(event)
        if math.isnan(ttft) and _has_content(obj):
            ttft = (arrived - start) / 1e6
        sent = obj.get("x_sent_ns") if obj else None
        transit.append((arrived - sent) / 1e6 if isinstance(sent, int) else None)
    return StreamSample(status, [(a - start) / 1e6 for a in arrivals], ttft, total / 1e6, transit)


@dataclass
class Pairs:
    direct: list[StreamSample]
    gateway: list[StreamSample]


async def run_pairs(direct_url: str, gateway_url: str, body: bytes, count: int) -> Pairs:
    """`count` sequential pairs, direct first on even pairs and gateway first on odd ones."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=4)
    out = Pairs([], [])
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for i in range(count):
            order = [("d", direct_url), ("g", gateway_url)]
            if i % 2:
                order.reverse()
            for which, url in order:
                sample = await stream_once(session, url, body)
                if sample.status != 200:
                    raise RuntimeError(f"{url} answered {sample.status}")
                (out.direct if which == "d" else out.gateway).append(sample)
    return out


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------------------------------------
# Analysis


def dist(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if not math.isnan(v)]
    return {"p50": percentile(clean, 50), "p99": percentile(clean, 99)}


@dataclass
class ChunkRow:
    index: int
    direct_ms: float  # median transit, upstream write -> client read
    gateway_ms: float
    added_p90_ms: float  # 90th percentile of gateway transit minus the direct median
    worst_ms: float  # the largest gateway transit seen for this chunk, minus the direct median
    gateway_gap_ms: float  # median gap to the previous event, through the gateway

    @property
    def added_ms(self) -> float:
        return self.gateway_ms - self.direct_ms


def chunk_rows(pairs: Pairs) -> list[ChunkRow]:
    counts = {len(s.transit_ms) for s in pairs.direct + pairs.gateway}
    if len(counts) != 1:
        raise RuntimeError(f"streams differ in event count: {sorted(counts)}")
    rows = []
    for i in range(counts.pop()):
        direct = [s.transit_ms[i] for s in pairs.direct]
        gateway = [s.transit_ms[i] for s in pairs.gateway]
        if any(v is None for v in direct + gateway):
            continue  # [DONE] carries no stamp
        d = [v for v in direct if v is not None]
        g = [v for v in gateway if v is not None]
        base = statistics.median(d)
        gaps = [s.events_ms[i] - s.events_ms[i - 1] if i else s.events_ms[0] for s in pairs.gateway]
        rows.append(
            ChunkRow(
                i,
                base,
                statistics.median(g),
                percentile(g, 90) - base,
                max(g) - base,
                statistics.median(gaps),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Options:
    requests: int
    chunks: int
    timing_runs: int
    chunk_delay: float
    latency: float
    warmup: int
    placement: Placement
    quiet_wait: float
    out_dir: Path
    spangate: str
    profile: bool


@dataclass
class Outcome:
    ttft: Pairs
    timing: Pairs
    busy: list[Busy]
    spans_written: int
    gateway_rc: int | None
    gateway_cpu_us_per_request: float  # TTFT phase, per request through the gateway
    span_overhead_ms: list[float]  # what the gateway itself recorded as its overhead


def start_stamped_upstream(
    opts: Options, tmp: Path, stack: contextlib.ExitStack
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = [sys.executable, str(STAMPED_UPSTREAM), "--host", HOST, "--port", str(port)]
    cmd += ["--chunks", str(opts.chunks), "--delay", str(opts.chunk_delay)]
    return start_upstream(
        opts.placement.wrap(cmd, CLIENT_CPU),
        port,
        tmp / "stamped.log",
        ("stamped upstream", "stamped upstream"),
        stack,
        **opts.placement.popen_kwargs(),
    )


def write_config(tmp: Path, provider_base: str, stamped_base: str) -> Path:
    cfg = tmp / "bench.yaml"
    lines = ["models:"]
    for name, base in ((MODEL, provider_base), (STAMPED_MODEL, stamped_base)):
        lines += [
            f"  - name: {name}",
            "    deployments:",
            "      - provider: openai",
            f"        model: {name}",
            f"        api_base: {base}",
            "        api_key: sk-bench",
        ]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def run(opts: Options) -> Outcome:
    opts.placement.pin_self()
    busy: list[Busy] = []
    body = request_body(opts.chunks)
    stamped_body = request_body(opts.chunks, STAMPED_MODEL)
    with temp_dir("spangate-bench-stream-") as tmp, contextlib.ExitStack() as stack:
        provider_base, provider = start_provider(opts.placement, tmp, stack, latency=opts.latency)
        stamped_base, stamped = start_stamped_upstream(opts, tmp, stack)
        cfg = write_config(tmp, provider_base, stamped_base)
        with start_gateway(opts.placement, opts.spangate, tmp, tmp / "bench.db", cfg) as gw:
            pid = gw.proc.pid
            direct_url = provider_base + "/chat/completions"
            gateway_url = f"{gw.root}/rollout/bench-stream/attempt/1/v1/chat/completions"
            stamped_url = stamped_base + "/chat/completions"
            gw_stamped_url = f"{gw.root}/rollout/bench-chunks/attempt/1/v1/chat/completions"
            run_async(run_pairs(direct_url, gateway_url, body, opts.warmup))
            profile = (
                profile_pid(pid, opts.out_dir / "streaming-profile.collapsed")
                if opts.profile
                else contextlib.nullcontext()
            )
            with profile:
                print(
                    f"TTFT/total: {opts.requests} pairs of {opts.chunks}-chunk streams", flush=True
                )
                cpu_before = process_cpu_s(pid)
                with BusyMeter("ttft and total", [pid, provider.pid]) as meter:
                    ttft = run_async(run_pairs(direct_url, gateway_url, body, opts.requests))
                assert meter.result is not None
                busy.append(meter.result)
                cpu_us = (process_cpu_s(pid) - cpu_before) / opts.requests * 1e6
                print(
                    f"chunk timing: {opts.timing_runs} pairs, {opts.chunk_delay * 1000:g} ms apart",
                    flush=True,
                )
                with BusyMeter("chunk timing", [pid, stamped.pid]) as meter:
                    timing = run_async(
                        run_pairs(stamped_url, gw_stamped_url, stamped_body, opts.timing_runs)
                    )
                assert meter.result is not None
                busy.append(meter.result)
            written = int(wait_drained(gw).get("written", -1))
        overheads = read_only_values(
            tmp / "bench.db",
            "select overhead_ms from spans where rollout_id = 'bench-stream' "
            "and overhead_ms is not null",
        )
        return Outcome(ttft, timing, busy, written, gw.proc.returncode, cpu_us, overheads)


def report(opts: Options, outcome: Outcome, busy_before: float) -> None:
    ttft = outcome.ttft
    d_ttft = dist([s.ttft_ms for s in ttft.direct])
    g_ttft = dist([s.ttft_ms for s in ttft.gateway])
    d_total = dist([s.total_ms for s in ttft.direct])
    g_total = dist([s.total_ms for s in ttft.gateway])
    pairs = list(zip(ttft.direct, ttft.gateway, strict=True))
    paired_ttft = statistics.median(g.ttft_ms - d.ttft_ms for d, g in pairs)
    paired_total = statistics.median(g.total_ms - d.total_ms for d, g in pairs)
    rows = chunk_rows(outcome.timing)
    first_added = rows[0].added_ms
    growth = max(r.added_ms - first_added for r in rows)
    max_added = max(r.added_ms for r in rows)
    worst = max(r.worst_ms for r in rows)

    def f(v: float) -> str:
        return f"{v:.2f}"

    latency_rows = [
        [
            name,
            *map(f, (d["p50"], d["p99"], g["p50"], g["p99"])),
            *map(f, (g["p50"] - d["p50"], g["p99"] - d["p99"], paired)),
        ]
        for name, d, g, paired in (
            ("TTFT", d_ttft, g_ttft, paired_ttft),
            ("total", d_total, g_total, paired_total),
        )
    ]
    latency_header = [
        "measure",
        "direct p50 ms",
        "direct p99 ms",
        "gateway p50 ms",
        "gateway p99 ms",
        "added p50 ms",
        "added p99 ms",
        "median paired diff ms",
    ]
    chunk_header = [
        "event",
        "transit direct ms",
        "transit gateway ms",
        "added ms (medians)",
        "added p90 ms",
        "worst added ms",
        "gap via gateway ms",
    ]
    last = rows[-1].index
    labels = {0: " (role)", last: " (usage)", last - 1: " (finish)"}
    chunk_table = [
        [
            f"{r.index}{labels.get(r.index, '')}",
            f(r.direct_ms),
            f(r.gateway_ms),
            f(r.added_ms),
            f(r.added_p90_ms),
            f(r.worst_ms),
            f(r.gateway_gap_ms),
        ]
        for r in rows
    ]
    chunk_busy = outcome.busy[1] if len(outcome.busy) > 1 else None
    held_ok = growth <= HOLD_BOUND_MS and max_added <= HOLD_BOUND_MS
    targets = [
        TargetCheck(
            "streaming TTFT added p50",
            f"<= {TARGET_TTFT_ADDED_P50_MS:g} ms",
            f"{g_ttft['p50'] - d_ttft['p50']:.2f} ms",
            g_ttft["p50"] - d_ttft["p50"] <= TARGET_TTFT_ADDED_P50_MS,
            f"p99 added {g_ttft['p99'] - d_ttft['p99']:.2f} ms; total added p50 "
            f"{g_total['p50'] - d_total['p50']:.2f} ms; {opts.requests} pairs",
        ),
        TargetCheck(
            "chunks not held back (per-chunk added transit, medians)",
            f"<= {HOLD_BOUND_MS:g} ms",
            f"max {max_added:.2f} ms",
            held_ok,
            f"growth along the stream {growth:+.2f} ms; worst single chunk {worst:.2f} ms; "
            f"{opts.timing_runs} pairs of {len(rows)} stamped events "
            f"{opts.chunk_delay * 1000:g} ms apart"
            + (
                "; machine busy: single-chunk values include its scheduling delays"
                if chunk_busy and chunk_busy.foreign_share > QUIET_THRESHOLD
                else ""
            ),
        ),
    ]
    records: list[dict[str, Any]] = []
    for kind, pair_set in (("ttft", outcome.ttft), ("chunks", outcome.timing)):
        for i, (d, g) in enumerate(zip(pair_set.direct, pair_set.gateway, strict=True)):
            records.append(
                {
                    "kind": kind,
                    "pair": i,
                    "direct_ttft_ms": round(d.ttft_ms, 3),
                    "gateway_ttft_ms": round(g.ttft_ms, 3),
                    "direct_total_ms": round(d.total_ms, 3),
                    "gateway_total_ms": round(g.total_ms, 3),
                    "direct_events_ms": " ".join(f"{v:.3f}" for v in d.events_ms),
                    "gateway_events_ms": " ".join(f"{v:.3f}" for v in g.events_ms),
                    "direct_transit_ms": " ".join(
                        "-" if v is None else f"{v:.3f}" for v in d.transit_ms
                    ),
                    "gateway_transit_ms": " ".join(
                        "-" if v is None else f"{v:.3f}" for v in g.transit_ms
                    ),
                }
            )
    info = machine_info(
        opts.placement,
        busy_before,
        **{
            "upstreams": f"tests/fake_provider.py (latency {opts.latency * 1000:g} ms) for "
            "TTFT/total; bench/_stamped_upstream.py for chunk timing",
            "client": "aiohttp (uvloop) in the benchmark process, one request at a time",
            "spans written by the gateway": str(outcome.spans_written),
            "gateway CPU per streamed request (TTFT phase)": (
                f"{outcome.gateway_cpu_us_per_request:.0f} µs"
            ),
            "gateway's own overhead_ms on its spans (p50 / p99)": (
                f"{percentile(outcome.span_overhead_ms, 50):.3f} / "
                f"{percentile(outcome.span_overhead_ms, 99):.3f} ms"
            ),
            "gateway exit code": str(outcome.gateway_rc),
        },
    )
    write_results(
        "streaming",
        "spangate streaming benchmark",
        "Streaming chat completions (`stream: true`, usage included), one at a time, "
        "alternating direct (upstream) and through `spangate serve` with recording on.",
        out_dir=opts.out_dir,
        sections=[
            Section(
                "Time to first token and total",
                latency_header,
                latency_rows,
                f"{opts.requests} pairs against the fake provider; {opts.chunks} content chunks "
                f"sent back-to-back ({opts.chunks + 4} events with role, finish, usage and "
                "[DONE]). TTFT = arrival of the first event carrying content.",
            ),
            Section(
                "Per-chunk transit",
                chunk_header,
                chunk_table,
                f"{opts.timing_runs} pairs against bench/_stamped_upstream.py, which waits "
                f"{opts.chunk_delay * 1000:g} ms before every event after the first and stamps "
                "each with its send time. *Transit* = arrival at the client - send time "
                "(CLOCK_MONOTONIC, same clock in every process), median over the pairs. "
                "*Added* = gateway transit - direct transit: what forwarding cost that chunk; "
                "held-back chunks would make it grow along the stream or jump to a chunk "
                "delay. *Gap via gateway* is the median time between consecutive events as the "
                "client saw them through the gateway.",
            ),
        ],
        targets=targets,
        busy=outcome.busy,
        info=info,
        records=records,
        extra={
            "ttft_added_p50_ms": g_ttft["p50"] - d_ttft["p50"],
            "ttft_added_p99_ms": g_ttft["p99"] - d_ttft["p99"],
            "total_added_p50_ms": g_total["p50"] - d_total["p50"],
            "max_chunk_added_ms": max_added,
            "chunk_added_growth_ms": growth,
            "worst_chunk_added_ms": worst,
        },
    )


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="TTFT pairs")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--timing-runs", type=int, default=10, help="chunk-timing pairs")
    parser.add_argument("--chunk-delay", type=float, default=0.05, help="seconds between events")
    parser.add_argument("--latency", type=float, default=0.0, help="fake provider latency (s)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up pairs")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.chunks < 2 or args.requests < 1 or args.timing_runs < 1:
        parser.error("need --chunks >= 2, --requests >= 1 and --timing-runs >= 1")
    return Options(
        requests=args.requests,
        chunks=args.chunks,
        timing_runs=args.timing_runs,
        chunk_delay=args.chunk_delay,
        latency=args.latency,
        warmup=args.warmup,
        **common_options(args),
        profile=args.profile,
    )


def main(argv: list[str] | None = None) -> int:
    opts, busy_before = begin_run(parse_args, argv)
    print(f"streaming benchmark on {HOST}; {opts.placement.describe()}", flush=True)
    outcome = run(opts)
    report(opts, outcome, busy_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
