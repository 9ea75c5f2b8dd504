"""Filtered, cursor-paged listings for the API: rollouts, spans and rewards.

A cursor is the sort key of the last row returned, base64-encoded, so a page never
skips or repeats rows while new ones arrive.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson
from sqlite_utils import Database

from store.errors import NotFound
from store.queries import decode_row

MAX_PAGE = 1000

ROLLOUT_SUMMARY_COLUMNS = """
  (select count(*) from attempts a where a.rollout_id = r.id) as attempts,
  (select count(*) from spans s
     where s.rollout_id = r.id and s.operation != 'execute_tool') as calls,
  (select count(*) from spans s where s.rollout_id = r.id and s.status = 'error') as errors,
  (select count(*) from spans s
     where s.rollout_id = r.id and s.operation = 'execute_tool') as tool_executions,
  (select coalesce(sum(s.input_tokens), 0) from spans s where s.rollout_id = r.id) as input_tokens,
  (select coalesce(sum(s.output_tokens), 0) from spans s where s.rollout_id = r.id) as output_tokens,
  (select sum(s.cost_usd) from spans s where s.rollout_id = r.id) as cost_usd
"""

# Each filter adds its clause only when given, so SQLite can use the matching index.
ROLLOUT_FILTERS = {
    "status": "r.status = :status",
    "agent": "r.agent = :agent",
    "tag": "exists (select 1 from json_each(r.tags) t where t.value = :tag)",
    "since_ns": "r.created_ns >= :since_ns",
    "until_ns": "r.created_ns < :until_ns",
    "cursor_ns": "(r.created_ns < :cursor_ns or (r.created_ns = :cursor_ns and r.id < :cursor_id))",
}

LIST_ROLLOUTS_SQL = f"""
select r.*, {ROLLOUT_SUMMARY_COLUMNS}
from rollouts r
where {{where}}
order by r.created_ns desc, r.id desc
limit :limit
"""

SPAN_LIST_COLUMNS = """
  rowid as _rowid, span_id, trace_id, parent_span_id, rollout_id, attempt_id, seq, name,
  operation, provider, deployment, model_group, request_model, response_model, response_id,
  status, http_status, error_type, error_message, stream, start_ns, end_ns, duration_ms,
  ttft_ms, upstream_ms, overhead_ms, retries, input_tokens, output_tokens, cached_tokens,
  reasoning_tokens, cost_usd, finish_reasons, tool_calls, attributes, tags, model_version,
  mode, held_ms
"""

SPAN_FILTERS = {
    "rollout_id": "rollout_id = :rollout_id",
    "attempt_id": "attempt_id = :attempt_id",
    "model": "(request_model = :model or response_model = :model or model_group = :model)",
    "status": "status = :status",
    "tag": "exists (select 1 from json_each(spans.tags) t where t.value = :tag)",
    "since_ns": "start_ns >= :since_ns",
    "until_ns": "start_ns < :until_ns",
    "after_rowid": "rowid > :after_rowid",
}

LIST_SPANS_SQL = f"""
select {SPAN_LIST_COLUMNS}
from spans
where {{where}}
order by rowid
limit :limit
"""

GET_SPAN_SQL = "select rowid as _rowid, * from spans where span_id = :span_id"

REWARD_FILTERS = {
    "rollout_id": "rollout_id = :rollout_id",
    "attempt_id": "attempt_id = :attempt_id",
    "span_id": "span_id = :span_id",
    "name": "name = :name",
    "source": "source = :source",
    "after_rowid": "rowid > :after_rowid",
}

LIST_REWARDS_SQL = """
select rowid as _rowid, *
from rewards
where {where}
order by rowid
limit :limit
"""


def _where(filters: dict[str, str], params: dict[str, Any]) -> str:
    clauses = [clause for name, clause in filters.items() if params.get(name) is not None]
    return "\n  and ".join(clauses) or "1"


STATS_SQL = """
select
  coalesce(model_group, request_model) as model,
  count(*) as calls,
  sum(status = 'error') as errors,
  coalesce(sum(input_tokens), 0) as input_tokens,
  coalesce(sum(output_tokens), 0) as output_tokens,
  sum(cost_usd) as cost_usd,
  avg(duration_ms) as mean_duration_ms,
  avg(overhead_ms) as mean_overhead_ms
from spans
where start_ns >= :since_ns
  and operation != 'execute_tool'
