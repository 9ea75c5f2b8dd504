"""The `spangate` command: serve the gateway and read what it recorded."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_DB = "spangate.db"


def db_option(fn: F) -> F:
    return click.option(
        "--db",
        "db",
        default=DEFAULT_DB,
        envvar="SPANGATE_DB",
        show_default=True,
        type=click.Path(dir_okay=False),
        help="SQLite database file (or $SPANGATE_DB).",
    )(fn)


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="One JSON object per line, for scripts."
    )(fn)


@click.group()
@click.version_option(package_name="spangate")
def cli() -> None:
    """spangate: an OpenAI-compatible gateway that records every call an agent makes."""


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="SPANGATE_CONFIG",
    help="Config file (default ./spangate.yaml if present, else the built-in mock model).",
)
@db_option
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port to bind (default 8400).")
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
def serve(
    config_path: str | None, db: str, host: str | None, port: int | None, log_level: str
) -> None:
    """Run the gateway.

    Example:

    \b
        spangate serve --port 8400
    """
    from config.loader import ConfigError, load_settings

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if host is not None:
        settings.server.host = host
    if port is not None:
        settings.server.port = port
    from gateway.app import check_providers
    from gateway.server import run

    try:
        check_providers(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        run(settings, db)
    except OSError as exc:
        raise click.ClickException(
            f"cannot serve on {settings.server.host}:{settings.server.port}: {exc}"
        ) from exc
