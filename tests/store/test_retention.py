"""`spangate prune` and `retention.days`: old ended rollouts go with everything they hold;
running ones and recent ones stay. On SQLite and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

import httpx
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


def test_retention_days_prunes_in_the_background(db_path: Any, make_gateway: Any) -> None:
    _build(db_path)
    gateway: GatewayThread = make_gateway(retention={"days": 30, "interval": 0.2, "batch_size": 1})
    wait_until(lambda: _ids(db_path, "rollouts") == ["r-new", "r-running"], timeout=10)
    assert _ids(db_path, "spans", "span_id") == ["s-new", "s-running"]
    assert httpx.get(f"{gateway.base}/health/ready").status_code == 200
