"""Measure what spangate adds on top of an upstream call: latency, throughput, and recording.

Starts a fake OpenAI-compatible provider (tests/fake_provider.py, fixed latency) and the gateway
(`spangate serve`, recording into a temporary SQLite file) as separate processes, then drives
closed-loop load with `wrk` (or bench/_aio_loadgen.py when wrk is missing) at each concurrency:
once directly against the provider and once through the gateway under
`/rollout/bench-<c>/attempt/1/v1/chat/completions`. It prints and writes a table of
p50/p99 latency, throughput and the difference, and checks that every request the load
generator sent produced exactly one span.

CPU placement on a 2-core machine (when taskset exists, `--pin on`, the default): the gateway
gets core 0 to itself; the load generator and the fake provider share core 1. CPU time of each
process and of everything else on the machine is read from /proc for every run, so a run that
other work disturbed says so (`--quiet-wait` waits for a calm machine first; `--nice -10`
raises our processes' priority when there is none).

    /work/venv/bin/python bench/overhead.py [--concurrency 1,16,64] [--duration 10]
        [--latency 0.02] [--warmup 2] [--loadgen auto|wrk|aiohttp] [--pin on|off]
        [--nice N] [--quiet-wait S] [--profile] [--spangate CMD] [--out-dir DIR]

Results: bench/results/overhead.csv and bench/results/overhead.md (and, with --profile,
py-spy stacks and a summary per concurrency).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
DEFAULT_PROVIDER = REPO / "tests" / "fake_provider.py"
AIO_LOADGEN = BENCH_DIR / "_aio_loadgen.py"
HOST = "127.0.0.1"  # all traffic stays on loopback
MODEL = "bench-model"
BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in one word."}]},
    separators=(",", ":"),
)
GATEWAY_CPU = "0"
LOADGEN_CPU = "1"  # shared by the load generator and the fake provider

QUIET_THRESHOLD = 0.10  # share of all cores other processes may use before we start
TARGET_ADDED_P50_MS_AT_1 = 1.0
TARGET_RATIO_AT_64 = 0.60

# wrk script: a static POST, a per-thread count of requests actually written (request() runs
# right before each write), and a done() hook that prints one JSON line we parse.
WRK_LUA = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"

local threads = {}
sent = 0
local req = nil

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  req = wrk.format()
end

function request()
  sent = sent + 1
  return req
end

function done(summary, latency, requests)
  local total_sent = 0
  for _, t in ipairs(threads) do
    total_sent = total_sent + t:get("sent")
  end
  -- wrk calls request() once on the first thread before the run to verify the script
  -- (script_verify_request); that call never reaches the socket.
  total_sent = total_sent - 1
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%%d,"sent":%%d,"duration_us":%%d,"errors_status":%%d,'
    .. '"errors_socket":%%d,"errors_timeout":%%d,"p50_us":%%.0f,"p90_us":%%.0f,'
    .. '"p99_us":%%.0f,"mean_us":%%.1f,"max_us":%%.0f}\\n',
    summary.requests, total_sent, summary.duration, e.status,
    e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class CpuUsage:
    """CPU seconds spent during one measured run, by whom; `foreign` is everything else the
    machine did meanwhile (other sessions' tests, say), which distorts the numbers."""

    wall_s: float
    gateway_s: float
    provider_s: float
    loadgen_s: float
    foreign_s: float


@dataclass
class LoadResult:
    """One load-generator run, as reported by wrk's done() hook or the aiohttp fallback."""

    requests: int  # completed responses (any status)
    sent: int  # requests written to the socket, including ones cut off at the deadline
    duration_us: int
    errors_status: int  # responses with status >= 400 (wrk) / not 2xx (aiohttp)
    errors_socket: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    max_us: float
    errors_timeout: int = 0
    cpu: CpuUsage | None = None

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0


@dataclass
class Row:
    """Direct vs gateway at one concurrency, plus the span count check."""

    concurrency: int
    direct: LoadResult
    gateway: LoadResult
    rollout: str
    spans_after_flush: int = -1
    spans_after_stop: int = -1
    span_overhead_p50_ms: float | None = None

    @property
    def ratio(self) -> float:
        return self.gateway.rps / self.direct.rps if self.direct.rps else 0.0

    @property
    def spans_ok(self) -> bool:
        return self.spans_after_stop == self.gateway.sent == self.spans_after_flush


@dataclass
class Options:
    concurrency: list[int]
    duration: int
    warmup: int
    latency: float
    loadgen: str  # "wrk" or "aiohttp" (resolved)
    pin: bool
    provider_script: Path
    out_dir: Path
    spangate: str  # command line that runs the spangate CLI
    quiet_wait: float  # seconds to wait at most for an idle machine before starting
    nice: int = 0  # niceness for everything we start; negative (root) shields from other work
    profile: bool = False  # py-spy the gateway during its runs
    busy_before: float = 0.0  # share of all cores other work used just before the runs


# ---------------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Call probe() until it returns something not None, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_get_json(url: str) -> tuple[int, Any] | None:
    """(status, parsed body) or None when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return None


# With kernel autogroups (sched_autogroup_enabled=1) plain `nice` only ranks processes within
# one session's group; other sessions' groups still get an equal share. So a --nice run starts
# each child in its own session (Popen start_new_session) and gives that group the niceness.
_AUTOGROUP_NICE = 'echo "$0" > /proc/self/autogroup 2>/dev/null; exec "$@"'


def placed(cmd: list[str], cpu: str, opts: Options) -> list[str]:
    """Prefix cmd with its CPU pinning and scheduling priority, as the options ask."""
    if opts.pin:
        cmd = ["taskset", "-c", cpu, *cmd]
    if opts.nice:
        cmd = ["sh", "-c", _AUTOGROUP_NICE, str(opts.nice), "nice", "-n", str(opts.nice), *cmd]
    return cmd


def spawn_options(opts: Options) -> dict[str, Any]:
    """Popen keyword arguments that go with placed()."""
    return {"start_new_session": bool(opts.nice), "stdin": subprocess.DEVNULL}


# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc (Linux)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """utime + stime of one process, all its threads."""
    try:
        after_comm = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(after_comm[11]) + int(after_comm[12])) / CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds all cores spent on anything but idle, iowait and steal."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in first[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_share(window: float = 1.0) -> float:
    """How busy all cores were over the next `window` seconds, 0..1."""
    before, start = machine_busy_s(), time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - start
    return (machine_busy_s() - before) / (elapsed * (os.cpu_count() or 1))


def wait_for_quiet(max_wait: float, threshold: float) -> float:
    """Wait (bounded) until other work on this shared machine leaves the cores idle, so it
    does not distort the numbers; returns the last busy share seen."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy_share()
    while busy > threshold and time.monotonic() < deadline:
        print(f"  machine {busy:.0%} busy with other work; waiting for it to calm down", flush=True)
        busy = machine_busy_share(2.0)
    return busy


@dataclass
class CpuWatch:
    """Snapshots the CPU counters of the processes under test."""

    gateway_pid: int
    provider_pid: int

    def sample(self) -> tuple[float, ...]:
        return (
            time.monotonic(),
            process_cpu_s(self.gateway_pid),
            process_cpu_s(self.provider_pid),
            children_cpu_s(),
            machine_busy_s(),
        )

    @staticmethod
    def usage(before: tuple[float, ...], after: tuple[float, ...]) -> CpuUsage:
        wall, gateway, provider, loadgen, busy = (b - a for a, b in zip(before, after, strict=True))
        foreign = max(0.0, busy - gateway - provider - loadgen)
        return CpuUsage(wall, gateway, provider, loadgen, foreign)


# ---------------------------------------------------------------------------------------------
# Processes


@contextlib.contextmanager
def managed_process(
    cmd: list[str], log_path: Path, name: str, **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """Start cmd with output to log_path; on exit SIGTERM it, then SIGKILL if it lingers."""
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)
    try:
        yield proc
    finally:
        stop_process(proc, name)


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout: float = 20.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop after SIGTERM; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
    return proc.returncode


def ensure_alive(proc: subprocess.Popen[bytes], name: str, log_path: Path) -> None:
    if proc.poll() is not None:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")


def start_provider(
    opts: Options, tmp: Path, stack: contextlib.ExitStack
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start the fake provider; return its /v1 base URL, once it answers, and its process."""
    wait_for(f"{opts.provider_script} to exist", lambda: opts.provider_script.exists() or None, 60)
    port = free_port()
    cmd = [sys.executable, str(opts.provider_script), "--host", HOST, "--port", str(port)]
    cmd += ["--latency", str(opts.latency)]
    return start_upstream(
        placed(cmd, LOADGEN_CPU, opts),
        port,
        tmp / "provider.log",
        ("provider", "fake provider"),
        stack,
        **spawn_options(opts),
    )


def start_upstream(
    cmd: list[str],
    port: int,
    log_path: Path,
    names: tuple[str, str],
    stack: contextlib.ExitStack,
    **popen_kwargs: Any,
) -> tuple[str, subprocess.Popen[bytes]]:
    """An OpenAI-like upstream (cmd, already placed, listening on port); its /v1 base URL,
    once GET /models answers, and its process. names: its name in managed_process and in
    messages. The stack stops it when it unwinds."""
    proc_name, label = names
    proc = stack.enter_context(managed_process(cmd, log_path, proc_name, **popen_kwargs))
    base = f"http://{HOST}:{port}/v1"

    def probe() -> bool | None:
        ensure_alive(proc, label, log_path)
        answer = http_get_json(base + "/models")
        return True if answer and answer[0] == 200 else None

    wait_for(f"the {label}", probe, 30)
    return base, proc


def write_gateway_config(tmp: Path, provider_base: str) -> Path:
    cfg = tmp / "bench.yaml"
    cfg.write_text(
        "models:\n"
        f"  - name: {MODEL}\n"
        "    deployments:\n"
        "      - provider: openai\n"
        f"        model: {MODEL}\n"
        f"        api_base: {provider_base}\n"
        "        api_key: sk-bench\n"
    )
    return cfg


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    root: str
    db: Path
    log_path: Path

    def ready(self) -> dict[str, Any] | None:
        ensure_alive(self.proc, "gateway", self.log_path)
        answer = http_get_json(self.root + "/health/ready")
        return answer[1] if answer and answer[0] == 200 else None


def default_spangate() -> str:
    script = Path(sys.executable).with_name("spangate")
    if script.exists():
        return str(script)
    return shlex.join([sys.executable, "-c", "from gateway.cli.main import cli; cli()"])


def start_gateway(opts: Options, tmp: Path, provider_base: str) -> Gateway:
    port = free_port()
    db = tmp / "bench.db"
    cfg = write_gateway_config(tmp, provider_base)
    cmd = [*shlex.split(opts.spangate), "serve", "--config", str(cfg), "--db", str(db)]
    cmd += ["--host", HOST, "--port", str(port)]
    log_path = tmp / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            placed(cmd, GATEWAY_CPU, opts),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            **spawn_options(opts),
        )
    gw = Gateway(proc, f"http://{HOST}:{port}", db, log_path)
    try:
        wait_for("the gateway's /health/ready", gw.ready, 60)
    except BaseException:
        stop_process(proc, "gateway")
        raise
    return gw


# ---------------------------------------------------------------------------------------------
# Load generation


def loadgen_command(
    opts: Options, url: str, concurrency: int, seconds: int, lua: Path
) -> list[str]:
    if opts.loadgen == "wrk":
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s"]
        cmd += ["-s", str(lua), url]
    else:
        cmd = [sys.executable, str(AIO_LOADGEN), "--url", url, "--concurrency", str(concurrency)]
        cmd += ["--duration", str(seconds), "--body", BODY]
    return placed(cmd, LOADGEN_CPU, opts)


def run_load(opts: Options, url: str, concurrency: int, seconds: int, lua: Path) -> LoadResult:
    cmd = loadgen_command(opts, url, concurrency, seconds, lua)
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
        **spawn_options(opts),
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return LoadResult(**json.loads(line.removeprefix("BENCH_JSON ")))
    raise RuntimeError(f"load generator gave no result (rc={proc.returncode}):\n{proc.stderr}")


def preflight(url: str, what: str) -> None:
    """One request before any load, so a broken target fails loudly instead of benchmarking
    a fast error path."""
    request = urllib.request.Request(
        url,
        data=BODY.encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            choices = json.loads(resp.read()).get("choices")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{what} answered {exc.code} to a chat completion: {detail}") from exc
    if not choices:
        raise RuntimeError(f"{what} answered 200 without choices")


@dataclass
class Target:
    """What one measurement needs: where to send load and whose CPU to watch."""

    opts: Options
    lua: Path
    watch: CpuWatch


def measure(target: Target, url: str, warmup_url: str, concurrency: int) -> LoadResult:
    opts = target.opts
    if opts.warmup > 0:
        run_load(opts, warmup_url, concurrency, opts.warmup, target.lua)
    before = target.watch.sample()
    result = run_load(opts, url, concurrency, opts.duration, target.lua)
    result.cpu = CpuWatch.usage(before, target.watch.sample())
    return result


# ---------------------------------------------------------------------------------------------
# Optional profile of the gateway (py-spy) during a measured run


def py_spy_path() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def profiled(opts: Options, pid: int, concurrency: int) -> Iterator[None]:
    """Sample the gateway with py-spy while the body runs (it shares the load generator's core,
    so it costs the run a little) and write raw stacks plus a summary next to the results."""
    tool = py_spy_path() if opts.profile else None
    if tool is None:
        yield
        return
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    raw = opts.out_dir / f"overhead-profile-c{concurrency}.collapsed"
    with py_spy_recording(tool, pid, raw, lambda c: placed(c, LOADGEN_CPU, opts)):
        yield


@contextlib.contextmanager
def py_spy_recording(
    tool: str,
    pid: int,
    raw: Path,
    wrap: Callable[[list[str]], list[str]],
    *,
    rate: int = 250,
) -> Iterator[None]:
    """`py-spy record` the process (the command placed by wrap) while the block runs; raw
    stacks to `raw`, a summary of them next to it (.txt)."""
    cmd = [tool, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking", "--threads"]
    cmd += ["--format", "raw", "--output", str(raw)]
    proc = subprocess.Popen(wrap(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if raw.exists():
        raw.with_suffix(".txt").write_text(summarize_profile(raw.read_text()))


def _leaf_file(frame: str) -> str:
    inside = frame.rpartition("(")[2].rstrip(")")
    return inside.rpartition(":")[0] or frame


def summarize_profile(collapsed: str, top: int = 25) -> str:
    """Self time by source file and by function, and inclusive time of our own functions."""
    total = 0
    by_file: dict[str, int] = {}
    by_frame: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")[1:]  # the first entry names the thread
        total += count
        leaf = frames[-1] if frames else stack
        by_file[_leaf_file(leaf)] = by_file.get(_leaf_file(leaf), 0) + count
        by_frame[leaf] = by_frame.get(leaf, 0) + count
        for frame in {f for f in frames if "gateway/" in f or "store/" in f}:
            inclusive[frame] = inclusive.get(frame, 0) + count

    def block(title: str, counts: dict[str, int]) -> list[str]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [title, *(f"{n / total:7.1%}  {name}" for name, n in ranked), ""]

    if not total:
        return "no samples\n"
    return "\n".join(
        [
            f"{total} samples (all threads, 250 Hz)",
            "",
            *block("self time by file", by_file),
            *block("self time by function (line)", by_frame),
            *block("inclusive time of gateway/ and store/ frames", inclusive),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Span counting (read-only, never on the gateway's write path)


def count_spans(db: Path, rollout: str) -> int:
    if not db.exists():
        return 0
    uri = f"file:{db}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        row = conn.execute("SELECT count(*) FROM spans WHERE rollout_id = ?", (rollout,)).fetchone()
    return int(row[0])


def span_overhead_p50(db: Path, rollout: str) -> float | None:
    if not db.exists():
        return None
    uri = f"file:{db}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        values = [
            r[0]
            for r in conn.execute(
                "SELECT overhead_ms FROM spans WHERE rollout_id = ? AND overhead_ms IS NOT NULL"
                " ORDER BY overhead_ms",
                (rollout,),
            )
        ]
    return values[len(values) // 2] if values else None


def wait_flushed(gw: Gateway, rollout: str, expected: int, timeout: float = 20.0) -> int:
    """Wait until the recorder queue is empty and the rollout's span count stops moving."""
    last: list[int] = []

    def probe() -> int | None:
        ready = gw.ready()
        if ready is None or ready.get("recorder", {}).get("queue_depth", 1) != 0:
            return None
        last.append(count_spans(gw.db, rollout))
        if last[-1] == expected or (len(last) >= 5 and len(set(last[-5:])) == 1):
            return last[-1]
        return None

    try:
        return wait_for(f"spans of {rollout} to be flushed", probe, timeout, interval=0.1)
    except TimeoutError:
        return last[-1] if last else -1


# ---------------------------------------------------------------------------------------------
# The benchmark


def bench_one(target: Target, provider_base: str, gw: Gateway, concurrency: int) -> Row:
    direct_url = provider_base + "/chat/completions"
    direct = measure(target, direct_url, direct_url, concurrency)
    rollout = f"bench-{concurrency}"
    gw_url = f"{gw.root}/rollout/{rollout}/attempt/1/v1/chat/completions"
    warm_url = f"{gw.root}/rollout/bench-warmup-{concurrency}/attempt/1/v1/chat/completions"
    with profiled(target.opts, gw.proc.pid, concurrency):
        gateway = measure(target, gw_url, warm_url, concurrency)
    row = Row(concurrency, direct, gateway, rollout)
    row.spans_after_flush = wait_flushed(gw, rollout, gateway.sent)
    print(
        f"  c={concurrency:<3} direct p50 {direct.p50_us / 1000:.2f} ms {direct.rps:.0f} rps | "
        f"gateway p50 {gateway.p50_us / 1000:.2f} ms {gateway.rps:.0f} rps | "
        f"sent {gateway.sent} completed {gateway.requests} spans {row.spans_after_flush}",
        flush=True,
    )
    return row


def run_benchmark(opts: Options) -> tuple[list[Row], int | None]:
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="spangate-bench-") as tmp_name,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(tmp_name)
        lua = tmp / "chat.lua"
        lua.write_text(WRK_LUA % {"body": BODY})
        provider_base, provider = start_provider(opts, tmp, stack)
        gw = start_gateway(opts, tmp, provider_base)
        target = Target(opts, lua, CpuWatch(gw.proc.pid, provider.pid))
        try:
            preflight(provider_base + "/chat/completions", "the fake provider")
            preflight(f"{gw.root}/rollout/bench-preflight/v1/chat/completions", "the gateway")
            for concurrency in opts.concurrency:
                rows.append(bench_one(target, provider_base, gw, concurrency))
        finally:
            gw_rc = stop_process(gw.proc, "gateway", timeout=60)
        for row in rows:
            row.spans_after_stop = count_spans(gw.db, row.rollout)
            row.span_overhead_p50_ms = span_overhead_p50(gw.db, row.rollout)
        if gw_rc != 0 or any(r.gateway.errors_status or r.gateway.errors_socket for r in rows):
            keep_logs(tmp, opts.out_dir)
    return rows, gw_rc


def keep_logs(tmp: Path, out_dir: Path) -> None:
    """Something went wrong: keep the servers' output next to the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("gateway.log", "provider.log"):
        src = tmp / name
        if src.exists():
            shutil.copyfile(src, out_dir / f"overhead-{name}")


# ---------------------------------------------------------------------------------------------
# Reporting


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        d, g = r.direct, r.gateway
        out.append(
            [
                str(r.concurrency),
                ms(d.p50_us),
                ms(d.p99_us),
                ms(g.p50_us),
                ms(g.p99_us),
                ms(g.p50_us - d.p50_us),
                ms(g.p99_us - d.p99_us),
                f"{d.rps:.0f}",
                f"{g.rps:.0f}",
                f"{r.ratio:.0%}",
            ]
        )
    return out


TABLE_HEADER = [
    "concurrency",
    "direct p50 ms",
    "direct p99 ms",
    "gateway p50 ms",
    "gateway p99 ms",
    "added p50 ms",
    "added p99 ms",
    "direct rps",
    "gateway rps",
    "throughput ratio",
]
SPAN_HEADER = [
    "concurrency",
    "rollout",
    "sent",
    "completed",
    "non-2xx",
    "socket errors",
    "spans after flush",
    "spans after SIGTERM",
    "spans = sent",
    "span overhead_ms p50",
]


def span_rows(rows: list[Row]) -> list[list[str]]:
    return [
        [
            str(r.concurrency),
            r.rollout,
            str(r.gateway.sent),
            str(r.gateway.requests),
            str(r.gateway.errors_status),
            str(r.gateway.errors_socket + r.gateway.errors_timeout),
            str(r.spans_after_flush),
            str(r.spans_after_stop),
            "yes" if r.spans_ok else "NO",
            "-" if r.span_overhead_p50_ms is None else f"{r.span_overhead_p50_ms:.3f}",
        ]
        for r in rows
    ]


def gateway_cpu_per_request_us(row: Row) -> float:
    cpu = row.gateway.cpu
    return cpu.gateway_s / row.gateway.requests * 1e6 if cpu and row.gateway.requests else 0.0


def share(seconds: float, cpu: CpuUsage | None, cores: int = 1) -> str:
    """CPU seconds as a percentage of `cores` cores over the run's wall time."""
    return f"{seconds / (cpu.wall_s * cores):.0%}" if cpu and cpu.wall_s else "-"


CPU_HEADER = [
    "concurrency",
    "gateway CPU µs/request",
    "gateway core busy",
    "provider core busy (gw run)",
    "loadgen core busy (gw run)",
    "provider core busy (direct)",
    "foreign CPU, direct run",
    "foreign CPU, gateway run",
]


def cpu_rows(rows: list[Row]) -> list[list[str]]:
    machine = os.cpu_count() or 1
    out = []
    for r in rows:
        g, d = r.gateway.cpu, r.direct.cpu
        out.append(
            [
                str(r.concurrency),
                f"{gateway_cpu_per_request_us(r):.0f}",
                share(g.gateway_s, g) if g else "-",
                share(g.provider_s, g) if g else "-",
                share(g.loadgen_s, g) if g else "-",
                share(d.provider_s, d) if d else "-",
                share(d.foreign_s, d, machine) if d else "-",
                share(g.foreign_s, g, machine) if g else "-",
            ]
        )
    return out


def noise_lines(rows: list[Row]) -> list[str]:
    """Warn about runs during which other processes used a noticeable share of the machine."""
    machine = os.cpu_count() or 1
    noisy = []
    for r in rows:
        for label, cpu in (("direct", r.direct.cpu), ("gateway", r.gateway.cpu)):
            if cpu and cpu.wall_s and cpu.foreign_s / (cpu.wall_s * machine) > QUIET_THRESHOLD:
                noisy.append(f"c={r.concurrency} {label} ({share(cpu.foreign_s, cpu, machine)})")
    if not noisy:
        return []
    return [
        "WARNING: other processes competed for the cores during: "
        + ", ".join(noisy)
        + "; treat those numbers as pessimistic and re-run on a quiet machine."
    ]


def target_lines(rows: list[Row]) -> list[str]:
    by_c = {r.concurrency: r for r in rows}
    lines = []
    if 1 in by_c:
        added = (by_c[1].gateway.p50_us - by_c[1].direct.p50_us) / 1000
        ok = added <= TARGET_ADDED_P50_MS_AT_1
        lines.append(
            f"added p50 at concurrency 1 <= {TARGET_ADDED_P50_MS_AT_1:g} ms: "
            f"{added:.2f} ms -> {'PASS' if ok else 'FAIL'}"
        )
    if 64 in by_c:
        ratio = by_c[64].ratio
        ok = ratio >= TARGET_RATIO_AT_64
        lines.append(
            f"gateway throughput >= {TARGET_RATIO_AT_64:.0%} of direct at concurrency 64: "
            f"{ratio:.0%} -> {'PASS' if ok else 'FAIL'}"
        )
    ok = all(r.spans_ok for r in rows)
    lines.append(f"spans recorded = requests sent (every run): {'PASS' if ok else 'FAIL'}")
    return lines


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def print_table(title: str, header: list[str], body: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown_table(header, body))
        return
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="right")
    for row in body:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a pipe or file: do not squeeze the columns to 80
    console.print(table)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def display_path(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def source_version() -> str:
    """The commit of the tree the gateway ran from, and whether it had uncommitted changes."""
    head = tool_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = tool_version(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway", "store", "config"]
    )
    return f"{head} + uncommitted changes" if dirty not in ("", "unknown") else head


def command_line() -> str:
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH",) if os.environ.get(k)]
    return " ".join([*env, shlex.join([sys.executable, *sys.argv])])


def machine_info(opts: Options) -> dict[str, str]:
    placement = (
        f"gateway on core {GATEWAY_CPU}; load generator and fake provider share core {LOADGEN_CPU}"
        if opts.pin
        else "not pinned (OS scheduler decides)"
    )
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
        "aiohttp": importlib.metadata.version("aiohttp"),
        "spangate source": source_version()
        if opts.spangate == default_spangate()
        else f"custom command: {opts.spangate}",
        "load generator": tool_version(["wrk", "--version"])
        if opts.loadgen == "wrk"
        else "bench/_aio_loadgen.py (aiohttp, closed loop)",
        "cpu placement": placement,
        "scheduling": f"nice {opts.nice}" if opts.nice else "default priority",
        "fake provider": f"{display_path(opts.provider_script)}, latency {opts.latency * 1000:g} ms",
        "per run": f"{opts.warmup} s warm-up + {opts.duration} s measured",
        "machine busy with other work just before": f"{opts.busy_before:.0%} of all cores",
        "command": command_line(),
    }


