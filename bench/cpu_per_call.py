"""CPU the gateway process spends per proxied call, overall and per stage (issue 19).

CPU time (utime + stime of `spangate serve`, from /proc) barely moves when other work shares
the machine, unlike latency: so this is the number to halve. Each round drives wrk at a fixed
concurrency through the gateway (recording on, metrics on, an auth key, OTLP export off) in
front of tests/fake_provider.py, waits until the writer has stored every span, and divides the
gateway's CPU by the spans recorded for that round. One more round runs under py-spy, and its
samples are sorted into stages by the innermost frame that names one (see STAGES); a stage's
µs per call is its share of the samples times the median CPU per call.

    python bench/cpu_per_call.py --label before [--rounds 3] [--duration 8] [--concurrency 64]
    git archive <commit> | tar -x -C /tmp/base
    python bench/cpu_per_call.py --label after --baseline-src /tmp/base --baseline-label before

Results: bench/results/cpu_per_call-<label>.json, and bench/results/cpu_per_call.md, which
puts every label found (before, after, ...) side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    BODY,
    CLIENT_CPU,
    HOST,
    MODEL,
    RESULTS_DIR,
    BusyMeter,
    Placement,
    free_port,
    markdown_table,
    print_table,
    process_cpu_s,
    profile_pid,
    read_only_count,
    rotated,
    source_version,
    start_gateway,
    start_provider,
    start_upstream,
    temp_dir,
    wait_drained,
)
from overhead import WRK_LUA
from streaming import STAMPED_UPSTREAM, request_body

LEAN_UPSTREAM = Path(__file__).resolve().parent / "_lean_upstream.py"

KEY = "sk-bench"
# Below this share of its core the gateway is waiting for calls, not bounding them.
SATURATED = 0.9

# (substring of a py-spy frame, stage). Each sample goes to the stage of its innermost frame
# that matches; frames that serve several stages (aiohttp's StreamWriter, asyncio) match none,
# so the search goes on outwards. Order matters only within one frame.
STAGES: tuple[tuple[str, str], ...] = (
    ("Metrics.observe", "metrics"),
    ("prometheus_client/", "metrics"),
    ("StoreWriter", "writer"),
    # Budget state lives under store/ but runs on the event loop, inside admission.
    ("store/budget_state.py", "budgets"),
    ("store/", "writer"),
    ("sqlite_utils/", "writer"),
    ("TraceIndex", "other subscribers"),
    ("ingest_otlp", "other subscribers"),
    ("Recorder.publish", "span building"),
    ("Call.publish", "span building"),
    ("Call._stored", "span building"),
    ("tool_span", "span building"),
    ("ToolTracker.note", "span building"),
    ("Call.headers", "response"),
    ("_answer_plain", "response"),
    ("_answer_stream", "response"),
    ("error_response", "response"),
    ("read_body", "parse"),
    ("FrontExchange.body", "parse"),
    ("parse_payload", "parse"),
    ("gateway/proxy/payload.py", "parse"),
    ("read_attribution", "attribution"),
    ("number_call", "attribution"),
    ("Sequencer", "attribution"),
    ("ToolTracker", "attribution"),
    ("rollout_trace", "attribution"),
    ("new_trace_id", "attribution"),
    ("enter_experiment", "attribution"),
    ("rollout_mode", "attribution"),
    ("Redactor", "attribution"),
    ("forwarded_client_headers", "attribution"),
    ("gateway/proxy/budgets.py", "budgets"),
    ("Router.", "routing"),
    ("Guard.", "routing"),
    ("Gate.", "routing"),
    ("upstream_changes", "routing"),
    ("upstream_body", "routing"),
    ("gateway/providers/", "forward"),
    ("gateway/proxy/forward.py", "forward"),
    ("aiohttp/client", "forward"),
    ("aiohttp/connector", "forward"),
    ("Call.", "span building"),
    ("proxy (gateway/web/routes_openai.py", "proxy() itself"),
    ("gateway/web/auth.py", "middleware + auth"),
    ("gateway/web/middleware.py", "middleware + auth"),
    ("aiohttp/web_", "server (HTTP in/out)"),
    ("aiohttp/_http_parser", "server (HTTP in/out)"),
    ("aiohttp/http_parser", "server (HTTP in/out)"),
    # The front (httptools) that takes the OpenAI routes instead of aiohttp since 2026-12-01.
    ("gateway/web/front.py", "server (HTTP in/out)"),
    ("gateway/web/exchange.py", "server (HTTP in/out)"),
)
STAGE_ORDER = (
    "parse",
    "attribution",
    "routing",
    "budgets",
    "forward",
    "response",
    "span building",
    "writer",
    "metrics",
    "other subscribers",
    "proxy() itself",
    "middleware + auth",
    "server (HTTP in/out)",
    "event loop and other",
)


def stage_of(thread: str, frames: list[str]) -> str:
    for frame in reversed(frames):
        for needle, stage in STAGES:
            if needle in frame:
                return stage
    if "MainThread" not in thread:
        return "writer" if "writer" in thread.lower() else "event loop and other"
    return "event loop and other"


def stage_shares(collapsed: str) -> dict[str, float]:
    counts: dict[str, int] = {}
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        thread, *frames = stack.split(";")
        stage = stage_of(thread, frames)
        counts[stage] = counts.get(stage, 0) + int(count_text)
    total = sum(counts.values()) or 1
    return {stage: n / total for stage, n in counts.items()}


def write_config(tmp: Path, provider_base: str) -> Path:
    cfg = tmp / "cpu.yaml"
    cfg.write_text(
        "auth:\n"
        "  keys:\n"
        f"    - key: {KEY}\n"
        "      scopes: [proxy, read]\n"
        "models:\n"
        f"  - name: {MODEL}\n"
        "    deployments:\n"
        "      - provider: openai\n"
        f"        model: {MODEL}\n"
        f"        api_base: {provider_base}\n"
        "        api_key: sk-upstream\n"
    )
    return cfg


def run_wrk(placement: Placement, url: str, concurrency: int, seconds: float, lua: Path) -> dict:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s"]
    cmd = placement.wrap([*cmd, "-s", str(lua), url], CLIENT_CPU)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise RuntimeError(f"wrk gave no result (rc={proc.returncode}):\n{proc.stderr}")


def thread_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of the process's main thread (the event loop) and of all its other threads
    (the writer above all), from /proc/PID/task: py-spy's shares cannot tell a thread waiting
    for the GIL from one at work, these counters can."""
    tick = os.sysconf("SC_CLK_TCK")
    main = others = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / tick
            if task.name == str(pid):
                main += cpu
            else:
                others += cpu
    return main, others