group by 1
order by calls desc
"""


class BadCursor(ValueError):
    """The cursor was not one this API handed out."""


def encode_cursor(*key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode().rstrip("=")


def decode_cursor(cursor: str, size: int) -> list[Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = orjson.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise BadCursor(f"invalid cursor {cursor!r}") from exc
    if not isinstance(key, list) or len(key) != size:
        raise BadCursor(f"invalid cursor {cursor!r}")
    return key


@dataclass
class Page:
    data: list[dict[str, Any]]
    next_cursor: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"data": self.data, "next_cursor": self.next_cursor}


def _rows(db: Database, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    # Filters left out of the WHERE clause must not be bound either.
    cursor = db.execute(sql, {k: v for k, v in params.items() if f":{k}" in sql})
    names = [d[0] for d in cursor.description]
    return [decode_row(dict(zip(names, row, strict=True))) for row in cursor.fetchall()]


def _limit(limit: int) -> int:
    return max(1, min(limit, MAX_PAGE))


def list_rollouts(
    db: Database,
    *,
    status: str | None = None,
    agent: str | None = None,
    tag: str | None = None,
    since_ns: int | None = None,
    until_ns: int | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> Page:
    """Newest first."""
    cursor_ns, cursor_id = decode_cursor(cursor, 2) if cursor else (None, None)
    limit = _limit(limit)
    params = {
        "status": status,
        "agent": agent,
        "tag": tag,
        "since_ns": since_ns,
        "until_ns": until_ns,
        "cursor_ns": cursor_ns,
        "cursor_id": cursor_id,
        "limit": limit + 1,
    }
    rows = _rows(db, LIST_ROLLOUTS_SQL.format(where=_where(ROLLOUT_FILTERS, params)), params)
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    return Page(rows, encode_cursor(last["created_ns"], last["id"]) if more and last else None)


def list_spans(
    db: Database,
    *,
    rollout_id: str | None = None,
    attempt_id: str | None = None,
    model: str | None = None,
    status: str | None = None,
    tag: str | None = None,
    since_ns: int | None = None,
    until_ns: int | None = None,
    cursor: str | None = None,
    after_rowid: int | None = None,
    limit: int = 100,
) -> Page:
    """In the order they were written (without bodies: `get_span` has them)."""
    if after_rowid is None:
        after_rowid = decode_cursor(cursor, 1)[0] if cursor else 0
    limit = _limit(limit)
    params = {
        "rollout_id": rollout_id,
        "attempt_id": attempt_id,
        "model": model,
        "status": status,
        "tag": tag,
        "since_ns": since_ns,
        "until_ns": until_ns,
        "after_rowid": after_rowid,
        "limit": limit + 1,
    }
    rows = _rows(db, LIST_SPANS_SQL.format(where=_where(SPAN_FILTERS, params)), params)
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1]["_rowid"]) if more and rows else None)


def get_span(db: Database, span_id: str) -> dict[str, Any]:
    rows = _rows(db, GET_SPAN_SQL, {"span_id": span_id})
    if not rows:
        raise NotFound(f"span {span_id!r} not found")
    return rows[0]


def list_rewards(
    db: Database,
    *,
    rollout_id: str | None = None,
    attempt_id: str | None = None,
    span_id: str | None = None,
    name: str | None = None,
    source: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> Page:
    after = decode_cursor(cursor, 1)[0] if cursor else 0
    limit = _limit(limit)
    params = {
        "rollout_id": rollout_id,
        "attempt_id": attempt_id,
        "span_id": span_id,
        "name": name,
        "source": source,
        "after_rowid": after,
        "limit": limit + 1,
    }
    rows = _rows(db, LIST_REWARDS_SQL.format(where=_where(REWARD_FILTERS, params)), params)
    for row in rows:
        row["final"] = bool(row["final"])
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1]["_rowid"]) if more and rows else None)


def stats(db: Database, *, since_ns: int | None = None) -> dict[str, Any]:
    by_model = _rows(db, STATS_SQL, {"since_ns": since_ns or 0})
    totals = {
        "calls": sum(r["calls"] for r in by_model),
        "errors": sum(r["errors"] or 0 for r in by_model),
        "input_tokens": sum(r["input_tokens"] for r in by_model),
        "output_tokens": sum(r["output_tokens"] for r in by_model),
        "cost_usd": sum(r["cost_usd"] or 0.0 for r in by_model),
    }
    counts = dict(db.execute("select status, count(*) from rollouts group by status").fetchall())
    return {"totals": totals, "by_model": by_model, "rollouts_by_status": counts}


def max_rowid(db: Database) -> int:
    """The newest span's rowid: where a live subscriber starts."""
    return db.execute("select coalesce(max(rowid), 0) from spans").fetchone()[0]
