"""spangate next to LiteLLM Proxy in one run (issue 19): the same fake provider, the same load
generator, four targets, one table.

Targets, each in front of tests/fake_provider.py (20 ms latency):

- *direct*: the fake provider itself;
- *aiohttp floor*: bench/_thin_proxy.py, the thinnest aiohttp-in, aiohttp-out hop (no parsing,
  no recording), on spangate's core: what any gateway built on aiohttp pays before its own work;
- *spangate*: `spangate serve` recording into SQLite, started as bench/overhead.py starts it;
- *LiteLLM*: LiteLLM Proxy 1.103.7 (`litellm --config CFG --num_workers 2`) from its own venv
  (`--litellm-venv`, created and filled by this script when it does not exist; never the
  project's venv), one `openai/` model whose `api_base` is the fake provider, run offline: no
  database, no callbacks, telemetry off, the bundled model-cost map, no access log.

For each concurrency (1 and 64), wrk (bench/overhead.py's script and runner) drives each target
in turn: warm-up, then the measured run; the CPU of the target's processes and of everything
else on the machine is read from /proc. Then an aiohttp client in this process streams one chat
at a time, rotating over the targets, and takes the time to the first content chunk
(bench/streaming.py's client). spangate's spans are counted as overhead.py counts them: every
request wrk sent, and every stream, must be one span, after the queue drained and again after
the gateway exited.

Placement (`--pin on`, the default): spangate on core 0, LiteLLM and all its workers on core 0
too (`--litellm-cpus`; the same CPU budget as spangate), wrk, the fake provider and the TTFT
client on core 1. Only the target under load is busy on core 0: the other one idles.

    python bench/vs_litellm.py [--duration 10] [--warmup 2] [--concurrency 1,64]
        [--ttft-requests 200] [--litellm-venv /tmp/litellm-venv] [--litellm-workers 2]
        [--litellm-cpus 0] [--pin on|off] [--nice N] [--quiet-wait S] [--out-dir DIR]

Results: bench/results/vs_litellm.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    QUIET_THRESHOLD,
    Busy,
    BusyMeter,
    Placement,
    Section,
    TargetCheck,
    exit_on_sigterm,
    machine_info,
    percentile,
    rotated,
    run_niced,
    settle,
    wake_round_trip_us,
    write_results,
)
from overhead import (
    BODY,
    DEFAULT_PROVIDER,
    GATEWAY_CPU,
    HOST,
    LOADGEN_CPU,
    MODEL,
    WRK_LUA,
    LoadResult,
    count_spans,
    default_spangate,
    ensure_alive,
    free_port,
    managed_process,
    placed,
    preflight,
    process_cpu_s,
    run_load,
    span_overhead_p50,
    spawn_options,
    start_gateway,
    start_provider,
    stop_process,
    tool_version,
    wait_flushed,
    wait_for,
)
from overhead import Options as LoadOptions
from streaming import REQUEST_TIMEOUT_S, request_body, run_async, stream_once

# Pinned on purpose: 1.82.7, 1.82.8 and 1.107.0 on PyPI are malicious uploads.
LITELLM_VERSION = "1.103.7"
LITELLM_REQUIREMENT = f"litellm[proxy]=={LITELLM_VERSION}"
DEFAULT_LITELLM_VENV = Path("/tmp/litellm-venv")

TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 3.0
TARGET_RATIO_AT_64 = 0.65
TARGET_P99_FACTOR_AT_64 = 2.0
TARGET_TTFT_ADDED_MS = 1.0
DEFAULT_DURATION = 10
IDLE_SHARE = 0.05  # of one core: a target below this between runs has finished its backlog
MIN_COMPLETED_PER_CONNECTION = 2  # fewer responses per wrk connection: no usable percentiles

DIRECT, FLOOR, SPANGATE, LITELLM = "direct", "aiohttp floor", "spangate", "LiteLLM"
THIN_PROXY = Path(__file__).with_name("_thin_proxy.py")
STREAM_ROLLOUT = "bench-stream"


# ---------------------------------------------------------------------------------------------
# LiteLLM Proxy: its own venv, an offline config, its process tree


def litellm_install_command(venv: Path) -> str:
    return f"python3 -m venv {venv} && {venv}/bin/pip install '{LITELLM_REQUIREMENT}'"


def ensure_litellm(venv: Path) -> str:
    """The litellm version installed in venv, installing it first when the venv does not exist
    yet. LiteLLM's proxy extra pins its own FastAPI/uvicorn stack, so it never goes into the
    project's venv."""
    if not venv.exists():
        print(f"installing LiteLLM into its own venv: {litellm_install_command(venv)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q", LITELLM_REQUIREMENT]
        subprocess.run(pip, check=True)
    version = venv_version(venv, "litellm")
    if version != LITELLM_VERSION or not (venv / "bin" / "litellm").exists():
        raise SystemExit(
            f"{venv} holds litellm {version}, not {LITELLM_VERSION}; remove it or point "
            f"--litellm-venv elsewhere (it is then created: {litellm_install_command(venv)})"
        )
    return version


