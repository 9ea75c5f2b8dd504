"""The SQLite schema, as named migration steps, and how a database is opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("spangate")

ROLLOUT_STATUSES = ("running", "succeeded", "failed", "cancelled", "timeout")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timeout"})

# Column order of a span row; the writer inserts tuples in exactly this order.
SPAN_COLUMNS: tuple[str, ...] = (
    "span_id",
    "trace_id",
    "parent_span_id",
    "rollout_id",
    "attempt_id",
    "seq",
    "name",
    "operation",
    "provider",
    "deployment",
    "model_group",
    "request_model",
    "response_model",
    "response_id",
    "status",
    "http_status",
    "error_type",
    "error_message",
    "stream",
    "start_ns",
    "end_ns",
    "duration_ms",
    "ttft_ms",
    "upstream_ms",
    "overhead_ms",
    "retries",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "finish_reasons",
    "tool_calls",
    "request_body",
    "response_body",
    "attributes",
    "tags",
    # Training: base64 of little-endian int32 / float32 arrays (store/packed.py), the
    # deployment's model version, the rollout's mode, and time held by a pause.
    "prompt_token_ids",
    "completion_token_ids",
    "logprobs",
    "model_version",
    "mode",
    "held_ms",
)


@migrations(name="001_initial")
def _initial(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL DEFAULT 'running',
            agent TEXT,
            input TEXT,
            metadata TEXT NOT NULL DEFAULT '{}',
            tags TEXT NOT NULL DEFAULT '[]',
            created_ns INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL,
            ended_ns INTEGER
        )
        """
    )
    db.execute(
        """
        CREATE TABLE attempts (
            rollout_id TEXT NOT NULL REFERENCES rollouts(id),
            id TEXT NOT NULL,
            number INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'running',
            created_ns INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL,
            ended_ns INTEGER,
            PRIMARY KEY (rollout_id, id)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE spans (
            span_id TEXT PRIMARY KEY,
            trace_id TEXT NOT NULL,
            parent_span_id TEXT,
            rollout_id TEXT,
            attempt_id TEXT,
            seq INTEGER,
            name TEXT NOT NULL,
            operation TEXT NOT NULL,
            provider TEXT,
            deployment TEXT,
            model_group TEXT,
            request_model TEXT,
            response_model TEXT,
            response_id TEXT,
            status TEXT NOT NULL,
            http_status INTEGER,
            error_type TEXT,
            error_message TEXT,
            stream INTEGER NOT NULL DEFAULT 0,
            start_ns INTEGER NOT NULL,
            end_ns INTEGER NOT NULL,
            duration_ms REAL NOT NULL,
            ttft_ms REAL,
            upstream_ms REAL,
            overhead_ms REAL,
            retries INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER,
            output_tokens INTEGER,
            cached_tokens INTEGER,
            reasoning_tokens INTEGER,
            cost_usd REAL,
            finish_reasons TEXT,
            tool_calls TEXT,
            request_body TEXT,
            response_body TEXT,
            attributes TEXT NOT NULL DEFAULT '{}',
            tags TEXT NOT NULL DEFAULT '[]'
        )
        """
    )
    db.execute("CREATE INDEX spans_rollout_seq ON spans (rollout_id, seq)")
    db.execute("CREATE INDEX spans_start ON spans (start_ns)")
    db.execute("CREATE INDEX spans_response_id ON spans (response_id)")
    db.execute("CREATE INDEX spans_trace ON spans (trace_id)")
    db.execute("CREATE INDEX rollouts_created ON rollouts (created_ns)")
    db.execute(
        """
        CREATE TABLE rewards (
            id TEXT PRIMARY KEY,
            rollout_id TEXT,
            attempt_id TEXT,
            span_id TEXT,
            name TEXT NOT NULL DEFAULT 'reward',
            value REAL NOT NULL,
            dimensions TEXT NOT NULL DEFAULT '{}',
            final INTEGER NOT NULL DEFAULT 0,
            source TEXT NOT NULL DEFAULT 'user',
            comment TEXT,
            details TEXT NOT NULL DEFAULT '{}',
            tags TEXT NOT NULL DEFAULT '[]',
            created_ns INTEGER NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX rewards_rollout ON rewards (rollout_id)")
    db.execute("CREATE INDEX rewards_span ON rewards (span_id)")


@migrations(name="002_judge_runs")
def _judge_runs(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE judge_runs (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            judge TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            total INTEGER NOT NULL DEFAULT 0,
            judged INTEGER NOT NULL DEFAULT 0,
            skipped INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            results TEXT NOT NULL DEFAULT '[]',
            error TEXT,
            created_ns INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL,
            ended_ns INTEGER
        )
        """
    )


