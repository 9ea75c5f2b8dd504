"""Pydantic models for `spangate.yaml`: every key, its default and what it means."""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8400
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_UPSTREAM_TIMEOUT = 600.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_QUEUE_SIZE = 50_000
DEFAULT_BATCH_SIZE = 2000
DEFAULT_FLUSH_INTERVAL = 0.2
DEFAULT_MAX_UNSAVED_SECONDS = 1.0
DEFAULT_MEMORY_BUFFER = 200_000
DEFAULT_STORE_BUSY_TIMEOUT = 0.25
DEFAULT_API_WRITE_TIMEOUT = 10.0
DEFAULT_MOCK_LATENCY = 0.0
DEFAULT_FIRST_TOKEN_TIMEOUT = 120.0
DEFAULT_RETRY_ATTEMPTS = 3
DEFAULT_BACKOFF_INITIAL = 0.5
DEFAULT_BACKOFF_MAX = 8.0
DEFAULT_BACKOFF_JITTER = 0.5
DEFAULT_RETRY_AFTER_CAP = 30.0
# A deployment's share: the group's weights must sum to a finite number to be drawn from.
MAX_WEIGHT = 1_000_000.0
# 529 is Anthropic's "overloaded".
DEFAULT_RETRY_STATUSES = (408, 409, 429, 500, 502, 503, 504, 529)
DEFAULT_FAIL_MAX = 5
DEFAULT_RESET_TIMEOUT = 30.0
DEFAULT_RATE_LIMIT_WAIT = 5.0
DEFAULT_MAX_TOKENS_ESTIMATE = 256
# Analysis defaults shared by the API, the CLI and the judge (patterns, leaderboards, export).
DEFAULT_REWARD_NAME = "reward"
DEFAULT_MIN_SUPPORT = 5
DEFAULT_ALPHA = 0.05
DEFAULT_SUCCESS_THRESHOLD = 0.5
DEFAULT_MAX_JUDGE_RUNS = 4
# Bounds on what clients and upstreams can make the gateway hold or wait for.
DEFAULT_HEADER_TIMEOUT = 60.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_WRITE_TIMEOUT = 60.0
DEFAULT_MAX_SSE_SUBSCRIBERS = 1000
DEFAULT_MAX_UPSTREAM_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_STREAM_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_STREAM_SECONDS = 1800.0
DEFAULT_MAX_STORED_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_LABEL_VALUES = 100
DEFAULT_SERVICE_NAME = "spangate"
DEFAULT_OTLP_QUEUE_SIZE = 20_000
DEFAULT_OTLP_BATCH_SIZE = 512
DEFAULT_OTLP_FLUSH_INTERVAL = 1.0
DEFAULT_OTLP_TIMEOUT = 10.0
DEFAULT_OTLP_RETRY_ATTEMPTS = 5
DEFAULT_OTLP_RETRY_AFTER_CAP = 30.0
DEFAULT_OTLP_SHUTDOWN_TIMEOUT = 5.0
DEFAULT_OTLP_INGEST_MAX_BYTES = 8 * 1024 * 1024
# Experiments: every variant keeps at least this share of new rollouts under `thompson`.
DEFAULT_EXPERIMENT_FLOOR = 0.05
# Strict, because people look at a running experiment every day and each look is a test.
DEFAULT_EXPERIMENT_ALPHA = 0.01
DEFAULT_EXPERIMENT_SUCCESS_THRESHOLD = 0.5
DEFAULT_EXPERIMENT_REFRESH = 1.0
DEFAULT_MAX_HOLD_SECONDS = 300.0
DEFAULT_PAUSE_RETRY_AFTER = 5.0
DEFAULT_SYNC_SECONDS = 1.0
# A rollout's budget counters outlive its last call by this long in Redis (a week).
DEFAULT_BUDGET_STATE_TTL = 7 * 24 * 3600.0
DEFAULT_STORE_URL = "spangate.db"
DEFAULT_RETENTION_BATCH = 500
DEFAULT_RETENTION_INTERVAL = 300.0
# Client headers a deployment receives: all of them (bar the ones never forwarded), none denied.
DEFAULT_FORWARD_HEADERS_ALLOW = ("*",)
DEFAULT_FORWARD_HEADERS_DENY: tuple[str, ...] = ()
# How a tool's result is judged an error (`tools.error_when`); see README "Recording an agent".
DEFAULT_TOOL_ERROR_WHEN: Literal["default"] = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Timeouts(_Strict):
    """Seconds allowed for each phase of one upstream call."""

    connect: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0, description="To open the connection.")
    first_token: float = Field(
        DEFAULT_FIRST_TOKEN_TIMEOUT,
        gt=0,
        description="Streams: until the first chunk arrives (retries are still possible).",
    )
    total: float = Field(DEFAULT_UPSTREAM_TIMEOUT, gt=0, description="For the whole call.")


