"""Writes the API makes (rollouts, attempts, rewards); each runs on the writer thread.

Every function takes the writer's `Database` first, so the gateway can hand it to
`StoreWriter.execute()` and the write lands after every span queued before it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from sqlite_utils import Database

from store.backend import atomic, dialect_of, json_table
from store.errors import Conflict, InvalidTransition, NotFound
from store.queries import decode_row
from store.schema import TERMINAL_STATUSES

# Where `announce_attempt` tells other replicas of a new attempt (PostgreSQL NOTIFY).
ATTEMPTS_CHANNEL = "spangate_attempts"

REWARD_FIELDS = (
    "rollout_id",
    "attempt_id",
    "span_id",
    "name",
    "value",
    "dimensions",
    "final",
    "source",
    "comment",
    "details",
    "tags",
)


def _json(value: Any, empty: str) -> str:
    return empty if value is None else orjson.dumps(value).decode()


def _one(db: Database, sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
    cursor = db.execute(sql, params)
    row = cursor.fetchone()
    if row is None:
        return None
    return decode_row(dict(zip([d[0] for d in cursor.description], row, strict=True)))


def get_rollout_row(db: Database, rollout_id: str) -> dict[str, Any]:
    row = _one(db, "select * from rollouts where id = :id", {"id": rollout_id})
    if row is None:
        raise NotFound(f"rollout {rollout_id!r} not found")
    return row


def _locked_rollout(db: Database, rollout_id: str, *, shared: bool = False) -> dict[str, Any]:
    """The rollout's row, locked on PostgreSQL until the transaction ends. Its end and the
    rewards given around it lock it first, so whichever replica writes them, each is stamped
    after what committed before it: a reward is at or before the end (`created_ns <=
    ended_ns`) exactly when it committed before the end, and the OTLP root span, read once
    the end is stored, carries exactly those. A `shared` lock (a reward's) waits only for an
    end: not for other rewards, nor for a span batch of the rollout (which takes the row
    for a no-key update)."""
    lock = ""
    if dialect_of(db) == "postgresql":
        lock = " for key share" if shared else " for update"
    row = _one(db, f"select * from rollouts where id = :id{lock}", {"id": rollout_id})
    if row is None:
        raise NotFound(f"rollout {rollout_id!r} not found")
    return row


def get_attempt_row(db: Database, rollout_id: str, attempt_id: str) -> dict[str, Any]:
    row = _one(
        db,
        "select * from attempts where rollout_id = :rollout_id and id = :id",
        {"rollout_id": rollout_id, "id": attempt_id},
    )
    if row is None:
        raise NotFound(f"attempt {attempt_id!r} of rollout {rollout_id!r} not found")
    return row


def create_rollout(
    db: Database,
    *,
    rollout_id: str | None = None,
    input: Any = None,
    agent: str | None = None,
    metadata: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    budget: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """A new rollout, or the existing one (filling fields it lacks); `(row, created)`."""
    rollout_id = rollout_id or f"ro-{uuid.uuid4().hex[:16]}"
    now = time.time_ns()
    existing = _one(db, "select * from rollouts where id = :id", {"id": rollout_id})
    if existing is None:
        db.execute(
            """
            insert into rollouts (id, status, agent, input, metadata, tags, budget,
                                  created_ns, updated_ns)
            values (:id, 'running', :agent, :input, :metadata, :tags, :budget, :now, :now)
            """,
            {
                "id": rollout_id,
                "budget": _budget_json(None, budget),
                "agent": agent,
                "input": None if input is None else orjson.dumps(input).decode(),
                "metadata": _json(metadata, "{}"),
                "tags": _json(tags, "[]"),
                "now": now,
            },
        )
        return get_rollout_row(db, rollout_id), True
    # A rollout first seen through a call has no input yet; a create call may supply it.
    clashes = [
        name
        for name, given, stored in (
            ("agent", agent, existing.get("agent")),
            ("input", input, existing.get("input")),
        )
        if given is not None and stored is not None and given != stored
    ]
    if clashes:
        raise Conflict(f"rollout {rollout_id!r} already exists with a different {clashes[0]}")
    tags = sorted({*(existing.get("tags") or []), *(tags or [])})
    _update_rollout(db, existing, now, metadata, tags, budget, agent=agent, input=input)
    return get_rollout_row(db, rollout_id), False


# A create that finds the rollout fills only what it lacks (agent, input); an update moves
# its status, and a terminal status sets `ended_ns` once. A null parameter changes nothing.
UPDATE_ROLLOUT_SQL = """
update rollouts set
  status = coalesce(:status, status),
  agent = coalesce(agent, :agent),
  input = coalesce(input, :input),
  metadata = :metadata,
  tags = :tags,
  budget = :budget,
  updated_ns = :now,
  ended_ns = coalesce(ended_ns, :ended)
where id = :id
"""


def _update_rollout(
    db: Database,
    stored: dict[str, Any],
    now: int,
    metadata: dict[str, Any] | None,
    tags: list[str] | None,
    budget: dict[str, Any] | None,
    *,
    status: str | None = None,
    ended: int | None = None,
    agent: str | None = None,
    input: Any = None,
) -> None:
    """Write a rollout's new state: `metadata` and `budget` merge into the stored ones,
    `tags` replace them."""
    params = {
        "id": stored["id"],
        "status": status,
        "agent": agent,
        "input": None if input is None else orjson.dumps(input).decode(),
        "metadata": _json({**(stored.get("metadata") or {}), **(metadata or {})}, "{}"),
        "tags": _json(tags, "[]"),
        "budget": _budget_json(stored.get("budget"), budget),
        "now": now,
        "ended": ended,
    }
    db.execute(UPDATE_ROLLOUT_SQL, params)


def _budget_json(stored: dict[str, Any] | None, given: dict[str, Any] | None) -> str | None:
    """`given` merged into `stored` limit by limit, per scope; a limit given as None is removed."""
    merged = {scope: dict(limits) for scope, limits in (stored or {}).items()}
    for scope, limits in (given or {}).items():
        current = merged.setdefault(scope, {})
        for name, value in (limits or {}).items():
            if value is None:
                current.pop(name, None)
            else:
                current[name] = value
    merged = {scope: limits for scope, limits in merged.items() if limits}
    return orjson.dumps(merged).decode() if merged else None


def update_rollout(
    db: Database,
    rollout_id: str,
    *,
    status: str | None = None,
    metadata: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    budget: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Change status (running → a terminal state, which is final), metadata, tags or budget."""
    # One transaction: the newest reward is read, and the end stamped, with nothing between.
    with atomic(db):
        row = _locked_rollout(db, rollout_id)
        now = time.time_ns()
        if status is not None and status != row["status"]:
            if row["status"] in TERMINAL_STATUSES:
                raise InvalidTransition(
                    f"rollout {rollout_id!r} is {row['status']}, a final status; "
                    f"it cannot become {status}"
                )
            if status == "running":
                raise InvalidTransition(f"rollout {rollout_id!r} is already running")
        new_status = status or row["status"]
        if new_status in TERMINAL_STATUSES and row["ended_ns"] is None:
            # Not before a reward already given, whichever replica's clock stamped it.
            now = max(now, _last_rollout_reward_ns(db, rollout_id))
        ended = now if new_status in TERMINAL_STATUSES else None
        tags = tags if tags is not None else row.get("tags")
        _update_rollout(db, row, now, metadata, tags, budget, status=new_status, ended=ended)
        if new_status in TERMINAL_STATUSES:
            # Attempts still running end with their rollout.
            db.execute(
                """
                update attempts set status = :status, ended_ns = :now, updated_ns = :now
                where rollout_id = :id and status = 'running'
                """,
                {"id": rollout_id, "status": new_status, "now": now},
            )
        return get_rollout_row(db, rollout_id)


def _last_rollout_reward_ns(db: Database, rollout_id: str) -> int:
    """When the rollout's newest reward of its own or an attempt's was given (0: none)."""
    found = db.execute(
        "select max(created_ns) from rewards where rollout_id = :id and span_id is null",
        {"id": rollout_id},
    ).fetchone()[0]
    return int(found or 0)


def create_attempt(
    db: Database, rollout_id: str, *, attempt_id: str | None = None
) -> dict[str, Any]:
    """The next attempt of a rollout; its id defaults to its number."""
    # Locked as a replica's span batch locks it before numbering the attempts it creates:
    # two new attempts never take one number.
    rollout = _locked_rollout(db, rollout_id)
    if rollout["status"] in TERMINAL_STATUSES:
        raise InvalidTransition(f"rollout {rollout_id!r} is {rollout['status']}; no new attempts")
    number = db.execute(
        "select coalesce(max(number), 0) + 1 from attempts where rollout_id = :id",
        {"id": rollout_id},
    ).fetchone()[0]
    attempt_id = attempt_id or str(number)
    if _one(
        db,
        "select id from attempts where rollout_id = :rollout_id and id = :id",
        {"rollout_id": rollout_id, "id": attempt_id},
    ):
        raise Conflict(f"attempt {attempt_id!r} of rollout {rollout_id!r} already exists")
    now = time.time_ns()
    db.execute(
        """
        insert into attempts (rollout_id, id, number, status, created_ns, updated_ns)
        values (:rollout_id, :id, :number, 'running', :now, :now)
        """,
        {"rollout_id": rollout_id, "id": attempt_id, "number": number, "now": now},
    )
    return get_attempt_row(db, rollout_id, attempt_id)


def announce_attempt(db: Database, origin: str, attempt: dict[str, Any]) -> None:
    """Tell every replica sharing a PostgreSQL store (at commit) that calls of the rollout
    naming no attempt now join this one; `origin` says which replica opened it, the number
    which of two news is the later."""
    if dialect_of(db) == "postgresql":
        news = [origin, attempt["rollout_id"], attempt["id"], attempt["number"]]
        payload = orjson.dumps(news).decode()
        db.execute(
            "select pg_notify(:channel, :payload)",
            {"channel": ATTEMPTS_CHANNEL, "payload": payload},
        )


def update_attempt(
    db: Database, rollout_id: str, attempt_id: str, *, status: str
) -> dict[str, Any]:
    row = get_attempt_row(db, rollout_id, attempt_id)
    if status != row["status"] and row["status"] in TERMINAL_STATUSES:
        raise InvalidTransition(
            f"attempt {attempt_id!r} is {row['status']}, a final status; it cannot become {status}"
        )
    now = time.time_ns()
    ended = now if status in TERMINAL_STATUSES and row["ended_ns"] is None else row["ended_ns"]
    db.execute(
        """
        update attempts set status = :status, updated_ns = :now, ended_ns = :ended
        where rollout_id = :rollout_id and id = :id
        """,
        {"rollout_id": rollout_id, "id": attempt_id, "status": status, "now": now, "ended": ended},
    )
    return get_attempt_row(db, rollout_id, attempt_id)


def _resolve_target(db: Database, reward: dict[str, Any]) -> dict[str, Any]:
    """Fill rollout/attempt/span ids from whichever target the reward names."""
    target = {k: reward.get(k) for k in ("rollout_id", "attempt_id", "span_id")}
    response_id = reward.get("response_id")
    if response_id and not target["span_id"]:
        span = _one(
            db,
            "select span_id from spans where response_id = :rid order by start_ns desc limit 1",
            {"rid": response_id},
        )
        if span is None:
            raise NotFound(f"no recorded call has response id {response_id!r}")
        target["span_id"] = span["span_id"]
    if target["span_id"]:
        span = _one(
            db,
            "select rollout_id, attempt_id from spans where span_id = :id",
            {"id": target["span_id"]},
        )
        if span is None:
            raise NotFound(f"span {target['span_id']!r} not found")
        for key in ("rollout_id", "attempt_id"):
            if target[key] and span[key] and target[key] != span[key]:
                raise Conflict(f"span {target['span_id']!r} belongs to {key} {span[key]!r}")
            target[key] = span[key]
        return target
    if target["attempt_id"]:
        get_attempt_row(db, target["rollout_id"] or "", target["attempt_id"])
    elif target["rollout_id"]:
        get_rollout_row(db, target["rollout_id"])
    return target


def add_reward(db: Database, reward: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Store a reward; a client-given id makes it idempotent. `(row, created)`."""
    # One transaction: the rollout's end is read, and the reward stamped, with nothing between.
    with atomic(db):
        return _add_reward(db, reward)


def _add_reward(db: Database, reward: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    row: dict[str, Any] = {**_resolve_target(db, reward)}
    row.update(
        name=reward.get("name") or "reward",
        value=float(reward["value"]),
        dimensions=reward.get("dimensions") or {},
        final=bool(reward.get("final", False)),
        source=reward.get("source") or "user",
        comment=reward.get("comment"),
        details=reward.get("details") or {},
        tags=reward.get("tags") or [],
    )
    reward_id = reward.get("id") or f"rw-{uuid.uuid4().hex[:16]}"
    created_ns = time.time_ns()
    if row["rollout_id"] and not row["span_id"]:
        rollout = _locked_rollout(db, row["rollout_id"], shared=True)
        if rollout["ended_ns"] is not None:
            # Given after the end, whichever replica's clock stamps it.
            created_ns = max(created_ns, int(rollout["ended_ns"]) + 1)
    # A client-given id stored already (a retry, on this replica or another at the same
    # moment) inserts nothing, and answers as a repeat of it, or a conflict.
    inserted = db.execute(
        """
        insert into rewards (id, rollout_id, attempt_id, span_id, name, value, dimensions,
                             final, source, comment, details, tags, created_ns)
        values (:id, :rollout_id, :attempt_id, :span_id, :name, :value, :dimensions,
                :final, :source, :comment, :details, :tags, :created_ns)
        on conflict (id) do nothing
        """,
        {
            **row,
            "id": reward_id,
            "dimensions": _json(row["dimensions"], "{}"),
            "details": _json(row["details"], "{}"),
            "tags": _json(row["tags"], "[]"),
            "final": int(row["final"]),
            "created_ns": created_ns,
        },
    ).rowcount
    if not inserted:
        repeated = _repeated_reward(db, reward_id, row)
        assert repeated is not None
        return repeated, False
    stored = _one(db, "select * from rewards where id = :id", {"id": reward_id})
    assert stored is not None
    stored["final"] = bool(stored["final"])
    return stored, True


def _repeated_reward(db: Database, reward_id: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """The stored reward under `reward_id` if `row` repeats it; Conflict if it differs."""
    stored = _one(db, "select * from rewards where id = :id", {"id": reward_id})
    if stored is None:
        return None
    stored["final"] = bool(stored["final"])
    if any(stored.get(k) != row.get(k) for k in REWARD_FIELDS):
        raise Conflict(f"reward {reward_id!r} already exists with a different body")
    return stored


def replace_reward(db: Database, reward: dict[str, Any]) -> dict[str, Any]:
    """Store a reward under its id whatever was there before (a forced re-judgement).

    Only a reward of the same rollout is replaced: one of another rollout under this id is
    not this reward's to remove, and adding then raises `Conflict`.
    """
    with atomic(db):
        if reward.get("id"):
            db.execute(
                "delete from rewards where id = :id"
                " and rollout_id is not distinct from :rollout_id",
                {"id": reward["id"], "rollout_id": reward.get("rollout_id")},
            )
        return _add_reward(db, reward)[0]


def save_judge_run(db: Database, run: dict[str, Any]) -> None:
    """Insert or update a judge run's row (progress is saved as it goes); each save is also
    a heartbeat of the run's `owner`.

    A run that has ended is final: a progress save landing after the final one (both wait
    on a locked store in their own threads) leaves it as it is.
    """
    now = time.time_ns()
    db.execute(
        """
        insert into judge_runs (id, status, judge, params, total, judged, skipped, failed,
                                results, error, created_ns, updated_ns, ended_ns, owner,
                                heartbeat_ns)
        values (:id, :status, :judge, :params, :total, :judged, :skipped, :failed,
                :results, :error, :now, :now, :ended_ns, :owner, :now)
        on conflict (id) do update set
          status = excluded.status, total = excluded.total, judged = excluded.judged,
          skipped = excluded.skipped, failed = excluded.failed, results = excluded.results,
          error = excluded.error, updated_ns = excluded.updated_ns, ended_ns = excluded.ended_ns,
          heartbeat_ns = excluded.heartbeat_ns
        where judge_runs.status = 'running'
        """,
        {
            "id": run["id"],
            "status": run["status"],
            "judge": run["judge"],
            "params": _json(run.get("params"), "{}"),
            "total": run.get("total", 0),
            "judged": run.get("judged", 0),
            "skipped": run.get("skipped", 0),
            "failed": run.get("failed", 0),
            "results": _json(run.get("results"), "[]"),
            "error": run.get("error"),
            "now": now,
            "ended_ns": run.get("ended_ns"),
            "owner": run.get("owner"),
        },
    )


def beat_judge_runs(db: Database, owner: str) -> int:
    """Say that `owner` still runs its running judge runs. Returns how many."""
    cursor = db.execute(
        "update judge_runs set heartbeat_ns = :now where owner = :owner and status = 'running'",
        {"owner": owner, "now": time.time_ns()},
    )
    return int(cursor.rowcount)


def fail_abandoned_judge_runs(
    db: Database, *, stale_before_ns: int, gone: Callable[[str], bool], reason: str
) -> int:
    """Mark failed, with `reason`, the runs still `running` that no process is left to end:
    their owner's last heartbeat is older than `stale_before_ns` (a run saved before owners
    were recorded counts its last save), or `gone(owner)` says the owner has exited.
    Returns how many."""
    owners = db.execute(
        "select distinct owner from judge_runs where status = 'running' and owner is not null"
    ).fetchall()
    exited = [row[0] for row in owners if gone(row[0])]
    cursor = db.execute(
        f"""
        update judge_runs
        set status = 'failed', error = :reason, updated_ns = :now, ended_ns = :now
        where status = 'running'
          and (coalesce(heartbeat_ns, updated_ns) < :stale_before
               or owner in (select value from {json_table(dialect_of(db), ":exited", "o")}))
        """,
        {
            "reason": reason,
            "now": time.time_ns(),
            "stale_before": stale_before_ns,
            "exited": orjson.dumps(exited).decode(),
        },
    )
    return int(cursor.rowcount)


def get_judge_run(db: Database, run_id: str) -> dict[str, Any]:
    row = _one(db, "select * from judge_runs where id = :id", {"id": run_id})
    if row is None:
        raise NotFound(f"judge run {run_id!r} not found")
    for key in ("params", "results"):
        if isinstance(row.get(key), str):
            row[key] = orjson.loads(row[key])
    return row