def csv_record(row: Row) -> dict[str, Any]:
    record: dict[str, Any] = {
        "concurrency": row.concurrency,
        "rollout": row.rollout,
        "added_p50_ms": round((row.gateway.p50_us - row.direct.p50_us) / 1000, 3),
        "added_p99_ms": round((row.gateway.p99_us - row.direct.p99_us) / 1000, 3),
        "throughput_ratio": round(row.ratio, 4),
        "spans_after_flush": row.spans_after_flush,
        "spans_after_stop": row.spans_after_stop,
        "spans_ok": row.spans_ok,
        "span_overhead_p50_ms": row.span_overhead_p50_ms,
    }
    for prefix, result in (("direct", row.direct), ("gateway", row.gateway)):
        fields = asdict(result)
        cpu = fields.pop("cpu") or {}
        record.update({f"{prefix}_{k}": v for k, v in fields.items()})
        record[f"{prefix}_rps"] = round(result.rps, 1)
        record.update({f"{prefix}_cpu_{k}": round(v, 3) for k, v in cpu.items()})
    record["gateway_cpu_us_per_request"] = round(gateway_cpu_per_request_us(row), 1)
    return record


def write_csv(path: Path, rows: list[Row]) -> None:
    records = [csv_record(r) for r in rows]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]) if records else [])
        writer.writeheader()
        writer.writerows(records)