class Backoff(_Strict):
    """Exponential backoff between tries: initial * 2^n, capped, plus random jitter."""

    initial: float = Field(DEFAULT_BACKOFF_INITIAL, ge=0, description="First wait, seconds.")
    max: float = Field(DEFAULT_BACKOFF_MAX, ge=0, description="Longest wait, seconds.")
    jitter: float = Field(
        DEFAULT_BACKOFF_JITTER, ge=0, description="Up to this many seconds added at random."
    )


class RetryPolicy(_Strict):
    """When and how a failed upstream try is repeated (never after a byte reached the client)."""

    attempts: int = Field(
        DEFAULT_RETRY_ATTEMPTS, ge=1, description="Tries per model group, the first included."
    )
    backoff: Backoff = Field(default_factory=Backoff, description="Waits between tries.")
    on_status: list[int] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_STATUSES),
        description="Upstream statuses worth another try (connection errors always are).",
    )
    retry_after_cap: float = Field(
        DEFAULT_RETRY_AFTER_CAP,
        ge=0,
        description="Longest upstream `Retry-After` honoured; longer ones give up on the group.",
    )


class BreakerPolicy(_Strict):
    """A circuit breaker per deployment (pybreaker)."""

    fail_max: int = Field(DEFAULT_FAIL_MAX, ge=1, description="Failures in a row that open it.")
    reset_timeout: float = Field(
        DEFAULT_RESET_TIMEOUT, gt=0, description="Seconds open before one probe is let through."
    )


class TrainingSettings(_Strict):
    """What the gateway asks a training upstream (vLLM, SGLang) for and keeps on the span."""

    return_token_ids: bool = Field(
        False,
        description="Ask for prompt and completion token ids (vLLM's `return_token_ids`) and "
        "record them; clients that did not ask for them never see them.",
    )
    logprobs: bool = Field(
        False,
        description="Ask for per-token logprobs and record them; clients that did not ask "
        "for them never see them.",
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Also ask for this many alternatives per token."
    )


class ForwardHeaders(_Strict):
    """Which client headers a deployment receives. Hop-by-hop headers, credentials and
    spangate's own headers are never forwarded, whatever these lists say."""

    allow: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FORWARD_HEADERS_ALLOW),
        description="Glob patterns (case-insensitive) of client headers passed upstream, "
        "e.g. `[user-agent, x-title, openai-*]`; `[]` passes none.",
    )
    deny: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FORWARD_HEADERS_DENY),
        description="Glob patterns of client headers never passed upstream, even when "
        "`allow` matches them, e.g. `[x-stainless-*]`.",
    )


class Deployment(_Strict):
    """One upstream that can serve a model group."""

    provider: str = Field(
        "openai",
        description=(
            "`openai` for any OpenAI-compatible API, `mock` for the built-in offline model, "
            "or a litellm provider name."
        ),
    )
    model: str = Field(..., description="The model name the upstream expects.")
    api_base: str | None = Field(
        None, description="Base URL of the upstream API, ending in `/v1` for OpenAI-compatible."
    )
    api_key: str | None = Field(
        None,
        repr=False,
        description="Key sent upstream as a Bearer token. Unset: the client's own "
        "`Authorization` header is forwarded (and never stored).",
    )
    weight: float = Field(
        1.0, gt=0, le=MAX_WEIGHT, description="Relative share of traffic in the group."
    )
    rpm: int | None = Field(None, gt=0, description="Requests per minute allowed.")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute allowed.")
    timeout: Timeouts = Field(
        default_factory=Timeouts,
        description="`{connect, first_token, total}` seconds; a single number sets `total`.",
    )
    input_cost_per_token: float | None = Field(
        None, ge=0, description="USD per input token; overrides litellm's cost map."
    )
    output_cost_per_token: float | None = Field(
        None, ge=0, description="USD per output token; overrides litellm's cost map."
    )
    mock_latency: float = Field(
        DEFAULT_MOCK_LATENCY,
        ge=0,
        description="`mock` only: seconds the fake model waits before answering.",
    )
    name: str | None = Field(
        None, description="How spans and metrics name it (default `provider/model`)."
    )
    version: str | None = Field(
        None, description="Model version it serves, recorded on every span as `model_version`."
    )
    training: TrainingSettings | None = Field(
        None, description="Token ids and logprobs to record; overrides the group's `training`."
    )
    forward_headers: ForwardHeaders = Field(
        default_factory=ForwardHeaders,
        description="Client headers passed upstream: `{allow, deny}` glob lists.",
    )

    @field_validator("timeout", mode="before")
    @classmethod
    def _number_is_total(cls, value: Any) -> Any:
        return {"total": value} if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _openai_needs_base(self) -> Deployment:
        if self.provider == "openai" and not self.api_base:
            self.api_base = "https://api.openai.com/v1"
        return self

    @property
    def label(self) -> str:
        """How the deployment is named in spans and metrics."""
        return self.name or f"{self.provider}/{self.model}"


