"""`spangate.yaml` as a user writes it: `${VAR}` and `${VAR:-default}` filled in from the
environment, and every mistake reported with the key path that holds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, load_settings, parse_settings

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
