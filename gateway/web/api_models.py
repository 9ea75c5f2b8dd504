"""Request and response shapes of the `/api` routes; they validate input and feed /openapi.json."""

from __future__ import annotations

import re
from typing import Any, Literal, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    create_model,
    model_validator,
)

from config.models import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_SUPPORT,
    DEFAULT_REWARD_NAME,
    DEFAULT_SUCCESS_THRESHOLD,
    MAX_WEIGHT,
    BudgetLimits,
)
from gateway.proxy.record import SpanRecord
from store.schema import SPAN_IDENTITY

RolloutStatus = Literal["running", "succeeded", "failed", "cancelled", "timeout"]
# Never only dots: `.` and `..` are path segments a browser resolves away (/ui/rollouts/..
# opens /ui/). Compiled, so pydantic matches it with `re` (its own engine has no lookahead);
# `(?!\n)` because `re`'s `$` also matches before a final newline.
ID_PATTERN = re.compile(r"^(?!\.+$)[A-Za-z0-9._:@+=~-]{1,256}$(?!\n)")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- requests -------------------------------------------------------------


class BudgetBody(BudgetLimits):
    """The rollout's own limits (they replace config defaults); `null` removes one."""

    attempt: BudgetLimits | None = Field(None, description="Limits on each attempt.")

    def stored(self) -> dict[str, Any]:
        """`{"rollout": {...}, "attempt": {...}}` with only the limits the client named."""
        given = self.model_dump(exclude_unset=True)
        return {"rollout": {k: v for k, v in given.items() if k != "attempt"}} | (
            {"attempt": given["attempt"] or {}} if "attempt" in given else {}
        )


class RolloutCreate(_Body):
    id: str | None = Field(
        None, pattern=ID_PATTERN, description="Client-chosen id; generated if absent."
    )
    input: Any = Field(None, description="The task given to the agent (any JSON).")
    agent: str | None = Field(None, max_length=256, description="Which agent runs it.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form metadata.")
    tags: list[str] = Field(
        default_factory=list, max_length=64, description="Labels for filtering."
    )
    mode: Literal["train", "val"] | None = Field(
        None,
        description="Training or validation: calls get the model group's `modes` parameters "
        "and record the mode; kept in `metadata.mode`.",
    )
    budget: BudgetBody | None = Field(None, description="The rollout's own budget.")


class RolloutUpdate(_Body):
    status: RolloutStatus | None = Field(None, description="New status; terminal ones are final.")
    metadata: dict[str, Any] | None = Field(None, description="Merged into the stored metadata.")
    tags: list[str] | None = Field(None, max_length=64, description="Replaces the stored tags.")
    budget: BudgetBody | None = Field(None, description="Merged into the rollout's budget.")


class AttemptCreate(_Body):
    id: str | None = Field(
        None, pattern=ID_PATTERN, description="Attempt id; defaults to its number."
    )


class AttemptUpdate(_Body):
    status: RolloutStatus = Field(..., description="New status; terminal ones are final.")


class RewardCreate(_Body):
    id: str | None = Field(
        None, pattern=ID_PATTERN, description="Client-given id: makes the post idempotent."
    )
    rollout_id: str | None = Field(None, description="Target a rollout (or scope an attempt).")
    attempt_id: str | None = Field(None, description="Target an attempt (needs rollout_id).")
    span_id: str | None = Field(None, description="Target one recorded call by its span id.")
    response_id: str | None = Field(
        None, description="Target one call by the provider's response id (the `id` the client got)."
    )
    name: str = Field(
        DEFAULT_REWARD_NAME, min_length=1, max_length=128, description="Which reward."
    )
    value: float = Field(..., allow_inf_nan=False, description="The reward value.")
    dimensions: dict[str, FiniteFloat] = Field(
        default_factory=dict, description='Per-dimension scores, e.g. {"accuracy": 0.9}.'
    )
    final: bool = Field(False, description="The outcome of the rollout or attempt, not a step.")
    source: str = Field("user", max_length=128, description="`user`, `agent`, `judge:<name>`...")
    comment: str | None = Field(None, max_length=10_000, description="Free text.")
    details: dict[str, Any] = Field(default_factory=dict, description="Any structured detail.")
    tags: list[str] = Field(default_factory=list, max_length=64, description="Labels.")

    @model_validator(mode="after")
    def _has_target(self) -> RewardCreate:
        if self.attempt_id and not self.rollout_id:
            raise ValueError("attempt_id needs rollout_id")
        if not (self.rollout_id or self.span_id or self.response_id):
            raise ValueError("a reward needs a target: rollout_id, span_id or response_id")
        return self


class _Page(_Body):
    """What every listing takes: where the last page ended, and how many rows."""

    cursor: str | None = None
    limit: int = Field(100, ge=1, le=1000)


class RolloutQuery(_Page):
    status: RolloutStatus | None = None
    agent: str | None = None
    tag: str | None = None
    since: str | None = Field(None, description="ISO 8601 time or a duration ago (`1h`, `7d`).")
    until: str | None = Field(None, description="ISO 8601 time or a duration ago.")
    limit: int = Field(50, ge=1, le=1000)


