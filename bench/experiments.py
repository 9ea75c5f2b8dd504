"""What experiments cost: per call on the request path, at start (rebuild from the store), and
per analysis, on a synthetic store of N rollouts under one three-variant experiment.

    python bench/experiments.py [--rollouts 50000] [--calls 3] [--other 100000] [--out-dir DIR]

`--other` adds spans outside any experiment, which the start-up scan and the analysis must
skip. Results: bench/results/experiments.md (machine load, command, numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from config.models import Experiment  # noqa: E402
from gateway.proxy.experiments import Experiments  # noqa: E402
from judge.experiments import analyse_experiment  # noqa: E402
from store import experiments as stored  # noqa: E402
from store.schema import connect  # noqa: E402
from store.span_inserts import insert_spans  # noqa: E402

T0 = 1_795_334_400_000_000_000
VARIANTS = [
    {"name": "control"},
    {"name": "guideline-v1", "guideline": {"agent": "a", "version": 1}},
    {"name": "bigger-model", "model": "big", "params": {"temperature": 0.2}},
]
PAYLOAD = {"model": "mini", "messages": [{"role": "user", "content": "x" * 400}]}


def experiment(policy: str) -> Experiment:
    return Experiment.model_validate(
        {"name": "e", "model": "mini", "policy": policy, "variants": VARIANTS}
    )


async def _guideline(agent: str, version: int) -> str:
    return "# Guideline\n\n- Cite a source for every claim.\n"


def per_call_us(policy: str, *, sticky: bool, n: int = 20_000) -> float:
    """Choose + apply + re-serialise, as `enter_experiment` does, per call (µs)."""
    experiments = Experiments([experiment(policy)], guideline=_guideline)
    state = experiments.by_name["e"]
    rng = random.Random(0)
    for i in range(2000):
        # Rewards so Thompson has posteriors to draw from.
        unit = f"warm-{i}"
        loop_apply(experiments, state, unit)
        experiments.on_reward({"rollout_id": unit, "name": "reward", "value": rng.random()})

    async def run() -> float:
        start = time.perf_counter()
        for i in range(n):
            unit = "sticky" if sticky else f"r{i}"
            applied = await experiments.apply(state, unit, PAYLOAD, "chat")
            assert applied is not None
            orjson.dumps(applied[0])
        return (time.perf_counter() - start) / n * 1e6

    return asyncio.run(run())


def loop_apply(experiments: Experiments, state: Any, unit: str) -> None:
    asyncio.run(experiments.apply(state, unit, PAYLOAD, "chat"))


def build_store(path: Path, rollouts: int, calls: int, other: int) -> None:
    db = connect(path)
    stored.save_configs(db, [experiment("thompson").model_dump(mode="json")])
    rng = random.Random(7)
    names = [v["name"] for v in VARIANTS]
    batch: list[dict[str, Any]] = []
    conn = db.conn

    def flush() -> None:
        insert_spans(conn, batch)
        batch.clear()

    for r in range(rollouts):
        variant = names[r % 3]
        for seq in range(1, calls + 1):
            batch.append(_span(f"e{r}", seq, {"experiment": "e", "variant": variant}, rng))
        if len(batch) >= 5000:
            flush()
    for r in range(other):
        batch.append(_span(f"o{r}", 1, {"gen_ai.request.temperature": 1}, rng))
        if len(batch) >= 5000:
            flush()
    flush()
    conn.execute("BEGIN")
    conn.executemany(
        "insert into rewards (id, rollout_id, name, value, created_ns) values (?, ?, ?, ?, ?)",
        [(f"rw{r}", f"e{r}", "reward", rng.random(), T0 + r) for r in range(rollouts)],
    )
    conn.execute("COMMIT")
    db.close()


def _span(rollout: str, seq: int, attributes: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    start = T0 + rng.randrange(10**12)
    return {
        "span_id": f"{rng.getrandbits(64):016x}",
        "trace_id": f"{rng.getrandbits(128):032x}",
        "rollout_id": rollout,
        "attempt_id": "1",
        "seq": seq,
        "name": "chat mini",
        "operation": "chat",
        "status": "ok",
        "start_ns": start,
        "end_ns": start + 200_000_000,
        "duration_ms": rng.gammavariate(4, 50),
        "cost_usd": 0.0004,
        "attributes": attributes,
        "tags": [],
    }


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rollouts", type=int, default=50_000)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--other", type=int, default=100_000)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [
        ["per call, fixed, new rollout", f"{per_call_us('fixed', sticky=False):.1f} µs"],
        ["per call, fixed, sticky rollout", f"{per_call_us('fixed', sticky=True):.1f} µs"],
        ["per call, thompson, new rollout", f"{per_call_us('thompson', sticky=False):.1f} µs"],
        ["per call, thompson, sticky rollout", f"{per_call_us('thompson', sticky=True):.1f} µs"],
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        build_s, _ = timed(build_store, path, args.rollouts, args.calls, args.other)
        db = connect(path, read_only=True)
        scan_s, assigned = timed(stored.assignments, db)
        rewards_s, rewards = timed(stored.rewards_after, db, 0, ["reward"])
        experiments = Experiments([experiment("thompson")])
        rebuild_s, _ = timed(experiments.rebuild, assigned, rewards)
        analyse_s, result = timed(analyse_experiment, db, "e")
        db.close()
    spans = args.rollouts * args.calls + args.other
    rows += [
        [f"build store ({spans:,} spans, {args.rollouts:,} rewards)", f"{build_s:.1f} s"],
        [f"start: scan assignments ({len(assigned):,} rollouts)", f"{scan_s:.2f} s"],
        [f"start: read rewards ({len(rewards):,})", f"{rewards_s:.2f} s"],
        ["start: rebuild posteriors in memory", f"{rebuild_s:.2f} s"],
        ["analysis (GET /api/experiments/{name})", f"{analyse_s:.2f} s"],
    ]
    load_after = os.getloadavg()
    width = max(len(r[0]) for r in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    print("\n".join(lines))
    print(f"verdict on random rewards: {result['verdict']}")
    command = shlex.join([sys.executable, *sys.argv])
    report = [
        "# bench/experiments.py",
        "",
        f"`{command}`",
        "",
        f"{os.cpu_count()} cores; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f} (other engineers' work shares the machine, so "
        "times are pessimistic).",
        "",
        "| what | time |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "experiments.md").write_text("\n".join(report), encoding="utf-8")


if __name__ == "__main__":
    main()