@migrations(name="003_guidelines")
def _guidelines(db: Database) -> None:
    # Versioned Markdown guidelines per agent, written by `spangate patterns guidelines`.
    db.execute(
        """
        CREATE TABLE guidelines (
            agent TEXT NOT NULL,
            version INTEGER NOT NULL,
            content TEXT NOT NULL,
            findings TEXT NOT NULL DEFAULT '[]',
            note TEXT,
            created_ns INTEGER NOT NULL,
            PRIMARY KEY (agent, version)
        )
        """
    )


@migrations(name="004_drop_trace_index")
def _drop_trace_index(db: Database) -> None:
    # No query looks spans up by trace id, and inserting random 128-bit ids into an index
    # cost the writer a third of its throughput.
    db.execute("DROP INDEX IF EXISTS spans_trace")


@migrations(name="005_experiments")
def _experiments(db: Database) -> None:
    # Each experiment's configuration as the gateway last ran it, so the CLI and the API
    # can analyse it from the database alone; and every promote/stop decision, kept for good
    # (the newest per experiment is in force).
    db.execute(
        """
        CREATE TABLE experiments (
            name TEXT PRIMARY KEY,
            config TEXT NOT NULL,
            updated_ns INTEGER NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE experiment_decisions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            experiment TEXT NOT NULL,
            action TEXT NOT NULL,
            variant TEXT,
            created_ns INTEGER NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX experiment_decisions_name ON experiment_decisions (experiment, id)")


@migrations(name="006_training")
def _training(db: Database) -> None:
    for column, kind in (
        ("prompt_token_ids", "TEXT"),
        ("completion_token_ids", "TEXT"),
        ("logprobs", "TEXT"),
        ("model_version", "TEXT"),
        ("mode", "TEXT"),
        ("held_ms", "REAL"),
    ):
        db.execute(f"ALTER TABLE spans ADD COLUMN {column} {kind}")
    # Deployments added at runtime through `/api/models`; keys are never stored.
    db.execute(
        """
        CREATE TABLE model_registry (
            model TEXT NOT NULL,
            api_base TEXT NOT NULL,
            provider TEXT NOT NULL DEFAULT 'openai',
            upstream_model TEXT NOT NULL,
            version TEXT NOT NULL,
            weight REAL NOT NULL DEFAULT 1.0,
            created_ns INTEGER NOT NULL,
            PRIMARY KEY (model, api_base)
        )
        """
    )


@migrations(name="007_rollout_budgets")
def _rollout_budgets(db: Database) -> None:
    # A rollout's own budget, set over the API: `{"rollout": {limits}, "attempt": {limits}}`.
    db.execute("ALTER TABLE rollouts ADD COLUMN budget TEXT")


def connect(path: str | Path, *, read_only: bool = False) -> Database:
    """Open the database; writers get WAL mode and the schema, readers never write."""
    if read_only:
        uri = f"file:{Path(path).resolve()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        # Plugins are never used here, and scanning entry points costs ~50 ms per start.
        return Database(conn, execute_plugins=False)
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    db = Database(conn, execute_plugins=False)
    db.enable_wal()
    # NORMAL keeps committed rows across a process kill; only a power loss can cost the tail.
    conn.execute("PRAGMA synchronous = NORMAL")
    migrations.apply(db)
    return db