class ModelGroup(_Strict):
    """A name clients send as `model`, served by one or more deployments."""

    name: str = Field(..., min_length=1, description="What clients send as `model`.")
    deployments: list[Deployment] = Field(..., min_length=1, description="Upstreams for the group.")
    fallbacks: list[str] = Field(
        default_factory=list, description="Other model groups to try, in order."
    )
    routing: Literal["weighted", "least-busy", "rollout-affinity"] = Field(
        "weighted",
        description="`weighted` random by `weight`, `least-busy` (fewest calls in flight), or "
        "`rollout-affinity` (a rollout's calls stay on one deployment, by consistent hash).",
    )
    training: TrainingSettings | None = Field(
        None, description="Token ids and logprobs to record for every deployment of the group."
    )
    modes: dict[Literal["train", "val"], dict[str, Any]] = Field(
        default_factory=dict,
        description="Request parameters forced per rollout mode, e.g. "
        "`{train: {temperature: 1.0}, val: {temperature: 0.7}}`.",
    )
    retries: RetryPolicy | None = Field(None, description="Overrides the global `retries`.")
    circuit_breaker: BreakerPolicy | None = Field(
        None, description="Overrides the global `circuit_breaker`."
    )


class PauseSettings(_Strict):
    """How `POST /api/proxy/pause` holds calls."""

    max_hold_seconds: float = Field(
        DEFAULT_MAX_HOLD_SECONDS,
        ge=0,
        description="Longest a call waits in `hold` mode; after it the call goes on anyway.",
    )
    retry_after_seconds: float = Field(
        DEFAULT_PAUSE_RETRY_AFTER,
        ge=0,
        description="`Retry-After` of a `reject` pause that names none.",
    )


class ServerSettings(_Strict):
    """Where and how the gateway listens."""

    host: str = Field(DEFAULT_HOST, description="Interface to bind.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port to bind.")
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, gt=0, description="Largest request body accepted (else 413)."
    )
    shutdown_timeout: float = Field(
        DEFAULT_SHUTDOWN_TIMEOUT,
        ge=0,
        description="Seconds in-flight calls get to finish after SIGTERM/SIGINT.",
    )
    header_timeout: float = Field(
        DEFAULT_HEADER_TIMEOUT,
        gt=0,
        description="Seconds a connection may take to send a request's headers, counted from "
        "when it opened or its last answer; also how long an idle keep-alive connection stays.",
    )
    body_timeout: float = Field(
        DEFAULT_BODY_TIMEOUT,
        gt=0,
        description="Seconds a client may take to send a request body once its headers are "
        "in (else 408).",
    )
    write_timeout: float = Field(
        DEFAULT_WRITE_TIMEOUT,
        gt=0,
        description="Seconds a write to a client may wait for it to read before the client "
        "is dropped (streams and event streams).",
    )
    max_sse_subscribers: int = Field(
        DEFAULT_MAX_SSE_SUBSCRIBERS,
        gt=0,
        description="Live event streams (`/api/spans/stream`) open at once; past it, 503.",
    )
    front: Literal["httptools", "aiohttp"] = Field(
        "httptools",
        description="The HTTP server of the OpenAI routes: `httptools`, a lean one that hands "
        "every other request to aiohttp, or `aiohttp` for all of them (a way back).",
    )


