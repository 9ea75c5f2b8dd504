"""What binding None costs the writer: span rows inserted with and without the NoneType
adapter `store/span_inserts.py` registers (Python 3.11's sqlite3 looks for an adapter for
every None it binds, the slow way, unless one is registered).

Records are `bench/store.py`'s gateway-shaped ones, inserted by `insert_spans` into a fresh
WAL database in batches of `--batch` (the gateway's at ~1,600 calls/s with its 0.2 s flush),
rounds alternating between the two; CPU is this thread's own.

    python bench/none_binding.py [--spans 20000] [--batch 320] [--rounds 4]

Results: bench/results/none_binding.{csv,md,json}.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO, BusyMeter, Section, TargetCheck, machine_info, temp_dir, write_results

sys.path.insert(0, str(REPO))
from store.records import span_row
from store.schema import connect
from store.span_inserts import insert_spans

ADAPTER_KEY = (type(None), sqlite3.PrepareProtocol)
BENCH_STORE = Path(__file__).with_name("store.py")


def gateway_records(count: int) -> list[dict[str, Any]]:
    # bench/store.py is loaded by path: as `store` it would shadow the package.
    spec = importlib.util.spec_from_file_location("bench_store", BENCH_STORE)
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.spans(7, count, max(1, count // 20), 64, "nb-"))


def one_round(
    db_path: Path, spans: list[dict[str, Any]], batch: int, drop_indexes: tuple[str, ...] = ()
) -> float:
    """CPU µs a span for `insert_spans` of `spans` into a new database (without the
    indexes named in `drop_indexes`)."""
    db = connect(db_path)
    db.conn.execute("PRAGMA wal_autocheckpoint = 0")
    for index in drop_indexes:
        db.conn.execute(f"DROP INDEX {index}")
    started = time.thread_time()
    for at in range(0, len(spans), batch):
        insert_spans(db, spans[at : at + batch])
    used = time.thread_time() - started
    db.conn.close()
    return used / len(spans) * 1e6


def per_span_section(cpu: dict[str, list[float]]) -> Section:
    """Each variant's median and every round's CPU µs a span."""
    rows = [
        [label, f"{statistics.median(v):.1f}", " ".join(f"{x:.1f}" for x in v)]
        for label, v in cpu.items()
    ]
    return Section("CPU per span", ["variant", "median µs/span", "rounds µs/span"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    adapter = sqlite3.adapters[ADAPTER_KEY]
    spans = gateway_records(args.spans)
    nones = statistics.mean(sum(v is None for v in span_row(s)) for s in spans)
    cpu: dict[str, list[float]] = {"without the adapter": [], "with the adapter": []}
    records: list[dict[str, Any]] = []
    with temp_dir("spangate-none-") as tmp, BusyMeter("inserts", []) as meter:
        for index in range(args.rounds):
            for label in sorted(cpu, reverse=index % 2 == 1):
                if label == "with the adapter":
                    sqlite3.adapters[ADAPTER_KEY] = adapter
                else:
                    sqlite3.adapters.pop(ADAPTER_KEY, None)
                # The last round's dirty pages written out first: a round that starts while the
                # kernel flushes them pays for it in its own write calls.
                os.sync()
                # As in the gateway, which freezes its heap and raises the thresholds: a
                # collection of the records held here would land in some rounds only.
                gc.collect()
                gc.freeze()
                us = one_round(tmp / f"{index}-{label[:4]}.db", spans, args.batch)
                cpu[label].append(us)
                records.append({"round": index, "variant": label, "cpu_us_per_span": us})
        sqlite3.adapters[ADAPTER_KEY] = adapter
    before, after = (statistics.median(cpu[k]) for k in cpu)
    assert meter.result is not None
    write_results(
        "none_binding",
        "Binding None in span inserts",
        f"CPU of `insert_spans` per span, {args.spans} gateway-shaped spans (bench/store.py), "
        f"{nones:.1f} of whose {len(span_row(spans[0]))} columns are None on average, in "
        f"batches of {args.batch} into a fresh WAL database; {args.rounds} alternating rounds.",
        out_dir=args.out_dir,
        sections=[per_span_section(cpu)],
        targets=[
            TargetCheck(
                "adapter saves CPU",
                "less CPU a span",
                f"{before:.1f} -> {after:.1f} µs ({after / before - 1:+.0%})",
                after < before,
            )
        ],
        busy=[meter.result],
        info=machine_info(),
        records=records,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
