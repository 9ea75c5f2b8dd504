"""Shared pieces of the benchmark scripts (streaming, memory, store, startup, run_all).

The generic helpers of bench/overhead.py (ports, polling, /proc CPU counters, process
start/stop, tables, machine description) are re-used from there unchanged, so overhead.py
keeps its own CLI. What is added here:

- `Placement`: CPU pinning (`taskset`) and priority for children, independent of overhead's
  Options; the gateway goes to core 0, clients and the fake provider to core 1.
- `BusyMeter`: how busy the whole machine was during a phase, and how much of that was
  *foreign* (other processes than ours), so a shared machine's noise is visible in every result.
- `start_provider` / `start_gateway`: the fake upstream and `spangate serve` as processes.
- `percentile`, `rss_kib` and the result writers (`write_results`): a CSV, a Markdown report
  and a JSON file that bench/run_all.py turns into bench/results/SUMMARY.md.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import importlib.metadata
import json
import math
import os
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from overhead import (
    BODY,
    DEFAULT_PROVIDER,
    HOST,
    MODEL,
    QUIET_THRESHOLD,
    REPO,
    Gateway,
    command_line,
    cpu_model,
    default_spangate,
    ensure_alive,
    free_port,
    http_get_json,
    machine_busy_s,
    managed_process,
    markdown_table,
    print_table,
    process_cpu_s,
    py_spy_path,
    py_spy_recording,
    source_version,
    start_upstream,
    stop_process,
    summarize_profile,
    wait_for,
    wait_for_quiet,
    write_gateway_config,
)

__all__ = [
    "BODY",
    "BUSY_HEADER",
    "CLIENT_CPU",
    "DEFAULT_PROVIDER",
    "GATEWAY_CPU",
    "HOST",
    "MODEL",
    "NICED_ENV",
    "QUIET_THRESHOLD",
    "REPO",
    "RESULTS_DIR",
    "TARGET_HEADER",
    "Busy",
    "BusyMeter",
    "Gateway",
    "Placement",
    "Section",
    "TargetCheck",
    "add_common_args",
    "begin_run",
    "busy_rows",
    "command_line",
    "common_options",
    "cpu_model",
    "cpu_pressure_s",
    "default_spangate",
    "ensure_alive",
    "exit_on_sigterm",
    "free_port",
    "gateway_command",
    "http_get_json",
    "machine_busy_now",
    "machine_busy_s",
    "machine_info",
    "managed_process",
    "markdown_table",
    "memory_total",
    "noise_warning",
    "percentile",
    "print_table",
    "proc_status_kib",
    "process_cpu_s",
    "profile_pid",
    "py_spy_path",
    "read_only_count",
    "read_only_values",
    "rss_kib",
    "run_niced",
    "settle",
    "source_version",
    "start_gateway",
    "start_provider",
    "start_upstream",
    "stop_process",
    "summarize_profile",
    "target_rows",
    "temp_dir",
    "versions",
    "wait_drained",
    "wait_for",
    "wait_for_quiet",
    "write_csv",
    "write_gateway_config",
    "write_results",
]

RESULTS_DIR = REPO / "bench" / "results"
GATEWAY_CPU = 0
CLIENT_CPU = 1  # the load generator / measuring client and the fake provider share this core


# ---------------------------------------------------------------------------------------------
# Placement


# Same trick as overhead.py: with kernel autogroups, niceness only counts inside a session, so
# a child that should outrank other sessions gets its own session and sets its group's nice.
_AUTOGROUP_NICE = 'echo "$0" > /proc/self/autogroup 2>/dev/null; exec "$@"'


@dataclass(frozen=True)
class Placement:
    """Where our processes run: pinned to a core each (when the machine has two) and at which
    niceness (0: default; negative needs root and shields the runs from other sessions)."""

    pin: bool = True
    nice: int = 0

    @classmethod
    def from_args(cls, pin: str, nice: int) -> Placement:
        can_pin = shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2
        return cls(pin=pin == "on" and can_pin, nice=nice)

    def wrap(self, cmd: Sequence[str], cpu: int) -> list[str]:
        """cmd prefixed with its pinning and priority. Both wrappers exec, so the pid of the
        Popen is the pid of the program itself (its /proc counters are the program's)."""
        out = list(cmd)
        if self.pin:
            out = ["taskset", "-c", str(cpu), *out]
        if self.nice:
            out = ["sh", "-c", _AUTOGROUP_NICE, str(self.nice), "nice", "-n", str(self.nice), *out]
        return out

    def popen_kwargs(self) -> dict[str, Any]:
        return {"start_new_session": bool(self.nice), "stdin": subprocess.DEVNULL}

    def pin_self(self, cpu: int = CLIENT_CPU) -> None:
        """Pin this (measuring) process; its threads inherit it."""
        if self.pin:
            os.sched_setaffinity(0, {cpu})

    def describe(self) -> str:
        where = (
            f"gateway on core {GATEWAY_CPU}; client/load generator and fake provider on core "
            f"{CLIENT_CPU}"
            if self.pin
            else "not pinned (the OS scheduler decides)"
        )
        return where + (f"; nice {self.nice}" if self.nice else "; default priority")


NICED_ENV = "SPANGATE_BENCH_NICED"


def run_niced(nice: int) -> None:
    """With a niceness, re-run this script in its own session at that niceness (the measuring
    client lives in this process, so it needs the same shield as the servers) and exit with
    its status; without one, or inside the re-run, return at once."""
    if not nice or os.environ.get(NICED_ENV):
        return
    cmd = ["sh", "-c", _AUTOGROUP_NICE, str(nice), "nice", "-n", str(nice)]
    cmd += [sys.executable, *sys.argv]
    proc = subprocess.Popen(cmd, env={**os.environ, NICED_ENV: "1"}, start_new_session=True)
    try:
        code = proc.wait()
    except BaseException:
        proc.terminate()  # the child unwinds on SIGTERM and stops its own children
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    sys.exit(code)


def add_common_args(parser: Any, *, quiet_wait: float = 30.0) -> None:
    """--pin, --nice, --quiet-wait, --out-dir, --spangate: the same meaning in every script."""
    parser.add_argument("--pin", choices=["on", "off"], default="on", help="taskset placement")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the processes under test (negative needs root; see bench/README.md)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=quiet_wait,
        help="wait up to this many seconds for other work to leave the machine first (0: don't)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--spangate", default=default_spangate(), help="command that runs the spangate CLI"
    )


