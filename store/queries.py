"""The one read layer, used by the API, the CLI and the judge: rollouts, spans and rewards,
filtered and cursor-paged, on SQLite and PostgreSQL alike.

Each read is a readable SQL constant with `:named` parameters. A cursor is the sort key of
the last row returned, base64-encoded, so a page never skips or repeats rows while new
ones arrive.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypedDict, Unpack

import orjson
from sqlite_utils import Database

from store.backend import contains, dialect_of, json_table
from store.errors import NotFound
from store.schema import SPAN_COLUMNS, TRACED_SPANS

MAX_PAGE = 1000

# A model call the gateway proxied, as a `{model_call}` hole (`{s_model_call}` for spans
# aliased `s`) that `for_dialect` fills: not a tool execution, and not an agent's own span
# taken on POST /v1/traces. Those carry `spangate.source: otlp`; the gateway's call of the
# same model request is already counted, calls and tokens, so counting them would double it.
MODEL_CALL_SOURCE = "otlp"

ROLLOUT_SUMMARY_COLUMNS = """
  (select count(*) from attempts a where a.rollout_id = r.id) as attempts,
  (select count(*) from spans s where s.rollout_id = r.id and {s_model_call}) as calls,
  (select count(*) from spans s where s.rollout_id = r.id and s.status = 'error') as errors,
  (select count(*) from spans s
     where s.rollout_id = r.id and s.operation = 'execute_tool') as tool_executions,
  (select coalesce(sum(s.input_tokens), 0) from spans s
     where s.rollout_id = r.id and {s_model_call}) as input_tokens,
  (select coalesce(sum(s.output_tokens), 0) from spans s
     where s.rollout_id = r.id and {s_model_call}) as output_tokens,
  (select sum(s.cost_usd) from spans s where s.rollout_id = r.id) as cost_usd
"""

# Each filter adds its clause only when given, so SQLite can use the matching index.
ROLLOUT_FILTERS = {
    "status": "r.status = :status",
    "agent": "r.agent = :agent",
    "tag": "exists (select 1 from {r_tags} where t.value = :tag)",
    "since_ns": "r.created_ns >= :since_ns",
    "until_ns": "r.created_ns < :until_ns",
    "cursor_ns": "(r.created_ns < :cursor_ns or (r.created_ns = :cursor_ns and r.id < :cursor_id))",
}

# The summary goes in as a `.format` value, so its `{s_model_call}` holes stay for
# `for_dialect`.
LIST_ROLLOUTS_SQL = """
select r.*, {summary}
from rollouts r
where {where}
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
    "tag": "exists (select 1 from {span_tags} where t.value = :tag)",
    "since_ns": "start_ns >= :since_ns",
    "until_ns": "start_ns < :until_ns",
    "after_rowid": "rowid > :after_rowid",
}

LIST_SPANS_SQL = """
select {columns}
from spans
where {where}
order by rowid {direction}
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
    return "\n  and ".join(clauses) or "true"


STATS_SQL = """
select
  coalesce(model_group, request_model) as model,
  count(*) as calls,
  sum(case when status = 'error' then 1 else 0 end) as errors,
  coalesce(sum(input_tokens), 0) as input_tokens,
  coalesce(sum(output_tokens), 0) as output_tokens,
  sum(cost_usd) as cost_usd,
  avg(duration_ms) as mean_duration_ms,
  avg(overhead_ms) as mean_overhead_ms
from spans
where start_ns >= :since_ns
  and {model_call}
group by 1
order by calls desc
"""


class BadCursor(ValueError):
    """The cursor was not one this API handed out."""


def encode_cursor(*key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode().rstrip("=")


def decode_cursor(cursor: str, kinds: str) -> list[Any]:
    """The key `encode_cursor` wrote, each value of the kind its position holds (`kinds`: `i`
    an integer, `n` a number, `t` text): a crafted cursor holding anything else is refused
    as a cursor, not failed on (PostgreSQL) or misread (SQLite) as a query."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = orjson.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise BadCursor(f"invalid cursor {cursor!r}") from exc
    if not isinstance(key, list) or len(key) != len(kinds) or not all(map(_fits, key, kinds)):
        raise BadCursor(f"invalid cursor {cursor!r}")
    return key