class RecorderSettings(_Strict):
    """How spans get from the request path to the database."""

    queue_size: int = Field(
        DEFAULT_QUEUE_SIZE,
        gt=0,
        description="Records held in memory for the writer; past this they spill to the journal.",
    )
    batch_size: int = Field(DEFAULT_BATCH_SIZE, gt=0, description="Most rows per transaction.")
    flush_interval: float = Field(
        DEFAULT_FLUSH_INTERVAL,
        gt=0,
        description="Seconds the writer waits for more rows before committing a partial batch.",
    )
    max_unsaved_seconds: float = Field(
        DEFAULT_MAX_UNSAVED_SECONDS,
        gt=0,
        description="Longest an answered call's span may wait in memory before it is in the "
        "database or the journal: the most a process kill (SIGKILL) can lose.",
    )
    memory_buffer: int = Field(
        DEFAULT_MEMORY_BUFFER,
        ge=0,
        description="Spans held in memory while neither the database nor the journal takes "
        "writes (a full disk); past this they are lost and counted.",
    )
    busy_timeout: float = Field(
        DEFAULT_STORE_BUSY_TIMEOUT,
        gt=0,
        description="Seconds the writer waits on a locked database before spilling to the journal "
        "(on PostgreSQL at least 2, where replicas take turns at one lock).",
    )
    journal_dir: str | None = Field(
        None,
        description="Folder for the spill journal and dead-letter file (default: beside the "
        "database); put it on another volume so a full database disk cannot stop both.",
    )
    store_bodies: bool = Field(True, description="Store request and response bodies on spans.")
    api_write_timeout: float = Field(
        DEFAULT_API_WRITE_TIMEOUT,
        gt=0,
        description="Seconds an `/api` write waits for the store (say, locked by another "
        "process) before it answers 503 with Retry-After.",
    )


class Limits(_Strict):
    """Size and time bounds on what upstreams send and what the gateway keeps of it."""

    max_upstream_body_bytes: int = Field(
        DEFAULT_MAX_UPSTREAM_BODY_BYTES,
        gt=0,
        description="Largest non-streamed upstream answer accepted; a larger one is a 502.",
    )
    max_stream_bytes: int = Field(
        DEFAULT_MAX_STREAM_BYTES,
        gt=0,
        description="Most bytes relayed from one upstream stream before it is cut (error span).",
    )
    max_stream_seconds: float = Field(
        DEFAULT_MAX_STREAM_SECONDS,
        gt=0,
        description="Longest one upstream stream may last before it is cut (error span).",
    )
    max_stored_body_bytes: int = Field(
        DEFAULT_MAX_STORED_BODY_BYTES,
        ge=0,
        description="Request or response body bytes stored on a span; longer ones are cut, "
        "and their size is kept in the span's attributes.",
    )
    max_label_values: int = Field(
        DEFAULT_MAX_LABEL_VALUES,
        gt=0,
        description="Distinct values per client-given metric label (tool, model); the rest "
        "are counted as `other`.",
    )


