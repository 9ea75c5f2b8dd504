"""Which store `--db` names (a SQLite path or a `postgresql://` URL) and one connection type
over PostgreSQL that takes the same `:named` SQL as SQLite, so every query is written once.

Where the two dialects differ (a JSON array as a table, a JSON field, a substring test) the
query asks `json_table()`, `json_field()` or `contains()`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from store.errors import InvalidValue, StoreUnavailable

POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
CONNECT_TIMEOUT_SECONDS = 5


def is_postgres(target: str | Path) -> bool:
    """True when `target` is a PostgreSQL URL rather than a SQLite file path."""
    text = str(target)
    return "://" in text and text.split("://", 1)[0].lower() in POSTGRES_SCHEMES


def mask_url(url: str) -> str:
    """The URL with its password replaced by `***`, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r":[^:@/]*@", ":***@", url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def libpq_url(url: str) -> str:
    """The URL as libpq takes it (`postgresql+psycopg://` is SQLAlchemy's spelling)."""
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}" if scheme.lower() in POSTGRES_SCHEMES else url


def store_label(target: str | Path) -> Path:
    """A local path standing for the store: SQLite's own file, or for PostgreSQL
    `./<host>-<port>-<dbname>.pg`, beside which this process keeps its spill journal."""
    if not is_postgres(target):
        return Path(target)
    parts = urlsplit(libpq_url(str(target)))
    name = (parts.path or "/").strip("/") or "postgres"
    host = parts.hostname or "local"
    port = parts.port or 5432
    return Path(re.sub(r"[^A-Za-z0-9_.-]", "_", f"{host}-{port}-{name}") + ".pg")


def store_exists(target: str | Path) -> bool:
    """A SQLite file is there, or a PostgreSQL URL (whose server answers for itself)."""
    return is_postgres(target) or Path(target).is_file()


def dialect_of(db: Any) -> str:
    """`postgresql` for a `PgDatabase`, else `sqlite` (a sqlite-utils `Database`)."""
    return getattr(db, "dialect", "sqlite")


def json_table(dialect: str, expr: str, alias: str) -> str:
    """A FROM item listing the JSON array `expr` as rows `alias.value` (text) and
    `alias.key` (position)."""
    if dialect == "postgresql":
        return f"jsonb_array_elements_text(cast({expr} as jsonb)) with ordinality as {alias}(value, key)"
    return f"json_each({expr}) as {alias}"


def json_field(dialect: str, column: str, key: str) -> str:
    """The text at `key` of the JSON object in `column`."""
    if dialect == "postgresql":
        return f"(cast({column} as jsonb) ->> '{key}')"
    return f"json_extract({column}, '$.{key}')"


def contains(dialect: str, haystack: str, needle: str) -> str:
    """True where the text `haystack` holds the text `needle` (both SQL expressions)."""
    function = "strpos" if dialect == "postgresql" else "instr"
    return f"{function}({haystack}, {needle}) > 0"


# -- PostgreSQL ---------------------------------------------------------------------

_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|::|:([A-Za-z_]\w*)|\?|%")


@lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """`:name` and `?` placeholders as psycopg's `%(name)s` and `%s` (quoted text and `::`
    casts left alone, every literal `%` doubled)."""

    def swap(match: re.Match[str]) -> str:
        token = match.group(0)
        if match.group(1):
            return f"%({match.group(1)})s"
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        # psycopg scans quoted text for placeholders too: a `%` there is doubled as well.
        return token.replace("%", "%%")

    return _TOKEN.sub(swap, sql)


def _numeric_loader() -> Any:
    from psycopg.adapt import Loader

    class NumericLoader(Loader):
        """sum() of integers is NUMERIC in PostgreSQL; SQLite gives an int, and so do we."""

        def load(self, data: Any) -> int | float:
            number = Decimal(bytes(data).decode())
            return int(number) if number == number.to_integral_value() else float(number)

    return NumericLoader


def connect_postgres(url: str, *, read_only: bool = False, autocommit: bool = True) -> Any:
    """A psycopg connection, or `StoreUnavailable` in one line with the password masked."""
    import psycopg

    options = "-c default_transaction_read_only=on" if read_only else None
    try:
        conn = psycopg.connect(
            libpq_url(url),
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            cursor_factory=psycopg.ClientCursor,
            options=options,
            application_name="spangate",
        )
    except (psycopg.Error, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        reason = reason.replace(url, mask_url(url))
        raise StoreUnavailable(f"cannot open {mask_url(url)}: {reason}") from None
    conn.adapters.register_loader("numeric", _numeric_loader())
    return conn


@contextlib.contextmanager
def _invalid_values() -> Iterator[None]:
    """psycopg's data exceptions (SQLSTATE class 22: a NUL in text, a number out of range)
    as `InvalidValue`: the value given was refused, the store is fine. SQLite takes such
    values, so callers see the same on both backends: a refused value, not a broken store."""
    import psycopg

    try:
        yield
    except psycopg.DataError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidValue(f"a value the store cannot hold: {reason}") from exc


class PgDatabase:
    """A PostgreSQL connection that runs the store's `:named` SQL like sqlite-utils'
    `Database.execute` does (client-side binding, so untyped `:x is null` works)."""

    dialect = "postgresql"

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = url
        self.read_only = read_only
        self.conn = connect_postgres(url, read_only=read_only)
        # Session settings `set_session` made, made again on each new connection.
        self.session: dict[str, str] = {}

    def set_session(self, **settings: str) -> None:
        """Set these for this session (`lock_timeout="2s"`), and again after a reconnect."""
        self.session.update(settings)
        self._apply_session()

    def _apply_session(self) -> None:
        for name, value in self.session.items():
            self.conn.execute("select set_config(%s, %s, false)", [name, value])

    def execute(self, sql: str, params: dict[str, Any] | Sequence[Any] | None = None) -> Any:
        with _invalid_values():
            return self.conn.execute(to_pyformat(sql), params if params is not None else {})

    def executemany(self, sql: str, rows: Sequence[Any]) -> Any:
        cur = self.conn.cursor()
        with _invalid_values():
            cur.executemany(to_pyformat(sql), rows)
        return cur

    @property
    def broken(self) -> bool:
        return bool(self.conn.closed or self.conn.broken)

    def reconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
        self.conn = connect_postgres(self.url, read_only=self.read_only)
        self._apply_session()

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def atomic(db: Any) -> Iterator[None]:
    """One transaction on either backend (SQLite takes the write lock at once); inside one
    already open, a savepoint, so a failure undoes only this block's work."""
    if dialect_of(db) == "postgresql":
        with db.conn.transaction():
            yield
        return
    conn = db.conn
    if conn.in_transaction:
        with _savepoint(conn):
            yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def _savepoint(conn: Any) -> Iterator[None]:
    conn.execute("SAVEPOINT spangate_atomic")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK TO spangate_atomic")
        conn.execute("RELEASE spangate_atomic")
        raise
    conn.execute("RELEASE spangate_atomic")
