"""What a proxied call costs before spangate does anything, and what each of spangate's parts
adds: CPU per call at concurrency 64, every target in alternating rounds of one run (issue 19).

Targets, each a process pinned to the gateway's core in front of tests/fake_provider.py (20 ms):

- *bare hop*: bench/_bare_hop.py, uvloop + httptools + spangate's upstream client, nothing else;
- *aiohttp hop*: bench/_thin_proxy.py with `own`: aiohttp's server, one route, the same client;
- *aiohttp floor*: bench/_thin_proxy.py: aiohttp on both sides (vs_litellm.py's floor);
- *spangate*: `spangate serve` as bench/cpu_per_call.py runs it (recording, metrics, a key);
- *spangate without X*: the same with one part switched off (bench/_ablated_gateway.py).

CPU is utime + stime from /proc over the round, after the writer has stored every span,
divided by the calls wrk completed; *direct* (wrk straight to the provider) gives the latency
the others add. A part's cost is spangate's median minus its ablated
median; the hops show what any Python gateway on aiohttp, or on no framework, pays first.

    python bench/hop_floors.py [--rounds 4] [--duration 6] [--parts budgets,metrics,writer,recording]

Results: bench/results/hop_floors-c<concurrency>.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    BODY,
    CLIENT_CPU,
    GATEWAY_CPU,
    HOST,
    BusyMeter,
    Placement,
    free_port,
    machine_info,
    managed_process,
    markdown_table,
    print_table,
    process_cpu_s,
    rotated,
    start_gateway,
    start_provider,
    temp_dir,
    wait_drained,
    wait_for,
)
from cpu_per_call import KEY, add_placement_args, run_wrk, write_config
from overhead import WRK_LUA

BENCH = Path(__file__).resolve().parent
PARTS = ("budgets", "metrics", "writer", "recording", "front")


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # None: the provider itself (direct), whose CPU is not the hop's
    # Waits until whatever the target still does after answering is done (the writer).
    settle: Callable[[], Any] = lambda: None
    rounds: list[dict[str, float]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rounds)


@contextlib.contextmanager
def start_hop(
    placement: Placement, tmp: Path, name: str, cmd: list[str], port: int
) -> Iterator[int]:
    """A lab hop on the gateway's core; its pid once it answers a call."""
    log_path = tmp / f"{name.replace(' ', '-')}.log"
    with managed_process(placement.wrap(cmd, GATEWAY_CPU), log_path, name) as proc:
        url = f"http://{HOST}:{port}/v1/chat/completions"

        def answers() -> bool | None:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log_path.read_text()[-2000:]}")
            status = _post_status(url)
            return True if status == 200 else None

        wait_for(name, answers, 60, interval=0.1)
        yield proc.pid


def _post_status(url: str) -> int | None:
    request = urllib.request.Request(
        url,
        data=BODY.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status)
    except (urllib.error.URLError, OSError):
        return None


def one_round(placement: Placement, target: Target, args: argparse.Namespace, lua: Path) -> None:
    with BusyMeter(target.name, [target.pid] if target.pid else []) as meter:
        pid = target.pid
        before = process_cpu_s(pid) if pid else 0.0
        load = run_wrk(placement, target.url, args.concurrency, args.duration, lua)
        target.settle()
        cpu = process_cpu_s(pid) - before if pid else math.nan
    assert meter.result is not None
    done = max(load["requests"], 1)
    target.rounds.append(
        {
            "cpu_us_per_call": cpu / done * 1e6,
            "rps": load["requests"] / (load["duration_us"] / 1e6),
            "p50_ms": load["p50_us"] / 1000,
            "p99_ms": load["p99_us"] / 1000,
            "non_2xx": load["errors_status"],
            "foreign_share": meter.result.foreign_share,
        }
    )


def measure(args: argparse.Namespace, placement: Placement) -> list[Target]:
    placement.pin_self(CLIENT_CPU)
    targets: list[Target] = []
    with temp_dir("spangate-hops-") as tmp, contextlib.ExitStack() as stack:
        lua = tmp / "bench.lua"
        lua.write_text(WRK_LUA.replace('"Bearer sk-bench"', f'"Bearer {KEY}"') % {"body": BODY})
        base, _ = start_provider(placement, tmp, stack, latency=args.latency)
        cfg = write_config(tmp, base)
        targets.append(Target("direct", base + "/chat/completions", None))
        python = sys.executable
        hops = [
            ("bare hop", [python, str(BENCH / "_bare_hop.py")], [base + "/chat/completions"]),
            ("aiohttp hop", [python, str(BENCH / "_thin_proxy.py")], [base, "own"]),
            ("aiohttp floor", [python, str(BENCH / "_thin_proxy.py")], [base]),
        ]
        for name, cmd, rest in hops:
            port = free_port()
            pid = stack.enter_context(
                start_hop(placement, tmp, name, [*cmd, str(port), *rest], port)
            )
            targets.append(Target(name, f"http://{HOST}:{port}/v1/chat/completions", pid))
        gateways = [("spangate", args.spangate)]
        ablate = BENCH / "_ablated_gateway.py"
        gateways += [
            (f"spangate without {part}", f"{python} {ablate} {part}") for part in args.parts
        ]
        for name, command in gateways:
            work = tmp / name.replace(" ", "-")
            work.mkdir()
            gw = stack.enter_context(start_gateway(placement, command, work, work / "g.db", cfg))
            url = f"{gw.root}/rollout/hops/v1/chat/completions"
            targets.append(Target(name, url, gw.proc.pid, settle=lambda gw=gw: wait_drained(gw)))
        for target in targets:  # warm-up: connections, caches, the rollout's first call
            run_wrk(placement, target.url, args.concurrency, 2, lua)
            target.settle()
        for index in range(args.rounds):
            for target in rotated(targets, index):
                one_round(placement, target, args, lua)
                last = target.rounds[-1]
                print(
                    f"round {index}: {target.name}: {last['cpu_us_per_call']:.0f} µs/call, "
                    f"p50 {last['p50_ms']:.2f} ms"
                )
    return targets


