"""SIGKILL under load (concurrency 64, three runs): after a restart on the same database, every
call acknowledged more than `recorder.max_unsaved_seconds` before the kill has its span, the
spill journal is replayed (a torn last line quarantined) and removed, and SQLite reports no
corruption."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fake_provider import FakeProviderThread
from servers import read_rows, read_spans, wait_until

from store.journal import journal_path_for
from store.span_inserts import normalize_span

from .support import CHAT_PATH, Ledger, ServeFactory, chat_body, run_load, span_record

WORKERS = 64
CALLS_PER_WORKER = 400
# The documented bound: a span waits at most this long in memory before it is in the
# database or the journal. The margin adds the time a loaded 2-core machine may take to
# schedule the guard thread and the client thread that notes the acknowledgement.
MAX_UNSAVED_SECONDS = 0.5
FLUSH_MARGIN = MAX_UNSAVED_SECONDS + 0.25
OLD_ENOUGH_BEFORE_KILL = 40
# Sustained load before the kill, so the writer works while calls keep arriving.
LOAD_SECONDS = 3.0
PLANTED_ROLLOUT = "planted-journal"


def planted_record(seq: int) -> dict[str, Any]:
    """A span as the gateway journals it: every column, passed through `normalize_span`."""
    return normalize_span(span_record(PLANTED_ROLLOUT, seq))


def plant_journal(db: Path, records: list[dict[str, Any]], torn: dict[str, Any]) -> Path:
    """Append whole records and then half a record with no newline (a write cut by a kill)."""
    path = journal_path_for(db)
    lead = b"\n" if path.exists() and path.stat().st_size else b""
    torn_bytes = orjson.dumps(torn)
    with open(path, "ab") as journal:
        journal.write(lead + b"".join(orjson.dumps(r) + b"\n" for r in records))
        journal.write(torn_bytes[: len(torn_bytes) // 2])
    return path


def integrity(db: Path) -> list[str]:
    return [row["integrity_check"] for row in read_rows(db, "PRAGMA integrity_check")]


@pytest.mark.parametrize("run", [1, 2, 3])
def test_sigkill_under_load_keeps_flushed_spans_and_replays_the_journal(
    served_process: ServeFactory, fake_provider: FakeProviderThread, run: int
) -> None:
    fake_provider.state.latency = 0.02
    groups = {"gpt-test": fake_provider.url}
    recorder = {"max_unsaved_seconds": MAX_UNSAVED_SECONDS}
    served = served_process(groups, recorder=recorder)
    ledger, stop = Ledger(), threading.Event()
    threads = run_load(
        served.base, ledger, stop, workers=WORKERS, calls_per_worker=CALLS_PER_WORKER
    )

    load_started = time.monotonic()

    def old_enough() -> bool:
        now = time.monotonic()
        cutoff = now - FLUSH_MARGIN
        long_enough = now - load_started > LOAD_SECONDS
        return long_enough and sum(t < cutoff for t in ledger.snapshot().values()) >= (
            OLD_ENOUGH_BEFORE_KILL
        )

    try:
        wait_until(old_enough, timeout=30, what="load to run past the flush window")
        killed_at = time.monotonic()
        served.signal(signal.SIGKILL)
        assert served.wait(10) == -signal.SIGKILL
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    acknowledged = ledger.snapshot()
    required = {sid for sid, at in acknowledged.items() if at < killed_at - FLUSH_MARGIN}
    records = [planted_record(seq) for seq in (1, 2, 3)]
    journal = plant_journal(served.db, records, planted_record(4))

    restarted = served_process(groups, recorder=recorder)
    stored = {row["span_id"] for row in read_rows(served.db, "select span_id from spans")}
    missing = required - stored
    lost = set(acknowledged) - stored
    oldest_lost = max((killed_at - acknowledged[s] for s in lost), default=0.0)
    print(
        f"\nSIGKILL run {run}: {len(acknowledged)} acknowledged, {len(required)} of them more than "
        f"{FLUSH_MARGIN}s before the kill; {len(set(acknowledged) & stored)} acknowledged spans "
        f"survived, {len(missing)} old enough ones missing; {len(lost)} lost, the oldest "
        f"acknowledged {oldest_lost * 1000:.0f} ms before the kill; failures {ledger.failures}"
    )
    assert integrity(served.db) == ["ok"]
    assert len(required) >= OLD_ENOUGH_BEFORE_KILL
    assert not missing, f"{len(missing)} spans acknowledged >{FLUSH_MARGIN}s before the kill lost"

    # The planted journal was replayed at start (the torn line skipped) and removed.
    planted = read_spans(served.db, rollout_id=PLANTED_ROLLOUT)
    assert [s["span_id"] for s in planted] == [r["span_id"] for r in records]
    assert planted[0]["response_body"] == {"id": "chatcmpl-planted-1", "choices": []}
    assert not journal.exists()
    leftovers = sorted(p.name for p in served.db.parent.glob(f"{served.db.name}.spill*"))
    assert not leftovers, f"journal files left after the replay: {leftovers}"
    ready = httpx.get(f"{restarted.base}/health/ready", timeout=5).json()
    assert ready["status"] == "ready"
    assert ready["recorder"]["replayed"] >= len(records)
    rollouts = read_rows(served.db, "select status from rollouts where id = ?", PLANTED_ROLLOUT)
    assert rollouts == [{"status": "running"}]

    # Sequence numbers keep rising across the crash.
    before = read_rows(served.db, "select max(seq) as seq from spans where rollout_id = 'load-0'")
    response = httpx.post(
        f"{restarted.base}/rollout/load-0{CHAT_PATH}", json=chat_body(), timeout=10
    )
    assert response.status_code == 200
    restarted.signal(signal.SIGTERM)
    assert restarted.wait(30) == 0, restarted.log()
    after = read_spans(served.db, span_id=response.headers["X-Span-Id"])
    assert after and after[0]["seq"] > (before[0]["seq"] or 0)
    assert integrity(served.db) == ["ok"]