class OtlpSettings(_Strict):
    """OpenTelemetry: every span sent to a tracing backend over OTLP/HTTP, and `/v1/traces`.

    Unset keys fall back to the standard OpenTelemetry environment variables: the traces or
    generic `OTEL_EXPORTER_OTLP_*` `ENDPOINT`, `PROTOCOL` (`http/protobuf` or `http/json`;
    `grpc` is not spoken, and is ignored with a warning) and `HEADERS`, and `OTEL_SERVICE_NAME`.
    """

    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces`; unset: "
        "no export.",
    )
    protocol: Literal["http/protobuf", "http/json"] = Field(
        "http/protobuf", description="Wire format of the export."
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        description="Headers sent with every export (`Authorization`, API keys).",
    )
    compression: Literal["gzip", "none"] = Field("gzip", description="Body compression.")
    content: bool = Field(
        False,
        description="Add `gen_ai.input.messages` / `gen_ai.output.messages` and tool "
        "arguments and results to exported spans.",
    )
    service_name: str = Field(
        DEFAULT_SERVICE_NAME, min_length=1, description="`service.name` of the exported resource."
    )
    queue_size: int = Field(
        DEFAULT_OTLP_QUEUE_SIZE,
        gt=0,
        description="Spans waiting for export; past this they are dropped from the export "
        "(never from the store) and counted.",
    )
    batch_size: int = Field(DEFAULT_OTLP_BATCH_SIZE, gt=0, description="Most spans per request.")
    flush_interval: float = Field(
        DEFAULT_OTLP_FLUSH_INTERVAL,
        gt=0,
        description="Seconds a partial batch waits for more spans before it is sent.",
    )
    timeout: float = Field(DEFAULT_OTLP_TIMEOUT, gt=0, description="Seconds per export request.")
    retry_attempts: int = Field(
        DEFAULT_OTLP_RETRY_ATTEMPTS,
        ge=1,
        description="Tries per batch on 429/502/503/504 or a connection failure, the first "
        "included.",
    )
    retry_after_cap: float = Field(
        DEFAULT_OTLP_RETRY_AFTER_CAP,
        ge=0,
        description="Longest receiver `Retry-After` honoured, seconds.",
    )
    shutdown_timeout: float = Field(
        DEFAULT_OTLP_SHUTDOWN_TIMEOUT,
        ge=0,
        description="Seconds the exporter gets at shutdown to send what is queued.",
    )
    ingest: bool = Field(True, description="Accept agents' spans on `POST /v1/traces`.")
    ingest_max_bytes: int = Field(
        DEFAULT_OTLP_INGEST_MAX_BYTES,
        gt=0,
        description="Largest `/v1/traces` body, compressed or not (else 413).",
    )


class BudgetLimits(_Strict):
    """Limits on one scope (a rollout or an attempt); an unset limit does not apply."""

    max_calls: int | None = Field(None, ge=0, description="Calls let through.")
    max_tokens: int | None = Field(None, ge=0, description="Input plus output tokens.")
    max_cost_usd: float | None = Field(None, ge=0, description="Cost in USD.")
    max_seconds: float | None = Field(
        None, gt=0, description="Wall time since the scope's first call, seconds."
    )


class AgentBudgets(_Strict):
    """One agent's budgets; each limit set here replaces the default one."""

    rollout: BudgetLimits = Field(default_factory=BudgetLimits, description="Per rollout.")
    attempt: BudgetLimits = Field(default_factory=BudgetLimits, description="Per attempt.")


class BudgetSettings(_Strict):
    """Per-rollout and per-attempt budgets, refused with 402 `budget_exceeded` when spent.

    Limits resolve from these defaults, then the agent's, then the rollout's own (set over
    the API); a call's `X-Budget-Max-*` headers can only lower them.
    """

    rollout: BudgetLimits = Field(
        default_factory=BudgetLimits, description="Default limits of every rollout."
    )
    attempt: BudgetLimits = Field(
        default_factory=BudgetLimits, description="Default limits of every attempt."
    )
    agents: dict[str, AgentBudgets] = Field(
        default_factory=dict, description="Limits per agent (`X-Agent-Id` or the rollout's)."
    )
    clamp_max_tokens: bool = Field(
        False,
        description="Lower a call's `max_tokens` / `max_completion_tokens` to what the token "
        "and cost budgets still allow, so the last call cannot overspend.",
    )
    state_ttl: float = Field(
        DEFAULT_BUDGET_STATE_TTL,
        gt=0,
        description="Seconds a rollout's counters stay in Redis after its last call (in "
        "PostgreSQL they stay until the rollout is pruned).",
    )


# `default`, `json` or `never`, or regular expressions (see ToolRule.error_when).
ToolErrorWhen = Literal["default", "json", "never"] | list[str]
_TOOL_ERROR_WHEN_HELP = (
    "When a result makes the `execute_tool` span an error. `default`: a JSON error "
    "(`error` not empty, `is_error`/`isError` true), the tool's own failed status (exit code, "
    "`failed`), or text that starts with an error marker (`Error:`, `ERROR`, `Exception:`, "
    "`Traceback (most recent call last)`, `fatal:`, `panic:`); `json`: the JSON and status "
    "signals only; `never`: never; a list of regular expressions: the JSON and status signals, "
    "or text any of them matches (searched anywhere)."
)


def _check_patterns(value: ToolErrorWhen) -> ToolErrorWhen:
    if isinstance(value, list):
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from None
    return value


class ToolRule(_Strict):
    """The error rule of one tool, by the name its spans carry."""

    error_when: ToolErrorWhen = Field(
        DEFAULT_TOOL_ERROR_WHEN,
        description="This tool's rule, one of those `tools.error_when` takes.",
    )

    _patterns = field_validator("error_when")(_check_patterns)


class ToolSettings(_Strict):
    """How a tool's result sent back (an `execute_tool` span) is judged an error."""

    error_when: ToolErrorWhen = Field(DEFAULT_TOOL_ERROR_WHEN, description=_TOOL_ERROR_WHEN_HELP)
    per_tool: dict[str, ToolRule] = Field(
        default_factory=dict,
        description="Rules by tool name (the function, custom or MCP tool's name; `shell`, "
        "`computer`, `apply_patch`, `web_search`, ... for built-in tools), replacing "
        "`error_when` for that tool.",
    )

    _patterns = field_validator("error_when")(_check_patterns)

    def rule_for(self, tool: str) -> ToolErrorWhen:
        rule = self.per_tool.get(tool)
        return rule.error_when if rule is not None else self.error_when


Scope = Literal["proxy", "read", "write", "admin"]
TerminalStatus = Literal["succeeded", "failed", "cancelled", "timeout"]


class ApiKey(_Strict):
    """A key clients send as `Authorization: Bearer <key>` (or as their OpenAI `api_key`)."""

    key: str = Field(
        ...,
        min_length=8,
        repr=False,
        description="The secret; use `${ENV_VAR}` to keep it out of the file.",
    )
    name: str = Field("", description="Who holds the key, for logs.")
    scopes: list[Scope] = Field(
        default_factory=lambda: list[Scope](["proxy", "read", "write"]),
        description="`proxy` (OpenAI routes), `read` (GET /api, /metrics), `write` (POST/PATCH /api), `admin` (all).",
    )


class AuthSettings(_Strict):
    """Who may call the gateway."""

    keys: list[ApiKey] = Field(
        default_factory=list, description="Accepted keys; none means no authentication."
    )
    allow_unauthenticated_remote: bool = Field(
        False,
        description="Serve on a non-loopback address without keys (otherwise refused at start).",
    )

    @field_validator("keys")
    @classmethod
    def _keys_are_unique(cls, keys: list[ApiKey]) -> list[ApiKey]:
        # A repeated key would get the scopes of whichever entry is found first, silently.
        first: dict[str, int] = {}
        for index, entry in enumerate(keys):
            if entry.key in first:
                raise ValueError(
                    f"entries [{first[entry.key]}] and [{index}] have the same key; "
                    "each key may be listed once"
                )
            first[entry.key] = index
        return keys


class OnlineJudging(_Strict):
    """Judge rollouts as they finish, in the background."""

    judge: str = Field("rules", description="`rules`, `llm`, or the name of a custom rubric.")
    sample: float = Field(1.0, ge=0, le=1, description="Share of finished rollouts judged.")
    on: list[TerminalStatus] = Field(
        default_factory=lambda: list[TerminalStatus](["succeeded", "failed"]),
        description="Terminal statuses that trigger judging.",
    )
    queue_size: int = Field(
        1000, gt=0, description="Rollouts waiting; past this they are skipped (and counted)."
    )
    concurrency: int = Field(2, gt=0, description="Rollouts judged at once.")


class JudgeSettings(_Strict):
    """Judges that score whole rollouts from their trace."""

    model: str | None = Field(
        None, description="Model group the `llm` judge asks (one of `models`); needed for `llm`."
    )
    gateway_url: str | None = Field(
        None,
        description="Gateway the judge's own calls go through (recorded under a judge rollout); "
        "default: this gateway.",
    )
    api_key: str | None = Field(
        None, repr=False, description="Gateway key for the judge's own calls."
    )
    budget_tokens: int = Field(
        6000, gt=500, description="Most tokens of trajectory shown to the `llm` judge."
    )
    max_invalid_retries: int = Field(
        2, ge=0, description="Times an invalid verdict is asked for again before giving up."
    )
    rubrics: dict[str, str] = Field(
        default_factory=dict, description="Custom rubrics: name -> YAML file path."
    )
    online: OnlineJudging | None = Field(None, description="Judge rollouts as they finish.")
    max_runs: int = Field(
        DEFAULT_MAX_JUDGE_RUNS,
        ge=1,
        description="Judge runs started over the API that may run at once; past it "
        "`POST /api/judge/runs` answers 429.",
    )


class GuidelineRef(_Strict):
    """A stored guideline version (from `spangate patterns guidelines`)."""

    agent: str = Field(..., min_length=1, description="The agent the guideline was written for.")
    version: int = Field(..., ge=1, description="The guideline version to prepend.")


class ExperimentVariant(_Strict):
    """One arm of an experiment: what it changes about the call, if anything."""

    name: str = Field(..., min_length=1, description="Shown in spans and the analysis.")
    weight: float = Field(1.0, ge=0, description="Share of rollouts under `policy: fixed`.")
    model: str | None = Field(None, description="Send the call to this model group instead.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Request parameters set on the call (`temperature`…)."
    )
    guideline: GuidelineRef | None = Field(
        None, description="A stored guideline, prepended to the call as a system message."
    )

    @field_validator("params")
    @classmethod
    def _params_keep_the_call(cls, params: dict[str, Any]) -> dict[str, Any]:
        # These would change what the call is, not how it is answered.
        fixed = sorted(set(params) & {"model", "messages", "stream", "input", "prompt"})
        if fixed:
            raise ValueError(f"params cannot set {fixed}: use `model`, or leave them to the client")
        return params


class Experiment(_Strict):
    """Variants tried on the traffic of one model group, judged by one reward."""

    name: str = Field(..., min_length=1, description="The experiment's name.")
    model: str = Field(..., min_length=1, description="The model group clients call.")
    reward: str = Field("reward", description="The reward name that decides.")
    policy: Literal["fixed", "thompson"] = Field(
        "fixed",
        description="`fixed` splits by `weight`; `thompson` draws from each variant's "
        "reward posterior.",
    )
    posterior: Literal["auto", "beta", "normal"] = Field(
        "auto",
        description="Beta (rewards in [0, 1]) or Normal; `auto` picks Beta while every "
        "reward is in [0, 1].",
    )
    floor: float = Field(
        DEFAULT_EXPERIMENT_FLOOR,
        ge=0,
        le=0.5,
        description="Under `thompson`, the least share of new rollouts each variant gets.",
    )
    control: str | None = Field(
        None, description="The variant the others are compared with (default: the first)."
    )
    alpha: float = Field(
        DEFAULT_EXPERIMENT_ALPHA,
        gt=0,
        lt=1,
        description="Significance level of the verdict (Bonferroni over the variants).",
    )
    success_threshold: float = Field(
        DEFAULT_EXPERIMENT_SUCCESS_THRESHOLD,
        description="A rollout whose reward is at least this counts as a success.",
    )
    variants: list[ExperimentVariant] = Field(
        ..., min_length=2, description="The arms; the first is the control unless `control`."
    )

    @model_validator(mode="after")
    def _check_variants(self) -> Experiment:
        names = [variant.name for variant in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: variant names repeat: {names}")
        if self.control is not None and self.control not in names:
            raise ValueError(f"experiment {self.name!r}: control {self.control!r} is no variant")
        if self.policy == "fixed" and not any(variant.weight > 0 for variant in self.variants):
            raise ValueError(f"experiment {self.name!r}: every variant has weight 0")
        return self

    @property
    def control_name(self) -> str:
        return self.control or self.variants[0].name


class StoreSettings(_Strict):
    """Where spans are stored (README "Scaling out")."""

    url: str | None = Field(
        None,
        description="Where spans are stored: a SQLite file path, or a `postgresql://` URL "
        f"for replicas sharing one store. `--db` / `$SPANGATE_DB` win; default `{DEFAULT_STORE_URL}`.",
    )


