"""Start-up: how long until `spangate serve` answers /health/ready, and how fast the read-only
commands (`spangate tail`, `show`, `rollouts`) start.

1. Ready time: `--runs` times, launch `spangate serve` with a plain config (one
   OpenAI-compatible model on loopback, nothing listening there: start-up must not call it)
   and a fresh database; poll GET /health/ready every 5 ms from this process; the clock runs
   from just before the launch to the first 200. Then SIGTERM and time the exit as well.
   A few runs with no config at all (the built-in mock models) are reported too; the last of
   them receives some calls, which gives the small database for step 2.
2. Read-only commands: wall time of `spangate tail --db X` (and `show`, `rollouts`) over
   `--cli-runs` runs, next to a bare `python -c pass`, plus the slowest imports of
   `spangate tail` from `python -X importtime`.

    /work/venv/bin/python bench/startup.py [--runs 10] [--mock-runs 3] [--cli-runs 10]

Results: bench/results/startup.{csv,md,json}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    GATEWAY_CPU,
    HOST,
    Busy,
    BusyMeter,
    Placement,
    Section,
    TargetCheck,
    add_common_args,
    begin_run,
    common_options,
    default_spangate,
    free_port,
    gateway_command,
    machine_info,
    percentile,
    stop_process,
    temp_dir,
    write_gateway_config,
    write_results,
)

TARGET_READY_S = 2.0
POLL_S = 0.005
READY_TIMEOUT_S = 60.0


@dataclass
class Startup:
    ready_s: float
    stop_s: float
    exit_code: int | None


def ready_status(port: int) -> int | None:
    """Status of GET /health/ready, or None while nothing answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=1)
    try:
        conn.request("GET", "/health/ready")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def post_calls(port: int, count: int) -> None:
    body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        for i in range(count):
            conn.request(
                "POST",
                f"/rollout/r{i % 3}/v1/chat/completions",
                body=body,
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"mock call answered {resp.status}")
    finally:
        conn.close()


