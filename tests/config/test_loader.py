"""`spangate.yaml` as a user writes it: `${VAR}` and `${VAR:-default}` filled in from the
environment, and every mistake reported with the key path that holds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, load_settings, parse_settings
from config.models import Settings

MINIMAL = {
    "models": [
        {
            "name": "gpt-4o-mini",
            "deployments": [
                {
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "api_base": "${BASE:-https://api.openai.com/v1}",
                    "api_key": "${OPENAI_API_KEY}",
                }
            ],
        }
    ]
}


def test_variables_are_filled_in_and_defaults_used_when_unset() -> None:
    settings = parse_settings(MINIMAL, env={"OPENAI_API_KEY": "sk-from-env"})
    deployment = settings.models[0].deployments[0]
    assert deployment.api_key == "sk-from-env"
    assert deployment.api_base == "https://api.openai.com/v1"
    other = parse_settings(MINIMAL, env={"OPENAI_API_KEY": "k", "BASE": "http://vllm:8000/v1"})
    assert other.models[0].deployments[0].api_base == "http://vllm:8000/v1"


def test_a_missing_variable_names_the_key_that_needs_it() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings(MINIMAL, env={})
    assert "models[0].deployments[0].api_key" in str(raised.value)
    assert "${OPENAI_API_KEY}" in str(raised.value)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"rpm": -5}, "models[0].deployments[0].rpm"),
        ({"colour": "blue"}, "models[0].deployments[0].colour"),
        ({"weight": "heavy"}, "models[0].deployments[0].weight"),
    ],
)
def test_a_bad_value_or_unknown_key_is_reported_with_its_path(
    change: dict[str, object], path: str
) -> None:
    data = {
        "models": [
            {
                "name": "g",
                "deployments": [{"provider": "openai", "model": "m", "api_base": "http://x/v1"}],
            }
        ]
    }
    data["models"][0]["deployments"][0].update(change)  # type: ignore[index]
    with pytest.raises(ConfigError) as raised:
        parse_settings(data, env={})
    assert path in str(raised.value)


def test_a_top_level_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match="top level"):
        parse_settings(["models"], env={})


def test_a_file_that_is_not_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "spangate.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_no_file_means_the_builtin_mock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert any(d.provider == "mock" for g in settings.models for d in g.deployments)


MOCK_GROUP = "models:\n  - name: mock\n    deployments: [{provider: mock, model: mock}]\n"


def load_text(tmp_path: Path, text: str | bytes) -> Settings:
    path = tmp_path / "spangate.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return load_settings(path)


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    # Saved as Latin-1 by an editor: the "è" of a comment is the byte 0xe8.
    with pytest.raises(ConfigError, match=r"spangate\.yaml: not UTF-8 \(byte 0xe8 at offset 5\)"):
        load_text(tmp_path, b"# mod\xe8le \xe9crit \xe0 la main\n" + MOCK_GROUP.encode())


@pytest.mark.parametrize(
    "otlp", ["true", "http://collector:4318/v1/traces", "[http://collector:4318/v1/traces]"]
)
def test_otlp_that_is_not_a_mapping_is_reported_as_otlp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, otlp: str
) -> None:
    # `otlp: http://...` is how one writes it after reading "OTLP endpoint"; the OTEL_*
    # variables are merged into a mapping only.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "agents")
    with pytest.raises(ConfigError, match=r"\n  otlp: Input should be a valid dictionary"):
        load_text(tmp_path, MOCK_GROUP + f"otlp: {otlp}\n")


def test_a_key_written_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    # Two `models:` blocks, one pasted below the other: PyYAML would keep the last one, and
    # the first group would silently not be served.
    other = "models:\n  - name: other\n    deployments: [{provider: mock, model: o}]\n"
    with pytest.raises(ConfigError) as raised:
        load_text(tmp_path, MOCK_GROUP + other)
    assert "found the key 'models' a second time" in str(raised.value)
    assert "line 4" in str(raised.value)


def test_a_key_beside_a_merge_overrides_the_merged_one(tmp_path: Path) -> None:
    settings = load_text(
        tmp_path,
        "models:\n  - name: a\n    deployments:\n"
        "      - &first {provider: mock, model: m}\n"
        "      - {<<: *first, model: other}\n",
    )
    assert [d.model for d in settings.models[0].deployments] == ["m", "other"]


def test_the_same_auth_key_twice_is_refused(tmp_path: Path) -> None:
    # An entry copied and its key left unchanged: one of the two entries' scopes would win
    # silently (the key given to agents with `[proxy]` only would also get `admin`).
    text = MOCK_GROUP + (
        "auth:\n  keys:\n"
        "    - {key: sk-team-000001, name: agents, scopes: [proxy]}\n"
        "    - {key: sk-team-000001, name: ops, scopes: [admin]}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_text(tmp_path, text)
    assert "auth.keys: Value error, entries [0] and [1] have the same key" in str(raised.value)
    assert "sk-team-000001" not in str(raised.value)


def test_a_judge_model_must_name_a_group_unless_another_gateway_serves_it(
    tmp_path: Path,
) -> None:
    # With no `judge.gateway_url` the judge asks this gateway: a typo would fail every
    # judged rollout.
    with pytest.raises(ConfigError, match=r"judge\.model 'mokc' names no model group"):
        load_text(tmp_path, MOCK_GROUP + "judge:\n  model: mokc\n  online: {judge: llm}\n")
    other = load_text(
        tmp_path, MOCK_GROUP + "judge: {model: judge, gateway_url: 'http://judges:8400'}\n"
    )
    assert other.judge.model == "judge"


@pytest.mark.parametrize("api_base", ["localhost:8000/v1", "ftp://host/v1", "http://["])
def test_an_openai_api_base_that_is_not_an_http_url_is_refused_before_serving(
    tmp_path: Path, api_base: str
) -> None:
    # `localhost:8000/v1` (vLLM's address without http://) would fail every call as
    # "unreachable: not an http(s) URL".
    settings = load_text(
        tmp_path,
        "models:\n  - name: local\n    deployments:\n"
        "      - {provider: mock, model: m}\n"
        f"      - {{provider: openai, model: m, api_base: '{api_base}'}}\n",
    )
    with pytest.raises(ValueError, match=r"models\[0\]\.deployments\[1\]\.api_base: expected"):
        settings.check_api_bases()


def test_other_providers_keep_their_own_api_base_forms(tmp_path: Path) -> None:
    """litellm's providers read `api_base` in their own ways; `mock` ignores it."""
    load_text(
        tmp_path,
        "models:\n  - name: g\n    deployments:\n"
        "      - {provider: ollama, model: llama3, api_base: 'localhost:11434'}\n"
        "      - {provider: mock, model: m, api_base: 'anything'}\n"
        "      - {provider: openai, model: m, api_base: 'http://[::1]:8000/v1'}\n",
    ).check_api_bases()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("models:\n  - name: a\n    deployments: []\n", "deployments"),
        (MOCK_GROUP + "    fallbacks: [nope]\n", "nope"),
        (MOCK_GROUP + MOCK_GROUP.removeprefix("models:\n"), "unique"),
        (
            "models:\n  - name: a\n    deployments: [{provider: mock, model: a, timeout: 0}]\n",
            "timeout",
        ),
        ("server: {port: 70000}\n", "server.port"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_text(tmp_path, text)


def test_a_group_that_falls_back_to_itself_is_accepted(tmp_path: Path) -> None:
    """A self-fallback is harmless: the chain names each group once."""
    settings = load_text(tmp_path, MOCK_GROUP + "    fallbacks: [mock]\n")
    assert settings.models[0].fallbacks == ["mock"]


def test_a_missing_file_is_named_and_an_empty_one_serves_no_models(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_settings(tmp_path / "nope.yaml")
    assert load_text(tmp_path, "").models == []


def test_unset_otlp_keys_come_from_the_standard_opentelemetry_variables() -> None:
    settings = parse_settings(
        {},
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-key=a%20b",
            "OTEL_SERVICE_NAME": "agents",
        },
    )
    assert settings.otlp.endpoint == "http://collector:4318/v1/traces"
    assert settings.otlp.protocol == "http/json"
    assert settings.otlp.headers == {"x-key": "a b"}
    assert settings.otlp.service_name == "agents"


def test_a_grpc_protocol_from_the_environment_is_ignored_aloud(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An exporter pointed at a gRPC receiver would otherwise fail every export, saying why
    # nowhere but in each failure.
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    }
    settings = parse_settings({}, env=env)
    assert settings.otlp.protocol == "http/protobuf"
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not spoken" in caplog.text