class SharedSettings(_Strict):
    """State that replicas behind one load balancer share."""

    redis_url: str | None = Field(
        None,
        repr=False,
        description="Redis shared by all replicas (`redis://host:6379/0`): rate limits, breaker "
        "state, budgets and rollout sequence numbers then hold across replicas. Without it rate "
        "limits and breakers are per replica (sequence numbers and budgets still come from "
        "PostgreSQL).",
    )
    sync_seconds: float = Field(
        DEFAULT_SYNC_SECONDS,
        gt=0,
        description="How often a replica reads from the store what another replica may have "
        "changed (a pause or resume, the model registry); a change sent to one replica holds "
        "on all of them within this long.",
    )


class RetentionSettings(_Strict):
    """Deleting old records in the background (`spangate prune` does it on demand)."""

    days: float | None = Field(
        None,
        gt=0,
        description="Prune spans, rewards, attempts and rollouts older than this many days in "
        "the background; running rollouts are kept. Nothing is deleted without it.",
    )
    batch_size: int = Field(
        DEFAULT_RETENTION_BATCH,
        ge=1,
        description="Rollouts deleted per transaction, so pruning never holds the writer long.",
    )
    interval: float = Field(
        DEFAULT_RETENTION_INTERVAL, gt=0, description="Seconds between background prunes."
    )