def start_once(
    placement: Placement, spangate: str, tmp: Path, cfg: Path | None, calls: int = 0
) -> Startup:
    """Launch, poll until ready, optionally send calls, stop; the timings."""
    port = free_port()
    db = tmp / "startup.db"
    for stale in tmp.glob("startup.db*"):
        stale.unlink()
    cmd = placement.wrap(gateway_command(spangate, cfg, db, port), GATEWAY_CPU)
    log_path = tmp / "gateway.log"
    with log_path.open("wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, **placement.popen_kwargs()
        )
    try:
        while True:
            status = ready_status(port)
            if status == 200:
                ready = time.perf_counter() - start
                break
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"spangate serve exited with {proc.returncode}:\n{tail}")
            if time.perf_counter() - start > READY_TIMEOUT_S:
                raise TimeoutError(f"not ready after {READY_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)
        if calls:
            post_calls(port, calls)
        stop_start = time.perf_counter()
        code = stop_process(proc, "gateway", timeout=30)
        return Startup(ready, time.perf_counter() - stop_start, code)
    finally:
        stop_process(proc, "gateway", timeout=30)


@dataclass
class CliTiming:
    name: str
    samples_ms: list[float] = field(default_factory=list)


def time_command(
    name: str, cmd: list[str], runs: int, placement: Placement, cwd: Path
) -> CliTiming:
    timing = CliTiming(name)
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(
            placement.wrap(cmd, GATEWAY_CPU),
            capture_output=True,
            timeout=60,
            cwd=cwd,
            check=False,
            **placement.popen_kwargs(),
        )
        timing.samples_ms.append((time.perf_counter() - start) * 1000)
        if out.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed: {out.stderr.decode()[-500:]}")
    return timing


def slowest_imports(cmd: list[str], cwd: Path, top: int = 12) -> list[tuple[str, float]]:
    """Packages `cmd` (a Python script and its arguments) imports, by cumulative import time:
    each top-level package (no dot in its name) wherever it was first imported, plus the
    command's own top-level imports."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    found: dict[str, float] = {}
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():
            continue
        depth = len(name) - len(name.lstrip(" "))
        module = name.strip()
        if "." not in module or depth == 1:
            found[module] = max(found.get(module, 0.0), int(cumulative) / 1000)
    return sorted(found.items(), key=lambda kv: -kv[1])[:top]


@dataclass
class Options:
    runs: int
    mock_runs: int
    cli_runs: int
    placement: Placement
    quiet_wait: float
    out_dir: Path
    spangate: str


def run(
    opts: Options,
) -> tuple[list[Startup], list[Startup], list[CliTiming], list[tuple[str, float]], list[Busy]]:
    plain: list[Startup] = []
    mock: list[Startup] = []
    busy: list[Busy] = []
    opts.placement.pin_self()
    with temp_dir("spangate-bench-startup-") as tmp:
        cfg = write_gateway_config(tmp, "http://127.0.0.1:9/v1")
        with BusyMeter("serve until ready (plain config)") as meter:
            for i in range(opts.runs):
                plain.append(start_once(opts.placement, opts.spangate, tmp, cfg))
                print(f"  plain config run {i + 1}: ready in {plain[-1].ready_s:.3f} s", flush=True)
        assert meter.result is not None
        busy.append(meter.result)
        mock_dir = tmp / "mock"
        mock_dir.mkdir()
        with BusyMeter("serve until ready (no config: mock)") as meter:
            for i in range(opts.mock_runs):
                last = i == opts.mock_runs - 1
                mock.append(start_once(opts.placement, opts.spangate, mock_dir, None, 30 * last))
                print(f"  mock run {i + 1}: ready in {mock[-1].ready_s:.3f} s", flush=True)
        assert meter.result is not None
        busy.append(meter.result)

        db = mock_dir / "startup.db"
        base = shlex.split(opts.spangate)
        python = [sys.executable, "-c", "pass"]
        commands = [
            ("`spangate tail --db X`", [*base, "tail", "--db", str(db)]),
            ("`spangate show r0 --db X`", [*base, "show", "r0", "--db", str(db)]),
            ("`spangate rollouts --db X`", [*base, "rollouts", "--db", str(db)]),
            ("`python -c pass` (interpreter alone)", python),
        ]
        timings = []
        with BusyMeter("read-only commands") as meter:
            for name, cmd in commands:
                timings.append(time_command(name, cmd, opts.cli_runs, opts.placement, tmp))
                print(f"  {name}: p50 {percentile(timings[-1].samples_ms, 50):.0f} ms", flush=True)
        assert meter.result is not None
        busy.append(meter.result)
        imports: list[tuple[str, float]] = []
        if opts.spangate == default_spangate() and Path(base[0]).exists():
            imports = slowest_imports([base[0], "tail", "--db", str(db)], tmp)
    return plain, mock, timings, imports, busy


def report(
    opts: Options,
    plain: list[Startup],
    mock: list[Startup],
    timings: list[CliTiming],
    imports: list[tuple[str, float]],
    busy: list[Busy],
    busy_before: float,
) -> None:
    def row(name: str, values: list[float], unit: float = 1000) -> list[str]:
        return [
            name,
            str(len(values)),
            f"{percentile(values, 50) * unit:.0f}",
            f"{percentile(values, 90) * unit:.0f}",
            f"{max(values) * unit:.0f}",
        ]

    header = ["measure", "runs", "p50 ms", "p90 ms", "max ms"]
    serve_rows = [
        row("serve, plain config: launch -> /health/ready 200", [s.ready_s for s in plain]),
        row("serve, plain config: SIGTERM -> exit", [s.stop_s for s in plain]),
        row("serve, no config (mock): launch -> ready", [s.ready_s for s in mock]),
    ]
    cli_rows = [row(t.name, t.samples_ms, 1) for t in timings]
    ready = [s.ready_s for s in plain]
    p50, worst = percentile(ready, 50), max(ready)
    exit_codes = sorted({str(s.exit_code) for s in plain + mock})
    tail = next((t for t in timings if "tail" in t.name), None)
    targets = [
        TargetCheck(
            "`spangate serve` ready (plain config)",
            f"< {TARGET_READY_S:g} s",
            f"p50 {p50:.2f} s, max {worst:.2f} s",
            p50 < TARGET_READY_S,
            f"judged on p50 of {len(ready)} runs; max "
            + ("also under" if worst < TARGET_READY_S else "over")
            + f" the bound; exit codes {', '.join(exit_codes)}",
        )
    ]
    if tail is not None:
        targets.append(
            TargetCheck(
                "`spangate tail --db X` wall time",
                "(no bound; reported)",
                f"p50 {percentile(tail.samples_ms, 50):.0f} ms",
                None,
                "Python start-up included",
            )
        )
    sections = [
        Section(
            "spangate serve",
            header,
            serve_rows,
            "Clock from just before the launch to the first 200 of GET /health/ready (polled "
            "every 5 ms); fresh database each run.",
        ),
        Section("Read-only commands (wall time, on a small database)", header, cli_rows),
    ]
    if imports:
        sections.append(
            Section(
                "Slowest imports of `spangate tail` (python -X importtime, cumulative; "
                "top-level packages and the command's own imports)",
                ["module", "ms"],
                [[name, f"{ms:.0f}"] for name, ms in imports],
            )
        )
    records = [
        {
            "kind": "serve_plain",
            "run": i,
            "ready_s": round(s.ready_s, 4),
            "stop_s": round(s.stop_s, 4),
        }
        for i, s in enumerate(plain)
    ]
    records += [
        {
            "kind": "serve_mock",
            "run": i,
            "ready_s": round(s.ready_s, 4),
            "stop_s": round(s.stop_s, 4),
        }
        for i, s in enumerate(mock)
    ]
    for t in timings:
        records += [
            {"kind": "cli", "name": t.name, "run": i, "wall_ms": round(v, 2)}
            for i, v in enumerate(t.samples_ms)
        ]
    write_results(
        "startup",
        "spangate start-up benchmark",
        "Time until `spangate serve` is ready, and wall time of the read-only commands.",
        out_dir=opts.out_dir,
        sections=sections,
        targets=targets,
        busy=busy,
        info=machine_info(opts.placement, busy_before),
        records=records,
        extra={"ready_p50_s": p50, "ready_max_s": worst},
    )


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="serve runs, plain config")
    parser.add_argument("--mock-runs", type=int, default=3, help="serve runs, no config")
    parser.add_argument("--cli-runs", type=int, default=10, help="runs of each CLI command")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.mock_runs < 1 or args.cli_runs < 1:
        parser.error("--runs, --mock-runs and --cli-runs must be at least 1")
    return Options(
        runs=args.runs,
        mock_runs=args.mock_runs,
        cli_runs=args.cli_runs,
        **common_options(args),
    )


def main(argv: list[str] | None = None) -> int:
    opts, busy_before = begin_run(parse_args, argv)
    plain, mock, timings, imports, busy = run(opts)
    report(opts, plain, mock, timings, imports, busy, busy_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