def common_options(args: Any) -> dict[str, Any]:
    """The Options fields the add_common_args flags fill: placement, quiet_wait, out_dir and
    spangate (for `Options(..., **common_options(args))`)."""
    return {
        "placement": Placement.from_args(args.pin, args.nice),
        "quiet_wait": args.quiet_wait,
        "out_dir": args.out_dir,
        "spangate": args.spangate,
    }


class RunOptions(Protocol):
    @property
    def placement(self) -> Placement: ...

    @property
    def quiet_wait(self) -> float: ...


OptionsT = TypeVar("OptionsT", bound=RunOptions)
ItemT = TypeVar("ItemT")


def begin_run(
    parse_args: Callable[[list[str] | None], OptionsT], argv: list[str] | None
) -> tuple[OptionsT, float]:
    """The start of every benchmark's main(): SIGTERM unwinds, the options are parsed, the
    script re-runs itself niced if asked, and it waits (bounded) for a quiet machine. The
    options and the machine's busy share just before the run."""
    exit_on_sigterm()
    opts = parse_args(argv)
    run_niced(opts.placement.nice)
    return opts, settle(QUIET_THRESHOLD, opts.quiet_wait)


# ---------------------------------------------------------------------------------------------
# How busy the machine was


def cpu_pressure_s() -> float:
    """Seconds during which some runnable task waited for a CPU (PSI, /proc/pressure/cpu);
    0 where the kernel does not expose it."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(first.rpartition("total=")[2]) / 1e6
    return 0.0


def _self_and_children_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Busy:
    """CPU use during one phase. `ours_s` is this process, its reaped children and the watched
    processes (gateway, provider); `foreign` is the rest of the machine's busy time."""

    phase: str
    wall_s: float
    machine_s: float
    ours_s: float
    stall_s: float = 0.0  # PSI "some": time at least one runnable task waited for a core
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def foreign_s(self) -> float:
        return max(0.0, self.machine_s - self.ours_s)

    @property
    def machine_share(self) -> float:
        return self.machine_s / (self.wall_s * self.cores) if self.wall_s else 0.0

    @property
    def foreign_share(self) -> float:
        return self.foreign_s / (self.wall_s * self.cores) if self.wall_s else 0.0

    @property
    def stall_share(self) -> float:
        return self.stall_s / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "wall_s": round(self.wall_s, 3),
            "machine_busy_share": round(self.machine_share, 4),
            "ours_cpu_s": round(self.ours_s, 3),
            "foreign_cpu_s": round(self.foreign_s, 3),
            "foreign_share": round(self.foreign_share, 4),
            "cpu_pressure_share": round(self.stall_share, 4),
        }


