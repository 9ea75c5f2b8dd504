"""Options and helpers every `spangate` command shares: --db, --json, --key, times,
and the read-only database."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar

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


@contextlib.contextmanager
def output_file(path: str, mode: str, **options: Any) -> Iterator[IO[Any]]:
    """`-o PATH` opened for writing; an error is one line naming the path.

    A regular file (or a new one) is written beside and moved over the old one once
    complete, so a failed write leaves it as it was. Anything else (`-`, a named pipe,
    `>(gzip > out.gz)`, /dev/stdout) is written into as it goes: moving a file over it
    would replace it, and its reader would get nothing.
    """
    try:
        with click.open_file(path, mode, atomic=replaces_file(path), **options) as fp:
            yield fp
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from exc


def replaces_file(path: str) -> bool:
    """Whether `-o PATH` is written beside and moved over: a regular file, or none yet."""
    import os
    import stat

    if path == "-":
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # missing (or unreachable: opening it will say why)


def output_option(what: str) -> Callable[[F], F]:
    """`-o/--output FILE` ("-" for stdout), written whole or not at all."""
    return click.option(
        "--output",
        "-o",
        default="-",
        show_default=True,
        type=click.Path(dir_okay=False, allow_dash=True),
        help=f"{what} to write (replaced only once complete); - is stdout.",
    )


SINCE_HELP = (
    "Rollouts created at or after T: ISO 8601 (2026-11-22T08:00:00, local time unless it has "
    "Z or an offset) or a duration ago (30m, 1h, 7d)."
)


def since_option(fn: F) -> F:
    return click.option("--since", "since_ns", metavar="T", callback=time_option, help=SINCE_HELP)(
        fn
    )


def rollout_filter_options(fn: F) -> F:
    """--rollout, --since, --status, --agent: which rollouts a batch command (judge run,
    export) takes."""
    fn = click.option("--agent", default=None, help="Only rollouts of this agent.")(fn)
    fn = click.option("--status", default=None, help="Only rollouts in this status.")(fn)
    fn = since_option(fn)
    return click.option(
        "--rollout",
        "rollout_ids",
        multiple=True,
        metavar="R",
        help="Only this rollout (repeat for several); default: every rollout that matches.",
    )(fn)


# Far more rows than any store holds, and small enough for SQLite's 64-bit LIMIT: a count
# past it means "all" (a callback, not IntRange's max, keeps `--help` as it was).
MAX_LIMIT = 1_000_000_000


def at_most_max(ctx: click.Context, param: click.Parameter, value: int) -> int:
    return min(value, MAX_LIMIT)


def limit_option(default: int, *, minimum: int, help: str) -> Callable[[F], F]:
    """`-n/--limit N`: how many rows a listing prints."""
    return click.option(
        "--limit",
        "-n",
        default=default,
        show_default=True,
        type=click.IntRange(min=minimum),
        callback=at_most_max,
        help=help,
    )


def configured_db(db: str, store_url: str | None) -> str:
    """The store a command that reads the config uses: `--db` or `$SPANGATE_DB` when given,
    else the config's `store.url`, else the default file."""
    source = click.get_current_context().get_parameter_source("db")
    if store_url and source is click.core.ParameterSource.DEFAULT:
        return store_url
    return db


def key_option(fn: F) -> F:
    return click.option(
        "--key",
        default=None,
        envvar="SPANGATE_KEY",
        metavar="KEY",
        help="With --url: the gateway API key, sent as a Bearer token (or $SPANGATE_KEY).",
    )(fn)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so the final flush cannot fail too."""
    import os

    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what the shell reports for `yes | head -1`


def require_db(path: str) -> None:
    """A command that reads a store needs one: say how to get it rather than create it."""
    from store.backend import is_postgres, store_exists

    if not store_exists(path):
        raise click.ClickException(f"no database at {path}; run `spangate serve` first")
    if not is_postgres(path) and not _has_spangate_schema(path):
        # Opening it for a write would migrate spangate's tables into it.
        raise click.ClickException(
            f"{path} is not a spangate database (it has no spangate schema); check --db"
        )


def _has_spangate_schema(path: str) -> bool:
    """The SQLite file has been migrated (Alembic's version table is there); a file that
    is not SQLite at all passes, and opening it reports that."""
    import sqlite3
    from pathlib import Path

    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return True
    return found is not None


@contextlib.contextmanager
def read_db(path: str) -> Iterator[Database]:
    """The database opened read-only; a missing or foreign file is a user error, not a traceback."""
    with _open_db(path, read_only=True) as db:
        yield db


@contextlib.contextmanager
def write_db(path: str) -> Iterator[Database]:
    """The database opened for a short write beside a running gateway (SQLite's WAL lets a
    second writer in); a store error is one line, not a traceback."""
    with _open_db(path, read_only=False) as db:
        yield db


@contextlib.contextmanager
def _open_db(path: str, *, read_only: bool) -> Iterator[Database]:
    import sqlite3

    from store.backend import mask_url
    from store.errors import StoreError
    from store.schema import connect

    require_db(path)
    try:
        db = connect(path, read_only=read_only)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    except sqlite3.DatabaseError as exc:
        raise click.ClickException(f"cannot open {path}: {exc}") from exc
    verb = "read" if read_only else "write to"
    try:
        yield db
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    except sqlite3.DatabaseError as exc:
        raise click.ClickException(f"cannot {verb} {path}: {exc}") from exc
    except Exception as exc:
        # psycopg's errors (a server that went away mid-read): one line, password masked.
        if type(exc).__module__.split(".")[0] != "psycopg":
            raise
        raise click.ClickException(f"cannot {verb} {mask_url(path)}: {exc}") from exc
    finally:
        db.close()


def store_writer(path: str) -> Any:
    """The store's single writer, opened for this command (judge verdicts, guidelines, prunes
    are written through it, on either backend)."""
    from judge.jobs import open_writer
    from store.errors import StoreError

    require_db(path)
    try:
        return open_writer(path)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc


def time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """--since/--until: ISO 8601 or a duration ago, as nanoseconds the store can hold."""
    from store.times import parse_since

    if value is None:
        return None
    try:
        return parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