def venv_version(venv: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return tool_version([str(venv / "bin" / "python"), "-c", code])


def write_litellm_config(tmp: Path, provider_base: str) -> tuple[Path, Path]:
    """The proxy config (one model, no callbacks, telemetry off; no database_url, so no DB) and a
    uvicorn logging config that keeps start-up messages but drops the per-request access log,
    which spangate does not write either."""
    cfg = tmp / "litellm.yaml"
    cfg.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {provider_base}\n"
        "      api_key: sk-bench\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  callbacks: []\n"
        "  success_callback: []\n"
        "  failure_callback: []\n"
        "  turn_off_message_logging: true\n"
        "general_settings:\n"
        "  disable_spend_logs: true\n"
        "  disable_error_logs: true\n"
    )
    log_cfg = tmp / "litellm-logging.json"
    handler = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
    log_cfg.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"plain": {"format": "%(levelname)s: %(message)s"}},
                "handlers": {"stderr": handler},
                "loggers": {
                    "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                    "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
                },
            }
        )
    )
    return cfg, log_cfg


# What the proxy needs to run offline and stay up while it starts on a busy machine.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the model-cost map at start-up
    # uvicorn's supervisor kills a worker that does not answer its ping within 5 s; importing
    # the proxy takes longer than that on a busy 2-core machine, so workers restarted in a loop.
    "TIMEOUT_WORKER_HEALTHCHECK": "120",
}
# Settings from the caller's environment that would give the proxy a database, a cache or auth.
LITELLM_ENV_DROP = ("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_HOST", "REDIS_URL", "LITELLM_LOG")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (LiteLLM's uvicorn parent and its worker processes)."""
    pids, i = [pid], 0
    while i < len(pids):
        for children in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                pids += [int(p) for p in children.read_text().split()]
        i += 1
    return pids


@dataclass
class LiteLLM:
    proc: subprocess.Popen[bytes]
    base: str  # .../v1
    log_path: Path
    start_s: float  # launch to every worker serving
    workers: int
    restarts_at_start: int  # workers that died while the proxy started

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)


def log_count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text)


@contextlib.contextmanager
def start_litellm(opts: Options, tmp: Path, provider_base: str) -> Iterator[LiteLLM]:
    """The proxy on `--litellm-cpus`, yielded once every worker serves; stopped (its whole
    process group) however the block ends."""
    cfg, log_cfg = write_litellm_config(tmp, provider_base)
    port = free_port()
    cmd = [str(opts.litellm_venv / "bin" / "litellm"), "--config", str(cfg), "--host", HOST]
    cmd += ["--port", str(port), "--num_workers", str(opts.litellm_workers)]
    cmd += ["--log_config", str(log_cfg)]
    env = {k: v for k, v in os.environ.items() if k not in LITELLM_ENV_DROP} | LITELLM_ENV
    env.pop("PYTHONPATH", None)  # our tree must not shadow anything in LiteLLM's venv
    log_path = tmp / "litellm.log"
    popen = spawn_options(opts.load) | {"start_new_session": True, "env": env, "cwd": tmp}
    started = time.monotonic()
    with managed_process(
        placed(cmd, opts.litellm_cpus, opts.load), log_path, "litellm", **popen
    ) as proc:
        try:
            base = f"http://{HOST}:{port}/v1"

            def serving() -> bool | None:
                # The port answers as soon as one worker is up; wait for all of them.
                ensure_alive(proc, "LiteLLM", log_path)
                done = log_count(log_path, "Application startup complete.")
                return True if done >= opts.litellm_workers and http_ok(base + "/models") else None

            print(
                f"starting LiteLLM {LITELLM_VERSION} ({opts.litellm_workers} workers)", flush=True
            )
            wait_for("LiteLLM's workers", serving, opts.litellm_timeout, interval=0.2)
            yield LiteLLM(
                proc,
                base,
                log_path,
                time.monotonic() - started,
                opts.litellm_workers,
                log_count(log_path, "died"),
            )
        finally:
            stop_process(proc, "litellm", timeout=30)
            with contextlib.suppress(ProcessLookupError):  # a worker its parent left behind
                os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def start_floor(opts: Options, tmp: Path, provider_base: str) -> Iterator[tuple[str, int]]:
    """bench/_thin_proxy.py on the gateway's core: its /v1 base URL and pid, once it answers."""
    port = free_port()
    cmd = [sys.executable, str(THIN_PROXY), str(port), provider_base]
    log_path = tmp / "floor.log"
    popen = spawn_options(opts.load) | {"cwd": tmp}
    with managed_process(placed(cmd, GATEWAY_CPU, opts.load), log_path, "floor", **popen) as proc:
        base = f"http://{HOST}:{port}/v1"

        def serving() -> bool | None:
            ensure_alive(proc, "the aiohttp floor", log_path)
            return True if port_open(port) else None

        wait_for("the aiohttp floor", serving, 60, interval=0.1)
        yield base, proc.pid


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
        return True
    return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Target:
    name: str
    url: Callable[[str], str]  # rollout -> chat completions URL (only spangate uses the rollout)
    pids: Callable[[], list[int]]  # the processes whose CPU is the target's


