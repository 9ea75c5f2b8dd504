"""Time `judge.patterns.analyse()` on a large synthetic store: is 100,000 rollouts under a minute?

Builds a temporary SQLite file with the store's own schema and `insert_spans`: N rollouts, each
with 2-4 chat calls that ask for tools, an `execute_tool` span per tool call (as the gateway
derives them), a final reward, a few second attempts, agents and models. Planted signal, so
the statistics have something to find: one tool sequence raises the success rate, one tool
fails often and its failures sink the attempt, one model is cheaper. Then it times `analyse()`
as a whole and stage by stage (load, differences, tools, leaderboards, outliers).

    /work/venv/bin/python bench/patterns.py [--rollouts 100000] [--repeat 3] [--seed 7]
        [--tools 20] [--agents 5] [--body-bytes 400] [--db PATH] [--keep] [--out-dir DIR]

Results: bench/results/patterns.csv and bench/results/patterns.md (machine, command, numbers).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from judge import patterns  # noqa: E402
from store.schema import connect  # noqa: E402
from store.span_inserts import insert_spans  # noqa: E402

T = TypeVar("T")
TARGET_SECONDS = 60.0
TARGET_ROLLOUTS = 100_000
BATCH_ROLLOUTS = 2_000  # rollouts per insert transaction: big enough to amortise the commit
T0 = 1_795_334_400_000_000_000  # 2026-11-22T08:00:00Z, in ns
MS = 1_000_000
# Model group -> USD per chat call; `mini` is the cheap one at (nearly) equal quality.
MODELS = {"big": 0.004, "mid": 0.002, "mini": 0.0004}
FLAKY_TOOL = "flaky_api"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Generator:
    """Span records shaped like the gateway's, for one rollout at a time (seeded, repeatable)."""

    def __init__(self, seed: int, tools: int, agents: int, body_bytes: int) -> None:
        self.rng = random.Random(seed)
        self.tools = ["search", "verify", FLAKY_TOOL] + [f"tool_{i:02d}" for i in range(tools - 3)]
        self.agents = [f"agent-{i}" for i in range(agents)]
        self.filler = "x" * body_bytes
        self.span_number = 0

    def _span_id(self) -> str:
        self.span_number += 1
        return f"{self.span_number:016x}"

    def _base(
        self, rid: str, aid: str, agent: str, seq: int, start: int, ms: float
    ) -> dict[str, Any]:
        return {
            "span_id": self._span_id(),
            "trace_id": f"{self.span_number:032x}",
            "rollout_id": rid,
            "attempt_id": aid,
            "agent": agent,
            "seq": seq,
            "stream": 0,
            "retries": 0,
            "start_ns": start,
            "end_ns": start + int(ms * MS),
            "duration_ms": ms,
            "attributes": "{}",
            "tags": "[]",
        }

    def attempt(
        self, rid: str, aid: str, agent: str, model: str, start: int, seq: int
    ) -> tuple[list[dict[str, Any]], bool, int, int]:
        """One attempt's spans, whether it succeeded, and the next free time and seq."""
        rng = self.rng
        turns = rng.randint(2, 4)
        used: list[str] = []
        errored = False
        spans: list[dict[str, Any]] = []
        now = start
        for turn in range(turns):
            last = turn == turns - 1
            calls: list[str] = []
            if not last:
                if rng.random() < 0.3 and not used:
                    calls = ["search", "verify"] if rng.random() < 0.5 else ["search"]
                else:
                    calls = [rng.choice(self.tools) for _ in range(rng.randint(1, 2))]
            ms = rng.lognormvariate(6.0, 0.5)  # ~400 ms median per chat call
            seq += 1
            span = self._base(rid, aid, agent, seq, now, ms)
            tool_calls = [
                {"id": f"call_{self.span_number}_{i}", "name": name, "arguments": '{"q":"a"}'}
                for i, name in enumerate(calls)
            ]
            span.update(
                name=f"chat {model}",
                operation="chat",
                provider="openai",
                model_group=model,
                request_model=model,
                response_model=model,
                status="ok",
                http_status=200,
                input_tokens=rng.randint(200, 2000),
                output_tokens=rng.randint(20, 300),
                cost_usd=MODELS[model] * rng.uniform(0.5, 1.5),
                finish_reasons=["tool_calls" if calls else "stop"],
                tool_calls=tool_calls or None,
                request_body={
                    "model": model,
                    "messages": [{"role": "user", "content": self.filler}],
                },
                response_body=None,
            )
            if rng.random() < 0.01:  # an occasional truncated reply
                span["finish_reasons"] = ["length"]
            spans.append(span)
            now = span["end_ns"]
            for call in tool_calls:
                name = call["name"]
                failed = name == FLAKY_TOOL and rng.random() < 0.4
                errored |= failed
                used.append(name)
                tool_ms = rng.lognormvariate(4.0, 0.7)
                seq += 1
                execution = self._base(rid, aid, agent, seq, now, tool_ms)
                execution.update(
                    parent_span_id=span["span_id"],
                    name=f"execute_tool {name}",
                    operation="execute_tool",
                    status="error" if failed else "ok",
                    error_type="tool_error" if failed else None,
                    error_message="Error: upstream 503" if failed else None,
                    tool_calls=[call],
                    request_body={"name": name, "arguments": call["arguments"]},
                    response_body={
                        "content": "Error: upstream 503" if failed else "ok",
                        "error": failed,
                    },
                )
                spans.append(execution)
                now = execution["end_ns"]
        chance = 0.45
        if used[:2] == ["search", "verify"]:
            chance = 0.8
        if errored:
            chance = 0.15
        return spans, rng.random() < chance, now, seq

    def rollouts(self, count: int) -> Iterator[tuple[list[dict[str, Any]], list[tuple[Any, ...]]]]:
        """Batches of (span records, reward rows)."""
        rng = self.rng
        spans: list[dict[str, Any]] = []
        rewards: list[tuple[Any, ...]] = []
        for n in range(count):
            rid = f"r-{n:07d}"
            agent = rng.choice(self.agents)
            model = rng.choice(list(MODELS))
            start = T0 + n * 1_000 * MS
            seq = 0
            attempts = 2 if rng.random() < 0.05 else 1
            for number in range(1, attempts + 1):
                aid = str(number)
                made, won, start, seq = self.attempt(rid, aid, agent, model, start, seq)
                spans.extend(made)
                value = 1.0 if won else rng.choice((0.0, 0.2))
                rewards.append((f"w-{rid}-{aid}", rid, aid, value, start))
            if (n + 1) % BATCH_ROLLOUTS == 0 or n + 1 == count:
                yield spans, rewards
                spans, rewards = [], []