def one_round(
    gw: Any, placement: Placement, args: argparse.Namespace, lua: Path, name: str
) -> dict:
    url = f"{gw.root}/rollout/{name}/attempt/1/v1/chat/completions"
    with BusyMeter(name, [gw.proc.pid]) as meter:
        started = time.monotonic()
        before = process_cpu_s(gw.proc.pid)
        threads_before = thread_cpu_s(gw.proc.pid)
        load = run_wrk(placement, url, args.concurrency, args.duration, lua)
        wait_drained(gw)
        cpu = process_cpu_s(gw.proc.pid) - before
        wall = time.monotonic() - started
        loop_cpu, other_cpu = (
            after - start
            for after, start in zip(thread_cpu_s(gw.proc.pid), threads_before, strict=True)
        )
    spans = read_only_count(gw.db, "select count(*) from spans where rollout_id = ?", (name,))
    assert meter.result is not None
    return {
        "round": name,
        "spans": spans,
        "completed": load["requests"],
        "non_2xx": load["errors_status"],
        "rps": load["requests"] / (load["duration_us"] / 1e6),
        "p50_ms": load["p50_us"] / 1000,
        "p99_ms": load["p99_us"] / 1000,
        "gateway_cpu_s": cpu,
        # Below ~90% of its core the gateway waits for work, and CPU per call then carries
        # the idle loop's wake-ups: it is no longer what bounds throughput.
        "gateway_busy": cpu / wall,
        "cpu_us_per_call": cpu / max(spans, 1) * 1e6,
        "loop_thread_us_per_call": loop_cpu / max(spans, 1) * 1e6,
        "other_threads_us_per_call": other_cpu / max(spans, 1) * 1e6,
        "foreign_share": meter.result.foreign_share,
    }


