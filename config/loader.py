"""Read `spangate.yaml`: `${VAR}` interpolation, validation, errors that name the key."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.models import Settings, default_settings

DEFAULT_CONFIG_FILE = "spangate.yaml"
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


def _key_path(loc: tuple[str | int, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def interpolate(value: Any, env: dict[str, str], where: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {
            k: interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, fallback = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if fallback is not None:
            return fallback
        raise ConfigError(f"{where}: environment variable ${{{name}}} is not set")

    return _ENV_PATTERN.sub(substitute, value)


def parse_settings(data: Any, *, env: dict[str, str] | None = None) -> Settings:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("(top level): expected a mapping of settings")
    data = interpolate(data, dict(os.environ) if env is None else env)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_key_path(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from exc


def load_settings(path: str | Path | None = None) -> Settings:
    """Load a config file; with no path, `./spangate.yaml` if present, else the mock defaults."""
    if path is None:
        candidate = Path(DEFAULT_CONFIG_FILE)
        if not candidate.exists():
            return default_settings()
        path = candidate
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return parse_settings(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
