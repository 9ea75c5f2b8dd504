"""What the `spans_trace` index costs the writer: span rows inserted with and without it (it
lets an agent's OTLP span that names no rollout find a call of its trace in the store).

It is a partial index of spans with a parent. Records are `bench/store.py`'s gateway-shaped
ones with the trace ids the gateway gives them (one a rollout, no parent: the agent sent no
`traceparent`), or each with a parent (it sent one: every row indexed), inserted by
`insert_spans` into a fresh WAL database in batches of `--batch`, rounds rotating over the
variants; CPU is this thread's own.

    python bench/trace_index.py [--spans 20000] [--batch 320] [--rounds 9]

Results: bench/results/trace_index.{csv,md,json}.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from _common import REPO, BusyMeter, TargetCheck, machine_info, temp_dir, write_results
from none_binding import gateway_records, one_round, per_span_section

sys.path.insert(0, str(REPO))

INDEX = "spans_trace"


# variant -> (index kept, the agent sent traceparent)
VARIANTS = {
    "no index": (False, False),
    "index, no traceparent": (True, False),
    "index, every call with traceparent": (True, True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    plain = gateway_records(args.spans)
    for span in plain:
        # As the gateway does: a rollout's calls share one trace.
        span["trace_id"] = hashlib.sha256(span["rollout_id"].encode()).hexdigest()[:32]
    traced = [
        {**span, "trace_id": f"{n:032x}", "parent_span_id": f"{n:016x}"}
        for n, span in enumerate(plain, start=1)
    ]
    cpu: dict[str, list[float]] = {label: [] for label in VARIANTS}
    records: list[dict[str, Any]] = []
    labels = list(VARIANTS)
    with temp_dir("spangate-trace-") as tmp, BusyMeter("inserts", []) as meter:
        for index in range(args.rounds):
            for label in labels[index % 3 :] + labels[: index % 3]:
                indexed, with_parent = VARIANTS[label]
                os.sync()
                gc.collect()
                gc.freeze()
                spans = traced if with_parent else plain
                dropped = () if indexed else (INDEX,)
                us = one_round(tmp / f"{index}-{label}.db", spans, args.batch, dropped)
                cpu[label].append(us)
                records.append({"round": index, "variant": label, "cpu_us_per_span": us})
    before, after, every = (statistics.median(cpu[k]) for k in cpu)
    assert meter.result is not None
    write_results(
        "trace_index",
        "The spans_trace index in span inserts",
        f"CPU of `insert_spans` per span, {args.spans} gateway-shaped spans (bench/store.py, "
        f"one trace a rollout, or a parent each), in batches of {args.batch} into a fresh WAL "
        f"database; {args.rounds} rounds rotating over the variants.",
        out_dir=args.out_dir,
        sections=[per_span_section(cpu)],
        targets=[
            TargetCheck(
                "calls without traceparent pay nothing",
                "within 5% of no index",
                f"{before:.1f} -> {after:.1f} µs ({after / before - 1:+.1%})",
                after <= before * 1.05,
            ),
            TargetCheck(
                "what an indexed span costs (reported)",
                "-",
                f"{before:.1f} -> {every:.1f} µs ({every / before - 1:+.1%})",
                True,
            ),
        ],
        busy=[meter.result],
        info=machine_info(),
        records=records,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
