"""Configuration for spangate: the settings models and the YAML loader."""

from config.loader import DEFAULT_CONFIG_FILE, ConfigError, load_settings, parse_settings
from config.models import (
    ApiKey,
    AuthSettings,
    Backoff,
    BreakerPolicy,
    Deployment,
    JudgeSettings,
    Limits,
    ModelGroup,
    OnlineJudging,
    OtlpSettings,
    RecorderSettings,
    RetryPolicy,
    ServerSettings,
    Settings,
    Timeouts,
    default_settings,
)

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ApiKey",
    "AuthSettings",
    "Backoff",
    "BreakerPolicy",
    "ConfigError",
    "Deployment",
    "JudgeSettings",
    "Limits",
    "ModelGroup",
    "OnlineJudging",
    "OtlpSettings",
    "RecorderSettings",
    "RetryPolicy",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "default_settings",
    "load_settings",
    "parse_settings",
]