def write_markdown(path: Path, rows: list[Row], info: dict[str, str], gw_rc: int | None) -> None:
    parts = [
        "# spangate overhead benchmark",
        "",
        "Closed-loop load, the same small chat completion each time; *direct* hits the fake "
        "provider, *gateway* goes through `spangate serve` with recording on.",
        "",
        markdown_table(TABLE_HEADER, table_rows(rows)),
        "",
        "## Targets",
        "",
        *[f"- {line}" for line in target_lines(rows)],
        *["", *noise_lines(rows)],
        "",
        "## Spans recorded vs requests sent (gateway runs)",
        "",
        "*sent* counts requests the load generator wrote (including those still in flight when "
        "the run's clock ran out); *completed* counts responses it read. Spans are counted "
        "read-only after the recorder queue drained, and again after the gateway exited on "
        f"SIGTERM (exit code {gw_rc}).",
        "",
        markdown_table(SPAN_HEADER, span_rows(rows)),
        "",
        "## CPU during the measured runs",
        "",
        "Busy shares are of one core over the run's wall time (from /proc). *Foreign* is CPU "
        "used by other processes on the machine during the run, as a share of all cores: "
        "when it is not near 0%, other work competed for the cores and the numbers are noisy.",
        "",
        markdown_table(CPU_HEADER, cpu_rows(rows)),
        "",
        "## Machine and run",
        "",
        *[f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in info.items()],
        "",
    ]
    path.write_text("\n".join(parts))


