"""The dashboard's reads (rollouts browsed under any sort, time series, reward values), built
on the store's read layer in `store.queries`."""

from __future__ import annotations

from typing import Any, Unpack

from sqlite_utils import Database

from store.backend import dialect_of
from store.queries import (
    ROLLOUT_FILTERS,
    ROLLOUT_SUMMARY_COLUMNS,
    BadCursor,
    Page,
    RolloutListFilters,
    _limit,
    _rows,
    _where,
    decode_cursor,
    encode_cursor,
    for_dialect,
    given,
)

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
    "calls": "(select count(*) from spans s where s.rollout_id = r.id and {s_model_call})",
    "errors": "(select count(*) from spans s where s.rollout_id = r.id and s.status = 'error')",
    "tokens": """(select coalesce(sum(s.input_tokens), 0) + coalesce(sum(s.output_tokens), 0)
     from spans s where s.rollout_id = r.id and {s_model_call})""",
    "cost": f"""coalesce((select sum(s.cost_usd) from spans s where s.rollout_id = r.id),
     {NO_VALUE})""",
    "duration": f"coalesce({ROLLOUT_DURATION}, {NO_VALUE})",
    "reward": f"coalesce({ROLLOUT_REWARD}, {NO_VALUE})",
}

BROWSE_FILTERS = {
    **{k: v for k, v in ROLLOUT_FILTERS.items() if k != "cursor_ns"},
    "model": """exists (select 1 from spans s where s.rollout_id = r.id
     and (s.model_group = :model or s.request_model = :model or s.response_model = :model))""",
    "text": "{id_has_text}",
}

# Only the sort key is computed for every matching rollout; the page's summaries come after.
BROWSE_KEYS_SQL = """
select id, sort_key from (
  select r.id as id, {sort} as sort_key
  from rollouts r
  where {where}
) as keyed
where {keyset}
order by sort_key {direction}, id {direction}
limit :limit
"""

# The summary goes in as a `.format` value, so its `{s_model_call}` holes stay for
# `for_dialect`.
BROWSE_ROWS_SQL = f"""
select r.*, {{summary}},
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
  and {model_call}
"""

REWARD_VALUES_SQL = """
select value from rewards
where name = :name
  and created_ns >= :since_ns
order by rowid desc
limit :limit
"""


class BrowseFilters(RolloutListFilters, total=False):
    """The filters of `browse_rollouts`: those of `list_rollouts`, a model any of its calls
    used, and text its id contains."""

    model: str | None
    text: str | None


def browse_rollouts(
    db: Database,
    *,
    sort: str = "created",
    descending: bool = True,
    reward_name: str = "reward",
    cursor: str | None = None,
    limit: int = 50,
    **filters: Unpack[BrowseFilters],
) -> Page:
    """Rollouts with their summaries, sorted by any summary column, cursor-paged.

    The cursor holds the sort column and the last row's (sort value, id), so paging through
    a sort stays stable while rollouts keep arriving.
    """
    if sort not in BROWSE_SORTS:
        raise ValueError(f"cannot sort by {sort!r}; one of {', '.join(BROWSE_SORTS)}")
    keyset = "1 = 1"
    after: dict[str, Any] = {}
    if cursor:
        cursor_sort, cursor_key, cursor_id = decode_cursor(cursor, "tnt")
        if cursor_sort != sort:
            raise BadCursor(f"cursor {cursor!r} belongs to another sort order")
        op = "<" if descending else ">"
        keyset = f"(sort_key {op} :cursor_key or (sort_key = :cursor_key and id {op} :cursor_id))"
        after = {"cursor_key": cursor_key, "cursor_id": cursor_id}
    limit = _limit(limit)
    params = given(filters, BrowseFilters.__optional_keys__)
    params.update(text=params["text"] or None, reward_name=reward_name, limit=limit + 1, **after)
    sql = for_dialect(
        BROWSE_KEYS_SQL.format(
            sort=BROWSE_SORTS[sort],
            where=_where(BROWSE_FILTERS, params),
            keyset=keyset,
            direction="desc" if descending else "asc",
        ),
        dialect_of(db),
    )
    keys = db.execute(sql, {k: v for k, v in params.items() if f":{k}" in sql}).fetchall()
    more = len(keys) > limit
    keys = keys[:limit]
    if not keys:
        return Page([], None)
    ids = {f"id{i}": key[0] for i, key in enumerate(keys)}
    rows_sql = BROWSE_ROWS_SQL.format(
        summary=ROLLOUT_SUMMARY_COLUMNS, ids=", ".join(f":{name}" for name in ids)
    )
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
    sql = for_dialect(TIMESERIES_SQL, dialect_of(db))
    for bucket, failed, duration_ms, tokens, cost in db.execute(sql, params):
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
