"""`spangate serve`: run the gateway."""

from __future__ import annotations

import logging

import click

from gateway.cli.options import configured_db, db_option, is_loopback

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# Checked in callbacks, not with IntRange/Choice, so the errors name the value in our words;
# the help text says the range and the levels.
def _port(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    # The OS takes a port modulo 65536: 70000 would bind 4464, and 65536 a random port.
    if value is not None and not 0 <= value <= 65535:
        raise click.BadParameter(f"{value} is not a port (0 to 65535)", ctx=ctx, param=param)
    return value


def _log_level(ctx: click.Context, param: click.Parameter, value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise click.BadParameter(
            f"{value!r} is not one of {', '.join(LOG_LEVELS)}", ctx=ctx, param=param
        )
    return level


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
@click.option(
    "--port",
    default=None,
    type=int,
    callback=_port,
    help="Port to bind, 0 to 65535 (default 8400; 0 picks a free one).",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    callback=_log_level,
    help=f"Python logging level: {', '.join(LOG_LEVELS)}.",
)
def serve(
    config_path: str | None, db: str, host: str | None, port: int | None, log_level: str
) -> None:
    """Run the gateway.

    Example:

    \b
        spangate serve --port 8400
    """
    from config.loader import ConfigError, load_settings

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
        settings.check_api_bases()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    from store.errors import StoreError

    db = configured_db(db, settings.store.url)
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
