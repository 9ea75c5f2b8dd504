"""The `spangate` command: serve the gateway and read what it recorded."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
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
        help="SQLite database file or postgresql:// URL (or $SPANGATE_DB).",
    )(fn)


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="One JSON object per line, for scripts."
    )(fn)


def key_option(fn: F) -> F:
    return click.option(
        "--key",
        default=None,
        envvar="SPANGATE_KEY",
        metavar="KEY",
        help="With --url: the gateway API key, sent as a Bearer token (or $SPANGATE_KEY).",
    )(fn)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so the final flush cannot fail too."""
    import os

    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class SpangateGroup(click.Group):
    """The command group, plus a quiet exit when the reader of our output goes away.

    `spangate tail --json | head -1`: head exits, the next write raises BrokenPipeError,
    and the command ends with the status a SIGPIPE would give (141), not a traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_stdout()
            ctx.exit(BROKEN_PIPE_EXIT)


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what the shell reports for `yes | head -1`


@click.group(cls=SpangateGroup)
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
    from gateway.compose import check_providers
    from gateway.server import run

    if not settings.auth.keys:
        if (
            not _is_loopback(settings.server.host)
            and not settings.auth.allow_unauthenticated_remote
        ):
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


POLL_SECONDS = 0.25  # --follow: a new call shows within a second, and idle polling stays cheap
FOLLOW_BATCH = 500


@contextlib.contextmanager
def read_db(path: str) -> Iterator[Database]:
    """The database opened read-only; a missing or foreign file is a user error, not a traceback."""
    import sqlite3

    from store.backend import mask_url, store_exists
    from store.errors import StoreUnavailable
    from store.schema import connect

    if not store_exists(path):
        raise click.ClickException(f"no database at {path}; run `spangate serve` first")
    try:
        db = connect(path, read_only=True)
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield db
    except sqlite3.DatabaseError as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from exc
    except Exception as exc:
        # psycopg's errors (a server that went away mid-read): one line, password masked.
        if type(exc).__module__.split(".")[0] != "psycopg":
            raise
        raise click.ClickException(f"cannot read {mask_url(path)}: {exc}") from exc
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
@click.option(
    "--url",
    default=None,
    metavar="URL",
    help="Follow a running gateway over HTTP (its /api/spans stream) instead of the file.",
)
@key_option
def tail(
    rollout_id: str | None,
    follow: bool,
    limit: int,
    as_json: bool,
    bodies: bool,
    db: str,
    url: str | None,
    key: str | None,
) -> None:
    """Print the latest calls, oldest first, one line each.

    Each line: time, rollout/attempt#seq, model, status, latency, tokens in/out,
    cost and the start of the reply. With --url the calls come from a running
    gateway (possibly on another machine) instead of the database file; a
    dropped connection is resumed where it stopped.

    Example:

    \b
        spangate tail --rollout r-42 --follow
        spangate tail -n 100 --json | jq .cost_usd
        spangate tail --url http://gpu-box:8400 --key $SPANGATE_KEY -f
    """
    if url is not None:
        from gateway.cli.remote import tail_remote

        try:
            tail_remote(
                url,
                key,
                rollout_id=rollout_id,
                follow=follow,
                limit=limit,
                as_json=as_json,
                bodies=bodies,
            )
        except KeyboardInterrupt:
            return
        return

    from gateway.cli import render as cli_render
    from store.queries import list_spans, max_rowid

    columns = cli_render.TailColumns()

    def emit(span: dict[str, Any]) -> None:
        if as_json:
            click.echo(cli_render.span_json(span, bodies=bodies))
        else:
            click.echo(columns.line(span))

    try:
        with read_db(db) as conn:
            # Taken first: a call recorded while the backlog is read is printed once, by the loop.
            last = max_rowid(conn)
            backlog = list_spans(
                conn,
                rollout_id=rollout_id,
                limit=limit,
                newest_first=True,
                bodies=True,
                max_page=max(limit, 1),
            ).data[:limit]
            backlog = [s for s in reversed(backlog) if s["_rowid"] <= last]
            columns.fit(backlog)
            for span in backlog:
                emit(span)
            if not follow:
                if not backlog and limit and not as_json:
                    where = f" for rollout {rollout_id}" if rollout_id else " yet"
                    click.echo(f"no calls recorded{where}", err=True)
                return
            while True:
                fresh = list_spans(
                    conn, rollout_id=rollout_id, after_rowid=last, limit=FOLLOW_BATCH, bodies=True
                ).data
                for span in fresh:
                    emit(span)
                if fresh:
                    last = fresh[-1]["_rowid"]
                if len(fresh) < FOLLOW_BATCH:
                    time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        # Ctrl-C (at any point, even mid-backlog) is how a follow ends: exit 0, not "Aborted!".
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
    from gateway.cli import render as cli_render
    from store.queries import list_rollouts
    from store.schema import ROLLOUT_STATUSES

    if status is not None and status not in ROLLOUT_STATUSES:
        raise click.BadParameter(
            f"{status!r} is not one of {', '.join(ROLLOUT_STATUSES)}", param_hint="--status"
        )
    with read_db(db) as conn:
        found = list_rollouts(conn, status=status, limit=limit, max_page=max(limit, 1)).data[:limit]
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
    from gateway.cli import render as cli_render
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


def _dimensions(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, float]:
    import math

    parsed: dict[str, float] = {}
    for item in values:
        name, sep, number = item.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not math.isfinite(value):
            raise click.BadParameter(
                f"{item!r} is not NAME=NUMBER (e.g. accuracy=0.9)", ctx=ctx, param=param
            )
        parsed[name.strip()] = value
    return parsed


def _reward_line(row: dict[str, Any], created: bool) -> str:
    from gateway.cli.render import printable

    target = [f"rollout {row.get('rollout_id') or '-'}"]
    if row.get("attempt_id"):
        target.append(f"attempt {row['attempt_id']}")
    if row.get("span_id"):
        target.append(f"span {row['span_id']}")
    final = " (final)" if row.get("final") else ""
    verb = "stored" if created else "already stored"
    # The row may come from a remote gateway, or hold what another client stored.
    return printable(
        f"{verb} {row['id']}: {row['name']} = {row['value']:g}{final} on "
        f"{' / '.join(target)} · source {row.get('source') or 'user'}"
    )


@cli.command()
@click.argument("rollout_id", metavar="ROLLOUT")
@click.option("--value", required=True, type=float, help="The reward value.")
@click.option(
    "--name", default="reward", show_default=True, help="Which reward (e.g. accuracy, pass)."
)
@click.option("--final", is_flag=True, help="The outcome of the rollout or attempt, not a step.")
@click.option("--attempt", "attempt_id", default=None, metavar="A", help="Reward this attempt.")
@click.option("--span", "span_id", default=None, metavar="S", help="Reward one call by span id.")
@click.option(
    "--response-id",
    default=None,
    metavar="R",
    help="Reward one call by the provider's response id (the `id` the client got back).",
)
@click.option(
    "--dimension",
    "-d",
    "dimensions",
    multiple=True,
    metavar="K=V",
    callback=_dimensions,
    help="A per-dimension score (repeatable): -d accuracy=0.9 -d style=0.5.",
)
@click.option("--comment", default=None, help="Free text.")
@click.option("--source", default="user", show_default=True, help="user, agent, judge:<name>…")
@click.option(
    "--id",
    "reward_id",
    default=None,
    metavar="ID",
    help="Your id for the reward: the same command twice stores it once.",
)
@json_option
@db_option
@click.option(
    "--url",
    default=None,
    metavar="URL",
    help="Post to a running gateway (POST /api/rewards) instead of writing the file.",
)
@key_option
def reward(
    rollout_id: str,
    value: float,
    name: str,
    final: bool,
    attempt_id: str | None,
    span_id: str | None,
    response_id: str | None,
    dimensions: dict[str, float],
    comment: str | None,
    source: str,
    reward_id: str | None,
    as_json: bool,
    db: str,
    url: str | None,
    key: str | None,
) -> None:
    """Record a reward for a rollout, one of its attempts, or one call.

    Without --url it is written straight into the database file (safe while
    `spangate serve` runs); with --url it is posted to the gateway.

    Example:

    \b
        spangate reward r-42 --value 1 --final
        spangate reward r-42 --value 0.3 --name accuracy --span 3fa85f6457d1c0de
        spangate reward r-42 --value 0.9 -d accuracy=1 -d style=0.8 --id r-42-grade
        spangate reward r-42 --value 1 --url http://127.0.0.1:8400 --key $SPANGATE_KEY
    """
    from pydantic import ValidationError

    from gateway.cli import render as cli_render
    from gateway.web.api_models import RewardCreate

    given = {
        "id": reward_id,
        "rollout_id": rollout_id,
        "attempt_id": attempt_id,
        "span_id": span_id,
        "response_id": response_id,
        "name": name,
        "value": value,
        "dimensions": dimensions,
        "final": final,
        "source": source,
        "comment": comment,
    }
    try:
        body = RewardCreate.model_validate(given).model_dump(exclude_none=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "reward"
        raise click.ClickException(f"{where}: {first['msg']}") from exc
    if url is not None:
        from gateway.cli.remote import post_reward

        row, created = post_reward(url, key, body)
    else:
        row, created = _write_reward(db, body)
    click.echo(cli_render.json_line(row) if as_json else _reward_line(row, created))


def _write_reward(path: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The reward written straight into the file: SQLite (WAL) lets a second writer in."""
    import sqlite3

    from store.backend import store_exists
    from store.errors import StoreError
    from store.schema import connect
    from store.writes import add_reward

    if not store_exists(path):
        raise click.ClickException(f"no database at {path}; run `spangate serve` first")
    try:
        conn = connect(path)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    except sqlite3.DatabaseError as exc:
        raise click.ClickException(f"cannot open {path}: {exc}") from exc
    try:
        return add_reward(conn, body)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    except sqlite3.DatabaseError as exc:
        raise click.ClickException(f"cannot write to {path}: {exc}") from exc
    finally:
        conn.close()


