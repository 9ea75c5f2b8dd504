"""Does the gateway's memory stay flat? RSS before and after 100,000 requests.

Starts tests/fake_provider.py and `spangate serve` (default recorder config: request and
response bodies stored) as processes, then drives closed-loop load with `wrk` in segments of
an exact number of responses (the Lua script announces when it has them and the script stops
wrk). Every request goes to `/rollout/<prefix><n // calls-per-rollout>/v1/chat/completions`,
so rollouts keep appearing (10 calls each by default: 10,500 rollouts over the run) and the
per-rollout state (sequence cursors, attempts, tool tracking) is exercised. After each segment
the script waits for the recorder queue to drain and reads VmRSS, RssAnon and VmHWM from
/proc/<gateway pid>/status.

Growth = RSS after the measured requests - RSS after the warm-up. The slope over the second
half of the run (bytes per request) tells a leak from a one-off step.

    /work/venv/bin/python bench/memory.py [--requests 100000] [--warmup 5000] [--segments 10]
        [--concurrency 32] [--calls-per-rollout 10] [--latency 0] [--pin on|off]

`--calls-per-rollout 1` is the worst case: a new rollout on every request, which fills the
gateway's per-rollout caches to their bounds. Results: bench/results/memory.{csv,md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    BODY,
    CLIENT_CPU,
    Busy,
    BusyMeter,
    Gateway,
    Placement,
    Section,
    TargetCheck,
    add_common_args,
    begin_run,
    common_options,
    machine_info,
    proc_status_kib,
    process_cpu_s,
    profile_pid,
    start_gateway,
    start_provider,
    temp_dir,
    wait_drained,
    wait_for,
    write_gateway_config,
    write_results,
)
from overhead import tool_version

TARGET_GROWTH_MB = 20.0

# wrk script: a fresh rollout every `per` requests, numbered on from `first`; announces on
# stdout once `limit` responses arrived (the script then SIGINTs wrk, which ends the run),
# and prints one JSON line of totals at the end.
WRK_LUA = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"

local threads = {}
local first, limit, per, prefix = 0, 0, 10, "m"
sent, responses, bad = 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  first = tonumber(args[1])
  limit = tonumber(args[2])
  per = tonumber(args[3])
  prefix = args[4]
end

function request()
  local n = first + sent
  sent = sent + 1
  local path = "/rollout/" .. prefix .. math.floor(n / per) .. "/v1/chat/completions"
  return wrk.format(nil, path)
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then bad = bad + 1 end
  if responses == limit then
    io.write("LIMIT_REACHED\\n")
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local s, r, b = 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent")
    r = r + t:get("responses")
    b = b + t:get("bad")
  end
  -- wrk calls request() once on the first thread to verify the script before the run
  -- (script_verify_request); that request never reaches the socket.
  s = s - 1
  io.write(string.format(
    'BENCH_JSON {"sent":%%d,"responses":%%d,"non_200":%%d,"socket_errors":%%d,'
    .. '"duration_us":%%d,"p50_us":%%.0f,"p99_us":%%.0f}\\n',
    s, r, b, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Sample:
    """Gateway memory after a number of requests (sent, all answered and recorded)."""

    label: str
    requests: int  # cumulative requests sent to the gateway, warm-up included
    rss_kib: int
    anon_kib: int
    hwm_kib: int
    rps: float = 0.0
    p99_ms: float = 0.0
    cpu_us_per_request: float = 0.0
    spans_written: int = 0
    foreign_share: float = 0.0


@dataclass
class Options:
    requests: int
    warmup: int
    segments: int
    concurrency: int
    calls_per_rollout: int
    latency: float
    placement: Placement
    quiet_wait: float
    out_dir: Path
    spangate: str
    profile: bool
    segment_timeout: float


def run_segment(
    opts: Options, lua: Path, url: str, first: int, count: int
) -> tuple[dict[str, Any], float]:
    """wrk until `count` responses arrived; its totals and the segment's wall time."""
    cmd = ["wrk", "-t1", f"-c{opts.concurrency}", f"-d{int(opts.segment_timeout)}s"]
    cmd += ["--timeout", "10s", "-s", str(lua), url, "--"]
    cmd += [str(first), str(count), str(opts.calls_per_rollout), "m"]
    start = time.monotonic()
    proc = subprocess.Popen(
        opts.placement.wrap(cmd, CLIENT_CPU),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **opts.placement.popen_kwargs(),
    )
    result: dict[str, Any] | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("LIMIT_REACHED"):
                proc.send_signal(signal.SIGINT)  # wrk ends its run early on SIGINT
            elif line.startswith("BENCH_JSON "):
                result = json.loads(line.removeprefix("BENCH_JSON "))
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - start
    if result is None:
        stderr = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"wrk gave no result (rc={proc.returncode}): {stderr}")
    if result["responses"] < count:
        raise RuntimeError(
            f"wrk got only {result['responses']} of {count} responses in "
            f"{opts.segment_timeout:.0f} s (socket errors {result['socket_errors']})"
        )
    return result, elapsed