@dataclass
class Run:
    """One measured wrk run against one target."""

    target: str
    concurrency: int
    load: LoadResult
    cpu_s: float  # CPU of the target's processes during the measured run
    busy: Busy
    note: str = ""
    others_cpu_s: float = 0.0  # the other gateway, idle on the same core, meanwhile
    spans_after_flush: int | None = None  # spangate only
    spans_after_stop: int | None = None
    own_p50_ms: float | None = None  # spangate only: its spans' overhead_ms, median

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.load.requests * 1e6 if self.load.requests else 0.0

    @property
    def recorded(self) -> bool:
        return self.spans_after_flush == self.spans_after_stop == self.load.sent


def cpu_of(pids: list[int]) -> float:
    return sum(process_cpu_s(p) for p in pids)


def wait_idle(pids: list[int], timeout: float = 60.0, window: float = 0.25) -> None:
    """Wait (bounded) until the processes are nearly idle: when wrk stops, requests still in
    flight go on inside the target, and on a slow target that backlog would run into the next
    target's measurement on the same core."""
    deadline = time.monotonic() + timeout
    last = cpu_of(pids)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_of(pids)
        if now - last < IDLE_SHARE * window:
            return
        last = now


def measure(
    opts: Options, target: Target, concurrency: int, lua: Path, targets: list[Target], provider: int
) -> Run:
    """Warm-up, then the measured wrk run. Every target's processes and the provider count as
    ours (not foreign); what the idle gateway took on the shared core meanwhile is noted."""
    rollout = f"bench-{concurrency}"
    if opts.load.warmup > 0:
        warm = target.url(f"bench-warmup-{concurrency}")
        run_load(opts.load, warm, concurrency, opts.load.warmup, lua)
    pids = target.pids()
    wait_idle(pids)
    others = [p for t in targets if t is not target for p in t.pids()]
    before, others_before = cpu_of(pids), cpu_of(others)
    with BusyMeter(f"{target.name} c={concurrency}", [*pids, *others, provider]) as meter:
        load = run_load(opts.load, target.url(rollout), concurrency, opts.load.duration, lua)
    cpu, others_cpu = cpu_of(pids) - before, cpu_of(others) - others_before
    assert meter.result is not None
    after = target.pids()
    notes = [] if after == pids else [f"processes changed during the run: {pids} -> {after}"]
    if load.requests < MIN_COMPLETED_PER_CONNECTION * concurrency:
        notes.append(
            f"only {load.requests} responses completed in the {opts.load.duration} s window: "
            "too few for latency percentiles or throughput; run longer (--duration)"
        )
    note = "; ".join(notes)
    wait_idle(after)
    print(
        f"  {target.name:<8} c={concurrency:<3} p50 {load.p50_us / 1000:7.2f} ms  "
        f"p99 {load.p99_us / 1000:7.2f} ms  {load.rps:7.0f} rps  sent {load.sent}  "
        f"non-2xx {load.errors_status}  foreign CPU {meter.result.foreign_share:.0%}"
        + (f"\n    NOTE: {note}" if note else ""),
        flush=True,
    )
    return Run(target.name, concurrency, load, cpu, meter.result, note, others_cpu)


def warm_up(opts: Options, targets: list[Target], lua: Path) -> None:
    """One request each (a broken target fails here, not as a fast error path), then load at
    the highest concurrency: wrk at concurrency 1 keeps one connection, which reaches only one
    of LiteLLM's workers, so the others would meet their first requests in a measured run."""
    for target in targets:
        preflight(target.url("bench-preflight"), target.name)
    top = max(opts.concurrency)
    print(f"warm-up: {opts.load.warmup} s per target at concurrency {top}", flush=True)
    for target in targets:
        if opts.load.warmup > 0:
            run_load(opts.load, target.url("bench-warmup"), top, opts.load.warmup, lua)
            wait_idle(target.pids())


async def ttft_rounds(urls: dict[str, str], body: bytes, rounds: int) -> dict[str, list[float]]:
    """`rounds` rounds of one stream per target, one at a time, the order rotating each round so
    drift hits every target alike; the time to the first content chunk of each, in ms."""
    out: dict[str, list[float]] = {name: [] for name in urls}
    names = list(urls)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for i in range(rounds):
            for name in rotated(names, i):
                sample = await stream_once(session, urls[name], body)
                if sample.status != 200:
                    raise RuntimeError(f"{name} answered {sample.status} to a stream")
                out[name].append(sample.ttft_ms)
    return out


@dataclass
class Outcome:
    runs: list[Run]
    ttft_ms: dict[str, list[float]]
    ttft_busy: Busy
    stream_spans_flushed: int
    stream_spans_stopped: int
    gateway_rc: int | None
    litellm: LiteLLM
    spangate_start_s: float
    load_before: str
    # Median µs of a round trip between idle processes: on one core, and across the two.
    wake_us: tuple[float | None, float | None] = (None, None)


