"""What the training features cost: stored size of token ids and logprobs (packed vs JSON),
the per-chunk cost of collecting and stripping them from a stream, and how many rollouts
`rollout-affinity` moves when a server is added.

    python bench/training.py [--tokens 1000] [--rollouts 10000]

Prints a table and writes bench/results/training.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.models import Deployment
from gateway.proxy.router import affinity_score
from gateway.proxy.training import TokenCapture

RESULTS = Path(__file__).resolve().parent / "results" / "training.md"


def _chunk(i: int) -> dict:
    piece = f" w{i}"
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "policy",
        "choices": [
            {
                "index": 0,
                "delta": {"content": piece},
                "logprobs": {
                    "content": [
                        {
                            "token": piece,
                            "logprob": -0.25,
                            "bytes": list(piece.encode()),
                            "top_logprobs": [],
                        }
                    ]
                },
                "token_ids": [1000 + i],
                "finish_reason": None,
            }
        ],
    }


def sizes(tokens: int) -> dict[str, float]:
    capture = TokenCapture("chat")
    for i in range(tokens):
        capture.take(_chunk(i))
    capture.prompt_ids = list(range(tokens))
    packed = capture.fields()
    packed_bytes = sum(len(v or "") for v in packed.values())
    as_json = len(
        orjson.dumps(
            {
                "prompt_token_ids": capture.prompt_ids,
                "token_ids": capture.completion_ids,
                "logprobs": [c["choices"][0]["logprobs"] for c in map(_chunk, range(tokens))],
            }
        )
    )
    return {"packed": packed_bytes, "json": as_json}


def chunk_cost(chunks: int) -> dict[str, float]:
    """Microseconds per chunk: parse only (no training), and parse + take + re-serialise."""
    raw = [orjson.dumps(_chunk(i)) for i in range(chunks)]
    start = time.perf_counter()
    for data in raw:
        orjson.loads(data)
    plain = (time.perf_counter() - start) / chunks * 1e6
    capture = TokenCapture("chat", strip_ids=True, strip_logprobs=True)
    start = time.perf_counter()
    for data in raw:
        obj = orjson.loads(data)
        if capture.take(obj):
            orjson.dumps(obj)
    training = (time.perf_counter() - start) / chunks * 1e6
    return {"plain_us": plain, "training_us": training}


def affinity_moves(rollouts: int) -> dict[str, float]:
    servers = [Deployment(model="m", api_base=f"http://gpu-{i}:8000/v1") for i in range(4)]
    added = Deployment(model="m", api_base="http://gpu-4:8000/v1")

    def home(rid: str, pool: list[Deployment]) -> str | None:
        return max(pool, key=lambda d: affinity_score(rid, d)).api_base

    ids = [f"ro-{i}" for i in range(rollouts)]
    before = {rid: home(rid, servers) for rid in ids}
    after = {rid: home(rid, [*servers, added]) for rid in ids}
    moved = [rid for rid in ids if before[rid] != after[rid]]
    wrong = [rid for rid in moved if after[rid] != added.api_base]
    return {"moved": len(moved) / rollouts, "between_old": len(wrong)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rollouts", type=int, default=10_000)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    size = sizes(args.tokens)
    cost = chunk_cost(20_000)
    moves = affinity_moves(args.rollouts)
    rows = [
        ("stored bytes per 1000 tokens, packed", f"{size['packed'] * 1000 / args.tokens:,.0f}"),
        ("same as JSON (ids + OpenAI logprobs)", f"{size['json'] * 1000 / args.tokens:,.0f}"),
        ("packed / JSON", f"{size['packed'] / size['json']:.2f}"),
        ("stream chunk: parse only, µs", f"{cost['plain_us']:.2f}"),
        ("stream chunk: parse + collect + strip + re-encode, µs", f"{cost['training_us']:.2f}"),
        ("rollouts moved adding a 5th server (ideal 0.20)", f"{moves['moved']:.3f}"),
        ("rollouts moved between old servers", f"{moves['between_old']}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    table = "\n".join(lines)
    print(table)
    header = (
        f"# training\n\n`python bench/training.py --tokens {args.tokens} --rollouts "
        f"{args.rollouts}` on {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load:.1f} at start (shared machine), Python {platform.python_version()}.\n\n"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(header + table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