def sample_memory(gw: Gateway, label: str, requests: int) -> Sample:
    """Memory once everything sent is recorded (queue empty and `written` caught up; a request
    wrk abandoned at its stop still gets its span), so no batch in flight inflates it."""
    wait_drained(gw)

    def caught_up() -> dict[str, Any] | None:
        recorder = wait_drained(gw)
        return recorder if int(recorder.get("written", 0)) >= requests else None

    try:
        recorder = wait_for("the recorder to write every span", caught_up, 15, interval=0.1)
    except TimeoutError:
        recorder = wait_drained(gw)
    status = proc_status_kib(gw.proc.pid)
    return Sample(
        label,
        requests,
        status.get("VmRSS", 0),
        status.get("RssAnon", 0),
        status.get("VmHWM", 0),
        spans_written=int(recorder.get("written", 0)),
    )


def run(opts: Options) -> tuple[list[Sample], list[Busy], int]:
    samples: list[Sample] = []
    busy: list[Busy] = []
    with temp_dir("spangate-bench-mem-") as tmp, contextlib.ExitStack() as stack:
        lua = tmp / "memory.lua"
        lua.write_text(WRK_LUA % {"body": BODY})
        provider_base, provider = start_provider(opts.placement, tmp, stack, latency=opts.latency)
        cfg = write_gateway_config(tmp, provider_base)
        with start_gateway(opts.placement, opts.spangate, tmp, tmp / "bench.db", cfg) as gw:
            url = gw.root + "/"
            pid = gw.proc.pid
            samples.append(sample_memory(gw, "started", 0))
            sent = 0
            plan = [("warm-up", opts.warmup)] if opts.warmup else []
            size, rest = divmod(opts.requests, opts.segments)
            plan += [
                (f"segment {i + 1}", size + (1 if i < rest else 0)) for i in range(opts.segments)
            ]
            profile = (
                profile_pid(pid, opts.out_dir / "memory-profile.collapsed")
                if opts.profile
                else contextlib.nullcontext()
            )
            with profile:
                for label, count in plan:
                    cpu_before = process_cpu_s(pid)
                    with BusyMeter(label, [pid, provider.pid]) as meter:
                        result, elapsed = run_segment(opts, lua, url, sent, count)
                        sent += result["sent"]
                        sample = sample_memory(gw, label, sent)
                    assert meter.result is not None
                    busy.append(meter.result)
                    sample.rps = result["responses"] / (result["duration_us"] / 1e6)
                    sample.p99_ms = result["p99_us"] / 1000
                    sample.cpu_us_per_request = (
                        (process_cpu_s(pid) - cpu_before) / result["sent"] * 1e6
                    )
                    sample.foreign_share = meter.result.foreign_share
                    if result["non_200"] or result["socket_errors"]:
                        print(
                            f"  {label}: {result['non_200']} non-200, "
                            f"{result['socket_errors']} socket errors",
                            flush=True,
                        )
                    samples.append(sample)
                    print(
                        f"  {label:<11} {sent:>7} requests  RSS {sample.rss_kib / 1024:7.1f} MB  "
                        f"anon {sample.anon_kib / 1024:7.1f} MB  {sample.rps:6.0f} rps  "
                        f"({elapsed:.1f} s, foreign CPU {meter.result.foreign_share:.0%})",
                        flush=True,
                    )
            rollouts = sent // opts.calls_per_rollout + 1
    return samples, busy, rollouts


