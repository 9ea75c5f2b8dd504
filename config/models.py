"""Pydantic models for `spangate.yaml`: every key, its default and what it means."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8400
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_UPSTREAM_TIMEOUT = 600.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_QUEUE_SIZE = 50_000
DEFAULT_BATCH_SIZE = 500
DEFAULT_FLUSH_INTERVAL = 0.2
DEFAULT_MOCK_LATENCY = 0.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        description="Key sent upstream as a Bearer token. Unset: the client's own "
        "`Authorization` header is forwarded (and never stored).",
    )
    weight: float = Field(1.0, gt=0, description="Relative share of traffic in the group.")
    rpm: int | None = Field(None, gt=0, description="Requests per minute allowed.")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute allowed.")
    timeout: float = Field(
        DEFAULT_UPSTREAM_TIMEOUT, gt=0, description="Total seconds allowed for one upstream call."
    )
    connect_timeout: float = Field(
        DEFAULT_CONNECT_TIMEOUT, gt=0, description="Seconds allowed to connect to the upstream."
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

    @model_validator(mode="after")
    def _openai_needs_base(self) -> Deployment:
        if self.provider == "openai" and not self.api_base:
            self.api_base = "https://api.openai.com/v1"
        return self

    @property
    def label(self) -> str:
        """How the deployment is named in spans and metrics."""
        return f"{self.provider}/{self.model}"


class ModelGroup(_Strict):
    """A name clients send as `model`, served by one or more deployments."""

    name: str = Field(..., min_length=1, description="What clients send as `model`.")
    deployments: list[Deployment] = Field(..., min_length=1, description="Upstreams for the group.")
    fallbacks: list[str] = Field(
        default_factory=list, description="Other model groups to try, in order."
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
    store_bodies: bool = Field(True, description="Store request and response bodies on spans.")


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
        return self


def default_settings() -> Settings:
    """What `spangate serve` runs with when there is no config file: the offline mock model."""
    names = ["mock", "gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    return Settings(
        models=[
            ModelGroup(name=name, deployments=[Deployment(provider="mock", model=name)])
            for name in names
        ]
    )
