"""Options and helpers every `spangate` command shares: --db, --json, --key, times,
and the read-only database."""

from __future__ import annotations

import contextlib
import sys
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


def time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from store.times import parse_since

    if value is None:
        return None
    try:
        return parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