class SpanQuery(_Page):
    rollout_id: str | None = None
    attempt_id: str | None = None
    model: str | None = None
    status: Literal["ok", "error", "cancelled"] | None = None
    tag: str | None = None
    since: str | None = None
    until: str | None = None


class SpanStreamQuery(SpanQuery):
    after: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="Resume after this event id (same as the Last-Event-ID header).",
    )


class RewardQuery(_Page):
    rollout_id: str | None = None
    attempt_id: str | None = None
    span_id: str | None = None
    name: str | None = None
    source: str | None = None


class ExportQuery(_Body):
    format: Literal["jsonl", "triplets"] = Field(
        "jsonl", description="Whole tree or a line per call."
    )
    reward_name: str = Field(DEFAULT_REWARD_NAME, description="Which reward the triplets carry.")
    reward_rule: Literal["every", "last", "discounted"] = Field(
        "every", description="How the rollout's reward is spread over its turns."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per later turn (`discounted`).")


class ModelRegistration(_Body):
    model: str = Field(
        ..., min_length=1, max_length=256, description="Model group (what clients send)."
    )
    api_base: str = Field(
        ...,
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
        description="OpenAI-compatible base URL (vLLM, SGLang), ending in `/v1`; one "
        "deployment per `api_base` in a group, so posting it again replaces it.",
    )
    version: str = Field(
        ..., min_length=1, max_length=256, description="Model version, recorded on spans."
    )
    api_key: str | None = Field(
        None, description="Key sent upstream; kept in memory only, never stored."
    )
    weight: float = Field(
        1.0, gt=0, le=MAX_WEIGHT, description="Relative share of the group's traffic."
    )
    upstream_model: str | None = Field(
        None, max_length=256, description="Model name the upstream serves (default: `model`)."
    )


class ModelRemoval(_Body):
    model: str = Field(..., min_length=1, description="Model group.")
    api_base: str = Field(..., min_length=1, description="The deployment's base URL.")


class PauseRequest(_Body):
    reason: str | None = Field(None, max_length=1024, description="Why, shown in the state.")
    retry_after_seconds: float | None = Field(
        None, ge=0, le=86400, description="`Retry-After` of rejected calls (`reject` mode)."
    )
    mode: Literal["hold", "reject"] = Field(
        "hold",
        description="`hold`: new calls wait (up to `pause.max_hold_seconds`) and go on after "
        "resume; `reject`: they get 429 with `Retry-After`.",
    )


class ProxyState(_Out):
    paused: bool
    reason: str | None
    mode: str | None
    retry_after_seconds: float | None
    in_flight: int
    held: int


class ModelDeployment(_Out):
    model: str
    api_base: str | None
    provider: str
    upstream_model: str
    version: str | None
    weight: float
    registered: bool


class ModelList(_Out):
    data: list[ModelDeployment]


class JudgeRunCreate(_Body):
    judge: str = Field("rules", description="`rules`, `llm`, or a rubric named in the config.")
    rollout_ids: list[str] | None = Field(
        None, min_length=1, max_length=10_000, description="Exactly these (at least one)."
    )
    since: str | None = Field(None, description="Rollouts created since (ISO 8601 or `1h`).")
    status: RolloutStatus | None = Field(None, description="Only rollouts with this status.")
    agent: str | None = Field(None, description="Only this agent's rollouts.")
    sample: float | None = Field(None, gt=0, le=1, description="Judge this share (stable choice).")
    concurrency: int = Field(4, ge=1, le=64, description="Rollouts judged at once.")
    force: bool = Field(
        False, description="Judge again rollouts this judge version already judged."
    )


class StatsQuery(_Body):
    since: str | None = None


# -- responses ------------------------------------------------------------


class Rollout(_Out):
    id: str
    status: RolloutStatus
    agent: str | None
    input: Any
    metadata: dict[str, Any]
    tags: list[str]
    created_ns: int
    updated_ns: int
    ended_ns: int | None
    budget: dict[str, Any] | None = Field(None, description="The budget set over the API.")


class Attempt(_Out):
    rollout_id: str
    id: str
    number: int
    status: RolloutStatus
    created_ns: int
    updated_ns: int
    ended_ns: int | None


# The span fields every listing and `GET /api/spans/{id}` document (the rest come along too:
# `_Out` keeps extra keys), each typed as the span record types it.
SPAN_SUMMARY = (
    *SPAN_IDENTITY,
    "status",
    "http_status",
    "upstream_status",
    "start_ns",
    "end_ns",
    "duration_ms",
    "input_tokens",
    "output_tokens",
    "cost_usd",
)
_SPAN_TYPES = get_type_hints(SpanRecord) | {"status": Literal["ok", "error", "cancelled"]}
Span = create_model(  # type: ignore[call-overload]
    "Span", __base__=_Out, **{name: (_SPAN_TYPES[name], ...) for name in SPAN_SUMMARY}
)


class Reward(_Out):
    id: str
    rollout_id: str | None
    attempt_id: str | None
    span_id: str | None
    name: str
    value: float
    dimensions: dict[str, Any]
    final: bool
    source: str
    comment: str | None
    details: dict[str, Any]
    tags: list[str]
    created_ns: int


class RolloutPage(_Out):
    data: list[Rollout]
    next_cursor: str | None


class SpanPage(_Out):
    data: list[Span]
    next_cursor: str | None


class RewardPage(_Out):
    data: list[Reward]
    next_cursor: str | None


class RolloutDetail(Rollout):
    attempts: list[dict[str, Any]]
    rewards: list[Reward]
    summary: dict[str, Any]
    budget_usage: dict[str, Any] | None = Field(
        None, description="Limits in force, used and remaining (rollout and attempts)."
    )


class Stats(_Out):
    totals: dict[str, Any]
    by_model: list[dict[str, Any]]
    rollouts_by_status: dict[str, int]


class JudgeRun(_Out):
    id: str
    status: Literal["running", "succeeded", "failed", "cancelled"]
    judge: str
    params: dict[str, Any]
    total: int
    judged: int
    skipped: int
    failed: int
    results: list[dict[str, Any]]
    error: str | None
    created_ns: int
    updated_ns: int
    ended_ns: int | None
    owner: str | None = Field(None, description="The gateway process running it.")
    heartbeat_ns: int | None = Field(None, description="When that process last said so.")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(_Out):
    error: ErrorDetail


# -- patterns and guidelines ----------------------------------------------


class LeaderboardQuery(_Body):
    since: str | None = Field(None, description="Rollouts created since (ISO 8601 or `7d`).")
    agent: str | None = Field(None, description="Only this agent's rollouts.")
    reward_name: str = Field(
        DEFAULT_REWARD_NAME,
        min_length=1,
        max_length=128,
        description="The reward that decides success.",
    )
    success_threshold: float = Field(
        DEFAULT_SUCCESS_THRESHOLD,
        allow_inf_nan=False,
        description="Success is a reward at least this.",
    )


class PatternsQuery(LeaderboardQuery):
    min_support: int = Field(
        DEFAULT_MIN_SUPPORT,
        ge=1,
        le=1_000_000_000,
        description="Test a feature shown by at least this many attempts.",
    )
    alpha: float = Field(
        DEFAULT_ALPHA,
        gt=0,
        le=1,
        description="Report findings with a Benjamini-Hochberg q at most this.",
    )


class Evidence(_Out):
    rollout_id: str
    attempt_id: str
    span_id: str


class Finding(_Out):
    kind: Literal["success_pattern", "failure_pattern"]
    feature: str = Field(
        description="`tools:a → b`, `tool_error:x`, `error:type`, `finish:reason`."
    )
    description: str
    support: int = Field(description="Attempts that show the feature.")
    effect: float = Field(description="Success rate with the feature minus without it.")
    odds_ratio: float | None = Field(description="Sample odds ratio; null when infinite.")
    ci_low: float
    ci_high: float
    p_value: float = Field(description="Fisher's exact test, two-sided.")
    q_value: float = Field(description="Benjamini-Hochberg across every feature tested.")
    rate_with: float
    rate_without: float
    evidence: list[Evidence]


class ToolStats(_Out):
    tool: str
    calls: int
    attempts: int
    executions: int = Field(description="`execute_tool` spans seen for the tool.")
    error_rate: float | None
    median_duration_ms: float | None
    reward_with: float | None
    reward_without: float | None
    p_value: float | None = Field(description="Mann-Whitney U, reward with versus without.")


class LeaderboardRow(_Out):
    model: str | None = Field(None, description="Set in the by-model board.")
    agent: str | None = Field(None, description="Set in the by-agent board.")
    model_version: str | None = Field(None, description="Set in the by-model-version board.")
    rollouts: int
    attempts: int
    success_rate: float | None
    mean_reward: float | None
    reward_ci_low: float | None
    reward_ci_high: float | None
    mean_cost_usd: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    cost_per_reward_point: float | None


class Leaderboards(_Out):
    models: list[LeaderboardRow]
    agents: list[LeaderboardRow]
    model_versions: list[LeaderboardRow]


class Outlier(_Out):
    rollout_id: str
    agent: str
    measure: Literal["slowest", "most_expensive"]
    value: float
    agent_median: float
    ratio: float


class Patterns(_Out):
    attempts: int
    with_outcome: int
    success_patterns: list[Finding]
    failure_patterns: list[Finding]
    tools: list[ToolStats]
    leaderboards: Leaderboards
    outliers: list[Outlier]
    tests_run: int
    alpha: float
    min_support: int


class GuidelineVersion(_Out):
    agent: str
    version: int
    note: str | None
    created_ns: int
    chars: int


class Guideline(_Out):
    agent: str
    version: int
    content: str = Field(description="Markdown; never applied to any prompt automatically.")
    findings: list[dict[str, Any]]
    note: str | None
    created_ns: int


class Guidelines(_Out):
    agent: str
    versions: list[GuidelineVersion]
    latest: Guideline | None
