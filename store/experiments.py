"""What the store keeps for experiments: their configuration, promote/stop decisions, and the
reads that rebuild assignments and rewards from recorded spans."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import orjson
from sqlite_utils import Database

from store.backend import contains, dialect_of, json_field, json_table
from store.errors import NotFound

ACTIONS = ("promote", "stop", "resume")
# Kept in a stored configuration once a gateway starts without it: when it went.
REMOVED = "removed_ns"

# A span's experiment and variant live in its attributes; the text filter skips the JSON parse
# on the (many) spans no experiment touched. Only the gateway's calls (they have an
# `http_status`) count: an agent's span taken over OTLP may carry any attribute. Holes are
# filled per dialect by `_sql`.
ASSIGNMENTS_SQL = """
select coalesce(rollout_id, span_id) as unit,
       {experiment} as experiment,
       {variant} as variant
from spans
where {tagged}
  and {experiment} is not null
order by unit, seq
"""

# The same, for some units only: rollouts (by their index) and lone calls (by span id).
UNIT_ASSIGNMENTS_SQL = """
select coalesce(rollout_id, span_id) as unit,
       {experiment} as experiment,
       {variant} as variant
from spans
where (rollout_id in (select u.value from {units})
       or (rollout_id is null and span_id in (select u.value from {units})))
  and {tagged}
  and {experiment} is not null
order by unit, seq
"""

# The variant of a rollout's first call under the experiment, as the analysis counts it.
ROLLOUT_VARIANT_SQL = """
select {variant} as variant
from spans
where rollout_id = :rollout_id
  and {tagged}
  and {experiment} = :name
order by seq
limit 1
"""

EXPERIMENT_SPANS_SQL = """
select span_id,
       rollout_id,
       seq,
       {variant} as variant,
       status,
       duration_ms,
       cost_usd
from spans
where {tagged}
  and {experiment} = :name
"""

# The reward that decides a unit (rollout, or call without one): the newest final one, else
# the newest.
UNIT_REWARDS_SQL = """
select rowid, rollout_id, span_id, value, final
from rewards
where name = :name
order by final, created_ns, rowid
"""

REWARDS_AFTER_SQL = """
select rowid, rollout_id, span_id, name, value, final
from rewards
where rowid > :after
  and name in (select n.value from {names})
order by rowid
"""


@lru_cache(maxsize=16)
def _sql(sql: str, dialect: str) -> str:
    return sql.format(
        experiment=json_field(dialect, "attributes", "experiment"),
        variant=json_field(dialect, "attributes", "variant"),
        tagged="http_status is not null and " + contains(dialect, "attributes", "'\"experiment\"'"),
        names=json_table(dialect, ":names", "n"),
        units=json_table(dialect, ":units", "u"),
    )


def _rows(db: Database, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    cursor = db.execute(_sql(sql, dialect_of(db)), params or {})
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def save_configs(db: Database, configs: list[dict[str, Any]]) -> None:
    """Record each experiment as the gateway runs it (the newest configuration wins), and
    mark every other stored one removed: no call of this gateway touches it any more."""
    now = time.time_ns()
    for config in configs:
        db.execute(
            """
            insert into experiments (name, config, updated_ns)
            values (:name, :config, :now)
            on conflict (name) do update set config = excluded.config,
                                             updated_ns = excluded.updated_ns
            """,
            {"name": config["name"], "config": orjson.dumps(config).decode(), "now": now},
        )
    running = {config["name"] for config in configs}
    for name, config in list_configs(db).items():
        if name not in running and REMOVED not in config:
            db.execute(
                "update experiments set config = :config, updated_ns = :now where name = :name",
                {
                    "name": name,
                    "config": orjson.dumps({**config, REMOVED: now}).decode(),
                    "now": now,
                },
            )


def list_configs(db: Database) -> dict[str, dict[str, Any]]:
    """Every experiment a gateway ran, by name; one since taken out of the configuration
    carries `removed_ns` (a gateway that runs it again saves it afresh)."""
    rows = _rows(db, "select name, config from experiments order by name")
    return {row["name"]: orjson.loads(row["config"]) for row in rows}


def get_config(db: Database, name: str) -> dict[str, Any]:
    found = list_configs(db).get(name)
    if found is None:
        raise NotFound(f"no experiment named {name!r}")
    return found


def decide(
    db: Database, experiment: str, action: str, variant: str | None = None
) -> dict[str, Any]:
    """Record a promote, stop or resume; it is in force from now until the next one."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    now = time.time_ns()
    # `returning`, not `lastrowid`: PostgreSQL's cursor has none.
    row = db.execute(
        """
        insert into experiment_decisions (experiment, action, variant, created_ns)
        values (:experiment, :action, :variant, :now)
        returning id
        """,
        {"experiment": experiment, "action": action, "variant": variant, "now": now},
    ).fetchall()[0]
    return {
        "id": row[0],
        "experiment": experiment,
        "action": action,
        "variant": variant,
        "created_ns": now,
    }


def decisions(db: Database) -> dict[str, dict[str, Any]]:
    """The decision in force for each experiment that has one (`resume` means none)."""
    rows = _rows(
        db,
        """
        select d.id, d.experiment, d.action, d.variant, d.created_ns
        from experiment_decisions d
        join (select experiment, max(id) as id from experiment_decisions group by experiment) m
          on m.id = d.id
        """,
    )
    return {row["experiment"]: row for row in rows if row["action"] != "resume"}


def assignments(db: Database) -> list[dict[str, Any]]:
    """Each unit's (rollout's, or lone call's) first experiment and variant, from its spans."""
    return _first_of_each(_rows(db, ASSIGNMENTS_SQL))


def unit_assignments(db: Database, units: list[str]) -> list[dict[str, Any]]:
    """`assignments` of these units only."""
    if not units:
        return []
    params = {"units": orjson.dumps(units).decode()}
    return _first_of_each(_rows(db, UNIT_ASSIGNMENTS_SQL, params))


def rollout_variant(db: Database, name: str, rollout_id: str) -> str | None:
    """The variant the rollout ran under experiment `name`; None if it has no call there."""
    rows = _rows(db, ROLLOUT_VARIANT_SQL, {"name": name, "rollout_id": rollout_id})
    return str(rows[0]["variant"]) if rows and rows[0]["variant"] is not None else None


def _first_of_each(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of each (unit, experiment), from rows ordered by unit and seq."""
    seen: set[tuple[str, str]] = set()
    found = []
    for row in rows:
        key = (row["unit"], row["experiment"])
        if key not in seen:
            seen.add(key)
            found.append(row)
    return found


def experiment_spans(db: Database, name: str) -> list[dict[str, Any]]:
    return _rows(db, EXPERIMENT_SPANS_SQL, {"name": name})


def unit_rewards(db: Database, reward_name: str) -> dict[str, float]:
    """Reward by rollout id, and by span id for rewards on calls outside any rollout."""
    rewards: dict[str, float] = {}
    # Ordered so the reward that decides is written last.
    for row in _rows(db, UNIT_REWARDS_SQL, {"name": reward_name}):
        unit = row["rollout_id"] or row["span_id"]
        if unit:
            rewards[unit] = row["value"]
    return rewards


def rewards_after(db: Database, after: int, names: list[str]) -> list[dict[str, Any]]:
    """Rewards of these names stored after rowid `after` (by any process), oldest first."""
    return _rows(db, REWARDS_AFTER_SQL, {"after": after, "names": orjson.dumps(names).decode()})


def last_reward_rowid(db: Database) -> int:
    row = db.execute("select coalesce(max(rowid), 0) from rewards").fetchone()
    return int(row[0])