def report(opts: Options, rows: list[Row], gw_rc: int | None) -> None:
    info = machine_info(opts)
    print_table("spangate overhead", TABLE_HEADER, table_rows(rows))
    print_table("spans recorded vs requests sent", SPAN_HEADER, span_rows(rows))
    print_table("CPU during the measured runs", CPU_HEADER, cpu_rows(rows))
    for line in [*target_lines(rows), *noise_lines(rows)]:
        print(line)
    for key, value in info.items():
        print(f"{key}: {value}")
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(opts.out_dir / "overhead.csv", rows)
    write_markdown(opts.out_dir / "overhead.md", rows, info, gw_rc)
    print(f"wrote {opts.out_dir / 'overhead.csv'} and {opts.out_dir / 'overhead.md'}")


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated list")
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per run")
    parser.add_argument("--latency", type=float, default=0.02, help="fake provider latency (s)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "aiohttp"], default="auto")
    parser.add_argument("--pin", choices=["on", "off"], default="on", help="taskset placement")
    parser.add_argument("--provider-script", type=Path, default=DEFAULT_PROVIDER)
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the processes under test; e.g. -10 (needs root) keeps other "
        "work on a shared machine from distorting the numbers",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the gateway with py-spy during its runs (bench/results/overhead-profile-*)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="wait up to this many seconds for other work to leave the machine (0: don't)",
    )
    parser.add_argument(
        "--spangate", default=default_spangate(), help="command that runs the spangate CLI"
    )
    args = parser.parse_args(argv)
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "aiohttp"
    can_pin = shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2
    return Options(
        concurrency=[int(c) for c in args.concurrency.split(",") if c.strip()],
        duration=args.duration,
        warmup=args.warmup,
        latency=args.latency,
        loadgen=loadgen,
        pin=args.pin == "on" and can_pin,
        provider_script=args.provider_script.resolve(),
        out_dir=args.out_dir,
        spangate=args.spangate,
        quiet_wait=args.quiet_wait,
        nice=args.nice,
        profile=args.profile,
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    opts = parse_args(argv)
    if opts.quiet_wait > 0:
        opts.busy_before = wait_for_quiet(opts.quiet_wait, QUIET_THRESHOLD)
    print(
        f"load generator: {opts.loadgen}; pinning: {'on' if opts.pin else 'off'}; "
        f"concurrency {opts.concurrency}; {opts.warmup}+{opts.duration} s per run",
        flush=True,
    )
    rows, gw_rc = run_benchmark(opts)
    report(opts, rows, gw_rc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
