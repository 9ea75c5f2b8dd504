"""What a judge returns, and how it is stored: a reward with `source = judge:<name>`."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import BaseModel, Field

REWARD_NAME = "judge"


class CriterionScore(BaseModel):
    score: float = Field(..., ge=0, le=1, description="0 (bad) to 1 (good).")
    explanation: str = Field("", description="Why, in a sentence or two.")
    evidence: list[str] = Field(default_factory=list, description="Span ids that show it.")


class Verdict(BaseModel):
    judge: str
    rubric_version: str
    rollout_id: str
    score: float = Field(..., ge=0, le=1)
    criteria: dict[str, CriterionScore]
    evidence: list[str] = Field(default_factory=list)
    summary: str = ""


MAX_ID_CHARS = 256
_NOT_ID = re.compile(r"[^A-Za-z0-9._:@+=~-]")
_HASH_CHARS = 16


def derived_id(raw: str) -> str:
    """`raw` as a store id: at most 256 characters, all of them id characters.

    An id that already fits is kept as it is (stored verdicts keep their ids); one that is
    too long or holds other characters keeps a prefix and ends with a hash of all of `raw`,
    so two ids that differ only past the cut, or only in a replaced character, stay apart.
    """
    clean = _NOT_ID.sub("_", raw)
    if clean == raw and len(raw) <= MAX_ID_CHARS:
        return raw
    digest = hashlib.sha256(raw.encode()).hexdigest()[:_HASH_CHARS]
    return f"{clean[: MAX_ID_CHARS - _HASH_CHARS - 1]}~{digest}"


def reward_id(judge: str, rubric_version: str, rollout_id: str) -> str:
    """The same judge and rubric version always write the same reward id, so reruns skip."""
    return derived_id(f"judge-{judge}-{rubric_version}-{rollout_id}")


def weighted_score(criteria: dict[str, CriterionScore], weights: dict[str, float]) -> float:
    total = sum(weights.get(name, 1.0) for name in criteria)
    if not total:
        return 0.0
    return sum(c.score * weights.get(name, 1.0) for name, c in criteria.items()) / total


def as_reward(verdict: Verdict) -> dict[str, Any]:
    """The reward row body (for store.writes.add_reward)."""
    return {
        "id": reward_id(verdict.judge, verdict.rubric_version, verdict.rollout_id),
        "rollout_id": verdict.rollout_id,
        "name": REWARD_NAME,
        "value": round(verdict.score, 6),
        "dimensions": {name: round(c.score, 6) for name, c in verdict.criteria.items()},
        "final": False,
        "source": f"judge:{verdict.judge}",
        "comment": verdict.summary or None,
        "details": {
            "rubric_version": verdict.rubric_version,
            "criteria": {name: c.model_dump() for name, c in verdict.criteria.items()},
            "evidence": verdict.evidence,
        },
        "tags": ["judge"],
    }
