"""Real servers for tests: the gateway on a loopback port in its own thread, `spangate serve`
as a real process, and polling helpers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from aiohttp import web
from shapes import CLI_ARGV

from config.models import Settings
from gateway.compose import create_app
from gateway.server import listen, runner_options
from gateway.web.state import GATEWAY, Gateway
from store.backend import is_postgres
from store.queries import decode_row
from store.schema import connect

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 30.0
# The upstream key in served configs: it must never show up in a log.
UPSTREAM_KEY = "sk-reliability-upstream-key"


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll until `predicate()` is truthy and return it; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)  # poll


class GatewayThread:
    """`create_app` served by a real AppRunner on 127.0.0.1:0, in a daemon thread."""

    def __init__(self, settings: Settings, db_path: str | Path) -> None:
        self.settings = settings
        self.db_path = db_path if is_postgres(db_path) else Path(db_path)
        self.loop = asyncio.new_event_loop()
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gw(self) -> Gateway:
        assert self.app is not None
        return self.app[GATEWAY]

    def url(self, rollout: str | None = None, attempt: str | None = None) -> str:
        """The `base_url` an OpenAI client uses, with the rollout prefix when given."""
        prefix = ""
        if rollout is not None:
            prefix = f"/rollout/{rollout}"
            if attempt is not None:
                prefix += f"/attempt/{attempt}"
        return f"{self.base}{prefix}/v1"

    def start(self) -> GatewayThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self.app = create_app(self.settings, self.db_path)
        # In-flight calls get a while to finish at stop: tests have no `_finish_in_flight`.
        options = {**runner_options(self.settings), "shutdown_timeout": 10}
        self._runner = web.AppRunner(self.app, access_log=None, **options)
        await self._runner.setup()
        site = await listen(self._runner, self.settings, "127.0.0.1", 0, grace=10)
        self.port = site.port
        self.app[GATEWAY].base_url = self.base

    def stop(self) -> None:
        """Stop serving; safe to call again (a test may stop a gateway its fixture also stops)."""
        if self.loop.is_closed():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=60)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every published span has been written, journaled ones included."""
        gw = self.gw
        wait_until(
            lambda: (
                gw.writer.written + gw.writer.spilled >= gw.recorder.published and gw.writer.settled
            ),
            timeout=timeout,
            what="the writer to catch up",
        )

    def spans(self, **where: Any) -> list[dict[str, Any]]:
        self.flush()
        return read_spans(self.db_path, **where)


def read_spans(db_path: str | Path, **where: Any) -> list[dict[str, Any]]:
    """Span rows (JSON columns decoded), filtered by equality on columns, in seq/start order."""
    clause = " and ".join(f"{k} = ?" for k in where) or "true"
    sql = f"select * from spans where {clause} order by rollout_id, seq, start_ns"
    return [decode_row(r) for r in read_rows(db_path, sql, *where.values())]


def head_revision() -> str:
    """The newest migration's revision: what `migrate` brings every store to."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from store.schema import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def read_rows(db_path: str | Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    if is_postgres(db_path):
        db = connect(db_path, read_only=True)
        try:
            cursor = db.execute(sql, list(params))
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            db.close()
        for row in rows:
            row.pop("rowid", None)
        return rows
    conn = sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


# -- `spangate serve` as a real process ------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, groups: dict[str, str], **settings: Any) -> Path:
    """A `spangate.yaml` with one OpenAI-compatible deployment per `{group: api_base}` and the
    built-in `mock` group, plus any top-level `settings`."""
    models: list[dict[str, Any]] = [
        {
            "name": name,
            "deployments": [
                {
                    "provider": "openai",
                    "model": "upstream-model",
                    "api_base": base,
                    "api_key": UPSTREAM_KEY,
                }
            ],
        }
        for name, base in groups.items()
    ]
    models.append({"name": "mock", "deployments": [{"provider": "mock", "model": "mock"}]})
    path.write_text(yaml.safe_dump({"models": models, **settings}))
    return path


@dataclass
class ServedProcess:
    """One `spangate serve` subprocess; its output goes to files so a chatty log never blocks."""

    process: subprocess.Popen[bytes]
    base: str
    db: Path
    log_path: Path
    _log: Any = field(repr=False, default=None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"spangate serve exited with {self.process.returncode}:\n{self.log()}"
            )
        try:
            return httpx.get(f"{self.base}/health/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def signal(self, signum: signal.Signals) -> None:
        os.kill(self.process.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill if still running (tests stop it gracefully themselves) and close the log."""
        if self.process.poll() is None:
            self.process.kill()
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


ServeFactory = Callable[..., ServedProcess]


def start_served(config: Path, db: Path, log_path: Path) -> ServedProcess:
    """Start `spangate serve` on a free port and wait until `/health/ready` answers 200."""
    port = free_port()
    log = open(log_path, "ab")  # noqa: SIM115 - closed by ServedProcess.stop
    process = subprocess.Popen(
        [
            *CLI_ARGV,
            "serve",
            "--config",
            str(config),
            "--db",
            str(db),
            "--port",
            str(port),
        ],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    served = ServedProcess(process, f"http://127.0.0.1:{port}", db, log_path, log)
    try:
        wait_until(served.ready, timeout=READY_TIMEOUT, interval=0.05, what="spangate serve")
    except BaseException:
        served.stop()
        raise
    return served
