"""Read queries, each a readable SQL constant with named parameters, and small helpers on them."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from sqlite_utils import Database

from store.errors import NotFound
from store.schema import SPAN_COLUMNS

ROLLOUT_CURSOR_SQL = """
select
  (select max(seq) from spans where rollout_id = :rollout_id) as max_seq,
  (select id from attempts where rollout_id = :rollout_id
     order by number desc limit 1) as latest_attempt
"""

SPANS_SQL = """
select rowid as _rowid, *
from spans
where (:rollout_id is null or rollout_id = :rollout_id)
  and rowid > :after_rowid
order by rowid {direction}
limit :limit
"""

ROLLOUTS_SQL = """
select
  r.*,
  (select count(*) from attempts a where a.rollout_id = r.id) as attempts,
  (select count(*) from spans s
     where s.rollout_id = r.id and s.operation != 'execute_tool') as calls,
  (select count(*) from spans s where s.rollout_id = r.id and s.status = 'error') as errors,
  (select count(*) from spans s
     where s.rollout_id = r.id and s.operation = 'execute_tool') as tool_executions,
  (select coalesce(sum(s.input_tokens), 0) + coalesce(sum(s.output_tokens), 0)
     from spans s where s.rollout_id = r.id) as tokens,
  (select sum(s.cost_usd) from spans s where s.rollout_id = r.id) as cost_usd
from rollouts r
where (:status is null or r.status = :status)
order by r.created_ns desc
limit :limit
"""

ROLLOUT_SQL = "select * from rollouts where id = :rollout_id"

ATTEMPTS_SQL = """
select * from attempts
where rollout_id = :rollout_id
order by number
"""

ROLLOUT_SPANS_SQL = """
select {columns} from spans
where rollout_id = :rollout_id
order by seq, start_ns
"""
# Every span column but the two bodies: what a timeline needs, a fraction of the bytes.
SPAN_OUTLINE_COLUMNS = ", ".join(
    c for c in SPAN_COLUMNS if c not in ("request_body", "response_body")
)

ROLLOUT_REWARDS_SQL = """
select * from rewards
where rollout_id = :rollout_id
order by created_ns
"""

ROLLOUT_BUDGET_USAGE_SQL = """
select
  attempt_id,
  sum(case when operation != 'execute_tool'
        and coalesce(error_type, '') != 'budget_exceeded' then 1 else 0 end) as calls,
  coalesce(sum(input_tokens), 0) + coalesce(sum(output_tokens), 0) as tokens,
  coalesce(sum(cost_usd), 0.0) as cost,
  min(case when operation != 'execute_tool'
        and coalesce(error_type, '') != 'budget_exceeded' then start_ns end) as first_ns
from spans
where rollout_id = :rollout_id
group by attempt_id
"""

JSON_COLUMNS = frozenset(
    {
        "budget",
        "input",
        "metadata",
        "tags",
        "finish_reasons",
        "tool_calls",
        "attributes",
        "dimensions",
        "details",
        "request_body",
        "response_body",
    }
)


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Turn the JSON text columns of a row back into Python values."""
    out = dict(row)
    for key in JSON_COLUMNS & out.keys():
        value = out[key]
        if isinstance(value, str):
            # Bodies that were not JSON are kept as the text they were.
            with contextlib.suppress(orjson.JSONDecodeError):
                out[key] = orjson.loads(value)
    return out