def report(targets: list[Target], args: argparse.Namespace, placement: Placement) -> str:
    by_name = {t.name: t for t in targets}
    bare = by_name["bare hop"].median("cpu_us_per_call")
    full = by_name["spangate"].median("cpu_us_per_call")
    direct_p50 = by_name["direct"].median("p50_ms")
    header = [
        "target",
        "CPU µs/call",
        "above the bare hop",
        "req/s",
        "p50 ms",
        "added p50 ms",
        "p99 ms",
        "rounds (µs/call)",
    ]
    # Under load, direct shares its core with wrk and so is no latency floor: one call at a
    # time is where the latency a hop adds shows.
    show_added = args.concurrency == 1
    rows = []
    for t in targets:
        cpu = t.median("cpu_us_per_call")
        p50 = t.median("p50_ms")
        rounds = ", ".join(f"{r['cpu_us_per_call']:.0f}" for r in t.rounds)
        rows.append(
            [
                t.name,
                "-" if t.pid is None else f"{cpu:.0f}",
                "-" if t.pid is None else f"{cpu - bare:+.0f}",
                f"{t.median('rps'):.0f}",
                f"{p50:.2f}",
                f"{p50 - direct_p50:+.2f}" if show_added and t.pid is not None else "-",
                f"{t.median('p99_ms'):.2f}",
                "-" if t.pid is None else rounds,
            ]
        )
    parts_header = ["part of spangate", "CPU µs/call it adds", "share of spangate's"]
    if show_added:
        parts_header.append("p50 ms it adds")
    full_p50 = by_name["spangate"].median("p50_ms")
    parts_rows = []
    for part in args.parts:
        without = by_name[f"spangate without {part}"]
        ablated = without.median("cpu_us_per_call")
        row = [part, f"{full - ablated:.0f}", f"{(full - ablated) / full:.0%}"]
        if show_added:
            row.append(f"{full_p50 - without.median('p50_ms'):+.2f}")
        parts_rows.append(row)
    print_table(f"CPU per call, concurrency {args.concurrency}", header, rows)
    print_table(
        "What each part costs (spangate minus spangate without it)", parts_header, parts_rows
    )
    info = machine_info(placement)
    foreign = [r["foreign_share"] for t in targets for r in t.rounds]
    lines = [
        f"# Hop floors: CPU per call before and inside spangate (concurrency {args.concurrency})",
        "",
        f"Concurrency {args.concurrency}, {args.duration:g} s a round, {args.rounds} rounds "
        "alternating over every target, tests/fake_provider.py at "
        f"{args.latency * 1000:g} ms. CPU is the target process's utime + stime (/proc) per "
        "completed call, the writer's work included; the medians are shown. Written by "
        "`bench/hop_floors.py`.",
        "",
        markdown_table(header, rows),
        "",
        "## What each part costs",
        "",
        "spangate's median minus the median of spangate with that part switched off "
        "(bench/_ablated_gateway.py). *recording* includes *writer* and *metrics*.",
        "",
        markdown_table(parts_header, parts_rows),
        "",
        "## Run",
        "",
        f"- other processes took {min(foreign):.0%} to {max(foreign):.0%} of the machine per "
        "round (wrk and the fake provider on the other core)",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of load per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.02, help="fake provider latency (s)")
    parser.add_argument(
        "--parts",
        type=lambda text: [p for p in text.split(",") if p],
        default=list(PARTS),
        help=f"parts to switch off one at a time, comma-separated (of {', '.join(PARTS)})",
    )
    add_placement_args(parser)
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    placement = Placement.from_args(args.pin, 0)  # before this process pins itself
    targets = measure(args, placement)
    stem = f"hop_floors-c{args.concurrency}"
    (args.out_dir / f"{stem}.md").write_text(report(targets, args, placement))
    (args.out_dir / f"{stem}.json").write_text(
        json.dumps({t.name: t.rounds for t in targets}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