def _fits(value: Any, kind: str) -> bool:
    if kind == "t":
        return isinstance(value, str)
    if type(value) is int:
        return -(2**63) <= value < 2**63
    return kind == "n" and type(value) is float


@dataclass
class Page:
    data: list[dict[str, Any]]
    next_cursor: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"data": self.data, "next_cursor": self.next_cursor}


@lru_cache(maxsize=256)
def for_dialect(sql: str, dialect: str) -> str:
    """The SQL with `{r_tags}`-style holes filled for this dialect (JSON arrays as tables, a
    substring test, a model call)."""
    return (
        sql.replace("{r_tags}", json_table(dialect, "r.tags", "t"))
        .replace("{span_tags}", json_table(dialect, "spans.tags", "t"))
        .replace("{id_has_text}", contains(dialect, "r.id", ":text"))
        .replace("{model_call}", model_call(dialect))
        .replace("{s_model_call}", model_call(dialect, "s."))
    )


def model_call(dialect: str, alias: str = "") -> str:
    """SQL true where the span (`alias` its table's prefix, e.g. `s.`) is a model call the
    gateway proxied; `is_model_call` says the same of a decoded span."""
    attributes = f"{alias}attributes"
    if dialect == "postgresql":
        source = f"(cast({attributes} as jsonb) ->> 'spangate.source')"
    else:
        source = f"""json_extract({attributes}, '$."spangate.source"')"""
    # Ingested spans never have an http_status: the gateway's calls skip parsing the JSON.
    return (
        f"({alias}operation != 'execute_tool' and ({alias}http_status is not null"
        f" or coalesce({source}, '') != '{MODEL_CALL_SOURCE}'))"
    )


def is_model_call(span: Mapping[str, Any]) -> bool:
    """A decoded span is a model call the gateway proxied (see `model_call`)."""
    attributes = span.get("attributes")
    source = attributes.get("spangate.source") if isinstance(attributes, dict) else None
    return span["operation"] != "execute_tool" and source != MODEL_CALL_SOURCE


def _rows(db: Database, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row as a decoded dict; the one row helper of the read layer."""
    sql = for_dialect(sql, dialect_of(db))
    # Filters left out of the WHERE clause must not be bound either.
    cursor = db.execute(sql, {k: v for k, v in params.items() if f":{k}" in sql})
    names = [d[0] for d in cursor.description]
    return [decode_row(dict(zip(names, row, strict=True))) for row in cursor.fetchall()]


def _limit(limit: int, max_page: int = MAX_PAGE) -> int:
    return max(1, min(limit, max_page))


def _page(
    db: Database,
    sql: str,
    filters: dict[str, str],
    params: dict[str, Any],
    limit: int,
    cursor_key: Callable[[dict[str, Any]], tuple[Any, ...]],
    **holes: str,
) -> Page:
    """One page of a listing: `sql`'s `{where}` made of the `filters` clauses whose parameter
    is given, one row more than `limit` read to learn whether another page follows, and the
    next cursor made of the last row's `cursor_key`."""
    sql = sql.format(where=_where(filters, params), **holes)
    rows = _rows(db, sql, {**params, "limit": limit + 1})
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(*cursor_key(rows[-1])) if more and rows else None)


def given(filters: Mapping[str, Any], known: Collection[str]) -> dict[str, Any]:
    """Filters passed as keywords, as SQL parameters (every one of `known`, None when not
    given); a name not in `known` raises the TypeError an unknown keyword would."""
    unknown = filters.keys() - set(known)
    if unknown:
        raise TypeError(f"unexpected keyword argument {min(unknown)!r}")
    return {**dict.fromkeys(known), **filters}


class RolloutFilters(TypedDict, total=False):
    """What selects rollouts wherever they are read (listed, browsed, exported); the filters
    given combine with AND, and `since_ns` <= created_ns < `until_ns`."""

    status: str | None
    agent: str | None
    since_ns: int | None
    until_ns: int | None


class RolloutListFilters(RolloutFilters, total=False):
    """The filters of `list_rollouts`: a tag besides the common ones."""

    tag: str | None


