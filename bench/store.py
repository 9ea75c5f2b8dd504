"""The store: spans written per second by the batch writer, and rollout query latency with
1,000,000 spans in the database.

(a) Writer throughput. Pre-builds `--writer-spans` span records shaped like the gateway's
    (request and response bodies of 1-2 KB as bytes, attributes, tags; 64 rollouts in flight
    at once, 20 calls each), then one thread calls `StoreWriter.put()` for all of them as fast
    as it can and the clock runs until the writer reports them written. Run with a queue
    large enough for all (the target; the guard journals what waits past 0.5 s, and the
    writer stores it from memory), with the gateway's default queue bound (50,000; what overflows
    spills to the journal and is replayed), with nothing journaled (the writer alone), and
    again into a database that already holds `--writer-prefill` spans (inserts into bigger
    indexes cost more). This process is pinned to one core, as the gateway is.

(b) Queries at 1M spans. Generates (once; cached in /tmp, reproducible from `--seed`) a
    database of `--db-spans` spans over `--db-rollouts` rollouts with `insert_spans` in big
    transactions (256 rollouts interleaved at a time, as concurrent agents would write them;
    one final reward each). Then measures, for random rollouts:
    - `get_rollout` in-process (what `spangate show` and GET /api/rollouts/{id} run),
      and `list_spans(rollout_id=...)` in-process;
    - `spangate show ROLLOUT --db DB` as a subprocess (wall time, Python start-up included);
    - GET /api/spans?rollout_id=X and GET /api/rollouts/X against `spangate serve` on that
      database (httpx, one request at a time).

    /work/venv/bin/python bench/store.py [--writer-spans 200000] [--writer-prefill 1000000]
        [--db-spans 1000000]
        [--db-rollouts 50000] [--seed 7] [--queries 200] [--show-runs 20] [--db-cache DIR]
        [--skip-writer] [--skip-queries] [--profile]

Results: bench/results/store.{csv,md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    GATEWAY_CPU,
    REPO,
    Busy,
    BusyMeter,
    Placement,
    Section,
    TargetCheck,
    add_common_args,
    begin_run,
    common_options,
    machine_info,
    percentile,
    profile_pid,
    start_gateway,
    temp_dir,
    write_gateway_config,
    write_results,
)

# This file is bench/store.py; the package it measures is store/. Put the repository first on
# the path so `import store` finds the package, not this script.
sys.path.insert(0, str(REPO))

from gateway.compose import writer_for
from gateway.proxy.attribution import new_span_id
from store.queries import (
    LIST_SPANS_SQL,
    ROLLOUT_SPANS_SQL,
    SPAN_FILTERS,
    SPAN_LIST_COLUMNS,
    _where,
    get_rollout,
    list_spans,
)
from store.schema import connect
from store.span_inserts import insert_spans

TARGET_SPANS_PER_S = 20_000
TARGET_QUERY_MS = 20.0
DB_FORMAT = 1  # bump when the generated data changes shape, so old caches are not reused
CALLS_PER_ROLLOUT = 20
CONCURRENT_ROLLOUTS_WRITER = 64
CONCURRENT_ROLLOUTS_DB = 256
GEN_BATCH = 20_000
WORDS = [
    "the",
    "agent",
    "reads",
    "the",
    "file",
    "and",
    "runs",
    "the",
    "tests",
    "then",
    "edits",
    "the",
    "function",
    "to",
    "handle",
    "empty",
    "input",
    "returns",
    "a",
    "list",
    "of",
    "results",
    "with",
    "their",
    "scores",
    "plan",
    "step",
    "tool",
    "call",
    "observation",
    "error",
    "retry",
    "success",
    "failed",
    "timeout",
    "search",
    "query",
    "answer",
    "context",
    "window",
    "token",
    "budget",
    "reward",
]


# ---------------------------------------------------------------------------------------------
# Span records shaped like the gateway's


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def body_pool(rng: random.Random, size: int = 64) -> list[tuple[bytes, bytes]]:
    """(request, response) body pairs, ~1-2 KB together, as the gateway hands them over."""
    pool = []
    for i in range(size):
        request = {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": _text(rng, rng.randint(150, 350))},
                {"role": "user", "content": _text(rng, rng.randint(300, 700))},
            ],
            "temperature": 0.7,
            "max_tokens": 512,
        }
        response = {
            "id": f"chatcmpl-{i:024d}",
            "object": "chat.completion",
            "created": 1700000000 + i,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _text(rng, rng.randint(200, 600))},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 230, "completion_tokens": 95, "total_tokens": 325},
        }
        pool.append(
            (
                json.dumps(request, separators=(",", ":")).encode(),
                json.dumps(response, separators=(",", ":")).encode(),
            )
        )
    return pool


def span_record(
    rng: random.Random,
    bodies: list[tuple[bytes, bytes]],
    rollout_id: str,
    seq: int,
    start_ns: int,
) -> dict[str, Any]:
    request_body, response_body = bodies[rng.randrange(len(bodies))]
    duration_ms = rng.uniform(200, 4000)
    input_tokens, output_tokens = rng.randint(100, 3000), rng.randint(10, 800)
    stream = rng.random() < 0.5
    return {
        # Ids as the gateway makes them (sequential within a process), not uniform random.
        "span_id": new_span_id(),
        "trace_id": f"{rng.getrandbits(128):032x}",
        "parent_span_id": None,
        "rollout_id": rollout_id,
        "attempt_id": "1",
        "seq": seq,
        "name": "chat gpt-4o-mini",
        "operation": "chat",
        "provider": "openai",
        "deployment": "openai/gpt-4o-mini",
        "model_group": "gpt-4o-mini",
        "request_model": "gpt-4o-mini",
        "response_model": "gpt-4o-mini-2024-07-18",
        "response_id": f"chatcmpl-{rng.getrandbits(96):024x}",
        "status": "ok" if rng.random() < 0.97 else "error",
        "http_status": 200,
        "error_type": None,
        "error_message": None,
        "stream": int(stream),
        "start_ns": start_ns,
        "end_ns": start_ns + int(duration_ms * 1e6),
        "duration_ms": duration_ms,
        "ttft_ms": duration_ms * 0.2 if stream else None,
        "upstream_ms": duration_ms - 0.5,
        "overhead_ms": 0.5,
        "retries": 0,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "cost_usd": input_tokens * 1.5e-7 + output_tokens * 6e-7,
        "finish_reasons": ["stop"],
        "tool_calls": None,
        "request_body": request_body,
        "response_body": response_body,
        "attributes": {"gen_ai.request.temperature": 0.7, "gen_ai.request.max_tokens": 512},
        "tags": ["bench"],
        "agent": "bench-agent",
        "metadata": {"suite": "bench"},
    }


def spans(
    seed: int, count: int, rollouts: int, concurrent: int, prefix: str
) -> Iterator[dict[str, Any]]:
    """`count` spans, `concurrent` rollouts interleaved at a time, call by call."""
    rng = random.Random(seed)
    bodies = body_pool(rng)
    per = max(1, count // rollouts)
    made = 0
    t = 1_700_000_000_000_000_000
    for wave in range(0, rollouts, concurrent):
        ids = [f"{prefix}{r:06d}" for r in range(wave, min(wave + concurrent, rollouts))]
        for seq in range(1, per + 1):
            for rid in ids:
                if made >= count:
                    return
                t += 1_000_000
                yield span_record(rng, bodies, rid, seq, t)
                made += 1


# ---------------------------------------------------------------------------------------------
# (a) writer throughput


@dataclass
class WriterRun:
    label: str
    queue_size: int
    spans: int
    put_s: float
    total_s: float
    written: int
    spilled: int
    replayed: int
    in_db: int
    kept: int
    busy: Busy | None = None

    @property
    def rate(self) -> float:
        return self.spans / self.total_s if self.total_s else 0.0


def writer_run(
    label: str,
    records: list[dict[str, Any]],
    queue_size: int,
    db: Path,
    timeout: float,
    **tuning: Any,
) -> WriterRun:
    writer = writer_for(db, queue_size=queue_size, **tuning)
    writer.start()
    n = len(records)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        before = int(conn.execute("select count(*) from spans").fetchone()[0])
    try:
        gc.collect()
        with BusyMeter(f"writer: {label}") as meter:
            start = time.perf_counter()
            put = writer.put
            for record in records:
                put(record)
            put_s = time.perf_counter() - start
            deadline = start + timeout
            while writer.written + writer.replayed < n and time.perf_counter() < deadline:
                time.sleep(0.001)
            total_s = time.perf_counter() - start
    finally:
        writer.close(timeout=120)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        in_db = int(conn.execute("select count(*) from spans").fetchone()[0]) - before
    return WriterRun(
        label,
        queue_size,
        n,
        put_s,
        total_s,
        writer.written,
        writer.spilled,
        writer.replayed,
        in_db,
        writer.kept,
        meter.result,
    )


def drop_span_indexes(conn: sqlite3.Connection) -> list[str]:
    """Drop the secondary indexes of the spans table; the DDL that re-creates them."""
    ddl = conn.execute(
        "select name, sql from sqlite_master "
        "where type = 'index' and tbl_name = 'spans' and sql is not null"
    ).fetchall()
    for name, _ in ddl:
        conn.execute(f'DROP INDEX "{name}"')
    return [sql for _, sql in ddl]


def prefilled_db(path: Path, count: int, seed: int) -> Path:
    """A database already holding `count` small spans (no bodies): what matters to the writer
    is the size of the indexes its inserts land in. Loaded with the secondary indexes dropped
    and re-created from their own DDL, so the schema is the product's."""
    db = connect(path)
    conn = db.conn
    conn.execute("PRAGMA synchronous = OFF")
    ddl = drop_span_indexes(conn)
    rng = random.Random(seed)
    conn.execute("BEGIN")
    conn.executemany(
        "insert into spans (span_id, trace_id, rollout_id, attempt_id, seq, name, operation, "
        "status, start_ns, end_ns, duration_ms, response_id) "
        "values (?, ?, ?, '1', ?, 'chat gpt-4o-mini', 'chat', 'ok', ?, ?, 1.0, ?)",
        (
            (
                f"{rng.getrandbits(64):016x}",
                f"{rng.getrandbits(128):032x}",
                f"p{i // CALLS_PER_ROLLOUT:06d}",
                i % CALLS_PER_ROLLOUT + 1,
                1_600_000_000_000_000_000 + i,
                1_600_000_000_000_000_001 + i,
                f"chatcmpl-{rng.getrandbits(96):024x}",
            )
            for i in range(count)
        ),
    )
    conn.execute("COMMIT")
    for sql in ddl:
        conn.execute(sql)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return path


