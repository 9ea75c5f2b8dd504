"""How soon a span recorded by one replica shows on another replica's live stream
(`/api/spans/stream`, woken by PostgreSQL LISTEN/NOTIFY), against the same replica's own.

Two `spangate serve` processes on one PostgreSQL (Debian's, started here) in front of the
fake provider; a reader follows each replica's stream while calls go through the first
replica one at a time, each into its own rollout. The delay is from the answer reaching
the client to the span's event arriving. The target is 1 s.

    python bench/replica_stream.py [--calls 200]

Prints a table and writes bench/results/replica_stream.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402
from fake_provider import FakeProviderThread  # noqa: E402
from pg import start_postgres  # noqa: E402
from servers import start_served, write_config  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "replica_stream.md"


def follow(base: str, seen: dict[str, float], connected: threading.Event) -> None:
    """Note when each rollout's span arrives on `base`'s live stream."""
    try:
        with httpx.stream("GET", f"{base}/api/spans/stream", timeout=None) as response:
            for line in response.iter_lines():
                if line.startswith(": connected"):
                    connected.set()
                elif line.startswith("data:") and '"rollout_id":"bench-' in line.replace(" ", ""):
                    at = time.perf_counter()
                    rollout = line.split('"rollout_id"', 1)[1].split('"')[1]
                    seen.setdefault(rollout, at)
    except httpx.HTTPError:
        return  # the replica stopped at the end of the run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    postgres = start_postgres()
    provider = FakeProviderThread().start()
    url = postgres.new_database()
    served = []
    try:
        for index in range(2):
            config = write_config(
                work / f"replica-{index}.yaml",
                {"gpt-test": provider.url},
                recorder={"journal_dir": str(work / f"journal-{index}")},
            )
            served.append(start_served(config, url, work / f"replica-{index}.log"))  # type: ignore[arg-type]
        first, second = served
        seen = {"same replica": {}, "other replica": {}}
        for name, replica in (("same replica", first), ("other replica", second)):
            connected = threading.Event()
            threading.Thread(
                target=follow, args=(replica.base, seen[name], connected), daemon=True
            ).start()
            assert connected.wait(10), f"no stream from {replica.base}"
        answered: dict[str, float] = {}
        with httpx.Client(base_url=first.base, timeout=10) as client:
            for i in range(args.calls):
                rollout = f"bench-{i}"
                response = client.post(
                    f"/rollout/{rollout}/v1/chat/completions",
                    json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
                )
                response.raise_for_status()
                answered[rollout] = time.perf_counter()
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not all(rollout in s for s in seen.values()):
                    time.sleep(0.001)
        rows = []
        for name, arrivals in seen.items():
            delays = [(arrivals[r] - answered[r]) * 1000 for r in answered if r in arrivals]
            missing = len(answered) - len(delays)
            rows.append(
                (
                    name,
                    statistics.median(delays),
                    percentile(delays, 0.95),
                    max(delays),
                    missing,
                )
            )
    finally:
        for replica in served:
            replica.stop()
        provider.stop()
        postgres.stop()
    load = os.getloadavg()
    lines = [
        "# A span on another replica's live stream",
        "",
        f"Machine: 2 cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the "
        f"end. {args.calls} calls through replica 1, one at a time, each its own rollout; "
        "delay from the answer to the span's event on each replica's `/api/spans/stream`. "
        "Target: 1 s. Command: `python bench/replica_stream.py`.",
        "",
        "| stream on | p50 ms | p95 ms | max ms | missing |",
        "|---|---|---|---|---|",
        *(
            f"| {n} | {p50:.0f} | {p95:.0f} | {top:.0f} | {miss} |"
            for n, p50, p95, top, miss in rows
        ),
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