def list_rollouts(
    db: Database,
    *,
    cursor: str | None = None,
    limit: int = 50,
    max_page: int = MAX_PAGE,
    **filters: Unpack[RolloutListFilters],
) -> Page:
    """Newest first. The API pages at most `MAX_PAGE` rows; the CLI asks for what it prints."""
    cursor_ns, cursor_id = decode_cursor(cursor, "it") if cursor else (None, None)
    params = given(filters, RolloutListFilters.__optional_keys__)
    params.update(cursor_ns=cursor_ns, cursor_id=cursor_id)
    page = _page(
        db,
        LIST_ROLLOUTS_SQL,
        ROLLOUT_FILTERS,
        params,
        _limit(limit, max_page),
        lambda last: (last["created_ns"], last["id"]),
        summary=ROLLOUT_SUMMARY_COLUMNS,
    )
    for row in page.data:
        row["tokens"] = (row["input_tokens"] or 0) + (row["output_tokens"] or 0)
    return page


class SpanFilters(TypedDict, total=False):
    """The filters of `list_spans`; `model` matches the model asked for, the one that
    answered, or the model group."""

    rollout_id: str | None
    attempt_id: str | None
    model: str | None
    status: str | None
    tag: str | None
    since_ns: int | None
    until_ns: int | None


def list_spans(
    db: Database,
    *,
    cursor: str | None = None,
    after_rowid: int | None = None,
    limit: int = 100,
    bodies: bool = False,
    newest_first: bool = False,
    max_page: int = MAX_PAGE,
    **filters: Unpack[SpanFilters],
) -> Page:
    """In the order they were written (bodies only when asked: `get_span` has them);
    `after_rowid` lets a follower ask only for what is new."""
    if after_rowid is None:
        after_rowid = decode_cursor(cursor, "i")[0] if cursor else 0
    params = given(filters, SpanFilters.__optional_keys__)
    params["after_rowid"] = after_rowid
    return _page(
        db,
        LIST_SPANS_SQL,
        SPAN_FILTERS,
        params,
        _limit(limit, max_page),
        _rowid_key,
        # With bodies every column, in the table's order (as `get_span` returns them).
        columns="rowid as _rowid, *" if bodies else SPAN_LIST_COLUMNS,
        direction="desc" if newest_first else "asc",
    )


def _rowid_key(last: dict[str, Any]) -> tuple[Any, ...]:
    return (last["_rowid"],)


def get_span(db: Database, span_id: str) -> dict[str, Any]:
    rows = _rows(db, GET_SPAN_SQL, {"span_id": span_id})
    if not rows:
        raise NotFound(f"span {span_id!r} not found")
    return rows[0]


class RewardFilters(TypedDict, total=False):
    """The filters of `list_rewards`: what a reward is on, its name and who gave it."""

    rollout_id: str | None
    attempt_id: str | None
    span_id: str | None
    name: str | None
    source: str | None


def list_rewards(
    db: Database, *, cursor: str | None = None, limit: int = 100, **filters: Unpack[RewardFilters]
) -> Page:
    params = given(filters, RewardFilters.__optional_keys__)
    params["after_rowid"] = decode_cursor(cursor, "i")[0] if cursor else 0
    page = _page(db, LIST_REWARDS_SQL, REWARD_FILTERS, params, _limit(limit), _rowid_key)
    for row in page.data:
        row["final"] = bool(row["final"])
    return page


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


# Ids asked for in one statement: far under SQLite's and PostgreSQL's limits on parameters.
SPAN_ID_BATCH = 500


def recorded_span_ids(db: Database, span_ids: Sequence[str]) -> set[str]:
    """Which of `span_ids` the store holds."""
    found: set[str] = set()
    for start in range(0, len(span_ids), SPAN_ID_BATCH):
        batch = list(span_ids[start : start + SPAN_ID_BATCH])
        marks = ", ".join("?" * len(batch))
        sql = f"select span_id from spans where span_id in ({marks})"
        found.update(row[0] for row in db.execute(sql, batch).fetchall())
    return found