def _rows(db: Database, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    cursor = db.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def rollout_cursor(db: Database, rollout_id: str) -> tuple[int, str | None]:
    """Highest sequence number recorded for a rollout and its latest attempt id."""
    row = db.execute(ROLLOUT_CURSOR_SQL, {"rollout_id": rollout_id}).fetchone()
    return (row[0] or 0, row[1])


def rollout_budget_usage(db: Database, rollout_id: str) -> dict[str, Any]:
    """A rollout's API-set budget, agent and recorded usage (calls, tokens, cost, first call
    in epoch seconds), whole and per attempt: where its budget counters start from."""
    found = _rows(db, "select agent, budget from rollouts where id = :id", {"id": rollout_id})
    row = decode_row(found[0]) if found else {}
    total = {"calls": 0, "tokens": 0, "cost": 0.0, "started": 0.0}
    attempts: dict[str, dict[str, float]] = {}
    for part in _rows(db, ROLLOUT_BUDGET_USAGE_SQL, {"rollout_id": rollout_id}):
        started = (part["first_ns"] or 0) / 1e9
        usage = {"calls": part["calls"], "tokens": part["tokens"], "cost": part["cost"]}
        for key, value in usage.items():
            total[key] += value
        if started and (not total["started"] or started < total["started"]):
            total["started"] = started
        if part["attempt_id"] is not None:
            attempts[part["attempt_id"]] = {**usage, "started": started}
    return {
        "budget": row.get("budget") or {},
        "agent": row.get("agent"),
        "usage": total,
        "attempts": attempts,
    }


def list_spans(
    db: Database,
    *,
    rollout_id: str | None = None,
    after_rowid: int = 0,
    limit: int = 50,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """Spans in write order; `after_rowid` lets a follower ask only for what is new."""
    sql = SPANS_SQL.format(direction="desc" if newest_first else "asc")
    rows = _rows(db, sql, {"rollout_id": rollout_id, "after_rowid": after_rowid, "limit": limit})
    return [decode_row(r) for r in rows]


def max_span_rowid(db: Database) -> int:
    return db.execute("select coalesce(max(rowid), 0) from spans").fetchone()[0]


def list_rollouts(
    db: Database, *, status: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    rows = _rows(db, ROLLOUTS_SQL, {"status": status, "limit": limit})
    return [decode_row(r) for r in rows]


def get_rollout(db: Database, rollout_id: str, *, bodies: bool = True) -> dict[str, Any]:
    """A rollout with its attempts, each holding its calls in order, and its rewards.

    `bodies=False` leaves out request and response bodies (a timeline has no use for them).
    """
    found = _rows(db, ROLLOUT_SQL, {"rollout_id": rollout_id})
    if not found:
        raise NotFound(f"rollout {rollout_id!r} not found")
    rollout = decode_row(found[0])
    params = {"rollout_id": rollout_id}
    attempts = [decode_row(a) for a in _rows(db, ATTEMPTS_SQL, params)]
    spans_sql = ROLLOUT_SPANS_SQL.format(columns="*" if bodies else SPAN_OUTLINE_COLUMNS)
    spans = [decode_row(s) for s in _rows(db, spans_sql, params)]
    rewards = [decode_row(r) for r in _rows(db, ROLLOUT_REWARDS_SQL, params)]
    for reward in rewards:
        reward["final"] = bool(reward["final"])
    by_attempt: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        by_attempt.setdefault(span["attempt_id"], []).append(span)
    for attempt in attempts:
        attempt["spans"] = by_attempt.pop(attempt["id"], [])
    rollout["attempts"] = attempts
    rollout["unattempted_spans"] = [s for group in by_attempt.values() for s in group]
    rollout["rewards"] = rewards
    rollout["summary"] = {
        "calls": sum(1 for s in spans if s["operation"] != "execute_tool"),
        "tool_executions": sum(1 for s in spans if s["operation"] == "execute_tool"),
        "errors": sum(1 for s in spans if s["status"] == "error"),
        "budget_refusals": sum(1 for s in spans if s["error_type"] == "budget_exceeded"),
        "input_tokens": sum(s["input_tokens"] or 0 for s in spans),
        "output_tokens": sum(s["output_tokens"] or 0 for s in spans),
        "cost_usd": sum(s["cost_usd"] or 0.0 for s in spans),
        "duration_ms": (
            (max(s["end_ns"] for s in spans) - min(s["start_ns"] for s in spans)) / 1e6
            if spans
            else 0.0
        ),
        "rewards": len(rewards),
    }
    return rollout