class BusyMeter:
    """Measures a phase: `with BusyMeter("name", pids) as m: ...; m.result`.

    A watched pid that exits and is reaped inside the window moves its whole CPU time into
    RUSAGE_CHILDREN; its starting sample is subtracted so it is not counted twice.
    """

    def __init__(self, phase: str, pids: Iterable[int] = ()) -> None:
        self.phase = phase
        self.pids = list(pids)
        self.result: Busy | None = None
        self._start: tuple[float, float, float, float, dict[int, float]] | None = None

    def __enter__(self) -> BusyMeter:
        self._start = (
            time.monotonic(),
            machine_busy_s(),
            cpu_pressure_s(),
            _self_and_children_cpu_s(),
            {pid: process_cpu_s(pid) for pid in self.pids},
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None
        wall0, busy0, stall0, ours0, pid0 = self._start
        ours = _self_and_children_cpu_s() - ours0
        for pid, before in pid0.items():
            alive = Path(f"/proc/{pid}").exists()
            ours += process_cpu_s(pid) - before if alive else -before
        self.result = Busy(
            self.phase,
            time.monotonic() - wall0,
            machine_busy_s() - busy0,
            ours,
            cpu_pressure_s() - stall0,
        )


BUSY_HEADER = [
    "phase",
    "wall s",
    "machine busy",
    "ours (CPU s)",
    "foreign CPU (of all cores)",
    "CPU pressure",
]


def busy_rows(busy: Sequence[Busy]) -> list[list[str]]:
    return [
        [
            b.phase,
            f"{b.wall_s:.1f}",
            f"{b.machine_share:.0%}",
            f"{b.ours_s:.1f}",
            f"{b.foreign_share:.0%}",
            f"{b.stall_share:.0%}",
        ]
        for b in busy
    ]


def noise_warning(busy: Sequence[Busy]) -> list[str]:
    noisy = [
        f"{b.phase} ({b.foreign_share:.0%})" for b in busy if b.foreign_share > QUIET_THRESHOLD
    ]
    if not noisy:
        return []
    return [
        "WARNING: other processes competed for the cores during: "
        + ", ".join(noisy)
        + "; treat those numbers as pessimistic and re-run on a quiet machine."
    ]


# ---------------------------------------------------------------------------------------------
# Numbers


def rotated(items: Sequence[ItemT], index: int) -> list[ItemT]:
    """`items` in round `index`'s order: rotated by one a round, so each takes every place in
    the order equally often. The place matters: in an A/A run (one build as both targets) the
    second target of every round measured ~15 µs a call more than the first."""
    shift = index % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank-on-interpolation percentile (like numpy's default, 'linear')."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def proc_status_kib(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, RssAnon, VmHWM, ...)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0])
    return out


def rss_kib(pid: int) -> int:
    return proc_status_kib(pid).get("VmRSS", 0)


# ---------------------------------------------------------------------------------------------
# Processes


def start_provider(
    placement: Placement,
    tmp: Path,
    stack: contextlib.ExitStack,
    *,
    latency: float = 0.0,
    provider_script: Path = DEFAULT_PROVIDER,
) -> tuple[str, subprocess.Popen[bytes]]:
    """tests/fake_provider.py on the client core; its /v1 base URL (once it answers) and process.
    The stack stops it (SIGTERM, then SIGKILL) when it unwinds."""
    port = free_port()
    cmd = [sys.executable, str(provider_script), "--host", HOST, "--port", str(port)]
    cmd += ["--latency", str(latency)]
    return start_upstream(
        placement.wrap(cmd, CLIENT_CPU),
        port,
        tmp / "provider.log",
        ("provider", "fake provider"),
        stack,
        **placement.popen_kwargs(),
    )


def gateway_command(spangate: str, cfg: Path | None, db: Path, port: int) -> list[str]:
    cmd = [*shlex.split(spangate), "serve", "--db", str(db), "--host", HOST, "--port", str(port)]
    if cfg is not None:
        cmd += ["--config", str(cfg)]
    return cmd


@contextlib.contextmanager
def start_gateway(
    placement: Placement,
    spangate: str,
    tmp: Path,
    db: Path,
    cfg: Path | None,
    *,
    ready_timeout: float = 60.0,
    log_name: str = "gateway.log",
) -> Iterator[Gateway]:
    """`spangate serve` on the gateway core, ready (GET /health/ready = 200) when yielded;
    stopped with SIGTERM (SIGKILL after 60 s) however the block ends."""
    port = free_port()
    log_path = tmp / log_name
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            placement.wrap(gateway_command(spangate, cfg, db, port), GATEWAY_CPU),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            **placement.popen_kwargs(),
        )
    gw = Gateway(proc, f"http://{HOST}:{port}", db, log_path)
    try:
        wait_for("the gateway's /health/ready", gw.ready, ready_timeout)
        yield gw
    finally:
        stop_process(proc, "gateway", timeout=60)


def wait_drained(gw: Gateway, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the gateway's recorder queue is empty; its /health/ready recorder block."""

    def probe() -> dict[str, Any] | None:
        ready = gw.ready()
        recorder = (ready or {}).get("recorder") or {}
        return recorder if recorder.get("queue_depth", 1) == 0 else None

    return wait_for("the recorder queue to drain", probe, timeout, interval=0.05)


@contextlib.contextmanager
def profile_pid(pid: int, out: Path, *, rate: int = 250, cpu: int = CLIENT_CPU) -> Iterator[None]:
    """py-spy the process while the block runs; raw stacks to `out`, a summary to out.txt."""
    tool = py_spy_path()
    if tool is None:
        print("py-spy not found; no profile", file=sys.stderr)
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with py_spy_recording(tool, pid, out, lambda c: Placement().wrap(c, cpu), rate=rate):
        yield


def read_only_count(db: Path, sql: str, params: Sequence[Any] = ()) -> int:
    uri = f"file:{db}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        return int(conn.execute(sql, params).fetchone()[0])


def read_only_values(db: Path, sql: str, params: Sequence[Any] = ()) -> list[float]:
    """The first column of every row, from a read-only connection."""
    uri = f"file:{db}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        return [float(row[0]) for row in conn.execute(sql, params)]


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like an exception, so the finally blocks stop our children."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------------------------
# Machine description and results


def memory_total() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "sqlite": sqlite3.sqlite_version,
        "spangate": _version("spangate"),
    }


def machine_info(
    placement: Placement | None = None, busy_before: float | None = None, **extra: str
) -> dict[str, str]:
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "memory": memory_total(),
        **versions(),
        "spangate source": source_version(),
        "load average (1/5/15 min) at the end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    if placement is not None:
        info["cpu placement"] = placement.describe()
    if busy_before is not None:
        info["machine busy with other work just before"] = f"{busy_before:.0%} of all cores"
    info.update(extra)
    info["command"] = command_line()
    return info


@dataclass
class TargetCheck:
    """One target of issue 5 and how this run did against it."""

    name: str
    target: str
    measured: str
    passed: bool | None  # None: not measured in this run
    note: str = ""

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "FAIL")

    def line(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.name} {self.target}: {self.measured} -> {self.verdict}{note}"


