"""Rubrics for the `llm` judge: criteria with descriptions and weights, built in or from YAML."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Criterion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$")
    description: str
    weight: float = Field(1.0, gt=0)


class Rubric(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str = ""
    instructions: str = ""
    criteria: list[Criterion] = Field(..., min_length=1)

    def weights(self) -> dict[str, float]:
        return {c.name: c.weight for c in self.criteria}

    def fingerprint(self) -> str:
        """The version, or a hash of the rubric's content when none is given."""
        if self.version:
            return self.version
        text = self.model_dump_json(exclude={"version"})
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEFAULT_RUBRIC = Rubric(
    name="llm",
    version="llm-1",
    instructions=(
        "You judge how well an AI agent did a task, from the full record of its model calls: "
        "what it was asked, each step it took, the tools it called and what they returned, "
        "the errors it met, and its final answer."
    ),
    criteria=[
        Criterion(
            name="task_completion",
            description="Did the final answer accomplish what the task asked, correctly and fully?",
            weight=3.0,
        ),
        Criterion(
            name="tool_efficiency",
            description="Were tools chosen well and called without waste, repetition or misuse?",
        ),
        Criterion(
            name="decision_quality",
            description="Were the agent's intermediate decisions sound given what it knew?",
            weight=1.5,
        ),
        Criterion(
            name="error_handling",
            description="When something failed, did the agent notice and recover sensibly?",
        ),
    ],
)


class RubricError(ValueError):
    """A rubric file that cannot be used; the message names the problem."""


def load_rubric(path: str | Path, name: str | None = None) -> Rubric:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RubricError(f"cannot read rubric {path}: {exc}") from exc
    if isinstance(data, dict) and name and "name" not in data:
        data["name"] = name
    try:
        return Rubric.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RubricError(f"rubric {path}: {where}: {first['msg']}") from exc
