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
from store.schema import SPAN_COLUMNS

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

# A listing leaves the bodies out: they can be megabytes, and GET /api/spans/{id} has them.
SPAN_LIST_COLUMNS = ", ".join(
    ["rowid as _rowid", *(c for c in SPAN_COLUMNS if c not in ("request_body", "response_body"))]
)

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


# -- reads for the dashboard ----------------------------------------------------------

ROLLOUT_REWARD = """(select w.value from rewards w
     where w.rollout_id = r.id and w.name = :reward_name
     order by w.final desc, w.created_ns desc limit 1)"""

ROLLOUT_DURATION = """(select (max(s.end_ns) - min(s.start_ns)) / 1e6 from spans s
     where s.rollout_id = r.id)"""

# What each sortable column sorts by; a missing value sorts below every real one.
NO_VALUE = -1e308
BROWSE_SORTS = {
    "created": "r.created_ns",
    "calls": """(select count(*) from spans s
     where s.rollout_id = r.id and s.operation != 'execute_tool')""",
    "errors": "(select count(*) from spans s where s.rollout_id = r.id and s.status = 'error')",
    "tokens": """(select coalesce(sum(s.input_tokens), 0) + coalesce(sum(s.output_tokens), 0)
     from spans s where s.rollout_id = r.id)""",
    "cost": f"""coalesce((select sum(s.cost_usd) from spans s where s.rollout_id = r.id),
     {NO_VALUE})""",
    "duration": f"coalesce({ROLLOUT_DURATION}, {NO_VALUE})",
    "reward": f"coalesce({ROLLOUT_REWARD}, {NO_VALUE})",
}

BROWSE_FILTERS = {
    **{k: v for k, v in ROLLOUT_FILTERS.items() if k != "cursor_ns"},
    "model": """exists (select 1 from spans s where s.rollout_id = r.id
     and (s.model_group = :model or s.request_model = :model or s.response_model = :model))""",
    "text": "instr(r.id, :text) > 0",
}

# Only the sort key is computed for every matching rollout; the page's summaries come after.
BROWSE_KEYS_SQL = """
select id, sort_key from (
  select r.id as id, {sort} as sort_key
  from rollouts r
  where {where}
)
where {keyset}
order by sort_key {direction}, id {direction}
limit :limit
"""

BROWSE_ROWS_SQL = f"""
select r.*, {ROLLOUT_SUMMARY_COLUMNS},
  {ROLLOUT_REWARD} as reward,
  {ROLLOUT_DURATION} as duration_ms
from rollouts r
where r.id in ({{ids}})
"""

TIMESERIES_SQL = """
select
  (start_ns - :since_ns) / :bucket_ns as bucket,
  status = 'error' as failed,
  duration_ms,
  coalesce(input_tokens, 0) + coalesce(output_tokens, 0) as tokens,
  coalesce(cost_usd, 0) as cost_usd
from spans
where start_ns >= :since_ns
  and start_ns < :until_ns
  and operation != 'execute_tool'
"""

REWARD_VALUES_SQL = """
select value from rewards
where name = :name
  and created_ns >= :since_ns
order by rowid desc
limit :limit
"""


def browse_rollouts(
    db: Database,
    *,
    status: str | None = None,
    agent: str | None = None,
    tag: str | None = None,
    model: str | None = None,
    text: str | None = None,
    since_ns: int | None = None,
    until_ns: int | None = None,
    sort: str = "created",
    descending: bool = True,
    reward_name: str = "reward",
    cursor: str | None = None,
    limit: int = 50,
) -> Page:
    """Rollouts with their summaries, sorted by any summary column, cursor-paged.

    The cursor holds the sort column and the last row's (sort value, id), so paging through
    a sort stays stable while rollouts keep arriving.
    """
    if sort not in BROWSE_SORTS:
        raise ValueError(f"cannot sort by {sort!r}; one of {', '.join(BROWSE_SORTS)}")
    keyset = "1"
    after: dict[str, Any] = {}
    if cursor:
        cursor_sort, cursor_key, cursor_id = decode_cursor(cursor, 3)
        if cursor_sort != sort:
            raise BadCursor(f"cursor {cursor!r} belongs to another sort order")
        op = "<" if descending else ">"
        keyset = f"(sort_key {op} :cursor_key or (sort_key = :cursor_key and id {op} :cursor_id))"
        after = {"cursor_key": cursor_key, "cursor_id": cursor_id}
    limit = _limit(limit)
    params: dict[str, Any] = {
        "status": status,
        "agent": agent,
        "tag": tag,
        "model": model,
        "text": text or None,
        "since_ns": since_ns,
        "until_ns": until_ns,
        "reward_name": reward_name,
        "limit": limit + 1,
        **after,
    }
    sql = BROWSE_KEYS_SQL.format(
        sort=BROWSE_SORTS[sort],
        where=_where(BROWSE_FILTERS, params),
        keyset=keyset,
        direction="desc" if descending else "asc",
    )
    keys = db.execute(sql, {k: v for k, v in params.items() if f":{k}" in sql}).fetchall()
    more = len(keys) > limit
    keys = keys[:limit]
    if not keys:
        return Page([], None)
    ids = {f"id{i}": key[0] for i, key in enumerate(keys)}
    rows_sql = BROWSE_ROWS_SQL.format(ids=", ".join(f":{name}" for name in ids))
    found = {row["id"]: row for row in _rows(db, rows_sql, {**ids, "reward_name": reward_name})}
    rows = [found[rollout_id] for rollout_id, _ in keys if rollout_id in found]
    last_id, last_key = keys[-1]
    return Page(rows, encode_cursor(sort, last_key, last_id) if more else None)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timeseries(
    db: Database, *, since_ns: int, until_ns: int, buckets: int = 60
) -> list[dict[str, Any]]:
    """Calls, errors, p50/p95 latency, tokens and cost in `buckets` equal slices of a window.

    Percentiles need every duration, so the rows come back and are counted here.
    """
    bucket_ns = max((until_ns - since_ns) // buckets, 1)
    out: list[dict[str, Any]] = [
        {
            "start_ns": since_ns + i * bucket_ns,
            "calls": 0,
            "errors": 0,
            "tokens": 0,
            "cost_usd": 0.0,
        }
        for i in range(buckets)
    ]
    durations: list[list[float]] = [[] for _ in range(buckets)]
    params = {"since_ns": since_ns, "until_ns": until_ns, "bucket_ns": bucket_ns}
    for bucket, failed, duration_ms, tokens, cost in db.execute(TIMESERIES_SQL, params):
        slot = out[min(bucket, buckets - 1)]
        slot["calls"] += 1
        slot["errors"] += failed
        slot["tokens"] += tokens
        slot["cost_usd"] += cost
        if duration_ms is not None:
            durations[min(bucket, buckets - 1)].append(duration_ms)
    for slot, values in zip(out, durations, strict=True):
        values.sort()
        slot["p50_ms"] = _percentile(values, 0.5)
        slot["p95_ms"] = _percentile(values, 0.95)
    return out


def reward_values(
    db: Database, *, name: str = "reward", since_ns: int = 0, limit: int = 100_000
) -> list[float]:
    """The newest `limit` values of one reward, for a distribution."""
    params = {"name": name, "since_ns": since_ns, "limit": limit}
    return [row[0] for row in db.execute(REWARD_VALUES_SQL, params)]
