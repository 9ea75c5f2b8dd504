"""What OTLP export costs: gateway throughput at concurrency 64 with export off and on.

Starts the fake provider, an OTLP sink (bench/_otlp_sink.py) and `spangate serve` twice per
round (export off, then on, alternating over `--rounds` so drift hits both alike), drives
each with bench/_aio_loadgen.py, and checks the sink received one span per request.

    python bench/otlp.py [--rounds 3] [--duration 10] [--concurrency 64] [--latency 0.02]

Results: a table on stdout and bench/results/otlp.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CLIENT_CPU,
    RESULTS_DIR,
    Placement,
    start_gateway,
    start_provider,
    temp_dir,
)
from overhead import (
    AIO_LOADGEN,
    BODY,
    default_spangate,
    free_port,
    wait_for,
    write_gateway_config,
)

SINK = Path(__file__).resolve().parent / "_otlp_sink.py"
BOUND = 0.05  # export on may cost at most 5% of throughput


def load(placement: Placement, url: str, concurrency: int, seconds: float) -> dict[str, float]:
    cmd = [sys.executable, str(AIO_LOADGEN), "--url", url, "--concurrency", str(concurrency)]
    cmd += ["--duration", str(seconds), "--body", BODY]
    proc = subprocess.run(
        placement.wrap(cmd, CLIENT_CPU), capture_output=True, text=True, timeout=seconds + 60
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result = json.loads(line.removeprefix("BENCH_JSON "))
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            return result
    raise RuntimeError(f"load generator gave no result:\n{proc.stderr}")


def sink_count(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as response:
        return int(json.loads(response.read())["spans"])


def sink_up(port: int) -> bool | None:
    try:
        return sink_count(port) == 0 or None
    except OSError:
        return None


def run_once(
    placement: Placement, tmp: Path, provider: str, sink: int | None, args: argparse.Namespace
) -> dict[str, float]:
    cfg = write_gateway_config(tmp, provider)
    if sink is not None:
        cfg.write_text(cfg.read_text() + f"otlp:\n  endpoint: http://127.0.0.1:{sink}/v1/traces\n")
    db = tmp / f"run-{time.monotonic_ns()}.db"
    before = sink_count(sink) if sink is not None else 0
    with start_gateway(placement, args.spangate, tmp, db, cfg) as gw:
        url = f"{gw.root}/rollout/bench/attempt/1/v1/chat/completions"
        warm = load(placement, url, 8, 1.0)
        result = load(placement, url, args.concurrency, args.duration)
        if sink is not None:
            expected = warm["sent"] + result["sent"]
            # Every request of the measured run must reach the receiver (one span each).
            result["exported"] = wait_for(
                "the export to catch up",
                lambda: n if (n := sink_count(sink) - before) >= expected else None,
                30,
            )
            result["expected"] = expected
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--pin", choices=["on", "off"], default="on")
    parser.add_argument("--spangate", default=default_spangate())
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    placement = Placement.from_args(args.pin, 0)
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with temp_dir("spangate-otlp-bench") as tmp, contextlib.ExitStack() as stack:
        provider, _ = start_provider(placement, tmp, stack, latency=args.latency)
        port = free_port()
        sink = subprocess.Popen(
            placement.wrap([sys.executable, str(SINK), "--port", str(port)], CLIENT_CPU),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(sink.wait, 10)
        stack.callback(sink.terminate)
        wait_for("the OTLP sink", lambda: sink_up(port), 20)
        for _ in range(args.rounds):
            runs["off"].append(run_once(placement, tmp, provider, None, args))
            runs["on"].append(run_once(placement, tmp, provider, port, args))
    rps = {mode: [r["rps"] for r in results] for mode, results in runs.items()}
    off, on = statistics.median(rps["off"]), statistics.median(rps["on"])
    cost = 1 - on / off
    complete = all(r["exported"] >= r["expected"] for r in runs["on"])
    header = ["export", "runs (req/s)", "median req/s", "p50 ms (median)", "p99 ms (median)"]
    rows = [
        [
            mode,
            ", ".join(f"{v:.0f}" for v in rps[mode]),
            f"{statistics.median(rps[mode]):.0f}",
            f"{statistics.median(r['p50_us'] for r in runs[mode]) / 1000:.2f}",
            f"{statistics.median(r['p99_us'] for r in runs[mode]) / 1000:.2f}",
        ]
        for mode in ("off", "on")
    ]
    verdict = "PASS" if cost <= BOUND and complete else "FAIL"
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"Throughput cost of export: {cost:.1%} (bound <= {BOUND:.0%}): {verdict}; "
        f"every request's span reached the receiver: {'yes' if complete else 'NO'}.",
    ]
    print("\n".join(lines))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "otlp.md").write_text(
        "# OTLP export: throughput with export off and on\n\n"
        f"Concurrency {args.concurrency}, fake provider latency {args.latency * 1000:.0f} ms, "
        f"{args.rounds} alternating rounds of {args.duration:.0f} s each, "
        f"{placement.describe()}; {dt.date.today().isoformat()}.\n\n" + "\n".join(lines) + "\n"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