def slope_bytes_per_request(samples: list[Sample]) -> float:
    """Least-squares slope of RSS over requests, second half of the measured samples."""
    half = samples[len(samples) // 2 :]
    if len(half) < 2:
        return 0.0
    xs = [s.requests for s in half]
    ys = [s.rss_kib * 1024 for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def report(
    opts: Options, samples: list[Sample], busy: list[Busy], rollouts: int, busy_before: float
) -> None:
    measured = [s for s in samples if s.label.startswith("segment")]
    base = next((s for s in samples if s.label == "warm-up"), samples[0])
    last = samples[-1]
    growth_mb = (last.rss_kib - base.rss_kib) / 1024
    anon_growth_mb = (last.anon_kib - base.anon_kib) / 1024
    slope = slope_bytes_per_request([base, *measured])
    header = [
        "after",
        "requests",
        "VmRSS MB",
        "RssAnon MB",
        "VmHWM MB",
        "RSS vs warm-up MB",
        "rps",
        "p99 ms",
        "gateway CPU µs/req",
        "spans written",
        "foreign CPU",
    ]
    rows = [
        [
            s.label,
            str(s.requests),
            f"{s.rss_kib / 1024:.1f}",
            f"{s.anon_kib / 1024:.1f}",
            f"{s.hwm_kib / 1024:.1f}",
            f"{(s.rss_kib - base.rss_kib) / 1024:+.1f}",
            f"{s.rps:.0f}" if s.rps else "-",
            f"{s.p99_ms:.1f}" if s.rps else "-",
            f"{s.cpu_us_per_request:.0f}" if s.rps else "-",
            str(s.spans_written),
            f"{s.foreign_share:.0%}" if s.rps else "-",
        ]
        for s in samples
    ]
    curve = ascii_curve(samples)
    n_measured = last.requests - base.requests
    targets = [
        TargetCheck(
            "gateway RSS growth over the measured requests",
            f"< {TARGET_GROWTH_MB:g} MB",
            f"{growth_mb:+.1f} MB",
            growth_mb < TARGET_GROWTH_MB,
            f"{n_measured} requests after a {base.requests}-request warm-up; spans written = "
            f"requests sent: {'yes' if last.spans_written == last.requests else 'NO'}; RssAnon "
            f"{anon_growth_mb:+.1f} MB; slope over the second half {slope:.1f} B/request",
        )
    ]
    if n_measured < 100_000:
        targets[0].note += "; shortened run (the target is over 100,000)"
    info = machine_info(
        opts.placement,
        busy_before,
        **{
            "load generator": tool_version(["wrk", "--version"]),
            "fake provider": f"tests/fake_provider.py, latency {opts.latency * 1000:g} ms",
            "load": f"{opts.concurrency} connections, closed loop, non-streaming chat",
            "rollouts": f"{rollouts} ({opts.calls_per_rollout} calls each)",
            "gateway config": "one OpenAI-compatible model, default recorder (bodies stored)",
        },
    )
    write_results(
        "memory",
        "spangate memory benchmark",
        "Gateway RSS (from /proc/PID/status) while `wrk` sends non-streaming chat completions "
        "through it, a new rollout every "
        f"{opts.calls_per_rollout} calls. Samples are taken after each segment, once the "
        "recorder queue is empty.",
        out_dir=opts.out_dir,
        sections=[
            Section("RSS along the run", header, rows),
            Section("Curve", [], [], "```\n" + curve + "\n```"),
        ],
        targets=targets,
        busy=busy,
        info=info,
        records=[s.__dict__ for s in samples],
        extra={
            "rss_growth_mb": growth_mb,
            "anon_growth_mb": anon_growth_mb,
            "slope_bytes_per_request": slope,
        },
    )
    print(curve)


def ascii_curve(samples: list[Sample], width: int = 50) -> str:
    lo = min(s.rss_kib for s in samples)
    hi = max(s.rss_kib for s in samples)
    span = max(hi - lo, 1)
    lines = [f"RSS MB ({lo / 1024:.1f} .. {hi / 1024:.1f})"]
    for s in samples:
        bar = "#" * (1 + round((s.rss_kib - lo) / span * (width - 1)))
        lines.append(f"{s.requests:>7} {s.rss_kib / 1024:7.1f} {bar}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=5_000, help="warm-up requests")
    parser.add_argument("--segments", type=int, default=10, help="RSS samples along the run")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections")
    parser.add_argument("--calls-per-rollout", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.0, help="fake provider latency (s)")
    parser.add_argument(
        "--segment-timeout", type=float, default=300, help="longest a segment may take (s)"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.segments < 1 or args.requests < args.segments or args.calls_per_rollout < 1:
        parser.error("need --segments >= 1, --requests >= --segments, --calls-per-rollout >= 1")
    return Options(
        requests=args.requests,
        warmup=args.warmup,
        segments=args.segments,
        concurrency=args.concurrency,
        calls_per_rollout=args.calls_per_rollout,
        latency=args.latency,
        **common_options(args),
        profile=args.profile,
        segment_timeout=args.segment_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    opts, busy_before = begin_run(parse_args, argv)
    print(
        f"memory benchmark: {opts.warmup} warm-up + {opts.requests} requests, "
        f"{opts.concurrency} connections; {opts.placement.describe()}",
        flush=True,
    )
    samples, busy, rollouts = run(opts)
    report(opts, samples, busy, rollouts, busy_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
