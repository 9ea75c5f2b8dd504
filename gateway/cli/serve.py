"""`spangate serve`: run the gateway."""

from __future__ import annotations

import logging

import click

from gateway.cli.options import db_option, is_loopback


@click.command()
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
    from gateway.compose import check_providers
    from gateway.server import run

    if not settings.auth.keys:
        if not is_loopback(settings.server.host) and not settings.auth.allow_unauthenticated_remote:
            raise click.ClickException(
                f"refusing to serve on {settings.server.host} without API keys: anyone who can "
                "reach it could use your providers. Add `auth.keys` to the config, or set "
                "`auth.allow_unauthenticated_remote: true` if something in front of spangate "
                "authenticates."
            )
        click.echo(
            "spangate: no API keys configured; serving without authentication "
            f"(only reachable on {settings.server.host})",
            err=True,
        )

    try:
        check_providers(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    from store.errors import StoreError

    source = click.get_current_context().get_parameter_source("db")
    if settings.store.url and source is click.core.ParameterSource.DEFAULT:
        db = settings.store.url
    try:
        run(settings, db)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(
            f"cannot serve on {settings.server.host}:{settings.server.port}: {exc}"
        ) from exc