class Settings(_Strict):
    """The whole `spangate.yaml`."""

    models: list[ModelGroup] = Field(default_factory=list, description="Model groups served.")
    require_rollout: bool = Field(
        False, description="Answer 400 to calls that name no rollout instead of recording them."
    )
    server: ServerSettings = Field(default_factory=ServerSettings, description="Listener.")
    recorder: RecorderSettings = Field(
        default_factory=RecorderSettings, description="Span recording."
    )
    limits: Limits = Field(
        default_factory=Limits, description="Bounds on upstream answers and stored bodies."
    )
    retries: RetryPolicy = Field(default_factory=RetryPolicy, description="Default retry policy.")
    circuit_breaker: BreakerPolicy = Field(
        default_factory=BreakerPolicy, description="Default circuit breaker per deployment."
    )
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys and scopes.")
    judge: JudgeSettings = Field(default_factory=JudgeSettings, description="Rollout judges.")
    otlp: OtlpSettings = Field(
        default_factory=OtlpSettings, description="OpenTelemetry export and ingest."
    )
    pause: PauseSettings = Field(
        default_factory=PauseSettings, description="Pause and drain (`/api/proxy/pause`)."
    )
    budgets: BudgetSettings = Field(
        default_factory=BudgetSettings, description="Per-rollout and per-attempt budgets."
    )
    store: StoreSettings = Field(default_factory=StoreSettings, description="The span store.")
    shared: SharedSettings = Field(
        default_factory=SharedSettings, description="State shared by replicas (Redis)."
    )
    retention: RetentionSettings = Field(
        default_factory=RetentionSettings, description="Deleting old records."
    )
    tools: ToolSettings = Field(
        default_factory=ToolSettings, description="When a tool's result is an error."
    )
    rate_limit_wait: float = Field(
        DEFAULT_RATE_LIMIT_WAIT,
        ge=0,
        description="Seconds a call may wait for a deployment's rpm/tpm budget before a 429.",
    )
    experiments: list[Experiment] = Field(
        default_factory=list, description="Variants tried on a model group's traffic."
    )
    experiment_refresh: float = Field(
        DEFAULT_EXPERIMENT_REFRESH,
        gt=0,
        description="Seconds between looks at the store for promote/stop decisions and "
        "rewards written elsewhere (the CLI, other replicas).",
    )

    def check_api_bases(self) -> None:
        """ValueError naming the first `openai` deployment whose `api_base` is not an
        http(s) URL (`localhost:8000/v1`): every call to it would fail as unreachable.

        litellm's providers read `api_base` in their own ways and `mock` ignores it, so
        only `openai` is checked. Checked before serving, not on load: a config is also
        validated with placeholder values for its `${VAR}`s (the example configs' test).
        """
        for i, group in enumerate(self.models):
            for j, deployment in enumerate(group.deployments):
                base = deployment.api_base
                if deployment.provider == "openai" and base and not _is_http_url(base):
                    raise ValueError(
                        f"models[{i}].deployments[{j}].api_base: expected an http:// or "
                        f"https:// URL, got {base!r}"
                    )

    def retry_policy(self, group: ModelGroup) -> RetryPolicy:
        return group.retries or self.retries

    def breaker_policy(self, group: ModelGroup) -> BreakerPolicy:
        return group.circuit_breaker or self.circuit_breaker

    @model_validator(mode="after")
    def _check_groups(self) -> Settings:
        names = [group.name for group in self.models]
        duplicate = {name for name in names if names.count(name) > 1}
        if duplicate:
            raise ValueError(f"model group names must be unique, repeated: {sorted(duplicate)}")
        known = set(names)
        for group in self.models:
            unknown = [name for name in group.fallbacks if name not in known]
            if unknown:
                raise ValueError(f"group {group.name!r} falls back to unknown groups {unknown}")
        _check_experiments(self.experiments, known)
        judge_model = self.judge.model
        # With a judge.gateway_url the model is that gateway's group, not one of ours.
        if judge_model and not self.judge.gateway_url and judge_model not in known:
            raise ValueError(
                f"judge.model {judge_model!r} names no model group (known: {sorted(known)})"
            )
        return self


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an unclosed IPv6 bracket, a port that is not a number
        return False


def _check_experiments(experiments: list[Experiment], groups: set[str]) -> None:
    names = [experiment.name for experiment in experiments]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment names must be unique: {names}")
    covered = [experiment.model for experiment in experiments]
    if len(set(covered)) != len(covered):
        # Two experiments on one group would each see a skewed share of its traffic.
        raise ValueError(f"one experiment per model group at a time: {covered}")
    for experiment in experiments:
        wanted = [experiment.model] + [v.model for v in experiment.variants if v.model]
        unknown = sorted({name for name in wanted if name not in groups})
        if unknown:
            raise ValueError(f"experiment {experiment.name!r} names unknown groups {unknown}")


def default_settings() -> Settings:
    """What `spangate serve` runs with when there is no config file: the offline mock model."""
    names = ["mock", "gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    return Settings(
        models=[
            ModelGroup(name=name, deployments=[Deployment(provider="mock", model=name)])
            for name in names
        ]
    )
