"""Configuration for spangate: the settings models and the YAML loader."""

from config.loader import DEFAULT_CONFIG_FILE, ConfigError, load_settings, parse_settings
from config.models import (
    Deployment,
    ModelGroup,
    RecorderSettings,
    ServerSettings,
    Settings,
    default_settings,
)

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ConfigError",
    "Deployment",
    "ModelGroup",
    "RecorderSettings",
    "ServerSettings",
    "Settings",
    "default_settings",
    "load_settings",
    "parse_settings",
]
