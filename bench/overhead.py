"""Measure what spangate adds on top of an upstream call: latency, throughput, and recording.

Starts a fake OpenAI-compatible provider (tests/fake_provider.py, fixed latency) and the gateway
(`spangate serve`, recording into a temporary SQLite file) as separate processes, then drives
closed-loop load with `wrk` (or bench/_aio_loadgen.py when wrk is missing) at each concurrency:
once directly against the provider and once through the gateway under
`/rollout/bench-<c>/attempt/1/v1/chat/completions`. It prints and writes a table of
p50/p99 latency, throughput and the difference, and checks that every request the load
generator sent produced exactly one span.

CPU placement on a 2-core machine (when taskset exists, `--pin on`, the default): the gateway
gets core 0 to itself; the load generator and the fake provider share core 1.

    /work/venv/bin/python bench/overhead.py [--concurrency 1,16,64] [--duration 10]
        [--latency 0.02] [--warmup 2] [--loadgen auto|wrk|aiohttp] [--pin on|off]

Results: bench/results/overhead.csv and bench/results/overhead.md.
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


def pinned(cmd: list[str], cpu: str, pin: bool) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if pin else cmd


# ---------------------------------------------------------------------------------------------
# Processes


@contextlib.contextmanager
def managed_process(cmd: list[str], log_path: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start cmd with output to log_path; on exit SIGTERM it, then SIGKILL if it lingers."""
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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


def start_provider(opts: Options, tmp: Path, stack: contextlib.ExitStack) -> str:
    """Start the fake provider; return its /v1 base URL once it answers."""
    wait_for(f"{opts.provider_script} to exist", lambda: opts.provider_script.exists() or None, 60)
    port = free_port()
    cmd = [sys.executable, str(opts.provider_script), "--host", HOST, "--port", str(port)]
    cmd += ["--latency", str(opts.latency)]
    log_path = tmp / "provider.log"
    proc = stack.enter_context(
        managed_process(pinned(cmd, LOADGEN_CPU, opts.pin), log_path, "provider")
    )
    base = f"http://{HOST}:{port}/v1"

    def probe() -> bool | None:
        ensure_alive(proc, "fake provider", log_path)
        answer = http_get_json(base + "/models")
        return True if answer and answer[0] == 200 else None

    wait_for("the fake provider", probe, 30)
    return base


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
    return shlex.join([sys.executable, "-c", "from gateway.cli import cli; cli()"])


def start_gateway(opts: Options, tmp: Path, provider_base: str) -> Gateway:
    port = free_port()
    db = tmp / "bench.db"
    cfg = write_gateway_config(tmp, provider_base)
    cmd = [*shlex.split(opts.spangate), "serve", "--config", str(cfg), "--db", str(db)]
    cmd += ["--host", HOST, "--port", str(port)]
    log_path = tmp / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            pinned(cmd, GATEWAY_CPU, opts.pin),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp,
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
    return pinned(cmd, LOADGEN_CPU, opts.pin)


def run_load(opts: Options, url: str, concurrency: int, seconds: int, lua: Path) -> LoadResult:
    cmd = loadgen_command(opts, url, concurrency, seconds, lua)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
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


def measure(opts: Options, url: str, warmup_url: str, concurrency: int, lua: Path) -> LoadResult:
    if opts.warmup > 0:
        run_load(opts, warmup_url, concurrency, opts.warmup, lua)
    return run_load(opts, url, concurrency, opts.duration, lua)


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


def bench_one(opts: Options, provider_base: str, gw: Gateway, concurrency: int, lua: Path) -> Row:
    direct_url = provider_base + "/chat/completions"
    direct = measure(opts, direct_url, direct_url, concurrency, lua)
    rollout = f"bench-{concurrency}"
    gw_url = f"{gw.root}/rollout/{rollout}/attempt/1/v1/chat/completions"
    warm_url = f"{gw.root}/rollout/bench-warmup-{concurrency}/attempt/1/v1/chat/completions"
    gateway = measure(opts, gw_url, warm_url, concurrency, lua)
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
        provider_base = start_provider(opts, tmp, stack)
        gw = start_gateway(opts, tmp, provider_base)
        try:
            preflight(provider_base + "/chat/completions", "the fake provider")
            preflight(f"{gw.root}/rollout/bench-preflight/v1/chat/completions", "the gateway")
            for concurrency in opts.concurrency:
                rows.append(bench_one(opts, provider_base, gw, concurrency, lua))
        finally:
            gw_rc = stop_process(gw.proc, "gateway", timeout=60)
        for row in rows:
            row.spans_after_stop = count_spans(gw.db, row.rollout)
            row.span_overhead_p50_ms = span_overhead_p50(gw.db, row.rollout)
        keep_logs(tmp, opts.out_dir)
    return rows, gw_rc


def keep_logs(tmp: Path, out_dir: Path) -> None:
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
    Console().print(table)


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
        "load generator": tool_version(["wrk", "--version"])
        if opts.loadgen == "wrk"
        else "bench/_aio_loadgen.py (aiohttp, closed loop)",
        "cpu placement": placement,
        "fake provider": f"{display_path(opts.provider_script)}, latency {opts.latency * 1000:g} ms",
        "per run": f"{opts.warmup} s warm-up + {opts.duration} s measured",
        "command": shlex.join([Path(sys.executable).as_posix(), *sys.argv]),
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
        record.update({f"{prefix}_{k}": v for k, v in asdict(result).items()})
        record[f"{prefix}_rps"] = round(result.rps, 1)
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
    for line in target_lines(rows):
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
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    opts = parse_args(argv)
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