def run(opts: Options) -> Outcome:
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    # Idle as long as the gateway's core is while the fake provider thinks.
    wake_us = (
        wake_round_trip_us(int(GATEWAY_CPU), int(GATEWAY_CPU), opts.load.latency),
        wake_round_trip_us(int(GATEWAY_CPU), int(LOADGEN_CPU), opts.load.latency),
    )
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="spangate-vs-litellm-") as tmp_name,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(tmp_name)
        lua = tmp / "chat.lua"
        lua.write_text(WRK_LUA % {"body": BODY})
        provider_base, provider = start_provider(opts.load, tmp, stack)
        litellm = stack.enter_context(start_litellm(opts, tmp, provider_base))
        floor_base, floor_pid = stack.enter_context(start_floor(opts, tmp, provider_base))
        print(
            f"  LiteLLM serving after {litellm.start_s:.1f} s "
            f"({litellm.restarts_at_start} worker restarts)",
            flush=True,
        )
        started = time.monotonic()
        gw = start_gateway(opts.load, tmp, provider_base)
        spangate_start_s = time.monotonic() - started
        gateway_rc: int | None = None
        try:
            targets = [
                Target(DIRECT, lambda _r: provider_base + "/chat/completions", lambda: []),
                Target(FLOOR, lambda _r: floor_base + "/chat/completions", lambda: [floor_pid]),
                Target(
                    SPANGATE,
                    lambda r: f"{gw.root}/rollout/{r}/attempt/1/v1/chat/completions",
                    lambda: [gw.proc.pid],
                ),
                Target(LITELLM, lambda _r: litellm.base + "/chat/completions", litellm.pids),
            ]
            warm_up(opts, targets, lua)
            for concurrency in opts.concurrency:
                for target in targets:
                    result = measure(opts, target, concurrency, lua, targets, provider.pid)
                    if target.name == SPANGATE:
                        # Before the next target loads core 0, so the writer's catch-up does
                        # not run during it.
                        rollout = f"bench-{concurrency}"
                        result.spans_after_flush = wait_flushed(gw, rollout, result.load.sent)
                        result.own_p50_ms = span_overhead_p50(gw.db, rollout)
                    runs.append(result)
            ours = [provider.pid, *(p for t in targets for p in t.pids())]
            ttft, ttft_busy = measure_ttft(opts, targets, ours)
            stream_flushed = wait_flushed(gw, STREAM_ROLLOUT, opts.ttft_requests)
        finally:
            gateway_rc = stop_process(gw.proc, "gateway", timeout=60)
        for r in runs:
            if r.target == SPANGATE:
                r.spans_after_stop = count_spans(gw.db, f"bench-{r.concurrency}")
        stream_stopped = count_spans(gw.db, STREAM_ROLLOUT)
        return Outcome(
            runs,
            ttft,
            ttft_busy,
            stream_flushed,
            stream_stopped,
            gateway_rc,
            litellm,
            spangate_start_s,
            load_before,
            wake_us,
        )


def measure_ttft(
    opts: Options, targets: list[Target], ours: list[int]
) -> tuple[dict[str, list[float]], Busy]:
    body = request_body(opts.chunks)
    warm = {t.name: t.url(f"{STREAM_ROLLOUT}-warmup") for t in targets}
    urls = {t.name: t.url(STREAM_ROLLOUT) for t in targets}
    affinity = os.sched_getaffinity(0)
    if opts.load.pin:
        os.sched_setaffinity(0, {int(LOADGEN_CPU)})  # the client shares wrk's core
    try:
        print(f"TTFT: {opts.ttft_requests} streams per target, one at a time", flush=True)
        run_async(ttft_rounds(warm, body, opts.ttft_warmup))
        with BusyMeter("TTFT (streams)", ours) as meter:
            ttft: dict[str, list[float]] = run_async(ttft_rounds(urls, body, opts.ttft_requests))
    finally:
        os.sched_setaffinity(0, affinity)
    assert meter.result is not None
    return ttft, meter.result


# ---------------------------------------------------------------------------------------------
# Reporting


def ms(us: float) -> float:
    return us / 1000


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


@dataclass
class Summary:
    """One target's numbers against direct, as the issue states its targets."""

    target: str
    c1_p50_ms: float | None = None
    c1_p99_ms: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    c64_rps: float | None = None
    c64_ratio: float | None = None
    c64_p99_ms: float | None = None
    c64_p99_factor: float | None = None
    ttft_p50_ms: float | None = None
    ttft_added_ms: float | None = None
    cpu_us_c64: float | None = None
    recorded: bool | None = None  # spangate only
    errors: int = 0  # non-2xx, socket errors and timeouts over all its runs
    notes: list[str] = field(default_factory=list)