TARGET_HEADER = ["target", "bound", "measured", "result", "note"]


def target_rows(targets: Sequence[TargetCheck]) -> list[list[str]]:
    return [[t.name, t.target, t.measured, t.verdict, t.note] for t in targets]


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]]
    text: str = ""


def write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    fieldnames: list[str] = []
    for record in records:
        fieldnames += [k for k in record if k not in fieldnames]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(records)


def write_results(
    name: str,
    title: str,
    intro: str,
    *,
    out_dir: Path,
    sections: Sequence[Section],
    targets: Sequence[TargetCheck],
    busy: Sequence[Busy],
    info: dict[str, str],
    records: Sequence[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Print the tables, and write <name>.csv (records), <name>.md and <name>.json."""
    for section in sections:
        if section.rows:
            print_table(section.title, section.header, section.rows)
    print_table(f"{name}: targets", TARGET_HEADER, target_rows(targets))
    print_table(f"{name}: how busy the machine was", BUSY_HEADER, busy_rows(busy))
    warning = noise_warning(busy)
    for line in [*(t.line() for t in targets), *warning]:
        print(line)
    for key, value in info.items():
        print(f"{key}: {value}")

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / f"{name}.csv", records)
    parts = [f"# {title}", "", intro, ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        if section.text:
            parts += [section.text, ""]
        if section.rows:
            parts += [markdown_table(section.header, section.rows), ""]
    parts += ["## Targets", "", markdown_table(TARGET_HEADER, target_rows(targets)), ""]
    parts += [
        "## How busy the machine was",
        "",
        "From /proc: *machine busy* is all cores' busy time over the phase; *ours* is the CPU "
        "time of this script, its children, the gateway and the fake provider; *foreign* is "
        "everything else, as a share of all cores. Foreign work near 0% means a clean run. "
        "*CPU pressure* (Linux PSI) is the share of the time at least one runnable task "
        "waited for a core: anything well above 0% means runs queued behind other work.",
        "",
        markdown_table(BUSY_HEADER, busy_rows(busy)),
        "",
        *([*warning, ""] if warning else []),
        "## Machine and run",
        "",
        *[f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in info.items()],
        "",
    ]
    (out_dir / f"{name}.md").write_text("\n".join(parts))
    summary = {
        "name": name,
        "title": title,
        "targets": [asdict(t) | {"verdict": t.verdict} for t in targets],
        "busy": [b.as_dict() for b in busy],
        "max_foreign_share": max((b.foreign_share for b in busy), default=0.0),
        "info": info,
        **(extra or {}),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out_dir / (name + '.csv')}, {name}.md and {name}.json")


# Two processes pinned to cores `a` and `b` bounce a byte over a socket pair, both idle for
# `gap` seconds between bounces (as a gateway's core idles while the upstream thinks).
_WAKE_PROBE = """
import os, socket, statistics, sys, time
a, b, rounds, gap = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
left, right = socket.socketpair()
pid = os.fork()
if pid == 0:
    os.sched_setaffinity(0, {b})
    left.close()
    while data := right.recv(1):
        right.send(data)
    os._exit(0)
os.sched_setaffinity(0, {a})
right.close()
times = []
for _ in range(rounds):
    time.sleep(gap)
    start = time.perf_counter_ns()
    left.send(b"x")
    left.recv(1)
    times.append(time.perf_counter_ns() - start)
left.close()
os.waitpid(pid, 0)
print(statistics.median(times) / 1000)
"""


def wake_round_trip_us(a: int, b: int, gap: float, rounds: int = 150) -> float | None:
    """Median µs of a round trip between processes on cores `a` and `b` that idle `gap` s
    between trips: across cores it wakes an idle core each way, which on a VM can cost far
    more than the work of a hop (None where affinity cannot be set)."""
    if not hasattr(os, "sched_setaffinity") or max(a, b) >= (os.cpu_count() or 1):
        return None
    probe = [sys.executable, "-c", _WAKE_PROBE, str(a), str(b), str(rounds), str(gap)]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
    try:
        return float(done.stdout.strip())
    except ValueError:
        return None


def settle(busy_threshold: float, max_wait: float) -> float:
    """Wait (bounded) for a quiet machine; the busy share last seen (0..1)."""
    if max_wait <= 0:
        return machine_busy_now()
    return wait_for_quiet(max_wait, busy_threshold)


def machine_busy_now(window: float = 1.0) -> float:
    before, start = machine_busy_s(), time.monotonic()
    time.sleep(window)
    return (machine_busy_s() - before) / ((time.monotonic() - start) * (os.cpu_count() or 1))