def build(path: Path, rollouts: int, gen: Generator) -> tuple[int, float]:
    """Fill the database; returns (spans written, seconds taken)."""
    db = connect(path)
    conn = db.conn
    # A benchmark file, rebuilt each run: durability is not worth the fsyncs.
    conn.execute("PRAGMA synchronous = OFF")
    started = time.perf_counter()
    written = 0
    try:
        for spans, rewards in gen.rollouts(rollouts):
            insert_spans(conn, spans)
            conn.execute("BEGIN")
            conn.executemany(
                "insert into rewards (id, rollout_id, attempt_id, name, value, final, source, created_ns) "
                "values (?, ?, ?, 'reward', ?, 1, 'user', ?)",
                rewards,
            )
            conn.execute("COMMIT")
            written += len(spans)
        conn.execute("ANALYZE")
    finally:
        db.close()
    return written, time.perf_counter() - started


def _count_rollouts(path: Path) -> int:
    db = connect(path, read_only=True)
    try:
        return int(db.execute("select count(*) from rollouts").fetchone()[0])
    finally:
        db.close()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def measure(
    path: Path, repeat: int, min_support: int
) -> tuple[list[float], list[float], dict[str, float], dict[str, Any]]:
    """Wall and CPU times of whole `analyse()` runs, then one run split into its stages."""
    db = connect(path, read_only=True)
    try:
        totals, cpu = [], []
        result: dict[str, Any] = {}
        for _ in range(repeat):
            # CPU time too: on a shared machine it says what the work costs when wall time
            # also counts waiting for a core.
            cpu_started = time.process_time()
            result, seconds = timed(lambda: patterns.analyse(db, min_support=min_support))
            cpu.append(time.process_time() - cpu_started)
            totals.append(seconds)
        stages: dict[str, float] = {}
        attempts, stages["load"] = timed(lambda: patterns.load(db))
        _, stages["differences"] = timed(
            lambda: patterns.differences(attempts, min_support=min_support)
        )
        _, stages["tool_effectiveness"] = timed(lambda: patterns.tool_effectiveness(attempts))
        _, stages["leaderboards"] = timed(lambda: patterns.leaderboards(attempts))
        _, stages["outliers"] = timed(lambda: patterns.outliers(attempts))
    finally:
        db.close()
    return totals, cpu, stages, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=TARGET_ROLLOUTS)
    parser.add_argument("--repeat", type=int, default=3, help="Whole analyse() runs to time.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tools", type=int, default=20)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--min-support", type=int, default=patterns.DEFAULT_MIN_SUPPORT)
    parser.add_argument("--body-bytes", type=int, default=400, help="Request body filler.")
    parser.add_argument("--db", type=Path, default=None, help="Reuse or keep this file.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary database.")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    workdir = None if args.db else tempfile.mkdtemp(prefix="spangate-patterns-")
    path = args.db or Path(workdir or ".") / "patterns.db"
    spans = None
    build_seconds = None
    if not path.exists():
        gen = Generator(args.seed, args.tools, args.agents, args.body_bytes)
        print(f"building {args.rollouts:,} rollouts in {path} ...", flush=True)
        spans, build_seconds = build(path, args.rollouts, gen)
        print(f"  {spans:,} spans in {build_seconds:.1f} s", flush=True)
    load_before = os.getloadavg()[0]
    try:
        totals, cpu, stages, result = measure(path, args.repeat, args.min_support)
    finally:
        if workdir is not None and not args.keep:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            os.rmdir(workdir)

    best, median = min(totals), statistics.median(totals)
    per_second = result["attempts"] / median if median else float("inf")
    # Counted in the file, so a reused --db is judged by what it holds.
    rollouts = _count_rollouts(path) if path.exists() else args.rollouts
    if rollouts < TARGET_ROLLOUTS:
        verdict = f"n/a ({rollouts:,} < {TARGET_ROLLOUTS:,} rollouts)"
    else:
        verdict = "PASS" if median < TARGET_SECONDS else "FAIL"
    rows = [
        ("rollouts", f"{rollouts:,}"),
        ("attempts analysed", f"{result['attempts']:,}"),
        ("spans", f"{spans:,}" if spans is not None else "(existing db)"),
        ("database build s", f"{build_seconds:.1f}" if build_seconds is not None else "-"),
        ("analyse() runs", str(len(totals))),
        ("analyse() best s", f"{best:.2f}"),
        ("analyse() median s", f"{median:.2f}"),
        ("analyse() median CPU s", f"{statistics.median(cpu):.2f}"),
        ("load average before / after", f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"),
        ("attempts per s", f"{per_second:,.0f}"),
        *((f"stage {name} s", f"{seconds:.2f}") for name, seconds in stages.items()),
        ("features tested", f"{result['tests_run']:,}"),
        ("success patterns", str(len(result["success_patterns"]))),
        ("failure patterns", str(len(result["failure_patterns"]))),
        ("tools", str(len(result["tools"]))),
        (f"target: {TARGET_ROLLOUTS:,} rollouts < {TARGET_SECONDS:.0f} s", verdict),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:>14}")
    top = result["success_patterns"][:3] + result["failure_patterns"][:3]
    for finding in top:
        print(
            f"  {finding['kind']:<16} {finding['feature']:<32} effect {finding['effect']:+.3f}  q {finding['q_value']:.1e}"
        )

    machine = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "patterns.csv").open("w", newline="") as fp:
        writer = csv.writer(fp)
        writer.writerow(["metric", "value"])
        writer.writerows([*machine.items(), *rows])
    busy = max(load_before, os.getloadavg()[0]) > (os.cpu_count() or 1)
    warning = (
        "WARNING: the load average exceeded the number of cores: other processes competed "
        "for the CPU, so wall times are pessimistic; the CPU time is what the work costs."
    )
    if busy:
        print(warning)
    lines = [
        "# spangate pattern-mining benchmark",
        "",
        "`judge.patterns.analyse()` over a synthetic store built with `insert_spans` (chat calls "
        "with tool calls, an `execute_tool` span per tool call, a final reward per attempt).",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        *([warning, ""] if busy else []),
        "## Top findings",
        "",
        "| kind | feature | support | effect | q |",
        "|---|---|---|---|---|",
        *(
            f"| {f['kind']} | `{f['feature']}` | {f['support']:,} | {f['effect']:+.3f} | {f['q_value']:.1e} |"
            for f in top
        ),
        "",
    ]
    (args.out_dir / "patterns.md").write_text("\n".join(lines))
    print(f"wrote {args.out_dir / 'patterns.csv'} and {args.out_dir / 'patterns.md'}")
    return 0 if not verdict.startswith("FAIL") else 1


if __name__ == "__main__":
    raise SystemExit(main())
