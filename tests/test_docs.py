"""README.md documents every command, config key, route, metric and stored column.

Each test reads the real objects (the click group, the pydantic models, the aiohttp route
table, the Prometheus registry, a migrated database), so adding one without documenting it
fails here. The generated parts of README.md (`--help` blocks, the config reference, the
metrics table) come from cog; `test_readme_is_up_to_date_with_cog` fails when they drift.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml
from aiohttp import web
from pydantic import BaseModel

from config import Settings, default_settings, parse_settings
from gateway.cli.main import cli
from gateway.compose import check_providers, create_app
from gateway.web.metrics import METRICS
from store.schema import connect

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
EXAMPLES = ROOT / "config" / "examples"
ROLLOUT_PREFIX = "/rollout/"
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


def _headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]


# -- commands -------------------------------------------------------------------------


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


COMMANDS = sorted(_commands(cli))


def test_there_are_commands_to_check() -> None:
    assert ("serve",) in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_is_in_the_readme(readme: str, path: tuple[str, ...]) -> None:
    name = " ".join(path)
    as_heading = any(
        heading.strip("`") in (name, f"spangate {name}") for heading in _headings(readme)
    )
    assert as_heading or f"spangate {name}" in readme, f"`spangate {name}` is not in README.md"


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help_text(path: tuple[str, ...]) -> None:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        found = command.get_command(click.Context(command), name)
        assert found is not None
        command = found
    assert command.help, f"`spangate {' '.join(path)}` has no help text"


# -- configuration --------------------------------------------------------------------


def _models_in(annotation: object) -> Iterator[type[BaseModel]]:
    """The pydantic models inside an annotation: `X`, `X | None`, `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _config_fields(
    model: type[BaseModel], path: str = "", seen: frozenset[type[BaseModel]] = frozenset()
) -> Iterator[tuple[str, str]]:
    """(dotted key path, field name) for every field reachable from `model`."""
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        yield key, name
        for inner in _models_in(field.annotation):
            if inner not in seen:
                yield from _config_fields(inner, key, seen | {model})


CONFIG_FIELDS = sorted(set(_config_fields(Settings)))


def test_the_config_walk_reaches_nested_models() -> None:
    keys = {key for key, _ in CONFIG_FIELDS}
    assert {"models.deployments.timeout.first_token", "retries.backoff.jitter"} <= keys


@pytest.mark.parametrize("key,name", CONFIG_FIELDS, ids=[key for key, _ in CONFIG_FIELDS])
def test_every_config_key_is_in_the_readme(readme: str, key: str, name: str) -> None:
    assert f"`{name}`" in readme, f"config key {key} is not documented in README.md"


@pytest.mark.parametrize("key,name", CONFIG_FIELDS, ids=[key for key, _ in CONFIG_FIELDS])
def test_every_config_key_has_a_description(key: str, name: str) -> None:
    model: type[BaseModel] = Settings
    for part in key.split(".")[:-1]:
        model = next(_models_in(model.model_fields[part].annotation))
    assert model.model_fields[name].description, f"config key {key} has no description="


EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def test_there_are_example_configs() -> None:
    assert len(EXAMPLE_FILES) >= 4


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_config_is_valid(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    env = {name: f"test-{name.lower()}" for name in ENV_REFERENCE.findall(text)}
    settings = parse_settings(yaml.safe_load(text), env=env)
    check_providers(settings)
    assert settings.models


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_config_is_named_in_the_readme(readme: str, path: Path) -> None:
    assert f"config/examples/{path.name}" in readme


# -- routes and metrics ---------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> web.Application:
    return create_app(default_settings(), tmp_path_factory.mktemp("docs") / "x.db")


def _mentions(text: str, path: str) -> bool:
    """`path` appears whole: `/api/rollouts` inside `/api/rollouts/{rollout_id}` does not count."""
    return re.search(rf"(?<![\w/{{}}.-]){re.escape(path)}(?![\w/{{}}.-])", text) is not None


def _route_paths(app: web.Application) -> list[str]:
    return sorted({resource.canonical for resource in app.router.resources()})


def test_every_route_is_in_the_readme(readme: str, app: web.Application) -> None:
    paths = _route_paths(app)
    assert "/health/live" in paths
    missing = [p for p in paths if not p.startswith(ROLLOUT_PREFIX) and not _mentions(readme, p)]
    assert not missing, f"routes missing from README.md: {missing}"


def test_every_rollout_prefix_is_in_the_readme(readme: str, app: web.Application) -> None:
    prefixes = {p.split("/v1/", 1)[0] for p in _route_paths(app) if p.startswith(ROLLOUT_PREFIX)}
    assert prefixes, "no rollout prefixes registered"
    missing = [prefix for prefix in sorted(prefixes) if prefix not in readme]
    assert not missing, f"rollout prefixes missing from README.md: {missing}"


def test_every_metric_is_in_the_readme(readme: str, app: web.Application) -> None:
    names = [family.name for family in app[METRICS].registry.collect()]
    assert "spangate_requests" in names
    missing = [name for name in names if name not in readme]
    assert not missing, f"metrics missing from README.md: {missing}"


# -- the data model -------------------------------------------------------------------


def test_every_stored_column_is_in_the_readme(readme: str, tmp_path: Path) -> None:
    db = connect(tmp_path / "schema.db")
    try:
        tables = {
            name: [column.name for column in db[name].columns]
            for name in db.table_names()
            if not name.startswith(("_", "sqlite_"))
        }
    finally:
        db.close()
    assert "spans" in tables
    missing = [f"table {table}" for table in tables if f"`{table}`" not in readme]
    missing += [
        f"{table}.{column}"
        for table, columns in tables.items()
        for column in columns
        if f"`{column}`" not in readme
    ]
    assert not missing, f"columns missing from README.md: {missing}"


# -- the two commands -----------------------------------------------------------------


def _last_command(script: str) -> str:
    lines = [line.strip() for line in script.splitlines()]
    return [line for line in lines if line and not line.startswith("#")][-1]


def _test_commands(readme: str) -> list[str]:
    return sorted(
        {line.strip() for line in readme.splitlines() if re.search(r"\bpytest\b", line)}
        & {line.strip() for line in readme.splitlines() if line.strip().startswith("pip ")}
    )


def test_readme_test_command_is_what_ci_runs(readme: str) -> None:
    commands = _test_commands(readme)
    assert len(commands) == 1, f"expected one test command in README.md, found {commands}"
    run_tests = commands[0].split("&&")[-1].strip()
    assert shlex.split(run_tests) == shlex.split(_last_command(CI_RUN.read_text()))


def test_readme_quickstart_installs_and_serves(readme: str) -> None:
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && spangate serve"
        in quickstart
    )
    assert _test_commands(readme)[0] in quickstart


# -- generated parts ------------------------------------------------------------------


def test_readme_is_up_to_date_with_cog() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        "README.md is out of date; regenerate it with `python -m cogapp -r README.md`\n"
        + result.stdout
        + result.stderr
    )
