"""What counts as a call wherever calls are counted (rollout summaries, stats, the dashboard,
budget usage): model calls the gateway proxied, never tool executions nor the agent's own
spans taken on POST /v1/traces, whose calls and tokens the gateway already counted."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from sqlite_utils import Database

from store import dashboard
from store.queries import get_rollout, list_rollouts, recorded_span_ids, rollout_budget_usage, stats
from store.schema import SPAN_COLUMNS, connect
from store.span_inserts import insert_spans

pytestmark = pytest.mark.both_backends

T0 = 1_795_334_400_000_000_000  # 2026-11-22T08:00:00Z
MS = 1_000_000
INGESTED = {"spangate.source": "otlp", "spangate.span.kind": "internal"}
_ids = itertools.count(1)


def span(seq: int, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(SPAN_COLUMNS)
    start = T0 + seq * 100 * MS
    record.update(
        span_id=f"{next(_ids):016x}",
        trace_id="ab" * 16,
        rollout_id="r1",
        attempt_id="a1",
        seq=seq,
        name="chat m",
        operation="chat",
        model_group="m",
        request_model="m",
        status="ok",
        http_status=200,
        stream=0,
        start_ns=start,
        end_ns=start + 50 * MS,
        duration_ms=50.0,
        retries=0,
        input_tokens=10,
        output_tokens=5,
        cost_usd=0.001,
        attributes={},
        tags=[],
        agent="bot",
        metadata={},
    )
    record.update(fields)
    return record


@pytest.fixture
def db(db_path: Any) -> Iterator[Database]:
    """Rollout r1: two gateway calls (one cut short by a shutdown: no http_status), a tool
    execution, and three agent spans (a plan, the agent's own view of a chat call with its
    usage, a tool it ran)."""
    conn = connect(db_path)
    insert_spans(
        conn,
        [
            span(1),
            span(2, http_status=None, status="error", input_tokens=None, output_tokens=None),
            span(3, name="execute_tool search", operation="execute_tool", model_group=None),
            span(4, name="plan", operation="agent", http_status=None, attributes=INGESTED),
            span(5, operation="chat", http_status=None, cost_usd=None, attributes=INGESTED),
            span(6, operation="execute_tool", http_status=None, attributes=INGESTED),
        ],
    )
    yield conn
    conn.close()


def test_a_rollout_summary_counts_only_the_gateway_calls(db: Database) -> None:
    summary = get_rollout(db, "r1")["summary"]
    assert summary["calls"] == 2
    assert summary["tool_executions"] == 2
    assert (summary["input_tokens"], summary["output_tokens"]) == (10, 5)
    (listed,) = list_rollouts(db).data
    assert (listed["calls"], listed["tokens"]) == (2, 15)


def test_the_dashboard_counts_only_the_gateway_calls(db: Database) -> None:
    (row,) = dashboard.browse_rollouts(db, sort="calls").data
    assert (row["calls"], row["input_tokens"], row["output_tokens"]) == (2, 10, 5)
    assert dashboard.browse_rollouts(db, sort="tokens").data[0]["id"] == "r1"
    series = dashboard.timeseries(db, since_ns=T0, until_ns=T0 + 1000 * MS, buckets=1)
    assert (series[0]["calls"], series[0]["tokens"]) == (2, 15)


def test_stats_count_only_the_gateway_calls(db: Database) -> None:
    totals = stats(db)["totals"]
    assert (totals["calls"], totals["input_tokens"], totals["output_tokens"]) == (2, 10, 5)


def test_budget_usage_counts_only_the_gateway_calls(db: Database) -> None:
    usage = rollout_budget_usage(db, "r1")["usage"]
    assert (usage["calls"], usage["tokens"]) == (2, 15)


def test_recorded_span_ids_are_those_the_store_holds(db: Database) -> None:
    rollout = get_rollout(db, "r1", bodies=False)
    stored = {s["span_id"] for attempt in rollout["attempts"] for s in attempt["spans"]}
    stored |= {s["span_id"] for s in rollout["unattempted_spans"]}
    # More ids than one statement asks for, the stored ones among them.
    asked = [*(f"{i:016x}" for i in range(10**6, 10**6 + 1200)), *stored]
    assert recorded_span_ids(db, asked) == stored
    assert recorded_span_ids(db, []) == set()
