"""The record cannot die: locks, replays, poison numbers, full disks and eviction each leave
the writer running and every answered call recorded (or quarantined with its reason)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, read_rows, wait_until

from gateway import compose as gateway_app
from gateway.compose import writer_for

CHAT = "/v1/chat/completions"
HUGE = 18446744073709551615  # 2**64 - 1, as a broken upstream reported it


@contextlib.contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process's exclusive lock on the database, held for the block."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def call(gateway: GatewayThread, rollout: str, text: str = "hi", **body: Any) -> str:
    response = httpx.post(
        gateway.base + f"/rollout/{rollout}" + CHAT,
        json={"model": body.pop("model", "mock"), "messages": [{"role": "user", "content": text}]},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.headers["X-Span-Id"]


def stored_ids(db: Path) -> set[str]:
    return {r["span_id"] for r in read_rows(db, "select span_id from spans")}


def ready(gateway: GatewayThread) -> httpx.Response:
    return httpx.get(gateway.base + "/health/ready", timeout=5)


def test_lock_then_replay_twice_at_low_traffic_keeps_the_writer_alive(
    make_gateway: Callable[..., GatewayThread], db_path: Path
) -> None:
    gateway = make_gateway()
    acked: list[str] = []
    for round_ in range(3):
        with locked(db_path):
            acked += [call(gateway, f"lock-{round_}") for _ in range(3)]
            wait_until(lambda: not gateway.gw.writer.healthy, what="the writer to see the lock")
            assert ready(gateway).status_code == 503
        # The journal goes back in; a second lock leaves a .replay file to be reused.
        wait_until(stored_all(db_path, list(acked)), timeout=10, what="replay")
        wait_until(lambda: ready(gateway).status_code == 200, what="readiness to recover")
    writer = gateway.gw.writer
    assert writer.alive and writer.faults == 0
    assert not list(db_path.parent.glob("*.replay"))
    # And the writer still writes what comes after.
    after = call(gateway, "after-locks")
    wait_until(lambda: after in stored_ids(db_path), what="a later call to be written")


def acked_stored(db: Path, acked: list[str]) -> bool:
    return set(acked) <= stored_ids(db)


def stored_all(db: Path, acked: list[str]) -> Callable[[], bool]:
    return lambda: acked_stored(db, acked)


def test_a_reward_posted_right_after_a_locked_call_finds_it(
    make_gateway: Callable[..., GatewayThread], db_path: Path
) -> None:
    gateway = make_gateway()
    with locked(db_path):
        span_id = call(gateway, "rewarded")
        wait_until(lambda: gateway.gw.writer.spilled > 0, what="the span to be journaled")
        locked_reply = httpx.post(
            gateway.base + "/api/rewards", json={"span_id": span_id, "value": 1.0}, timeout=10
        )
        assert locked_reply.status_code == 503, locked_reply.text
    reply = httpx.post(
        gateway.base + "/api/rewards", json={"span_id": span_id, "value": 1.0}, timeout=10
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["rollout_id"] == "rewarded"


def test_sequence_numbers_never_repeat_after_eviction_while_locked(
    make_gateway: Callable[..., GatewayThread], db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_app, "SEQUENCER_CAPACITY", 5)
    gateway = make_gateway()
    with locked(db_path):
        call(gateway, "kept")
        call(gateway, "kept")
        for other in range(20):  # pushes "kept" out of the sequencer's memory
            call(gateway, f"other-{other}")
        call(gateway, "kept")
    gateway.flush()
    wait_until(lambda: gateway.gw.writer.healthy, timeout=10, what="the store to come back")
    wait_until(
        lambda: len(read_rows(db_path, "select 1 from spans where rollout_id = 'kept'")) == 3,
        timeout=10,
        what="the rollout's spans to be written back",
    )
    seqs = [r["seq"] for r in read_rows(db_path, "select seq from spans where rollout_id='kept'")]
    assert sorted(seqs) == [1, 2, 3]


def test_a_poison_number_from_the_upstream_is_recorded_clamped(
    make_gateway: Callable[..., GatewayThread], db_path: Path, fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway()
    fake_provider.state.add_fault(body=poison_completion())
    span_id = call(gateway, "poison", model="gpt-test")
    healthy = call(gateway, "poison")
    wait_until(lambda: {span_id, healthy} <= stored_ids(db_path), what="both spans written")
    row = read_rows(db_path, "select * from spans where span_id = ?", span_id)[0]
    assert row["input_tokens"] is None  # an impossible count is not a count
    assert row["output_tokens"] == 2
    assert str(HUGE) in row["response_body"]  # what the upstream said is kept verbatim
    assert gateway.gw.writer.alive and gateway.gw.writer.quarantined == 0


def test_a_poison_number_spilled_to_the_journal_replays_with_the_rest(
    make_gateway: Callable[..., GatewayThread], db_path: Path, fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway()
    with locked(db_path):
        before = call(gateway, "spilled")
        fake_provider.state.add_fault(body=poison_completion())
        poison = call(gateway, "spilled", model="gpt-test")
        after = call(gateway, "spilled")
        wait_until(lambda: gateway.gw.writer.spilled >= 3, what="all three to be journaled")
    wait_until(lambda: {before, poison, after} <= stored_ids(db_path), timeout=10, what="replay")


def test_corrupt_and_poison_journal_lines_are_quarantined_and_the_rest_restored(
    tmp_path: Path,
) -> None:
    db = tmp_path / "j.db"
    first = writer_for(db)
    first.start()
    first.close(timeout=10)
    good = [journal_record(f"good-{n}", n) for n in range(1, 4)]
    journal = first.journal.path
    lines = [orjson.dumps(good[0]), b"{not json", b"[1, 2, 3]"]
    lines += [orjson.dumps(good[1]), orjson.dumps(journal_record("np", 1, start_ns="soon"))]
    lines += [orjson.dumps(good[2]), b'{"span_id": "torn", "trace']
    journal.write_bytes(b"\n".join(lines))
    second = writer_for(db)
    second.start()  # replays at start: must not raise
    second.close(timeout=10)
    stored = stored_ids(db)
    assert {g["span_id"] for g in good} <= stored
    dead = [orjson.loads(line) for line in second.dead_letters.path.read_bytes().splitlines()]
    reasons = " | ".join(d["reason"] for d in dead)
    assert len(dead) == 3, reasons  # not JSON, not an object, torn; "soon" is stored as 0
    assert "not JSON" in reasons and "not a JSON object" in reasons
    assert not journal.exists() and not list(tmp_path.glob("*.replay"))


def test_a_full_journal_disk_holds_spans_in_memory_says_so_and_recovers(
    fake_provider: FakeProviderThread, db_path: Path, tmp_path: Path
) -> None:
    """The database is locked and the journal's volume (a 1 MiB tmpfs) fills up: the
    gateway keeps answering, readiness tells how much it holds, and once space is freed
    and the lock lifts every answered call is in the store."""
    from conftest import gateway_settings

    mount = tmp_path / "journal-volume"
    mount.mkdir()
    if not tiny_tmpfs(mount):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    filler = mount / "filler"
    try:
        settings = gateway_settings(
            fake_provider.url, recorder={"journal_dir": str(mount), "memory_buffer": 10_000}
        )
        gateway = GatewayThread(settings, db_path).start()
        try:
            fill(filler)
            acked: list[str] = []
            with locked(db_path):
                for n in range(40):
                    acked.append(call(gateway, f"full-{n % 4}", "x" * 2000))
                wait_until(lambda: gateway.gw.writer.held > 0, what="spans held in memory")
                body = ready(gateway).json()
                assert body["status"] == "not_ready"
                assert any("journal not writable" in p for p in body["problems"]), body
                assert body["recorder"]["held_in_memory"] > 0
                metrics = httpx.get(gateway.base + "/metrics", timeout=5).text
                assert "spangate_journal_healthy 0.0" in metrics
                filler.unlink()  # space freed while still locked: held spans reach the journal
                wait_until(lambda: gateway.gw.writer.held == 0, timeout=10, what="unheld")
            wait_until(lambda: acked_stored(db_path, acked), timeout=15, what="everything stored")
            wait_until(lambda: ready(gateway).status_code == 200, what="ready again")
            assert gateway.gw.writer.lost == 0 and gateway.gw.writer.alive
        finally:
            gateway.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def tiny_tmpfs(mount: Path) -> bool:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    return done.returncode == 0


def fill(path: Path) -> None:
    with open(path, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def poison_completion() -> str:
    return (
        '{"id":"chatcmpl-poison","object":"chat.completion","created":1,"model":"upstream-model",'
        '"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},'
        '"finish_reason":"stop"}],'
        f'"usage":{{"prompt_tokens":{HUGE},"completion_tokens":2,"total_tokens":{HUGE}}}}}'
    )


def journal_record(rollout: str, seq: int, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "span_id": uuid.uuid4().hex[:16],
        "trace_id": uuid.uuid4().hex,
        "rollout_id": rollout,
        "attempt_id": "1",
        "seq": seq,
        "name": "chat mock",
        "operation": "chat",
        "status": "ok",
        "stream": 0,
        "start_ns": 1_700_000_000_000_000_000,
        "end_ns": 1_700_000_000_100_000_000,
        "retries": 0,
    }
    record.update(extra)
    return record
