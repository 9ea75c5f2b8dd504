"""What every `spangate judge` command shares: its options, the judge and the model it asks,
the gateway those calls go through, a judge job with a progress bar, and the output table.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import click

from gateway.cli.options import configured_db, db_option, json_option, require_db

if TYPE_CHECKING:
    from rich.progress import Progress

    from config.models import Settings
    from judge.jobs import JobSummary, Judge, JudgeStore, Outcome
    from judge.llm import JudgeClient

T = TypeVar("T")

INTERRUPTED_EXIT = 130  # 128 + SIGINT


def config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        envvar="SPANGATE_CONFIG",
        help="Config file with the judge settings and model groups (default ./spangate.yaml).",
    )(fn)


def judge_option(
    default: str, help: str = "rules, llm, or a rubric named in `judge.rubrics`."
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--judge",
        "judge_name",
        default=default,
        show_default=True,
        metavar="NAME",
        help=help,
    )


def gateway_url_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--gateway-url",
        default=None,
        metavar="URL",
        help="Gateway the judge model is asked through (default: judge.gateway_url, "
        "else one started in this process).",
    )(fn)


def concurrency_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--concurrency", type=click.IntRange(1, 64), default=4, show_default=True, help=help
    )


def judge_context_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --db, --gateway-url, --json: where the judge, its model and the rollouts
    come from, and how the result is printed (every `judge` command takes them)."""
    return config_option(db_option(gateway_url_option(json_option(fn))))


def judge_settings(config_path: str | None) -> Settings:
    """The config's settings; a config that does not load is a ClickException."""
    from config.loader import ConfigError, load_settings

    try:
        return load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _proxy_key(settings: Settings) -> str | None:
    """A key the in-process gateway accepts on its OpenAI routes, if it checks keys at all."""
    for key in settings.auth.keys:
        if "proxy" in key.scopes or "admin" in key.scopes:
            return key.key
    return None


@contextlib.asynccontextmanager
async def judge_gateway(
    settings: Settings, db: str, url: str | None
) -> AsyncIterator[tuple[str, str | None]]:
    """`(base URL, key)` of the gateway the judge's calls go through; started here if none given.

    Judges that ask a model send their calls through a gateway, so those calls are recorded
    under judge rollouts like any agent's: `--gateway-url`, else `judge.gateway_url`, else a
    gateway started inside this process for the length of the command.
    """
    url = url or settings.judge.gateway_url
    if url:
        yield url, settings.judge.api_key
        return
    from aiohttp import web

    from gateway.compose import create_app
    from gateway.web.state import GATEWAY

    own = settings.model_copy(deep=True)
    own.judge.online = None  # this gateway only carries the judge's calls
    try:
        own.check_api_bases()
        app = create_app(own, db)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    # The judge's calls are over (or cancelled) when it stops: nothing to wait long for.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        app[GATEWAY].base_url = base
        yield base, settings.judge.api_key or _proxy_key(settings)
    finally:
        # Drains the writer, so the judge's own calls are in the database when we return.
        await runner.cleanup()


class JudgeModel:
    """The judge model's client, made once the gateway its calls go through is up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: JudgeClient | None = None

    def get(self) -> JudgeClient:
        if self.client is None:
            raise click.ClickException("the judge model is not connected")
        return self.client

    def factory(self) -> Callable[[], JudgeClient] | None:
        """For `make_judge`: None when no judge model is configured (an llm judge then refuses)."""
        return self.get if self.settings.judge.model else None

    @contextlib.asynccontextmanager
    async def connected(self, db: str, gateway_url: str | None) -> AsyncIterator[str]:
        import httpx

        from judge.llm import JudgeClient

        model = self.settings.judge.model
        if not model:
            raise click.ClickException("the judge needs a model: set `judge.model` in the config")
        async with (
            httpx.AsyncClient() as http,
            judge_gateway(self.settings, db, gateway_url) as (base, key),
        ):
            self.client = JudgeClient(base, model, http, key)
            try:
                yield base
            finally:
                self.client = None


def ready_judge(
    name: str, config_path: str | None, db: str, *, will_run: bool
) -> tuple[JudgeModel, Judge, str]:
    """The judge NAME, the model it asks and the store (`--db`, else the config's
    `store.url`), as configured; the store must exist."""
    settings = judge_settings(config_path)
    model = JudgeModel(settings)
    chosen = _make_judge(name, settings, model, will_run=will_run)
    db = configured_db(db, settings.store.url)
    require_db(db)
    return model, chosen, db


def _make_judge(name: str, settings: Settings, model: JudgeModel, *, will_run: bool) -> Judge:
    """The named judge; a reader of stored verdicts needs its version, not its model."""
    from judge.jobs import make_judge

    try:
        return make_judge(name, settings.judge, model.factory() if will_run else model.get)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


@dataclass
class JobRun:
    """One judge job from the CLI: a progress bar on stderr, safe to interrupt."""

    judge: Judge
    model: JudgeModel
    db: str
    gateway_url: str | None
    concurrency: int
    force: bool
    counts: Counter[str] = field(default_factory=Counter)

    def run(self, select: Callable[[JudgeStore], Awaitable[list[str]]]) -> JobSummary:
        """Judge the rollouts `select(store)` picks; Ctrl-C keeps what was written, exits 130."""
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from judge.jobs import JudgeStore
        from store.errors import StoreError

        try:
            store = JudgeStore(self.db)
        except StoreError as exc:
            raise click.ClickException(str(exc)) from exc
        progress = Progress(
            TextColumn("judging ({task.fields[judge]})"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tally]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        try:
            with progress:
                return run_async(self._job(store, select, progress))
        except KeyboardInterrupt:
            judged = self.counts["judged"]
            click.echo(f"interrupted; {judged} judged so far — rerun to continue", err=True)
            raise click.exceptions.Exit(INTERRUPTED_EXIT) from None
        finally:
            # After asyncio.run: its executor is shut down, so no store thread is mid-write.
            store.close()

    async def _job(
        self,
        store: JudgeStore,
        select: Callable[[JudgeStore], Awaitable[list[str]]],
        progress: Progress,
    ) -> JobSummary:
        from judge.jobs import run_job

        ids = await select(store)
        from rich.markup import escape

        from gateway.cli.render import printable

        # The field is rendered as rich markup, and rich lets ESC and C1 controls through.
        judge = escape(printable(self.judge.name))
        task = progress.add_task("judge", total=len(ids), judge=judge, tally="")

        def record(outcome: Outcome) -> None:
            self.counts[outcome.status] += 1
            tally = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
            progress.update(task, advance=1, tally=tally)

        async def job() -> JobSummary:
            summary = await run_job(
                self.judge,
                store,
                ids,
                concurrency=self.concurrency,
                force=self.force,
                on_result=record,
            )
            order = {rid: i for i, rid in enumerate(ids)}
            summary.outcomes.sort(key=lambda o: order.get(o.rollout_id, len(order)))
            return summary

        if not self.judge.needs_model or not ids:
            return await job()
        async with self.model.connected(self.db, self.gateway_url):
            return await job()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)`, imported here, not at the top: it costs ~30 ms on every
    `spangate` start."""
    import asyncio

    return asyncio.run(coro)


def score_text(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_lines(rows: Sequence[Sequence[str]], right: frozenset[int]) -> list[str]:
    """Cells padded to their column's width (numbers right-aligned), header in bold.

    Cells hold rollout ids and what the judge model wrote: shown escaped (`printable`).
    """
    from gateway.cli.render import printable

    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        line = "  ".join(cells).rstrip()
        lines.append(click.style(line, bold=True) if n == 0 else line)
    return lines