def summarize(outcome: Outcome, opts: Options) -> list[Summary]:
    by = {(r.target, r.concurrency): r for r in outcome.runs}
    ttft = {name: statistics.median(v) for name, v in outcome.ttft_ms.items() if v}
    out = []
    for name in (DIRECT, FLOOR, SPANGATE, LITELLM):
        s = Summary(name)
        runs = [r for r in outcome.runs if r.target == name]
        s.errors = sum(
            r.load.errors_status + r.load.errors_socket + r.load.errors_timeout for r in runs
        )
        s.notes = [r.note for r in runs if r.note]
        if (one := by.get((name, 1))) and (d1 := by.get((DIRECT, 1))):
            s.c1_p50_ms, s.c1_p99_ms = ms(one.load.p50_us), ms(one.load.p99_us)
            if name != DIRECT:
                s.added_p50_ms = ms(one.load.p50_us - d1.load.p50_us)
                s.added_p99_ms = ms(one.load.p99_us - d1.load.p99_us)
        if (many := by.get((name, 64))) and (d64 := by.get((DIRECT, 64))):
            s.c64_rps, s.c64_p99_ms = many.load.rps, ms(many.load.p99_us)
            s.cpu_us_c64 = many.cpu_us_per_request if name != DIRECT else None
            if name != DIRECT:
                s.c64_ratio = many.load.rps / d64.load.rps if d64.load.rps else 0.0
                s.c64_p99_factor = many.load.p99_us / d64.load.p99_us if d64.load.p99_us else 0.0
        s.ttft_p50_ms = ttft.get(name)
        if name != DIRECT and name in ttft and DIRECT in ttft:
            s.ttft_added_ms = ttft[name] - ttft[DIRECT]
        if name == SPANGATE:
            streams = (outcome.stream_spans_flushed, outcome.stream_spans_stopped)
            s.recorded = all(r.recorded for r in runs) and streams == (opts.ttft_requests,) * 2
        out.append(s)
    return out


SUMMARY_HEADER = [
    "target",
    "c1 p50 ms",
    "c1 p99 ms",
    "added p50 ms (c1)",
    "added p99 ms (c1)",
    "c64 req/s",
    "c64 % of direct",
    "c64 p99 ms",
    "c64 p99 vs direct",
    "TTFT p50 ms",
    "TTFT added ms",
    "CPU µs/request (c64)",
    "every request recorded",
    "errors",
]


def summary_rows(summaries: list[Summary]) -> list[list[str]]:
    rows = []
    for s in summaries:
        recorded = {None: "-" if s.target == DIRECT else "n/a", True: "yes", False: "NO"}
        rows.append(
            [
                s.target,
                fmt(s.c1_p50_ms),
                fmt(s.c1_p99_ms),
                fmt(s.added_p50_ms, "+.2f"),
                fmt(s.added_p99_ms, "+.2f"),
                fmt(s.c64_rps, ".0f"),
                fmt(None if s.c64_ratio is None else s.c64_ratio * 100, ".0f", " %"),
                fmt(s.c64_p99_ms),
                fmt(s.c64_p99_factor, ".2f", "x"),
                fmt(s.ttft_p50_ms),
                fmt(s.ttft_added_ms, "+.2f"),
                fmt(s.cpu_us_c64, ".0f"),
                recorded[s.recorded],
                str(s.errors),
            ]
        )
    return rows


FLOOR_HEADER = [
    "target",
    "c1 p50 above the floor, ms",
    "TTFT above the floor, ms",
    "c64 req/s, share of the floor's",
    "CPU µs/request (c64) above the floor's",
]


def floor_rows(summaries: list[Summary]) -> list[list[str]]:
    """What each gateway adds on top of the bare aiohttp hop, measured in the same run."""
    by = {s.target: s for s in summaries}
    floor = by.get(FLOOR)
    if floor is None:
        return []

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    rows = []
    for name in (SPANGATE, LITELLM):
        s = by[name]
        share = None if not (s.c64_rps and floor.c64_rps) else s.c64_rps / floor.c64_rps * 100
        rows.append(
            [
                name,
                fmt(minus(s.c1_p50_ms, floor.c1_p50_ms), "+.2f"),
                fmt(minus(s.ttft_p50_ms, floor.ttft_p50_ms), "+.2f"),
                fmt(share, ".0f", " %"),
                fmt(minus(s.cpu_us_c64, floor.cpu_us_c64), "+.0f"),
            ]
        )
    return rows


SPLIT_HEADER = [
    "target",
    "added p50 at c1, ms",
    "its own time, p50 ms",
    "the rest: hops between processes and what overhead_ms does not time, ms",
]


def split_rows(outcome: Outcome, summaries: list[Summary]) -> list[list[str]]:
    """spangate's added latency at concurrency 1, split into what it spends on a call (its
    spans say) and what the two extra loopback hops cost."""
    by = {s.target: s for s in summaries}
    own = next(
        (r.own_p50_ms for r in outcome.runs if r.target == SPANGATE and r.concurrency == 1), None
    )
    added = by[SPANGATE].added_p50_ms
    rest = None if added is None or own is None else added - own
    rows = [[SPANGATE, fmt(added, "+.2f"), fmt(own, ".2f"), fmt(rest, "+.2f")]]
    floor = by.get(FLOOR)
    if floor is not None:
        rows.append([FLOOR, fmt(floor.added_p50_ms, "+.2f"), "-", "-"])
    return rows


