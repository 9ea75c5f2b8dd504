"""The `spangate` command: serve the gateway and read what it recorded."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from sqlite_utils import Database

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


POLL_SECONDS = 0.25  # --follow: a new call shows within a second, and idle polling stays cheap
FOLLOW_BATCH = 500


@contextlib.contextmanager
def read_db(path: str) -> Iterator[Database]:
    """The database opened read-only; a missing or foreign file is a user error, not a traceback."""
    import sqlite3

    from store.schema import connect

    if not Path(path).is_file():
        raise click.ClickException(f"no database at {path}; run `spangate serve` first")
    db = connect(path, read_only=True)
    try:
        yield db
    except sqlite3.DatabaseError as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from exc
    finally:
        db.close()


@cli.command()
@click.option("--rollout", "rollout_id", default=None, help="Only calls of this rollout.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new calls as they are recorded.")
@click.option(
    "--limit",
    "-n",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many of the latest calls to print first.",
)
@json_option
@click.option("--bodies", is_flag=True, help="With --json: include request and response bodies.")
@db_option
def tail(
    rollout_id: str | None, follow: bool, limit: int, as_json: bool, bodies: bool, db: str
) -> None:
    """Print the latest calls, oldest first, one line each.

    Each line: time, rollout/attempt#seq, model, status, latency, tokens in/out,
    cost and the start of the reply.

    Example:

    \b
        spangate tail --rollout r-42 --follow
        spangate tail -n 100 --json | jq .cost_usd
    """
    from gateway import cli_render
    from store.queries import list_spans, max_span_rowid

    def emit(span: dict[str, Any]) -> None:
        if as_json:
            click.echo(cli_render.span_json(span, bodies=bodies))
        else:
            click.echo(cli_render.tail_line(span))

    with read_db(db) as conn:
        # Taken first, so a call recorded while the backlog is read is printed once, by the loop.
        last = max_span_rowid(conn)
        backlog = list_spans(conn, rollout_id=rollout_id, limit=limit, newest_first=True)
        for span in reversed([s for s in backlog if s["_rowid"] <= last]):
            emit(span)
        if not follow:
            if not backlog and not as_json:
                click.echo("no calls recorded yet", err=True)
            return
        try:
            while True:
                fresh = list_spans(
                    conn, rollout_id=rollout_id, after_rowid=last, limit=FOLLOW_BATCH
                )
                for span in fresh:
                    emit(span)
                if fresh:
                    last = fresh[-1]["_rowid"]
                if len(fresh) < FOLLOW_BATCH:
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            # Ctrl-C is how a follow ends: exit 0, no "Aborted!".
            return


@cli.command()
@click.option(
    "--status", default=None, help="Only rollouts in this status (running, succeeded, …)."
)
@click.option(
    "--limit",
    "-n",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many rollouts to list.",
)
@json_option
@db_option
def rollouts(status: str | None, limit: int, as_json: bool, db: str) -> None:
    """List rollouts, newest first, with their calls, errors, tokens and cost.

    Example:

    \b
        spangate rollouts --status failed --limit 10
    """
    from gateway import cli_render
    from store.queries import list_rollouts
    from store.schema import ROLLOUT_STATUSES

    if status is not None and status not in ROLLOUT_STATUSES:
        raise click.BadParameter(
            f"{status!r} is not one of {', '.join(ROLLOUT_STATUSES)}", param_hint="--status"
        )
    with read_db(db) as conn:
        found = list_rollouts(conn, status=status, limit=limit)
    if as_json:
        for rollout in found:
            click.echo(cli_render.json_line(rollout))
    elif not found:
        click.echo(f"no {status} rollouts" if status else "no rollouts yet", err=True)
    else:
        for line in cli_render.rollouts_table(found):
            click.echo(line)


@cli.command()
@click.argument("rollout_id", metavar="ROLLOUT")
@json_option
@db_option
def show(rollout_id: str, as_json: bool, db: str) -> None:
    """Show one rollout: its attempts with their calls in order, rewards and totals.

    Example:

    \b
        spangate show r-42
        spangate show r-42 --json | jq .summary
    """
    from gateway import cli_render
    from store.errors import NotFound
    from store.queries import get_rollout

    with read_db(db) as conn:
        try:
            rollout = get_rollout(conn, rollout_id)
        except NotFound as exc:
            raise click.ClickException(f"rollout {rollout_id} not found") from exc
    if as_json:
        click.echo(cli_render.json_line(rollout))
        return
    for line in cli_render.rollout_tree(rollout):
        click.echo(line)
