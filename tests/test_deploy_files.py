"""The container files run what they say: docker-compose.yml's replicas start `spangate serve`
through the image's ENTRYPOINT, with a config that loads and an nginx that names them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from config.loader import load_settings
from gateway.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_instruction(name: str) -> list[str]:
    """An exec-form (JSON array) instruction of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    (found,) = re.findall(rf"^{name}\s+(\[.*\])\s*$", text, flags=re.MULTILINE)
    return list(json.loads(found))


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8")))


def replicas() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("build") == "."
    }


def test_the_image_alone_runs_spangate_serve() -> None:
    argv = dockerfile_instruction("ENTRYPOINT") + dockerfile_instruction("CMD")

    assert argv[:2] == ["spangate", "serve"]
    assert CliRunner().invoke(cli, [*argv[1:], "--help"]).exit_code == 0


@pytest.mark.parametrize("name", sorted(replicas()))
def test_each_compose_replica_runs_spangate_serve_through_the_entrypoint(name: str) -> None:
    # Compose's `command` replaces the image's CMD only: the ENTRYPOINT still comes first.
    service = replicas()[name]
    argv = dockerfile_instruction("ENTRYPOINT") + service["command"]

    assert argv[:2] == ["spangate", "serve"], argv
    result = CliRunner().invoke(cli, [*argv[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert "--host" in argv and "0.0.0.0" in argv  # reachable from nginx's container


def test_the_replicas_config_loads_and_nginx_sends_to_every_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment = next(iter(replicas().values()))["environment"]
    in_image = Path(environment["SPANGATE_CONFIG"])
    # The image copies the checkout to /app.
    config = ROOT / in_image.relative_to("/app")
    monkeypatch.delenv("SPANGATE_CONFIG", raising=False)

    settings = load_settings(config)

    assert [group.name for group in settings.models] == ["mock"]
    assert environment["SPANGATE_DB"].startswith("postgresql://")
    nginx = (ROOT / "deploy" / "nginx.conf").read_text(encoding="utf-8")
    upstreams = set(re.findall(r"server\s+([\w-]+):8400;", nginx))
    assert upstreams == set(replicas())