def split_note(outcome: Outcome, latency: float) -> str:
    same, cross = outcome.wake_us
    probe = (
        "not measured here"
        if same is None or cross is None
        else f"{same:.0f} µs between two processes on one core, {cross:.0f} µs across the two "
        f"cores (median of 150, each after {latency * 1000:g} ms idle, as long as the "
        "provider's latency; bench/_common.py `wake_round_trip_us`)"
    )
    return (
        "*Its own time* is the median `overhead_ms` of spangate's spans in the c1 run: parsing "
        "to forwarding, and the upstream's answer to the client's, without the upstream (the "
        "HTTP read before its clock starts, and the loop's turns, are in the rest). The "
        "rest is mostly what a proxy's two extra connections cost: the client's request and answer "
        "cross from the load generator's core to the gateway's and back, and so does the "
        "upstream call. At concurrency 1 the gateway's core sleeps while the provider thinks, "
        "and its answer must wake it: on a VM that wake is the larger part of the rest. A "
        f"round trip that wakes an idle core took {probe} at the start of this run."
    )


def checks(s: Summary) -> list[TargetCheck]:
    """The issue's bounds applied to one target (spangate's are the targets; LiteLLM's are
    for comparison)."""

    def check(
        name: str, bound: str, value: float | None, ok: Callable[[float], bool], unit: str
    ) -> TargetCheck:
        if value is None:
            return TargetCheck(f"{s.target}: {name}", bound, "not measured", None)
        return TargetCheck(f"{s.target}: {name}", bound, f"{value:.2f}{unit}", ok(value))

    out = [
        check(
            "added p50 at c1",
            f"<= {TARGET_ADDED_P50_MS:g} ms",
            s.added_p50_ms,
            lambda v: v <= TARGET_ADDED_P50_MS,
            " ms",
        ),
        check(
            "added p99 at c1",
            f"<= {TARGET_ADDED_P99_MS:g} ms",
            s.added_p99_ms,
            lambda v: v <= TARGET_ADDED_P99_MS,
            " ms",
        ),
        check(
            "throughput at c64, share of direct",
            f">= {TARGET_RATIO_AT_64:.0%}",
            None if s.c64_ratio is None else s.c64_ratio * 100,
            lambda v: v >= TARGET_RATIO_AT_64 * 100,
            " %",
        ),
        check(
            "p99 at c64 vs direct",
            f"<= {TARGET_P99_FACTOR_AT_64:g}x",
            s.c64_p99_factor,
            lambda v: v <= TARGET_P99_FACTOR_AT_64,
            "x",
        ),
        check(
            "streaming TTFT added (medians)",
            f"<= {TARGET_TTFT_ADDED_MS:g} ms",
            s.ttft_added_ms,
            lambda v: v <= TARGET_TTFT_ADDED_MS,
            " ms",
        ),
    ]
    if s.target == SPANGATE:
        out.append(
            TargetCheck(
                "spangate: every request recorded",
                "spans = requests sent",
                "yes" if s.recorded else "no",
                s.recorded,
                "each wrk run's sent count and every stream, after the queue drained and "
                "after SIGTERM",
            )
        )
    return out


RUN_HEADER = [
    "target",
    "concurrency",
    "p50 ms",
    "p99 ms",
    "req/s",
    "sent",
    "completed",
    "non-2xx",
    "socket errors / timeouts",
    "target CPU µs/request",
    "idle gateway's CPU",
    "foreign CPU",
    "spans after flush / after SIGTERM",
    "note",
]


def run_rows(runs: list[Run]) -> list[list[str]]:
    return [
        [
            r.target,
            str(r.concurrency),
            f"{ms(r.load.p50_us):.2f}",
            f"{ms(r.load.p99_us):.2f}",
            f"{r.load.rps:.0f}",
            str(r.load.sent),
            str(r.load.requests),
            str(r.load.errors_status),
            f"{r.load.errors_socket} / {r.load.errors_timeout}",
            "-" if r.target == DIRECT else f"{r.cpu_us_per_request:.0f}",
            f"{r.others_cpu_s / r.busy.wall_s:.1%}" if r.busy.wall_s else "-",
            f"{r.busy.foreign_share:.0%}",
            "-" if r.spans_after_flush is None else f"{r.spans_after_flush} / {r.spans_after_stop}",
            r.note,
        ]
        for r in runs
    ]


TTFT_HEADER = ["target", "streams", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "added p50 ms"]


def ttft_rows(ttft: dict[str, list[float]]) -> list[list[str]]:
    base = statistics.median(ttft[DIRECT]) if ttft.get(DIRECT) else None
    rows = []
    for name, values in ttft.items():
        p50 = statistics.median(values)
        added = "-" if base is None or name == DIRECT else f"{p50 - base:+.2f}"
        rows.append(
            [
                name,
                str(len(values)),
                f"{p50:.2f}",
                f"{percentile(values, 90):.2f}",
                f"{percentile(values, 99):.2f}",
                added,
            ]
        )
    return rows


def is_short(opts: Options) -> bool:
    return opts.load.duration < DEFAULT_DURATION


