"""Read `spangate.yaml`: `${VAR}` interpolation, validation, errors that name the key."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.models import OtlpSettings, Settings, default_settings

log = logging.getLogger("spangate.config")

DEFAULT_CONFIG_FILE = "spangate.yaml"
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a key given twice in one mapping is an error: PyYAML
    keeps the last one, so a block pasted below another silently replaces it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            # `<<` merges are meant to be overridden by the keys written beside them.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} a second time",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


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


def _otel_env(data: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """`otlp` keys the file leaves unset, from the standard OpenTelemetry variables."""
    given = data.get("otlp")
    if given is not None and not isinstance(given, dict):
        return data  # not a mapping: validation names `otlp` and says what it expects
    otlp = dict(given or {})
    if "endpoint" not in otlp:
        if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            otlp["endpoint"] = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            # The generic variable names the collector; the signal's path is appended.
            otlp["endpoint"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    if "protocol" not in otlp and protocol in ("http/protobuf", "http/json"):
        otlp["protocol"] = protocol
    elif "protocol" not in otlp and protocol:
        # Said once at start: an endpoint that speaks only gRPC fails every export otherwise,
        # with nothing but the export's warnings to say why.
        log.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%s is not spoken: spangate exports OTLP over HTTP "
            "(http/protobuf, the default, or http/json); point the endpoint at an HTTP "
            "receiver (port 4318, not gRPC's 4317)",
            protocol,
        )
    headers = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
    if "headers" not in otlp and headers:
        otlp["headers"] = parse_otel_headers(headers)
    if "service_name" not in otlp and env.get("OTEL_SERVICE_NAME"):
        otlp["service_name"] = env["OTEL_SERVICE_NAME"]
    return {**data, "otlp": otlp} if otlp else data


def parse_otel_headers(text: str) -> dict[str, str]:
    """`k1=v1,k2=v2` with URL-encoded values, as the OpenTelemetry spec writes them."""
    from urllib.parse import unquote

    headers = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            headers[unquote(name.strip())] = unquote(value.strip())
    return headers


def parse_settings(data: Any, *, env: dict[str, str] | None = None) -> Settings:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("(top level): expected a mapping of settings")
    env = dict(os.environ) if env is None else env
    data = _otel_env(interpolate(data, env), env)
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
            settings = default_settings()
            otel = _otel_env({}, dict(os.environ)).get("otlp")
            if otel:
                settings.otlp = OtlpSettings.model_validate(otel)
            return settings
        path = candidate
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read config file {path}: not UTF-8 (byte {exc.object[exc.start]:#x} "
            f"at offset {exc.start}); save it as UTF-8"
        ) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return parse_settings(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
