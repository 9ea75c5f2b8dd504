"""`spangate prune` and `retention.days`: old ended rollouts go with everything they hold;
running ones and recent ones stay. On SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import orjson
import pytest
from click.testing import CliRunner
from servers import GatewayThread, read_rows, wait_until

from gateway.cli.main import cli
from store.schema import connect
from store.span_inserts import insert_spans

pytestmark = pytest.mark.both_backends

DAY = 86_400 * 10**9


def _span(span_id: str, rollout: str | None, at: int) -> dict[str, Any]:
    return {
        "span_id": span_id,
        "trace_id": "a" * 32,
        "rollout_id": rollout,
        "attempt_id": "1" if rollout else None,
        "seq": 1,
        "name": "chat m",
        "operation": "chat",
        "status": "ok",
        "start_ns": at,
        "end_ns": at,
        "duration_ms": 1.0,
    }


def _build(target: Any) -> None:
    """r-old ended 40 days ago, r-running started 40 days ago and never ended, r-new is
    recent; one stray call 40 days old."""
    old = time.time_ns() - 40 * DAY
    db = connect(target)
    try:
        insert_spans(
            db,
            [
                _span("s-old", "r-old", old),
                _span("s-running", "r-running", old),
                _span("s-new", "r-new", time.time_ns()),
                _span("s-stray", None, old),
            ],
        )
        db.execute(
            "update rollouts set status = 'succeeded', updated_ns = :at where id = 'r-old'",
            {"at": old},
        )
        db.execute(
            "insert into rewards (id, rollout_id, value, created_ns) values ('rw', 'r-old', 1, :at)",
            {"at": old},
        )
        for rollout in ("r-old", "r-running"):
            # Budget counters (replicas on PostgreSQL): they go with their rollout.
            db.execute(
                "insert into budget_usage (rollout_id, attempt_id) values (:r, ''), (:r, '1')",
                {"r": rollout},
            )
            # A Thompson experiment's claimed variant (replicas on PostgreSQL): the same.
            db.execute(
                "insert into experiment_assignments (rollout_id, experiment, variant, created_ns)"
                " values (:r, 'split', 'control', :at)",
                {"r": rollout, "at": old},
            )
    finally:
        db.close()


def _ids(target: Any, table: str, column: str = "id") -> list[str]:
    return sorted(r[column] for r in read_rows(target, f"select {column} from {table}"))


def test_prune_dry_run_counts_and_prune_removes_only_old_ended_rollouts(db_path: Any) -> None:
    _build(db_path)
    runner = CliRunner()
    dry = runner.invoke(cli, ["prune", "--older-than", "30d", "--dry-run", "--db", str(db_path)])
    assert dry.exit_code == 0, dry.output
    assert dry.output.strip() == "would remove: 2 spans, 1 rewards, 1 attempts, 1 rollouts"
    assert _ids(db_path, "spans", "span_id") == ["s-new", "s-old", "s-running", "s-stray"]

    done = runner.invoke(cli, ["prune", "--older-than", "30d", "--db", str(db_path)])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == "removed: 2 spans, 1 rewards, 1 attempts, 1 rollouts"
    assert _ids(db_path, "spans", "span_id") == ["s-new", "s-running"]
    assert _ids(db_path, "rollouts") == ["r-new", "r-running"]
    assert _ids(db_path, "rewards") == []
    assert _ids(db_path, "budget_usage", "rollout_id") == ["r-running", "r-running"]
    assert _ids(db_path, "experiment_assignments", "rollout_id") == ["r-running"]


def test_retention_days_prunes_in_the_background(db_path: Any, make_gateway: Any) -> None:
    _build(db_path)
    gateway: GatewayThread = make_gateway(retention={"days": 30, "interval": 0.2, "batch_size": 1})
    wait_until(lambda: _ids(db_path, "rollouts") == ["r-new", "r-running"], timeout=10)
    assert _ids(db_path, "spans", "span_id") == ["s-new", "s-running"]
    assert httpx.get(f"{gateway.base}/health/ready").status_code == 200


def _calls(gateway: GatewayThread, rollout_id: str) -> None:
    with openai.OpenAI(base_url=gateway.url(rollout_id), api_key="x", max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )


def _count(target: Any, sql: str) -> int:
    return int(next(iter(read_rows(target, sql)[0].values())))


def test_prune_while_the_gateway_writes_loses_no_span_of_a_running_rollout(
    db_path: Any, make_gateway: Any
) -> None:
    gateway: GatewayThread = make_gateway()
    ended = [f"old-{n}" for n in range(30)]
    for rid in ended:
        _calls(gateway, rid)
    gateway.flush()
    for rid in ended:
        response = httpx.patch(f"{gateway.base}/api/rollouts/{rid}", json={"status": "succeeded"})
        assert response.status_code == 200, response.text
    calls = 0
    stop = threading.Event()

    def keep_calling() -> None:
        nonlocal calls
        while not stop.is_set():
            _calls(gateway, "busy")
            calls += 1

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        wait_until(lambda: calls >= 3, timeout=30, what="calls to flow")
        args = ["prune", "--older-than", "0s", "--batch", "1", "--db", str(db_path)]
        result = CliRunner().invoke(cli, args)
    finally:
        stop.set()
        caller.join(timeout=60)
    gateway.flush(timeout=30)

    assert result.exit_code == 0, result.output
    assert result.output.startswith("removed: 30 spans"), result.output
    assert _count(db_path, "select count(*) from spans where rollout_id = 'busy'") == calls
    assert _count(db_path, "select count(*) from rollouts where id like 'old-%'") == 0


def test_prune_dry_run_counts_exactly_what_prune_then_removes(db_path: Any) -> None:
    _build(db_path)
    runner = CliRunner()
    args = ["prune", "--older-than", "30d", "--json", "--db", str(db_path)]

    dry = runner.invoke(cli, [*args, "--dry-run"])
    done = runner.invoke(cli, args)

    assert dry.exit_code == 0 and done.exit_code == 0, (dry.output, done.output)
    assert {**orjson.loads(dry.stdout), "dry_run": False} == orjson.loads(done.stdout)