def report(opts: Options, outcome: Outcome, busy_before: float) -> None:
    summaries = summarize(outcome, opts)
    by_name = {s.target: s for s in summaries}
    targets = checks(by_name[SPANGATE])
    litellm = outcome.litellm
    placement = Placement(pin=opts.load.pin, nice=opts.load.nice)
    info = machine_info(
        placement,
        busy_before,
        **{
            "load average (1/5/15 min) at the start": outcome.load_before,
            "run length": (
                f"SHORT validation run: {opts.load.warmup} s warm-up + {opts.load.duration} s "
                f"measured per wrk run, {opts.ttft_requests} streams per target; indicative only"
                if is_short(opts)
                else f"{opts.load.warmup} s warm-up + {opts.load.duration} s measured per wrk "
                f"run, {opts.ttft_requests} streams per target"
            ),
            "fake provider": f"tests/fake_provider.py, latency {opts.load.latency * 1000:g} ms",
            "load generator": tool_version(["wrk", "--version"])
            if opts.load.loadgen == "wrk"
            else "bench/_aio_loadgen.py (aiohttp, closed loop)",
            "TTFT client": f"aiohttp (uvloop) in the benchmark process; {opts.chunks}-chunk "
            f"streams with usage; rounds rotate the order of the targets; "
            f"{opts.ttft_warmup} warm-up rounds",
            "LiteLLM": f"litellm {venv_version(opts.litellm_venv, 'litellm')} "
            f"(uvicorn {venv_version(opts.litellm_venv, 'uvicorn')}, "
            f"{tool_version([str(opts.litellm_venv / 'bin' / 'python'), '--version'])}) "
            f"from {opts.litellm_venv}; {opts.litellm_workers} workers; "
            + (f"pinned to core(s) {opts.litellm_cpus}" if opts.load.pin else "not pinned"),
            "LiteLLM settings": "no database (no database_url), no master key, callbacks "
            "empty, telemetry false, disable_spend_logs and disable_error_logs, "
            "turn_off_message_logging; env LITELLM_LOCAL_MODEL_COST_MAP=True, "
            "TIMEOUT_WORKER_HEALTHCHECK=120; uvicorn access log off (--log_config)",
            "LiteLLM start-up": f"{litellm.start_s:.1f} s from launch to every worker serving; "
            f"{litellm.restarts_at_start} worker restarts meanwhile",
            "spangate start-up": f"{outcome.spangate_start_s:.1f} s to /health/ready",
            "spangate": "`spangate serve` recording into SQLite (bench/overhead.py's config)",
            "spangate exit code": str(outcome.gateway_rc),
            "idle-core round trip at the start (one core / across cores)": " / ".join(
                "-" if us is None else f"{us:.0f} µs" for us in outcome.wake_us
            ),
        },
    )
    run_notes = [f"{r.target} c={r.concurrency}: {r.note}" for r in outcome.runs if r.note]
    records: list[dict[str, Any]] = []
    for r in outcome.runs:
        load = asdict(r.load)
        load.pop("cpu", None)
        records.append(
            {
                "kind": "load",
                "target": r.target,
                "concurrency": r.concurrency,
                **load,
                "rps": round(r.load.rps, 1),
                "target_cpu_us_per_request": round(r.cpu_us_per_request, 1),
                "idle_gateway_cpu_s": round(r.others_cpu_s, 3),
                "foreign_share": round(r.busy.foreign_share, 4),
                "spans_after_flush": r.spans_after_flush,
                "spans_after_stop": r.spans_after_stop,
                "own_p50_ms": r.own_p50_ms,
                "note": r.note,
            }
        )
    for name, values in outcome.ttft_ms.items():
        records.append(
            {"kind": "ttft", "target": name, "ttft_ms": " ".join(f"{v:.3f}" for v in values)}
        )
    litellm_checks = checks(by_name[LITELLM])
    write_results(
        "vs_litellm",
        "spangate vs LiteLLM Proxy vs direct"
        + (" (SHORT validation run)" if is_short(opts) else ""),
        "One run, one fake provider (20 ms), one load generator (wrk): *direct* is the fake "
        "provider itself, *aiohttp floor* the thinnest aiohttp pass-through (no recording), "
        "*spangate* is `spangate serve` recording every call into SQLite, "
        f"*LiteLLM* is LiteLLM Proxy {LITELLM_VERSION} with {opts.litellm_workers} workers, "
        "run offline. *Added* = the target's percentile minus direct's in the same run; TTFT = "
        "time to the first content chunk of a streamed chat, one at a time, median over the "
        "streams."
        + (
            f" **Short validation run** (`--duration {opts.load.duration}`): the numbers show the "
            "script works; run without `--duration` on a quiet machine for numbers to quote."
            if is_short(opts)
            else ""
        ),
        out_dir=opts.out_dir,
        sections=[
            Section(
                "Side by side",
                SUMMARY_HEADER,
                summary_rows(summaries),
                "Notes on the runs behind it: " + "; ".join(run_notes) if run_notes else "",
            ),
            Section(
                "Above the aiohttp floor",
                FLOOR_HEADER,
                floor_rows(summaries),
                "The *aiohttp floor* is bench/_thin_proxy.py on spangate's core: one route, one "
                "ClientSession, no parsing, no recording. Its own added latency is what an "
                "aiohttp server in front of an aiohttp client costs on this machine; these "
                "columns are what each gateway adds beyond it.",
            ),
            Section(
                "Where the added latency goes at concurrency 1",
                SPLIT_HEADER,
                split_rows(outcome, summaries),
                split_note(outcome, opts.load.latency),
            ),
            Section(
                "Every wrk run",
                RUN_HEADER,
                run_rows(outcome.runs),
                "*sent* counts requests wrk wrote, including those in flight when the clock "
                "ran out; spangate's spans for the run's rollout are counted read-only once its "
                "queue drained and again after it exited on SIGTERM. *Target CPU* is the CPU "
                "time of the target's processes (LiteLLM: parent and workers) per completed "
                "request. *Idle gateway's CPU* is what the gateway(s) not under load took "
                "meanwhile on the same core, as a share of one core. *Foreign CPU* is what "
                "other processes on the machine took during the run, as a share of all cores.",
            ),
            Section(
                "Streaming: time to first content chunk",
                TTFT_HEADER,
                ttft_rows(outcome.ttft_ms),
                f"spangate recorded {outcome.stream_spans_flushed} spans for the "
                f"{opts.ttft_requests} measured streams (after SIGTERM: "
                f"{outcome.stream_spans_stopped}).",
            ),
            Section(
                "LiteLLM against the same bounds (for comparison)",
                ["check", "bound", "measured", "result", "note"],
                [[t.name, t.target, t.measured, t.verdict, t.note] for t in litellm_checks],
            ),
        ],
        targets=targets,
        busy=[*(r.busy for r in outcome.runs), outcome.ttft_busy],
        info=info,
        records=records,
        extra={"summary": [asdict(s) for s in summaries], "short_run": is_short(opts)},
    )


