"""Run every spangate benchmark with one command and summarise them against the targets.

Runs, each as its own process with a time limit (a failure or hang in one does not stop the
others): overhead.py, streaming.py, memory.py, store.py, startup.py. Each writes its own
bench/results/<name>.{csv,md} (and .json; overhead.py writes csv/md); this script then writes
bench/results/SUMMARY.md: the machine (nproc, CPU model, memory), versions (python, aiohttp,
uvloop, sqlite, wrk), date, the exact commands, every target of issue 5 with the measured
value and PASS/FAIL, and how busy the machine was (other processes' CPU) during each.

    /work/venv/bin/python bench/run_all.py            # the full set (about 10-15 minutes)
    /work/venv/bin/python bench/run_all.py --quick    # shortened runs (about 4-6 minutes)
        [--only streaming,store] [--nice -10] [--quiet-wait 10] [--out-dir DIR]

Each benchmark's output is also kept in bench/results/<name>.log.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    QUIET_THRESHOLD,
    RESULTS_DIR,
    TargetCheck,
    command_line,
    exit_on_sigterm,
    machine_busy_now,
    machine_info,
    markdown_table,
    print_table,
)
from overhead import tool_version

BENCH_DIR = Path(__file__).resolve().parent
NAMES = ("overhead", "streaming", "memory", "store", "startup")

# Arguments per benchmark: (full, quick), and the time limit of each in seconds.
ARGS: dict[str, tuple[list[str], list[str]]] = {
    "overhead": (
        ["--concurrency", "1,16,64,256", "--duration", "10", "--warmup", "2"],
        ["--concurrency", "1,64", "--duration", "3", "--warmup", "1"],
    ),
    "streaming": ([], ["--requests", "100", "--timing-runs", "8", "--warmup", "10"]),
    "memory": ([], ["--requests", "20000", "--warmup", "2000", "--segments", "4"]),
    "store": (
        [],
        [
            "--writer-spans",
            "50000",
            "--writer-prefill",
            "300000",
            "--queries",
            "100",
            "--show-runs",
            "5",
        ],
    ),
    "startup": ([], ["--runs", "5", "--mock-runs", "1", "--cli-runs", "3"]),
}
LIMITS = {"overhead": 1200, "streaming": 600, "memory": 1800, "store": 1800, "startup": 600}

TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 3.0
TARGET_RATIO_64 = 0.60


@dataclass
class Outcome:
    name: str
    command: list[str]
    returncode: int | None
    elapsed_s: float
    targets: list[TargetCheck] = field(default_factory=list)
    foreign_share: float | None = None  # the most other processes took during any phase
    pressure_share: float | None = None
    error: str = ""


def run_one(name: str, argv: list[str], out_dir: Path, limit: float) -> Outcome:
    """Run one benchmark, echoing and logging its output; stopped (SIGTERM) after `limit` s."""
    cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), *argv]
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    start = time.monotonic()
    with (out_dir / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=BENCH_DIR.parent
        )
        watchdog = threading.Timer(limit, stop, [proc])
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            proc.wait()
        except BaseException:
            stop(proc)
            raise
        finally:
            watchdog.cancel()
    elapsed = time.monotonic() - start
    error = f"stopped after the {limit:.0f} s limit" if elapsed >= limit else ""
    return Outcome(name, cmd, proc.returncode, elapsed, error=error)


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (each benchmark unwinds and stops its own children), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# Reading each benchmark's results


def read_json_result(outcome: Outcome, out_dir: Path, started: float) -> None:
    path = out_dir / f"{outcome.name}.json"
    if not path.exists() or path.stat().st_mtime < started:
        outcome.error = outcome.error or "no result file written"
        return
    data = json.loads(path.read_text())
    outcome.targets = [
        TargetCheck(t["name"], t["target"], t["measured"], t["passed"], t.get("note", ""))
        for t in data["targets"]
    ]
    busy = data.get("busy") or []
    outcome.foreign_share = max((b["foreign_share"] for b in busy), default=None)
    outcome.pressure_share = max((b.get("cpu_pressure_share", 0.0) for b in busy), default=None)


def read_overhead(outcome: Outcome, out_dir: Path, started: float) -> None:
    path = out_dir / "overhead.csv"
    if not path.exists() or path.stat().st_mtime < started:
        outcome.error = outcome.error or "no result file written"
        return
    with path.open() as fh:
        rows = {int(r["concurrency"]): r for r in csv.DictReader(fh)}
    cores = os.cpu_count() or 1
    shares = []
    for r in rows.values():
        for prefix in ("direct", "gateway"):
            wall = float(r.get(f"{prefix}_cpu_wall_s") or 0)
            if wall:
                shares.append(float(r[f"{prefix}_cpu_foreign_s"]) / (wall * cores))
    outcome.foreign_share = max(shares, default=None)
    if 1 in rows:
        r = rows[1]
        p50, p99 = float(r["added_p50_ms"]), float(r["added_p99_ms"])
        outcome.targets += [
            TargetCheck(
                "added latency p50 at concurrency 1",
                f"<= {TARGET_ADDED_P50_MS:g} ms",
                f"{p50:.2f} ms",
                p50 <= TARGET_ADDED_P50_MS,
                f"direct p50 {float(r['direct_p50_us']) / 1000:.2f} ms",
            ),
            TargetCheck(
                "added latency p99 at concurrency 1",
                f"<= {TARGET_ADDED_P99_MS:g} ms",
                f"{p99:.2f} ms",
                p99 <= TARGET_ADDED_P99_MS,
                f"direct p99 {float(r['direct_p99_us']) / 1000:.2f} ms",
            ),
        ]
    if 64 in rows:
        ratio = float(rows[64]["throughput_ratio"])
        outcome.targets.append(
            TargetCheck(
                "throughput at concurrency 64, share of direct",
                f">= {TARGET_RATIO_64:.0%}",
                f"{ratio:.1%}",
                ratio >= TARGET_RATIO_64,
                f"{float(rows[64]['gateway_rps']):.0f} vs {float(rows[64]['direct_rps']):.0f} rps",
            )
        )
    spans_ok = all(r["spans_ok"] == "True" for r in rows.values())
    outcome.targets.append(
        TargetCheck(
            "every request sent has its span",
            "spans = requests",
            "equal in every run" if spans_ok else "MISMATCH",
            spans_ok,
            ", ".join(f"c={c}: {r['spans_after_stop']}" for c, r in sorted(rows.items())),
        )
    )


# ---------------------------------------------------------------------------------------------
# SUMMARY.md


SUMMARY_HEADER = ["benchmark", "target", "bound", "measured", "result", "machine: foreign CPU"]


def summary_rows(outcomes: list[Outcome]) -> list[list[str]]:
    rows = []
    for o in outcomes:
        foreign = "-" if o.foreign_share is None else f"up to {o.foreign_share:.0%}"
        if o.pressure_share:
            foreign += f" (CPU pressure up to {o.pressure_share:.0%})"
        if not o.targets:
            rows.append(
                [
                    o.name,
                    "(did not finish)",
                    "",
                    o.error or f"exit {o.returncode}",
                    "ERROR",
                    foreign,
                ]
            )
        for t in o.targets:
            rows.append([o.name, t.name, t.target, t.measured, t.verdict, foreign])
    return rows


def write_summary(
    out_dir: Path,
    outcomes: list[Outcome],
    quick: bool,
    busy_before: float,
    nice: int,
    started_at: str,
) -> Path:
    info = machine_info(
        None,
        busy_before,
        **{
            "wrk": tool_version(["wrk", "--version"]),
            "mode": "quick (shortened runs)" if quick else "full",
            "scheduling": f"nice {nice} (own session per process)" if nice else "default priority",
        },
    )
    rows = summary_rows(outcomes)
    verdicts = [r[4] for r in rows]
    tally = ", ".join(
        f"{verdicts.count(v)} {v}" for v in ("PASS", "FAIL", "n/a", "ERROR") if verdicts.count(v)
    )
    noisy = [o.name for o in outcomes if (o.foreign_share or 0) > QUIET_THRESHOLD]
    parts = [
        "# spangate benchmark summary",
        "",
        f"Produced by `{info['command']}`, started {started_at}, finished {info['date']}. {tally}.",
        "",
        markdown_table(SUMMARY_HEADER, rows),
        "",
        "*Foreign CPU* is the most that processes other than the benchmark's own took, as a "
        "share of all cores, during any measured phase of that benchmark (from /proc/stat); "
        "*CPU pressure* is Linux PSI, the share of time some runnable task waited for a core.",
        "",
    ]
    if noisy:
        parts += [
            f"**The machine was shared during: {', '.join(noisy)}.** Other work took more "
            f"than {QUIET_THRESHOLD:.0%} of the cores; latency and throughput numbers from "
            "those runs are pessimistic. Memory growth and query plans are not affected.",
            "",
        ]
    parts += [
        "## Runs",
        "",
        markdown_table(
            ["benchmark", "exit", "time s", "details", "command"],
            [
                [
                    o.name,
                    "timeout" if o.returncode is None else str(o.returncode),
                    f"{o.elapsed_s:.0f}",
                    f"[{o.name}.md]({o.name}.md)" + (f" ({o.error})" if o.error else ""),
                    f"`{shlex.join(o.command)}`",
                ]
                for o in outcomes
            ],
        ),
        "",
        "## Machine and versions",
        "",
        *[f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in info.items()],
        "",
    ]
    path = out_dir / "SUMMARY.md"
    path.write_text("\n".join(parts))
    print_table("spangate benchmarks", SUMMARY_HEADER, rows)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shortened runs")
    parser.add_argument("--only", default=",".join(NAMES), help="comma-separated benchmarks")
    parser.add_argument("--nice", type=int, default=0, help="passed to every benchmark")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15,
        help="each benchmark waits up to this long for a calm machine before it starts",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(NAMES)}")
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    busy_before = machine_busy_now()
    print(f"machine {busy_before:.0%} busy before the runs; {command_line()}", flush=True)
    outcomes: list[Outcome] = []
    for name in names:
        argv_one = list(ARGS[name][1 if args.quick else 0])
        argv_one += ["--quiet-wait", f"{args.quiet_wait:g}", "--out-dir", str(out_dir)]
        if args.nice:
            argv_one += ["--nice", str(args.nice)]
        started = time.time()
        outcome = run_one(name, argv_one, out_dir, LIMITS[name])
        if name == "overhead":
            read_overhead(outcome, out_dir, started)
        else:
            read_json_result(outcome, out_dir, started)
        outcomes.append(outcome)
    write_summary(out_dir, outcomes, args.quick, busy_before, args.nice, started_at)
    failed = [o.name for o in outcomes if o.returncode != 0]
    if failed:
        print(f"benchmarks that did not finish cleanly: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
