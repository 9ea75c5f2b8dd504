"""The one schema definition (SQLAlchemy Core) that both SQLite and PostgreSQL are built from.

SQLite numbers rows itself (`rowid`); PostgreSQL gets a `rowid` identity column on the
tables that are paged in write order, so every query can say `rowid` on both.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)

from store.schema import TRACE_INDEX, TRACED_SPANS

ADDED_SPAN_TEXT_COLUMNS = (
    "prompt_token_ids",
    "completion_token_ids",
    "logprobs",
    "model_version",
    "mode",
)
# Columns added after 0.1, which a store made before them gets from migration 0003.
ADDED_COLUMNS = {
    "spans": (*ADDED_SPAN_TEXT_COLUMNS, "held_ms"),
    "rollouts": ("budget",),
}
# Added by migration 0005: the upstream's status beside the client's (`http_status`).
UPSTREAM_STATUS_COLUMN = "upstream_status"
# Added by migration 0007: which process runs a judge run, and when it last said it still
# does (replicas on one store tell a live run from an abandoned one by them).
JUDGE_RUN_OWNER_COLUMNS: dict[str, type[Text] | type[BigInteger]] = {
    "owner": Text,
    "heartbeat_ns": BigInteger,
}

# Tables read in write order (live tail, cursor paging, export).
ROWID_TABLES = frozenset({"spans", "rewards", "rollouts"})


def _rowid(dialect: str) -> list[Column]:
    if dialect == "sqlite":
        return []
    return [Column("rowid", BigInteger, Identity(always=False), nullable=False, unique=True)]


def _json(name: str, empty: str) -> Column:
    """A JSON text column that is never null: `empty` (`{}` or `[]`) when nothing was given."""
    return Column(name, Text, nullable=False, server_default=text(f"'{empty}'"))


def _zero(name: str, type_: type[Integer] | type[Float] = Integer) -> Column:
    """A number that starts at 0: a count, a flag, a time not yet set."""
    return Column(name, type_, nullable=False, server_default=text("0"))


def _lifetime() -> list[Column]:
    """When a row was made, last changed and (once it has) ended, in epoch nanoseconds."""
    return [
        Column("created_ns", BigInteger, nullable=False),
        Column("updated_ns", BigInteger, nullable=False),
        Column("ended_ns", BigInteger),
    ]


def _running() -> Column:
    """The status of a rollout or attempt, which starts as running."""
    return Column("status", Text, nullable=False, server_default=text("'running'"))


def build_metadata(dialect: str) -> MetaData:
    """Every table and index of the store, for `dialect` (`sqlite` or `postgresql`)."""
    md = MetaData()
    Table(
        "rollouts",
        md,
        Column("id", Text, primary_key=True),
        _running(),
        Column("agent", Text),
        Column("input", Text),
        _json("metadata", "{}"),
        _json("tags", "[]"),
        *_lifetime(),
        # A rollout's own budget, set over the API: `{"rollout": {limits}, "attempt": {...}}`.
        Column("budget", Text),
        *_rowid(dialect),
        Index("rollouts_created", "created_ns"),
    )
    Table(
        "attempts",
        md,
        Column("rollout_id", Text, nullable=False),
        Column("id", Text, nullable=False),
        Column("number", Integer, nullable=False),
        _running(),
        *_lifetime(),
        PrimaryKeyConstraint("rollout_id", "id"),
    )
    Table(
        "spans",
        md,
        Column("span_id", Text, primary_key=True),
        Column("trace_id", Text, nullable=False),
        Column("parent_span_id", Text),
        Column("rollout_id", Text),
        Column("attempt_id", Text),
        Column("seq", BigInteger),
        Column("name", Text, nullable=False),
        Column("operation", Text, nullable=False),
        Column("provider", Text),
        Column("deployment", Text),
        Column("model_group", Text),
        Column("request_model", Text),
        Column("response_model", Text),
        Column("response_id", Text),
        Column("status", Text, nullable=False),
        Column("http_status", Integer),
        Column("error_type", Text),
        Column("error_message", Text),
        _zero("stream"),
        Column("start_ns", BigInteger, nullable=False),
        Column("end_ns", BigInteger, nullable=False),
        Column("duration_ms", Float, nullable=False),
        Column("ttft_ms", Float),
        Column("upstream_ms", Float),
        Column("overhead_ms", Float),
        _zero("retries"),
        Column("input_tokens", BigInteger),
        Column("output_tokens", BigInteger),
        Column("cached_tokens", BigInteger),
        Column("reasoning_tokens", BigInteger),
        Column("cost_usd", Float),
        Column("finish_reasons", Text),
        Column("tool_calls", Text),
        Column("request_body", Text),
        Column("response_body", Text),
        _json("attributes", "{}"),
        _json("tags", "[]"),
        # Training: base64 of little-endian int32 / float32 arrays (store/packed.py), the
        # deployment's model version, the rollout's mode, and time held by a pause.
        *(Column(name, Text) for name in ADDED_SPAN_TEXT_COLUMNS),
        Column("held_ms", Float),
        Column(UPSTREAM_STATUS_COLUMN, Integer),
        *_rowid(dialect),
        Index("spans_rollout_seq", "rollout_id", "seq"),
        Index("spans_start", "start_ns"),
        Index("spans_response_id", "response_id"),
        # Only spans with a parent: a call the agent sent `traceparent` with, and the agent's
        # own OTLP spans. The calls of a rollout's own trace (the most) cost the writer nothing.
        Index(
            TRACE_INDEX,
            "trace_id",
            "start_ns",
            sqlite_where=text(TRACED_SPANS),
            postgresql_where=text(TRACED_SPANS),
        ),
    )
    Table(
        "rewards",
        md,
        Column("id", Text, primary_key=True),
        Column("rollout_id", Text),
        Column("attempt_id", Text),
        Column("span_id", Text),
        Column("name", Text, nullable=False, server_default=text("'reward'")),
        Column("value", Float, nullable=False),
        _json("dimensions", "{}"),
        _zero("final"),
        Column("source", Text, nullable=False, server_default=text("'user'")),
        Column("comment", Text),
        _json("details", "{}"),
        _json("tags", "[]"),
        Column("created_ns", BigInteger, nullable=False),
        *_rowid(dialect),
        Index("rewards_rollout", "rollout_id"),
        Index("rewards_span", "span_id"),
    )
    Table(
        "judge_runs",
        md,
        Column("id", Text, primary_key=True),
        Column("status", Text, nullable=False),
        Column("judge", Text, nullable=False),
        _json("params", "{}"),
        _zero("total"),
        _zero("judged"),
        _zero("skipped"),
        _zero("failed"),
        _json("results", "[]"),
        Column("error", Text),
        *_lifetime(),
        *(Column(name, type_) for name, type_ in JUDGE_RUN_OWNER_COLUMNS.items()),
    )
    # Versioned Markdown guidelines per agent, written by `spangate patterns guidelines`.
    Table(
        "guidelines",
        md,
        Column("agent", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("content", Text, nullable=False),
        _json("findings", "[]"),
        Column("note", Text),
        Column("created_ns", BigInteger, nullable=False),
        PrimaryKeyConstraint("agent", "version"),
    )
    # Each experiment's configuration as the gateway last ran it, and every promote/stop
    # decision, kept for good (the newest per experiment is in force).
    Table(
        "experiments",
        md,
        Column("name", Text, primary_key=True),
        Column("config", Text, nullable=False),
        Column("updated_ns", BigInteger, nullable=False),
    )
    Table(
        "experiment_decisions",
        md,
        Column("id", Integer, Identity(always=False), primary_key=True),
        Column("experiment", Text, nullable=False),
        Column("action", Text, nullable=False),
        Column("variant", Text),
        Column("created_ns", BigInteger, nullable=False),
        Index("experiment_decisions_name", "experiment", "id"),
    )
    # Deployments added at runtime through `/api/models`; keys are never stored.
    Table(
        "model_registry",
        md,
        Column("model", Text, nullable=False),
        Column("api_base", Text, nullable=False),
        Column("provider", Text, nullable=False, server_default=text("'openai'")),
        Column("upstream_model", Text, nullable=False),
        Column("version", Text, nullable=False),
        Column("weight", Float, nullable=False, server_default=text("1.0")),
        Column("created_ns", BigInteger, nullable=False),
        PrimaryKeyConstraint("model", "api_base"),
    )
    # Whether model calls are paused (`/api/proxy/pause`): one row, read by every replica.
    Table(
        "proxy_state",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("paused", Integer, nullable=False),
        Column("mode", Text),
        Column("reason", Text),
        Column("retry_after", Float),
        Column("updated_ns", BigInteger, nullable=False),
    )
    # The last sequence number handed out per rollout, when replicas share one store.
    Table(
        "rollout_counters",
        md,
        Column("rollout_id", Text, primary_key=True),
        Column("seq", BigInteger, nullable=False),
    )
    # The variant each rollout runs under an experiment that draws (Thompson), claimed by
    # the first replica to draw it, when replicas share one PostgreSQL without Redis.
    Table(
        "experiment_assignments",
        md,
        Column("rollout_id", Text, nullable=False),
        Column("experiment", Text, nullable=False),
        Column("variant", Text, nullable=False),
        Column("created_ns", BigInteger, nullable=False),
        PrimaryKeyConstraint("rollout_id", "experiment"),
    )
    # Budget counters replicas share on PostgreSQL without Redis: one row per rollout
    # (`attempt_id` '') holding its own budget, one per attempt; tokens and cost include
    # what calls in flight hold.
    Table(
        "budget_usage",
        md,
        Column("rollout_id", Text, nullable=False),
        Column("attempt_id", Text, nullable=False),
        Column("budget", Text),
        _zero("calls", BigInteger),
        _zero("tokens", Float),
        _zero("cost", Float),
        _zero("started", Float),
        PrimaryKeyConstraint("rollout_id", "attempt_id"),
    )
    return md
