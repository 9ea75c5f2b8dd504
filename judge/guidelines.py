"""Versioned guidelines per agent, written from the findings; nothing is applied to any prompt.

A guideline is Markdown a person reads and decides on. Versions only grow: a rollback
writes the old text again as the newest version, so history is never rewritten.
"""

from __future__ import annotations

import difflib
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from sqlite_utils import Database
from tenacity import Retrying, retry_if_exception, stop_after_attempt

from store.backend import atomic, dialect_of
from store.errors import NotFound

# Versions lost to other writers before giving up (each loss means another version landed).
VERSION_RACE_ATTEMPTS = 5


def _pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def render_guideline(agent: str, analysis: dict[str, Any], version: int) -> str:
    """Markdown: what to keep doing and what to avoid, each with its evidence."""
    lines = [
        f"# Guideline for `{agent}` (version {version})",
        "",
        f"From {analysis['with_outcome']} attempts with a known outcome "
        f"({analysis['tests_run']} patterns tested, false discovery rate {analysis['alpha']}).",
        "",
        "## Keep doing",
        "",
    ]
    keep = analysis["success_patterns"]
    avoid = analysis["failure_patterns"]
    for finding in keep or []:
        lines.append(_bullet(finding))
    if not keep:
        lines.append("- Nothing stands out yet.")
    lines += ["", "## Avoid", ""]
    for finding in avoid or []:
        lines.append(_bullet(finding))
    if not avoid:
        lines.append("- Nothing stands out yet.")
    risky = [t for t in analysis["tools"] if (t.get("error_rate") or 0) >= 0.2]
    if risky:
        lines += ["", "## Tools that often fail", ""]
        for tool in risky:
            lines.append(
                f"- `{tool['tool']}` returns an error in {_pct(tool['error_rate'])} of "
                f"{tool['executions']} executions."
            )
    return "\n".join(lines) + "\n"


def _bullet(finding: dict[str, Any]) -> str:
    examples = ", ".join(f"`{e['rollout_id']}`" for e in finding["evidence"][:3])
    return (
        f"- {finding['description'][0].upper()}{finding['description'][1:]}: "
        f"{_pct(finding['rate_with'])} succeed with it vs {_pct(finding['rate_without'])} without "
        f"({finding['support']} attempts, q = {finding['q_value']:.2g}). Examples: {examples}."
    )


def write_guideline(
    db: Database, agent: str, content: str, findings: list[dict[str, Any]], note: str | None = None
) -> dict[str, Any]:
    """`content` as the agent's next version."""
    return write_next_guideline(db, agent, lambda _version: content, findings, note)


def write_next_guideline(
    db: Database,
    agent: str,
    compose: Callable[[int], str],
    findings: list[dict[str, Any]],
    note: str | None = None,
) -> dict[str, Any]:
    """The agent's next version, its text `compose(version)` (the text names its version).

    The version is read and written in one transaction. Writers on one PostgreSQL store take
    the agent's advisory lock first, so they go one at a time (SQLite's write lock does the
    same); one that still loses the version to another writer (one that took no lock) reads
    again and writes the version after it.
    """
    retrying = Retrying(
        retry=retry_if_exception(_version_taken),
        stop=stop_after_attempt(VERSION_RACE_ATTEMPTS),
        reraise=True,
    )
    for attempt in retrying:
        with attempt, atomic(db):
            if dialect_of(db) == "postgresql":
                db.execute("select pg_advisory_xact_lock(hashtext(:agent))", {"agent": agent})
            version = latest_version(db, agent) + 1
            db.execute(
                """
                insert into guidelines (agent, version, content, findings, note, created_ns)
                values (:agent, :version, :content, :findings, :note, :now)
                """,
                {
                    "agent": agent,
                    "version": version,
                    "content": compose(version),
                    "findings": orjson.dumps(findings).decode(),
                    "note": note,
                    "now": time.time_ns(),
                },
            )
    return get_guideline(db, agent, version)


def _version_taken(exc: BaseException) -> bool:
    """The (agent, version) key was written by another writer first."""
    if isinstance(exc, sqlite3.IntegrityError):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.errors.UniqueViolation)


def latest_version(db: Database, agent: str) -> int:
    row = db.execute(
        "select coalesce(max(version), 0) from guidelines where agent = ?", [agent]
    ).fetchone()
    return int(row[0])


def get_guideline(db: Database, agent: str, version: int | None = None) -> dict[str, Any]:
    version = version or latest_version(db, agent)
    cursor = db.execute(
        "select * from guidelines where agent = ? and version = ?", [agent, version]
    )
    row = cursor.fetchone()
    if row is None:
        raise NotFound(f"no guideline version {version} for agent {agent!r}")
    found = dict(zip([d[0] for d in cursor.description], row, strict=True))
    found["findings"] = orjson.loads(found["findings"])
    return found


def list_guidelines(db: Database, agent: str) -> list[dict[str, Any]]:
    cursor = db.execute(
        "select agent, version, note, created_ns, length(content) as chars "
        "from guidelines where agent = ? order by version",
        [agent],
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def diff_guidelines(db: Database, agent: str, old: int, new: int) -> str:
    before, after = get_guideline(db, agent, old), get_guideline(db, agent, new)
    return "".join(
        difflib.unified_diff(
            before["content"].splitlines(keepends=True),
            after["content"].splitlines(keepends=True),
            fromfile=f"{agent} v{old}",
            tofile=f"{agent} v{new}",
        )
    )


def rollback_guideline(db: Database, agent: str, version: int) -> dict[str, Any]:
    """Make an old version current again, as a new version that says where it came from."""
    old = get_guideline(db, agent, version)
    return write_next_guideline(
        db, agent, lambda _new: str(old["content"]), old["findings"], note=f"rollback to v{version}"
    )
