"""The pause state shared by every replica: one row, written by `/api/proxy/pause` and
`/resume`, read by each replica every `pause.sync_seconds`."""

from __future__ import annotations

import time
from typing import Any

from store.queries import _rows

SAVE_SQL = """
insert into proxy_state (id, paused, mode, reason, retry_after, updated_ns)
values (1, :paused, :mode, :reason, :retry_after, :updated_ns)
on conflict (id) do update set
  paused = excluded.paused,
  mode = excluded.mode,
  reason = excluded.reason,
  retry_after = excluded.retry_after,
  updated_ns = excluded.updated_ns
"""
LOAD_SQL = "select paused, mode, reason, retry_after, updated_ns from proxy_state where id = 1"


def save_pause(db: Any, state: dict[str, Any]) -> int:
    """Store `state` (`paused`, `mode`, `reason`, `retry_after`); returns its time (ns)."""
    updated_ns = time.time_ns()
    params = {
        "paused": 1 if state.get("paused") else 0,
        "mode": state.get("mode"),
        "reason": state.get("reason"),
        "retry_after": state.get("retry_after"),
        "updated_ns": updated_ns,
    }
    db.execute(SAVE_SQL, params)
    return updated_ns


def load_pause(db: Any) -> dict[str, Any] | None:
    """The stored pause state, or None when no pause was ever sent."""
    found = _rows(db, LOAD_SQL, {})
    return found[0] if found else None