def _time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from store.times import parse_since

    if value is None:
        return None
    try:
        return parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@cli.command("export")
@click.option(
    "--rollout",
    "rollout_ids",
    multiple=True,
    metavar="R",
    help="Only this rollout (repeat for several).",
)
@click.option(
    "--since",
    "since_ns",
    metavar="T",
    callback=_time_option,
    help="Rollouts created at or after T: ISO 8601 (2026-11-22T08:00:00, local time "
    "unless it has Z or an offset) or a duration ago (30m, 1h, 7d).",
)
@click.option(
    "--until",
    "until_ns",
    metavar="T",
    callback=_time_option,
    help="Rollouts created before T (same forms as --since).",
)
@click.option("--status", default=None, help="Only rollouts in this status.")
@click.option("--agent", default=None, help="Only rollouts of this agent.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "triplets", "otlp"]),
    default="jsonl",
    show_default=True,
    help="jsonl: one rollout per line; triplets: one prompt/completion/reward per call; "
    "otlp: one OTLP/JSON trace export per rollout, for a tracing backend.",
)
@click.option(
    "--reward-name",
    default=None,
    metavar="N",
    help="With --format triplets: the reward name that counts (default reward).",
)
@click.option(
    "--output",
    "-o",
    default="-",
    show_default=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="File to write (replaced only once the export is complete); - is stdout.",
)
@db_option
def export_command(
    rollout_ids: tuple[str, ...],
    since_ns: int | None,
    until_ns: int | None,
    status: str | None,
    agent: str | None,
    fmt: str,
    reward_name: str | None,
    output: str,
    db: str,
) -> None:
    """Export rollouts for training or analysis, as JSON lines.

    jsonl gives each rollout with its attempts, their calls (request and response
    bodies) and rewards. triplets gives one line per chat/responses/completion call:
    prompt, tools, completion and a reward, the call's own reward, else its attempt's
    final one, else its attempt's latest, else the rollout's final one.

    Example:

    \b
        spangate export --since 7d --status succeeded -o rollouts.jsonl
        spangate export --format triplets --reward-name accuracy | jq .reward
        spangate export --format otlp --rollout task-42 -o task-42.otlp.jsonl
    """
    from store.export import (
        DEFAULT_REWARD_NAME,
        iter_rollouts,
        iter_triplets,
        missing_rollouts,
        write_jsonl,
    )
    from store.schema import ROLLOUT_STATUSES

    if status is not None and status not in ROLLOUT_STATUSES:
        raise click.BadParameter(
            f"{status!r} is not one of {', '.join(ROLLOUT_STATUSES)}", param_hint="--status"
        )
    if reward_name is not None and fmt != "triplets":
        raise click.UsageError("--reward-name applies only to --format triplets")
    if since_ns is not None and until_ns is not None and since_ns >= until_ns:
        raise click.BadParameter("must be later than --since", param_hint="--until")
    filters: dict[str, Any] = {
        "rollout_ids": list(rollout_ids) or None,
        "since_ns": since_ns,
        "until_ns": until_ns,
        "status": status,
        "agent": agent,
    }
    with read_db(db) as conn:
        missing = missing_rollouts(conn, rollout_ids) if rollout_ids else []
        if missing:
            raise click.ClickException(f"rollout not found: {', '.join(missing)}")
        if fmt == "otlp":
            from gateway.exporters.otlp_mapping import iter_otlp_json

            items = iter_otlp_json(iter_rollouts(conn, **filters))
            unit = "rollouts"
        elif fmt == "triplets":
            items = iter_triplets(conn, reward_name=reward_name or DEFAULT_REWARD_NAME, **filters)
            unit = "calls"
        else:
            items = iter_rollouts(conn, **filters)
            unit = "rollouts"
        # atomic: a failed export leaves an existing file as it was, not half-written.
        with click.open_file(output, "wb", atomic=output != "-") as fp:
            count = write_jsonl(items, fp)
    if count == 0:
        click.echo(f"no {unit} match; nothing exported", err=True)
    elif output != "-":
        click.echo(f"exported {count} {unit} to {output}", err=True)


# The judge and patterns commands live in their own modules; registered last, as they
# import from this one.
from gateway.cli.judge import judge  # noqa: E402

cli.add_command(judge)

from gateway.cli.patterns import patterns  # noqa: E402

cli.add_command(patterns)

from gateway.cli.prune import prune  # noqa: E402

cli.add_command(prune)