def rollouts_of_traces(db: Database, trace_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """The rollout and attempt of the newest stored call in each of `trace_ids` that has
    one (as the gateway's in-memory index would say): a call the agent sent `traceparent`
    with, so one with a parent (the `spans_trace` index), one look-up a trace."""
    found: dict[str, tuple[str, str | None]] = {}
    sql = (
        "select rollout_id, attempt_id from spans where trace_id = ? "
        f"and {TRACED_SPANS} and rollout_id is not null order by start_ns desc limit 1"
    )
    for trace_id in dict.fromkeys(trace_ids):
        row = db.execute(sql, [trace_id]).fetchone()
        if row is not None:
            found[trace_id] = (row[0], row[1])
    return found


def max_rowid(db: Database) -> int:
    """The newest span's rowid: where a live subscriber starts."""
    return db.execute("select coalesce(max(rowid), 0) from spans").fetchone()[0]


# -- one rollout ----------------------------------------------------------------------

ROLLOUT_CURSOR_SQL = """
select
  (select max(seq) from spans where rollout_id = :rollout_id) as max_seq,
  (select id from attempts where rollout_id = :rollout_id
     order by number desc limit 1) as latest_attempt
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
  sum(case when coalesce(error_type, '') != 'budget_exceeded' then 1 else 0 end) as calls,
  coalesce(sum(input_tokens), 0) + coalesce(sum(output_tokens), 0) as tokens,
  coalesce(sum(cost_usd), 0.0) as cost,
  min(case when coalesce(error_type, '') != 'budget_exceeded' then start_ns end) as first_ns
from spans
where rollout_id = :rollout_id
  and {model_call}
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
    # PostgreSQL's `rowid` is a real column, so `select *` returns it; SQLite's never shows.
    out.pop("rowid", None)
    for key in JSON_COLUMNS & out.keys():
        value = out[key]
        if isinstance(value, str):
            # Bodies that were not JSON are kept as the text they were.
            with contextlib.suppress(orjson.JSONDecodeError):
                out[key] = orjson.loads(value)
    return out


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


def get_rollout(db: Database, rollout_id: str, *, bodies: bool = True) -> dict[str, Any]:
    """A rollout with its attempts, each holding its calls in order, and its rewards.

    `bodies=False` leaves out request and response bodies (a timeline has no use for them).
    """
    found = _rows(db, ROLLOUT_SQL, {"rollout_id": rollout_id})
    if not found:
        raise NotFound(f"rollout {rollout_id!r} not found")
    rollout = found[0]
    params = {"rollout_id": rollout_id}
    attempts = _rows(db, ATTEMPTS_SQL, params)
    spans_sql = ROLLOUT_SPANS_SQL.format(columns="*" if bodies else SPAN_OUTLINE_COLUMNS)
    spans = _rows(db, spans_sql, params)
    rewards = _rows(db, ROLLOUT_REWARDS_SQL, params)
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
    calls = [s for s in spans if is_model_call(s)]
    rollout["summary"] = {
        "calls": len(calls),
        "tool_executions": sum(1 for s in spans if s["operation"] == "execute_tool"),
        "errors": sum(1 for s in spans if s["status"] == "error"),
        "budget_refusals": sum(1 for s in spans if s["error_type"] == "budget_exceeded"),
        "input_tokens": sum(s["input_tokens"] or 0 for s in calls),
        "output_tokens": sum(s["output_tokens"] or 0 for s in calls),
        "cost_usd": sum(s["cost_usd"] or 0.0 for s in spans),
        "duration_ms": (
            (max(s["end_ns"] for s in spans) - min(s["start_ns"] for s in spans)) / 1e6
            if spans
            else 0.0
        ),
        "rewards": len(rewards),
    }
    return rollout


RESPONSE_ORIGIN_SQL = """
select model_group, deployment from spans
where response_id = :response_id and operation = 'responses' and deployment is not null
order by start_ns desc
limit 1
"""


def response_origin(db: Database, response_id: str) -> dict[str, Any] | None:
    """The model group and deployment of the call that made a Responses API response."""
    rows = _rows(db, RESPONSE_ORIGIN_SQL, {"response_id": response_id})
    return rows[0] if rows else None