def start_spaced_upstream(
    placement: Placement, tmp: Path, stack: contextlib.ExitStack, chunks: int, delay: float
) -> str:
    """bench/_stamped_upstream.py, which spaces a stream's events `delay` apart as a model
    does (the fake provider sends them all at once); its /v1 base URL."""
    port = free_port()
    cmd = [sys.executable, str(STAMPED_UPSTREAM), "--host", HOST, "--port", str(port)]
    cmd += ["--chunks", str(chunks), "--delay", str(delay)]
    base, _ = start_upstream(
        placement.wrap(cmd, CLIENT_CPU),
        port,
        tmp / "stamped.log",
        ("stamped upstream", "stamped upstream"),
        stack,
        **placement.popen_kwargs(),
    )
    return base


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One result per build: the current one (`--label`) and, with `--baseline-src`, the
    source tree given there (`--baseline-label`); their rounds alternate, so drift on a shared
    machine hits both alike."""
    placement = Placement.from_args(args.pin, 0)
    placement.pin_self(CLIENT_CPU)
    builds = [(args.label, args.spangate)]
    if args.baseline_src:
        cli = shlex.join([sys.executable, "-c", "from gateway.cli.main import cli; cli()"])
        env = shlex.join(["env", f"PYTHONPATH={Path(args.baseline_src).resolve()}"])
        builds.insert(0, (args.baseline_label, f"{env} {cli}"))
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in builds}
    profiled: dict[str, dict[str, Any]] = {}
    raws: dict[str, Path] = {}
    with temp_dir("spangate-cpu-") as tmp, contextlib.ExitStack() as stack:
        lua = tmp / "bench.lua"
        body = request_body(args.stream).decode() if args.stream else BODY
        lua.write_text(WRK_LUA.replace('"Bearer sk-bench"', f'"Bearer {KEY}"') % {"body": body})
        if args.chunk_delay:
            base = start_spaced_upstream(placement, tmp, stack, args.stream, args.chunk_delay)
        elif args.upstream == "lean":
            if args.stream:
                raise SystemExit("--upstream lean answers plain completions only")
            base, _ = start_provider(
                placement, tmp, stack, latency=args.latency, provider_script=LEAN_UPSTREAM
            )
        else:
            base, _ = start_provider(placement, tmp, stack, latency=args.latency)
        cfg = write_config(tmp, base)
        gateways = {}
        for label, command in builds:
            work = tmp / label
            work.mkdir()
            gw = stack.enter_context(start_gateway(placement, command, work, work / "cpu.db", cfg))
            warm = f"{gw.root}/rollout/warm/v1/chat/completions"
            run_wrk(placement, warm, args.concurrency, 2, lua)
            wait_drained(gw)
            gateways[label] = gw
        for index in range(args.rounds):
            for label, gw in rotated(list(gateways.items()), index):
                rounds[label].append(one_round(gw, placement, args, lua, f"cpu-{index}"))
                print(label, json.dumps(rounds[label][-1]))
        for label, gw in gateways.items():
            raws[label] = args.out_dir / f"cpu_per_call-{label}-profile.collapsed"
            with profile_pid(gw.proc.pid, raws[label], rate=args.profile_rate):
                profiled[label] = one_round(gw, placement, args, lua, "cpu-profiled")
            print(label, json.dumps(profiled[label]))
    results = []
    for label, command in builds:
        per_call = statistics.median(r["cpu_us_per_call"] for r in rounds[label])
        raw = raws[label]
        shares = stage_shares(raw.read_text()) if raw.exists() else {}
        results.append(
            {
                "label": label,
                "source": args.baseline_src if command != args.spangate else source_version(),
                "cpu_us_per_call": per_call,
                "rounds": rounds[label],
                "profiled_round": profiled[label],
                "stage_share": shares,
                "stage_us_per_call": {stage: share * per_call for stage, share in shares.items()},
                "load_average": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "concurrency": args.concurrency,
                "duration_s": args.duration,
                "latency_s": args.latency,
                "upstream": args.upstream,
                "stream_chunks": args.stream,
                "chunk_delay_s": args.chunk_delay,
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
            }
        )
    return results


def report(out_dir: Path) -> str:
    """cpu_per_call.md: every labelled run found, side by side (first label is the baseline)."""
    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("cpu_per_call-*.json"))]
    order = {"before": 0, "after": 2}
    runs.sort(key=lambda r: order.get(r["label"], 1))
    if not runs:
        return ""
    for run in runs:
        # Stages are re-sorted from the kept samples, so a new rule applies to old runs too.
        raw = out_dir / f"cpu_per_call-{run['label']}-profile.collapsed"
        if raw.exists():
            shares = stage_shares(raw.read_text())
            run["stage_us_per_call"] = {k: v * run["cpu_us_per_call"] for k, v in shares.items()}
    labels = [r["label"] for r in runs]
    header = ["stage", *(f"{label} µs/call" for label in labels)]
    if len(runs) > 1:
        header.append(f"{labels[-1]} / {labels[0]}")

    def row(name: str, values: list[float]) -> list[str]:
        cells = [name, *(f"{v:.0f}" for v in values)]
        if len(runs) > 1:
            cells.append(f"{values[-1] / values[0]:.0%}" if values[0] else "-")
        return cells

    body = [
        row(stage, [r["stage_us_per_call"].get(stage, 0.0) for r in runs]) for stage in STAGE_ORDER
    ]
    body.append(row("**total (measured)**", [r["cpu_us_per_call"] for r in runs]))
    round_rows = [
        [
            r["label"],
            x["round"],
            str(x["spans"]),
            str(x["completed"]),
            str(x["non_2xx"]),
            f"{x['rps']:.0f}",
            f"{x['p50_ms']:.1f}",
            f"{x['p99_ms']:.1f}",
            f"{x['cpu_us_per_call']:.0f}",
            _cell(x, "loop_thread_us_per_call", "{:.0f}"),
            _cell(x, "other_threads_us_per_call", "{:.0f}"),
            _cell(x, "gateway_busy", "{:.0%}"),
            f"{x['foreign_share']:.0%}",
        ]
        for r in runs
        for x in [*r["rounds"], r["profiled_round"]]
    ]
    runs_text = [
        f"- {r['label']}: source {r['source']}, {r['date']}, load average "
        f"{' '.join(f'{v:.2f}' for v in r['load_average'])}, concurrency {r['concurrency']}, "
        f"{r['duration_s']} s per round, upstream latency {r['latency_s']} s; `{r['command']}`"
        for r in runs
    ]
    concurrency = ", ".join(sorted({str(r["concurrency"]) for r in runs}))
    saturation = _saturation(runs)
    text = "\n".join(
        [
            "# CPU per proxied call"
            + (f" (concurrency {concurrency})" if concurrency != "64" else ""),
            "",
            "CPU time (utime + stime from /proc) of `spangate serve` per recorded call, at "
            f"concurrency {concurrency} with wrk against {_scenario(runs[0])}, recording, "
            "metrics and an API key on, OTLP export off. The gateway runs pinned to core 0, wrk and the "
            "provider to core 1. *total* is the median of the rounds; a stage's figure is its "
            "share of py-spy's samples (one extra round, 200 Hz, all threads, idle excluded) "
            "times that total. Written by `bench/cpu_per_call.py`.",
            "",
            "## Per stage",
            "",
            markdown_table(header, body),
            "",
            "## Rounds",
            "",
            "*foreign* is CPU other processes took during the round, as a share of both cores. "
            "The thread columns split the same CPU by thread (/proc/PID/task): the event loop "
            "(aiohttp in and out, the call's own work) and every other thread (the writer "
            "inserting into SQLite, its checkpoint and guard threads). *gateway core busy* is "
            "the gateway's CPU over the round's wall time, as a share of its one core.",
            "",
            markdown_table(
                [
                    "run",
                    "round",
                    "spans",
                    "completed",
                    "non-2xx",
                    "rps",
                    "p50 ms",
                    "p99 ms",
                    "CPU µs/call",
                    "event-loop thread µs/call",
                    "other threads µs/call",
                    "gateway core busy",
                    "foreign",
                ],
                round_rows,
            ),
            "",
            *saturation,
            "## Runs",
            "",
            *runs_text,
            "",
            *_notes(out_dir),
        ]
    )
    (out_dir / "cpu_per_call.md").write_text(text)
    print_table("CPU µs per call, by stage", header, body)
    for line in saturation:
        print(line)
    return text


def _scenario(run: dict[str, Any]) -> str:
    chunks, delay = run.get("stream_chunks", 0), run.get("chunk_delay_s", 0.0)
    if run.get("upstream") == "lean":
        return "bench/_lean_upstream.py (20 ms)"
    if not chunks:
        return "tests/fake_provider.py (20 ms)"
    if not delay:
        return f"tests/fake_provider.py (20 ms), streams of {chunks} content chunks sent at once"
    return (
        f"bench/_stamped_upstream.py, streams of {chunks} content chunks with every event "
        f"{delay * 1000:g} ms after the one before"
    )


def _cell(round_: dict[str, Any], key: str, fmt: str) -> str:
    """Rounds measured before a column was added have no figure."""
    return fmt.format(round_[key]) if key in round_ else "-"


def _saturation(runs: list[dict[str, Any]]) -> list[str]:
    """A warning for every build whose gateway was not kept busy: the issue's premise (at this
    concurrency the gateway is CPU-bound, so CPU per call is throughput) does not hold for it."""
    lines = []
    for run in runs:
        busy = [x["gateway_busy"] for x in run["rounds"] if "gateway_busy" in x]
        if busy and statistics.median(busy) < SATURATED:
            lines.append(
                f"**{run['label']} was not saturated** (its gateway busy "
                f"{statistics.median(busy):.0%} of its core, median of the rounds): its CPU per "
                "call includes the wake-ups of an idle loop and is not what bounds throughput. "
                "Raise `--concurrency` until every build is above "
                f"{SATURATED:.0%}."
            )
            lines.append("")
    return lines


def _notes(out_dir: Path) -> list[str]:
    """What was learnt from the numbers, kept by hand in cpu_per_call-notes.md."""
    notes = out_dir / "cpu_per_call-notes.md"
    return ["## Findings", "", notes.read_text().strip(), ""] if notes.exists() else []


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """`--pin`, `--out-dir` and `--spangate`, as every CPU-per-call script takes them."""
    parser.add_argument("--pin", choices=["on", "off"], default="on")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--spangate",
        default=str(Path(sys.executable).with_name("spangate")),
        help="command that runs the spangate CLI",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="run", help="name of this run in the report")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.02, help="fake provider latency (s)")
    parser.add_argument(
        "--stream", type=int, default=0, help="stream answers of this many content chunks"
    )
    parser.add_argument(
        "--chunk-delay",
        type=float,
        default=0.0,
        help="with --stream: seconds between events (bench/_stamped_upstream.py); 0 sends "
        "them at once after --latency (tests/fake_provider.py)",
    )
    parser.add_argument(
        "--upstream",
        choices=("fake", "lean"),
        default="fake",
        help="fake: tests/fake_provider.py; lean: bench/_lean_upstream.py, which takes so little "
        "CPU that a fast gateway is saturated even on a slow day",
    )
    parser.add_argument("--profile-rate", type=int, default=200)
    add_placement_args(parser)
    parser.add_argument(
        "--baseline-src",
        help="a source tree of another build (say `git archive <commit>` unpacked), run in "
        "alternating rounds with this one through PYTHONPATH",
    )
    parser.add_argument("--baseline-label", default="before")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and stop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for result in measure(args):
            (args.out_dir / f"cpu_per_call-{result['label']}.json").write_text(
                json.dumps(result, indent=2) + "\n"
            )
    report(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