# ---------------------------------------------------------------------------------------------
# CLI


@dataclass
class Options:
    load: LoadOptions  # what overhead.py's runner and launchers read
    ttft_requests: int
    ttft_warmup: int
    chunks: int
    litellm_venv: Path
    litellm_workers: int
    litellm_cpus: str
    litellm_timeout: float

    @property
    def concurrency(self) -> list[int]:
        return self.load.concurrency

    @property
    def out_dir(self) -> Path:
        return self.load.out_dir


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,64", help="comma-separated list")
    parser.add_argument("--duration", type=int, default=DEFAULT_DURATION, help="measured s/run")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per wrk run")
    parser.add_argument("--latency", type=float, default=0.02, help="fake provider latency (s)")
    parser.add_argument("--ttft-requests", type=int, default=200, help="streams per target")
    parser.add_argument("--ttft-warmup", type=int, default=10, help="warm-up rounds of streams")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "aiohttp"], default="auto")
    parser.add_argument("--litellm-venv", type=Path, default=DEFAULT_LITELLM_VENV)
    parser.add_argument("--litellm-workers", type=int, default=2)
    parser.add_argument(
        "--litellm-cpus",
        default=GATEWAY_CPU,
        help="taskset CPU list for LiteLLM (default: spangate's core, the same CPU budget)",
    )
    parser.add_argument(
        "--litellm-timeout", type=float, default=600, help="seconds LiteLLM may take to start"
    )
    parser.add_argument("--pin", choices=["on", "off"], default="on", help="taskset placement")
    parser.add_argument("--nice", type=int, default=0, help="see bench/README.md (needs root)")
    parser.add_argument(
        "--quiet-wait", type=float, default=30, help="wait up to S s for a calm machine first"
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--spangate", default=default_spangate(), help="spangate CLI command")
    args = parser.parse_args(argv)
    if args.ttft_requests < 1 or args.chunks < 2 or args.litellm_workers < 1:
        parser.error("need --ttft-requests >= 1, --chunks >= 2 and --litellm-workers >= 1")
    placement = Placement.from_args(args.pin, args.nice)
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if tool_version(["wrk", "--version"]) != "not installed" else "aiohttp"
    load = LoadOptions(
        concurrency=[int(c) for c in args.concurrency.split(",") if c.strip()],
        duration=args.duration,
        warmup=args.warmup,
        latency=args.latency,
        loadgen=loadgen,
        pin=placement.pin,
        provider_script=DEFAULT_PROVIDER,
        out_dir=args.out_dir,
        spangate=args.spangate,
        quiet_wait=args.quiet_wait,
        nice=args.nice,
    )
    return Options(
        load,
        args.ttft_requests,
        args.ttft_warmup,
        args.chunks,
        args.litellm_venv,
        args.litellm_workers,
        args.litellm_cpus,
        args.litellm_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    opts = parse_args(argv)
    run_niced(opts.load.nice)
    ensure_litellm(opts.litellm_venv)
    busy_before = settle(QUIET_THRESHOLD, opts.load.quiet_wait)
    print(
        f"load generator: {opts.load.loadgen}; pinning: {'on' if opts.load.pin else 'off'}; "
        f"concurrency {opts.concurrency}; {opts.load.warmup}+{opts.load.duration} s per run",
        flush=True,
    )
    outcome = run(opts)
    report(opts, outcome, busy_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