def bench_writer(opts: Options, tmp: Path) -> list[WriterRun]:
    print(f"building {opts.writer_spans} span records", flush=True)
    records = list(
        spans(
            opts.seed,
            opts.writer_spans,
            max(1, opts.writer_spans // CALLS_PER_ROLLOUT),
            CONCURRENT_ROLLOUTS_WRITER,
            "w",
        )
    )
    plan: list[tuple[str, int, Path, dict[str, Any]]] = [
        ("queue holds all", len(records) + 1, tmp / "writer-a.db", {}),
        ("gateway default queue (50,000)", 50_000, tmp / "writer-b.db", {}),
        # The guard journals whatever waited past max_unsaved_seconds: in a burst like this
        # one, most of it, at a cost to the writer's core. Without it: the writer alone.
        (
            "queue holds all, nothing journaled (writer alone)",
            len(records) + 1,
            tmp / "writer-d.db",
            {"max_unsaved_seconds": 1e6},
        ),
    ]
    if opts.writer_prefill:
        print(f"pre-filling a database with {opts.writer_prefill:,} spans", flush=True)
        plan.append(
            (
                f"queue holds all, {opts.writer_prefill:,} spans already stored",
                len(records) + 1,
                prefilled_db(tmp / "writer-c.db", opts.writer_prefill, opts.seed + 3),
                {},
            )
        )
    runs: list[WriterRun] = []
    profile = (
        profile_pid(os.getpid(), opts.out_dir / "store-writer-profile.collapsed")
        if opts.profile
        else contextlib.nullcontext()
    )
    with profile:
        for label, queue_size, db, tuning in plan:
            # Fresh dicts each run: the writer must not see records it already normalized.
            batch = [dict(r) for r in records] if runs else records
            run = writer_run(label, batch, queue_size, db, opts.writer_timeout, **tuning)
            runs.append(run)
            db.unlink(missing_ok=True)
            print(
                f"  {label}: {run.rate:,.0f} spans/s ({run.spans} in {run.total_s:.2f} s; "
                f"put() loop {run.put_s:.2f} s; kept {run.kept}, spilled {run.spilled}, "
                f"in db {run.in_db})",
                flush=True,
            )
    return runs


# ---------------------------------------------------------------------------------------------
# (b) the 1M-span database


def cached_db_path(opts: Options) -> Path:
    name = f"spangate-bench-store-{opts.db_spans}-{opts.db_rollouts}-seed{opts.seed}-v{DB_FORMAT}"
    return opts.db_cache / f"{name}.db"


def ensure_db(opts: Options) -> tuple[Path, float | None]:
    """The cached database, generated first if missing; (path, seconds spent generating)."""
    path = cached_db_path(opts)
    marker = path.with_suffix(".json")
    if path.exists() and marker.exists():
        return path, None
    for stale in (path, marker, Path(f"{path}-wal"), Path(f"{path}-shm")):
        stale.unlink(missing_ok=True)
    partial = path.with_suffix(".partial.db")
    for stale in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        stale.unlink(missing_ok=True)
    print(f"generating {opts.db_spans:,} spans into {path} (cached for reruns)", flush=True)
    start = time.perf_counter()
    db = connect(partial)
    conn = db.conn
    conn.execute("PRAGMA synchronous = OFF")  # a throwaway file: no need to wait for the disk
    conn.execute("PRAGMA cache_size = -262144")
    # Loading with the secondary indexes in place would update random pages of them for every
    # row; dropping them first and re-creating them from their own DDL afterwards gives the
    # same schema in a fraction of the time.
    index_ddl = drop_span_indexes(conn)
    batch: list[dict[str, Any]] = []
    done = 0
    for record in spans(opts.seed, opts.db_spans, opts.db_rollouts, CONCURRENT_ROLLOUTS_DB, "ro-"):
        batch.append(record)
        if len(batch) >= GEN_BATCH:
            insert_spans(conn, batch)
            done += len(batch)
            batch = []
            if done % 200_000 == 0:
                print(f"  {done:,} spans ({time.perf_counter() - start:.0f} s)", flush=True)
    if batch:
        insert_spans(conn, batch)
    print(f"  indexing ({time.perf_counter() - start:.0f} s)", flush=True)
    for sql in index_ddl:
        conn.execute(sql)
    rng = random.Random(opts.seed + 1)
    conn.execute("BEGIN")
    conn.executemany(
        "insert into rewards (id, rollout_id, name, value, final, source, created_ns) "
        "values (?, ?, 'reward', ?, 1, 'user', ?)",
        (
            (f"rw-{r:06d}", f"ro-{r:06d}", rng.random(), 1_800_000_000_000_000_000 + r)
            for r in range(opts.db_rollouts)
        ),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    count = int(conn.execute("select count(*) from spans").fetchone()[0])
    db.close()
    partial.rename(path)
    for leftover in (Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)
    elapsed = time.perf_counter() - start
    marker.write_text(
        json.dumps(
            {
                "spans": count,
                "rollouts": opts.db_rollouts,
                "seed": opts.seed,
                "format": DB_FORMAT,
                "generated_in_s": round(elapsed, 1),
                "bytes": path.stat().st_size,
            }
        )
    )
    print(f"  done: {count:,} spans, {path.stat().st_size / 1e9:.2f} GB in {elapsed:.0f} s")
    return path, elapsed


@dataclass
class Timing:
    name: str
    samples_ms: list[float] = field(default_factory=list)
    note: str = ""

    def p(self, pct: float) -> float:
        return percentile(self.samples_ms, pct)


def time_calls(name: str, fn: Callable[[str], Any], ids: list[str], note: str = "") -> Timing:
    timing = Timing(name, note=note)
    for rid in ids:
        start = time.perf_counter()
        fn(rid)
        timing.samples_ms.append((time.perf_counter() - start) * 1000)
    return timing


def resident(path: Path) -> str:
    """How much of a file the OS page cache holds (util-linux `fincore`), for the record."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        res, size = (int(v) for v in out.stdout.split()[:2])
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown (no fincore)"
    return f"{res / 1e6:,.0f} of {size / 1e6:,.0f} MB ({res / size:.0%})"


def query_plan(db: Any, sql: str, params: dict[str, Any]) -> str:
    rows = db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    return "; ".join(str(r[-1]) for r in rows)


def bench_queries(opts: Options, db_path: Path, tmp: Path) -> tuple[list[Timing], list[str]]:
    rng = random.Random(opts.seed + 2)
    ids = [f"ro-{rng.randrange(opts.db_rollouts):06d}" for _ in range(opts.queries)]
    timings: list[Timing] = []
    notes: list[str] = []

    db = connect(db_path, read_only=True)
    try:
        sample = get_rollout(db, ids[0])
        summary = sample["summary"]
        notes.append(f"a rollout holds {summary['calls']} calls and {summary['rewards']} reward(s)")
        params = {"rollout_id": ids[0], "after_rowid": 0, "limit": 101}
        listing_sql = LIST_SPANS_SQL.format(
            where=_where(SPAN_FILTERS, params), columns=SPAN_LIST_COLUMNS, direction="asc"
        )
        notes.append("plan of list_spans(rollout_id): " + query_plan(db, listing_sql, params))
        notes.append(
            "plan of get_rollout's spans: "
            + query_plan(db, ROLLOUT_SPANS_SQL.format(columns="*"), {"rollout_id": ids[0]})
        )
        notes.append(f"database file in the OS page cache before the queries: {resident(db_path)}")
        # The first touch of a rollout reads its pages from disk unless the OS still caches
        # them (on this machine a memory reclaimer evicts cold page cache); every later measure
        # asks for the same rollouts, warm.
        timings.append(
            time_calls(
                "get_rollout, first touch (cold cache)",
                lambda rid: get_rollout(db, rid),
                ids,
                "disk-bound when the file is not cached",
            )
        )
        timings.append(
            time_calls(
                "get_rollout (in-process)",
                lambda rid: get_rollout(db, rid),
                ids,
                "warm; spans with bodies, attempts, rewards, decoded",
            )
        )
        timings.append(
            time_calls(
                "list_spans(rollout_id) (in-process)",
                lambda rid: list_spans(db, rollout_id=rid),
                ids,
                "warm; one page (100), no bodies",
            )
        )
    finally:
        db.close()

    show_cmd = [*shlex.split(opts.spangate), "show", "--db", str(db_path)]
    placement = opts.placement

    def run_show(rid: str) -> None:
        out = subprocess.run(
            placement.wrap([*show_cmd, rid], GATEWAY_CPU),
            capture_output=True,
            timeout=60,
            check=False,
            **placement.popen_kwargs(),
        )
        if out.returncode != 0:
            raise RuntimeError(f"spangate show {rid} failed: {out.stderr.decode()[-500:]}")

    timings.append(
        time_calls(
            "`spangate show ROLLOUT` (subprocess wall)",
            run_show,
            ids[: opts.show_runs],
            "includes Python start-up and imports",
        )
    )
    timings.append(
        time_calls(
            "`python -c pass` (interpreter start, for reference)",
            lambda rid: subprocess.run(
                placement.wrap([sys.executable, "-c", "pass"], GATEWAY_CPU), check=True
            ),
            ids[: min(opts.show_runs, 10)],
        )
    )

    import httpx

    per_rollout = max(1, opts.db_spans // opts.db_rollouts)
    cfg = write_gateway_config(tmp, "http://127.0.0.1:9/v1")
    with (
        start_gateway(placement, opts.spangate, tmp, db_path, cfg, ready_timeout=120) as gw,
        httpx.Client(base_url=gw.root, timeout=30) as client,
    ):

        def api_spans(rid: str) -> None:
            resp = client.get("/api/spans", params={"rollout_id": rid})
            resp.raise_for_status()
            if len(resp.json()["data"]) != per_rollout:
                raise RuntimeError(
                    f"/api/spans?rollout_id={rid}: unexpected page {resp.text[:200]}"
                )

        def api_rollout(rid: str) -> None:
            client.get(f"/api/rollouts/{rid}").raise_for_status()

        for rid in ids[:10]:
            api_spans(rid)
        timings.append(
            time_calls("GET /api/spans?rollout_id=X", api_spans, ids, "warm; httpx, keep-alive")
        )
        timings.append(time_calls("GET /api/rollouts/X", api_rollout, ids, "warm; with summary"))
    return timings, notes


# ---------------------------------------------------------------------------------------------


@dataclass
class Options:
    writer_spans: int
    writer_prefill: int
    writer_timeout: float
    db_spans: int
    db_rollouts: int
    seed: int
    queries: int
    show_runs: int
    db_cache: Path
    skip_writer: bool
    skip_queries: bool
    placement: Placement
    quiet_wait: float
    out_dir: Path
    spangate: str
    profile: bool


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writer-spans", type=int, default=200_000)
    parser.add_argument(
        "--writer-prefill",
        type=int,
        default=1_000_000,
        help="also time the writer into a database already holding this many spans (0: skip)",
    )
    parser.add_argument("--writer-timeout", type=float, default=300)
    parser.add_argument("--db-spans", type=int, default=1_000_000)
    parser.add_argument("--db-rollouts", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--queries", type=int, default=200, help="rollouts asked per measure")
    parser.add_argument("--show-runs", type=int, default=20, help="`spangate show` runs")
    parser.add_argument("--db-cache", type=Path, default=Path("/tmp"), help="where the DB is kept")
    parser.add_argument("--skip-writer", action="store_true")
    parser.add_argument("--skip-queries", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy the writer run")
    add_common_args(parser)
    args = parser.parse_args(argv)
    return Options(
        writer_spans=args.writer_spans,
        writer_prefill=args.writer_prefill,
        writer_timeout=args.writer_timeout,
        db_spans=args.db_spans,
        db_rollouts=args.db_rollouts,
        seed=args.seed,
        queries=args.queries,
        show_runs=args.show_runs,
        db_cache=args.db_cache,
        skip_writer=args.skip_writer,
        skip_queries=args.skip_queries,
        **common_options(args),
        profile=args.profile,
    )


def main(argv: list[str] | None = None) -> int:
    opts, busy_before = begin_run(parse_args, argv)
    busy: list[Busy] = []
    writer_runs: list[WriterRun] = []
    timings: list[Timing] = []
    notes: list[str] = []
    generated: float | None = None
    db_path: Path | None = None
    with temp_dir("spangate-bench-store-") as tmp:
        if not opts.skip_writer:
            opts.placement.pin_self(GATEWAY_CPU)  # one core, like the gateway's
            writer_runs = bench_writer(opts, tmp)
            busy += [r.busy for r in writer_runs if r.busy is not None]
            gc.collect()
        if not opts.skip_queries:
            opts.placement.pin_self()  # the measuring side: the other core
            db_path, generated = ensure_db(opts)
            with BusyMeter("queries at 1M spans") as meter:
                timings, notes = bench_queries(opts, db_path, tmp)
            assert meter.result is not None
            busy.append(meter.result)
    report(opts, writer_runs, timings, notes, busy, busy_before, db_path, generated)
    return 0


def report(
    opts: Options,
    writer_runs: list[WriterRun],
    timings: list[Timing],
    notes: list[str],
    busy: list[Busy],
    busy_before: float,
    db_path: Path | None,
    generated: float | None,
) -> None:
    sections = []
    targets = []
    records: list[dict[str, Any]] = []
    if writer_runs:
        sections.append(
            Section(
                "Batch writer throughput",
                [
                    "run",
                    "spans",
                    "spans/s",
                    "put() loop s",
                    "until written s",
                    "journaled, stored from memory",
                    "spilled",
                    "replayed",
                    "rows added",
                ],
                [
                    [
                        r.label,
                        str(r.spans),
                        f"{r.rate:,.0f}",
                        f"{r.put_s:.2f}",
                        f"{r.total_s:.2f}",
                        str(r.kept),
                        str(r.spilled),
                        str(r.replayed),
                        str(r.in_db),
                    ]
                    for r in writer_runs
                ],
                "One thread calls `StoreWriter.put()` for every record (pre-built, bodies as "
                "bytes), the clock stops when `written + replayed` reaches the count. Writer "
                "defaults: batch 500, flush interval 0.2 s. This process is pinned to one core. "
                "Spans that wait in memory past `max_unsaved_seconds / 2` (0.5 s) are journaled "
                "by the guard thread (the writer still stores them from memory): in a burst "
                "like this, most of them, and journaling costs CPU on the same core. The "
                "*writer alone* "
                "run turns that off to show the writer's own speed; the target is judged on "
                "the first run, spills included. The run with spans already stored writes "
                "into a database that holds that many (small) spans: the bigger its indexes, "
                "the more each insert costs.",
            )
        )
        main_run = writer_runs[0]
        targets.append(
            TargetCheck(
                "spans written per second (batch writer)",
                f">= {TARGET_SPANS_PER_S:,}",
                f"{main_run.rate:,.0f}",
                main_run.rate >= TARGET_SPANS_PER_S and main_run.in_db == main_run.spans,
                f"{main_run.spans:,} spans; all in db: {main_run.in_db == main_run.spans}",
            )
        )
        for r in writer_runs:
            records.append(
                {
                    "kind": "writer",
                    "name": r.label,
                    "spans": r.spans,
                    "spans_per_s": round(r.rate, 1),
                    "put_s": round(r.put_s, 3),
                    "total_s": round(r.total_s, 3),
                    "kept": r.kept,
                    "spilled": r.spilled,
                    "replayed": r.replayed,
                    "in_db": r.in_db,
                }
            )
    if timings:
        rows = [
            [
                t.name,
                str(len(t.samples_ms)),
                f"{t.p(50):.2f}",
                f"{t.p(90):.2f}",
                f"{t.p(99):.2f}",
                f"{max(t.samples_ms):.2f}",
                t.note,
            ]
            for t in timings
        ]
        text = (
            f"Database: {db_path} ({opts.db_spans:,} spans, {opts.db_rollouts:,} rollouts of "
            f"{CALLS_PER_ROLLOUT} calls, bodies ~1-2 KB; "
            + (f"generated in {generated:.0f} s" if generated else "reused from the cache")
            + "). Random rollouts, one query at a time.\n\n"
            + "\n".join(f"- {n}" for n in notes)
        )
        sections.append(
            Section(
                "Rollout queries at 1M spans",
                ["query", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "note"],
                rows,
                text,
            )
        )
        by_name = {t.name: t for t in timings}
        for name in ("get_rollout (in-process)", "GET /api/spans?rollout_id=X"):
            t = by_name.get(name)
            if t is not None:
                targets.append(
                    TargetCheck(
                        f"rollout query at 1M spans: {name}",
                        f"< {TARGET_QUERY_MS:g} ms",
                        f"p50 {t.p(50):.2f} ms, p99 {t.p(99):.2f} ms",
                        t.p(99) < TARGET_QUERY_MS,
                        "warm cache; judged on p99",
                    )
                )
        cold = by_name.get("get_rollout, first touch (cold cache)")
        if cold is not None:
            targets.append(
                TargetCheck(
                    "rollout query at 1M spans, first touch (cold OS cache)",
                    "(no bound; reported)",
                    f"p50 {cold.p(50):.2f} ms, p99 {cold.p(99):.2f} ms",
                    None,
                    "disk reads when the file is not in the page cache",
                )
            )
        show = next((t for t in timings if t.name.startswith("`spangate show")), None)
        if show is not None:
            targets.append(
                TargetCheck(
                    "`spangate show` at 1M spans (whole command)",
                    "(no bound; reported)",
                    f"p50 {show.p(50):.0f} ms",
                    None,
                    "process start-up included",
                )
            )
        for t in timings:
            records.append(
                {
                    "kind": "query",
                    "name": t.name,
                    "n": len(t.samples_ms),
                    "p50_ms": round(t.p(50), 3),
                    "p90_ms": round(t.p(90), 3),
                    "p99_ms": round(t.p(99), 3),
                    "max_ms": round(max(t.samples_ms), 3),
                }
            )
    info = machine_info(
        opts.placement,
        busy_before,
        **{"generated database": str(db_path) if db_path else "-", "seed": str(opts.seed)},
    )
    write_results(
        "store",
        "spangate store benchmark",
        "The batch writer's throughput, and rollout queries on a database with "
        f"{opts.db_spans:,} spans.",
        out_dir=opts.out_dir,
        sections=sections,
        targets=targets,
        busy=busy,
        info=info,
        records=records,
    )


if __name__ == "__main__":
    sys.exit(main())
