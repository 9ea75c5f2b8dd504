"""`spangate judge`: judge recorded rollouts in jobs, calibrate a judge on human labels, and
compare two rollouts or attempts pairwise.

Judges that ask a model send their calls through a gateway, so those calls are recorded
under judge rollouts like any agent's: `--gateway-url`, else `judge.gateway_url`, else a
gateway started inside this process for the length of the command.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gateway.cli.options import db_option, json_option, require_db, rollout_filter_options

if TYPE_CHECKING:
    from rich.progress import Progress

    from config.models import Settings
    from judge.calibrate import Agreement
    from judge.jobs import JobSummary, Judge, JudgeStore, Outcome
    from judge.llm import JudgeClient, PairwiseResult
    from judge.rubric import Rubric
    from judge.trajectory import Trajectory

INTERRUPTED_EXIT = 130  # 128 + SIGINT
# Fewer labelled rollouts than this and the reading says the numbers are still noisy.
FEW_LABELS = 30
# Landis & Koch (1977): kappa bands and what they are called.
KAPPA_BANDS = (
    (0.0, "poor"),
    (0.20, "slight"),
    (0.40, "fair"),
    (0.60, "moderate"),
    (0.80, "substantial"),
    (1.0, "almost perfect"),
)
PASS_LABELS = frozenset({"pass", "good", "true", "1", "yes"})
FAIL_LABELS = frozenset({"fail", "bad", "false", "0", "no"})


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


@click.group()
def judge() -> None:
    """Score recorded rollouts with a judge, check a judge against human labels, compare two."""


# -- shared plumbing ----------------------------------------------------------


def _settings(config_path: str | None) -> Settings:
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
    """`(base URL, key)` of the gateway the judge's calls go through; started here if none given."""
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


def _ready_judge(
    name: str, config_path: str | None, db: str, *, will_run: bool
) -> tuple[JudgeModel, Judge]:
    """The judge NAME and the model it asks, as configured; the store must exist."""
    settings = _settings(config_path)
    model = JudgeModel(settings)
    chosen = _make_judge(name, settings, model, will_run=will_run)
    require_db(db)
    return model, chosen


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

        store = JudgeStore(self.db)
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
                return _asyncio().run(self._job(store, select, progress))
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


def _asyncio() -> types.ModuleType:
    import asyncio  # here, not at the top: it costs ~30 ms on every `spangate` start

    return asyncio


def _score(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(rows: Sequence[Sequence[str]], right: frozenset[int]) -> list[str]:
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


def _summary_lines(summary: JobSummary) -> list[str]:
    from gateway.cli.render import clip, printable

    head = printable(
        f"judge {summary.judge} ({summary.version}): {summary.count('judged')} judged, "
        f"{summary.count('skipped')} skipped, {summary.count('failed')} failed · "
        f"mean score {_score(summary.mean_score)}"
    )
    if not summary.outcomes:
        return [head]
    rows = [["ROLLOUT", "RESULT", "SCORE", "SUMMARY"]]
    for outcome in summary.outcomes:
        if outcome.status == "skipped":
            note = "already judged (--force judges it again)"
        elif outcome.status == "failed":
            note = outcome.error or ""
        else:
            note = outcome.summary or ""
        rows.append([outcome.rollout_id, outcome.status, _score(outcome.score), clip(note, 80)])
    return [head, "", *_table(rows, right=frozenset({2}))]


def _missing_rollouts(db: str, rollout_ids: Sequence[str]) -> list[str]:
    from gateway.cli.options import read_db
    from store.export import missing_rollouts

    with read_db(db) as conn:
        return missing_rollouts(conn, rollout_ids)


# -- judge run ------------------------------------------------------------------


@judge.command("run")
@rollout_filter_options
@click.option(
    "--sample",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    metavar="P",
    help="Judge this share of them (0-1); the same rollouts on every rerun.",
)
@judge_option("rules")
@concurrency_option("Rollouts judged at once.")
@click.option("--force", is_flag=True, help="Judge again rollouts this judge version already did.")
@judge_context_options
def run_command(
    rollout_ids: tuple[str, ...],
    since_ns: int | None,
    status: str | None,
    agent: str | None,
    sample: float | None,
    judge_name: str,
    concurrency: int,
    force: bool,
    config_path: str | None,
    db: str,
    gateway_url: str | None,
    as_json: bool,
) -> None:
    """Judge recorded rollouts and store each verdict as a reward (source judge:NAME).

    A rollout this judge (same rubric version) already judged is skipped, so an
    interrupted run continues where it stopped when run again; --force judges
    again. Rollouts of the judge itself (judge-*) are never picked.

    Example:

    \b
        spangate judge run --since 1d --status failed
        spangate judge run --judge llm --sample 0.1 --concurrency 8
        spangate judge run --rollout r-42 --judge llm --force --json | jq .mean_score
    """
    from gateway.cli import render as cli_render
    from judge.jobs import Selection
    from store.schema import ROLLOUT_STATUSES

    if status is not None and status not in ROLLOUT_STATUSES:
        raise click.BadParameter(
            f"{status!r} is not one of {', '.join(ROLLOUT_STATUSES)}", param_hint="--status"
        )
    model, chosen = _ready_judge(judge_name, config_path, db, will_run=True)
    if rollout_ids:
        missing = _missing_rollouts(db, rollout_ids)
        if missing:
            raise click.ClickException(f"rollout not found: {', '.join(missing)}")
    selection = Selection(
        rollout_ids=list(rollout_ids) or None,
        since_ns=since_ns,
        status=status,
        agent=agent,
        sample=sample,
    )
    job = JobRun(chosen, model, db, gateway_url, concurrency, force)
    summary = job.run(lambda store: store.select(selection))
    if as_json:
        click.echo(cli_render.json_line(summary.as_dict()))
        return
    if not summary.outcomes:
        click.echo("no rollouts match; nothing to judge", err=True)
        return
    for line in _summary_lines(summary):
        click.echo(line)


# -- judge calibrate ------------------------------------------------------------


@dataclass
class Labelled:
    """One line of a labels file: a human's score (0-1) or pass/fail label for a rollout."""

    line: int
    rollout_id: str
    overall: float | str
    criteria: dict[str, float | str]


def _human_value(value: Any, what: str) -> float | str:
    """A score in [0, 1] stays a float; a label becomes "pass" or "fail"."""
    if isinstance(value, bool):
        return "pass" if value else "fail"
    if isinstance(value, int | float):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{what} must be between 0 and 1, got {value}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PASS_LABELS:
            return "pass"
        if text in FAIL_LABELS:
            return "fail"
    raise ValueError(
        f"{what} {value!r} is neither a score in [0, 1] nor a label (pass/fail, good/bad, "
        "true/false, 1/0)"
    )


def _label_value(value: Any, what: str) -> str:
    """A `label` field: pass/fail, also written as 1/0 or true/false."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1):
        return "pass" if value else "fail"
    found = _human_value(value, what)
    if not isinstance(found, str):
        raise ValueError(f"{what} {value!r} is not a label (pass/fail, good/bad, true/false)")
    return found


def parse_labels(path: str) -> list[Labelled]:
    """Every labelled line of a JSONL file; the first bad line is a ClickException naming it."""
    import orjson

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from exc
    found: list[Labelled] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from exc
            if not isinstance(item, dict):
                raise ValueError("expected a JSON object")
            rollout_id = item.get("rollout_id")
            if not isinstance(rollout_id, str) or not rollout_id:
                raise ValueError("`rollout_id` (a string) is missing")
            if item.get("score") is not None:
                if isinstance(item["score"], bool) or not isinstance(item["score"], int | float):
                    raise ValueError(f"`score` must be a number in [0, 1], got {item['score']!r}")
                overall = _human_value(item["score"], "`score`")
            elif item.get("label") is not None:
                overall = _label_value(item["label"], "`label`")
            else:
                raise ValueError("give a `score` (0-1) or a `label` (pass/fail)")
            given = item.get("criteria") or {}
            if not isinstance(given, dict):
                raise ValueError("`criteria` must be an object of name: score or label")
            criteria = {
                str(name): _human_value(value, f"criteria.{name}") for name, value in given.items()
            }
        except ValueError as exc:
            raise click.ClickException(f"{path} line {number}: {exc}") from exc
        found.append(Labelled(number, rollout_id, overall, criteria))
    if not found:
        raise click.ClickException(f"{path} has no labelled rollouts")
    return found


def kappa_band(kappa: float) -> str:
    """Landis & Koch's name for a kappa value."""
    if kappa < 0:
        return "poor"
    for upper, name in KAPPA_BANDS[1:]:
        if kappa <= upper:
            return name
    return KAPPA_BANDS[-1][1]


def _agree(name: str, pairs: list[tuple[float | str, float]], threshold: float) -> Agreement | None:
    from judge.calibrate import agreement, label_of

    if not pairs:
        return None
    humans = [h for h, _ in pairs]
    if any(isinstance(h, str) for h in humans):
        # Labels and scores mixed: compare everything as labels, scores cut at the threshold.
        humans = [
            h if isinstance(h, str) else ("pass" if label_of(h, (threshold,)) else "fail")
            for h in humans
        ]
    return agreement(name, humans, [j for _, j in pairs], thresholds=(threshold,))


def reading(overall: Agreement) -> str:
    """One line on how far to trust the judge, from its overall agreement."""
    parts = []
    if overall.kappa is not None:
        parts.append(f"kappa {overall.kappa:.2f}: {kappa_band(overall.kappa)} agreement")
    if overall.spearman is not None:
        parts.append(f"Spearman {overall.spearman:.2f}")
    line = "; ".join(parts)
    if overall.n < FEW_LABELS:
        line += f" (only {overall.n} labelled rollouts: label more before trusting it)"
    return line


def _stored_verdicts(
    db: str, judge_obj: Judge, rollout_ids: Sequence[str]
) -> tuple[set[str], dict[str, tuple[float, dict[str, float]]]]:
    """(rollouts that exist, {rollout: (score, dimensions)} of this judge version's verdicts)."""
    import orjson

    from gateway.cli.options import read_db
    from judge.verdict import reward_id

    ids = list(dict.fromkeys(rollout_ids))
    by_reward = {reward_id(judge_obj.name, judge_obj.version, rid): rid for rid in ids}
    with read_db(db) as conn:
        known = {
            row[0]
            for row in conn.execute(
                "select id from rollouts where id in (select value from json_each(?))",
                [orjson.dumps(ids).decode()],
            ).fetchall()
        }
        rows = conn.execute(
            "select id, value, dimensions from rewards "
            "where id in (select value from json_each(?))",
            [orjson.dumps(list(by_reward)).decode()],
        ).fetchall()
    verdicts = {}
    for reward, value, dimensions in rows:
        dims = orjson.loads(dimensions) if isinstance(dimensions, str) else dimensions or {}
        verdicts[by_reward[reward]] = (float(value), {k: float(v) for k, v in dims.items()})
    return known, verdicts


@judge.command("calibrate")
@click.option(
    "--labels",
    "labels_path",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="FILE.jsonl",
    help='Human labels, one JSON object a line: {"rollout_id": "r-1", "score": 0.8} or '
    '{"rollout_id": "r-1", "label": "pass"}, optionally with "criteria": {"name": 0.9}.',
)
@judge_option("rules")
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Scores at or above it count as pass when comparing labels (kappa, accuracy).",
)
@click.option(
    "--run", "run_missing", is_flag=True, help="Judge the labelled rollouts it has not judged yet."
)
@concurrency_option("With --run: rollouts judged at once.")
@judge_context_options
def calibrate_command(
    labels_path: str,
    judge_name: str,
    threshold: float,
    run_missing: bool,
    concurrency: int,
    config_path: str | None,
    db: str,
    gateway_url: str | None,
    as_json: bool,
) -> None:
    """Measure how well a judge agrees with human labels, overall and per criterion.

    Reads this judge version's stored verdicts for the labelled rollouts and
    reports n, Spearman (human scores vs judge scores), Cohen's kappa and
    accuracy (pass/fail at --threshold) and the mean absolute error, with a
    reading of kappa on Landis & Koch's scale: whether to trust the judge before
    automating it. Labelled rollouts that are unknown or not judged are counted.

    Example:

    \b
        spangate judge run --judge llm --rollout r-1 --rollout r-2
        spangate judge calibrate --labels labels.jsonl --judge llm
        spangate judge calibrate --labels labels.jsonl --judge llm --run --json
    """
    from gateway.cli import render as cli_render

    labels = parse_labels(labels_path)
    model, chosen = _ready_judge(judge_name, config_path, db, will_run=run_missing)
    rollout_ids = [item.rollout_id for item in labels]
    known, verdicts = _stored_verdicts(db, chosen, rollout_ids)
    if run_missing:
        todo = [rid for rid in dict.fromkeys(rollout_ids) if rid in known and rid not in verdicts]
        if todo:

            async def select(store: JudgeStore) -> list[str]:
                return todo

            JobRun(chosen, model, db, gateway_url, concurrency, force=False).run(select)
            known, verdicts = _stored_verdicts(db, chosen, rollout_ids)

    unknown = sorted({item.rollout_id for item in labels if item.rollout_id not in known})
    unjudged = sorted(
        {item.rollout_id for item in labels if item.rollout_id in known} - set(verdicts)
    )
    overall_pairs: list[tuple[float | str, float]] = []
    criteria_pairs: dict[str, list[tuple[float | str, float]]] = {}
    for item in labels:
        verdict = verdicts.get(item.rollout_id)
        for name in item.criteria:
            criteria_pairs.setdefault(name, [])
        if verdict is None:
            continue
        score, dimensions = verdict
        overall_pairs.append((item.overall, score))
        for name, human in item.criteria.items():
            if name in dimensions:
                criteria_pairs[name].append((human, dimensions[name]))

    overall = _agree("overall", overall_pairs, threshold)
    if overall is None:
        hint = "" if run_missing else " (pass --run to judge them)"
        raise click.ClickException(
            f"none of the {len(labels)} labelled rollouts has a verdict from judge "
            f"{chosen.name} ({chosen.version}): {len(unknown)} unknown, "
            f"{len(unjudged)} not judged{hint}"
        )
    per_criterion = {name: _agree(name, pairs, threshold) for name, pairs in criteria_pairs.items()}
    summary_line = reading(overall)
    if as_json:
        click.echo(
            cli_render.json_line(
                {
                    "judge": chosen.name,
                    "version": chosen.version,
                    "threshold": threshold,
                    "labels": len(labels),
                    "overall": overall.as_dict(),
                    "criteria": {
                        name: (found.as_dict() if found else {"name": name, "n": 0})
                        for name, found in per_criterion.items()
                    },
                    "reading": summary_line,
                    "unknown_rollouts": unknown,
                    "unjudged_rollouts": unjudged,
                }
            )
        )
        return
    rows = [["", "N", "SPEARMAN", "KAPPA", "ACCURACY", "MAE"]]
    for name, found in [("overall", overall), *per_criterion.items()]:
        if found is None:
            rows.append([name, "0", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                name,
                str(found.n),
                _score(found.spearman, 2),
                _score(found.kappa, 2),
                _score(found.accuracy, 2),
                _score(found.mean_abs_error, 2),
            ]
        )
    click.echo(
        cli_render.printable(
            f"judge {chosen.name} ({chosen.version}) against {len(labels)} labels "
            f"(pass at score >= {threshold:g})"
        )
    )
    click.echo("")
    for line in _table(rows, right=frozenset({1, 2, 3, 4, 5})):
        click.echo(line)
    click.echo("")
    click.echo(summary_line)
    left_out = []
    if unknown:
        left_out.append(
            f"{len(unknown)} unknown rollout{'s' * (len(unknown) != 1)} ({', '.join(unknown[:5])}{'…' * (len(unknown) > 5)})"
        )
    if unjudged:
        left_out.append(
            f"{len(unjudged)} not judged by {chosen.name} yet"
            + ("" if run_missing else " (--run judges them)")
        )
    if left_out:
        click.echo(cli_render.printable("left out: " + "; ".join(left_out)), err=True)


# -- judge compare --------------------------------------------------------------


@judge.command("compare")
@click.argument("ids", nargs=-1, required=True, metavar="A B | ROLLOUT ATTEMPT_A ATTEMPT_B")
@click.option(
    "--attempts",
    is_flag=True,
    help="Compare two attempts of one rollout: ROLLOUT ATTEMPT_A ATTEMPT_B.",
)
@judge_option("llm", help="llm, or a rubric named in `judge.rubrics`: its criteria are weighed.")
@judge_context_options
def compare_command(
    ids: tuple[str, ...],
    attempts: bool,
    judge_name: str,
    config_path: str | None,
    db: str,
    gateway_url: str | None,
    as_json: bool,
) -> None:
    """Ask the judge model which of two rollouts (or two attempts) did the task better.

    It asks twice, with the two in both orders: a preference that flips with the
    order is not position-consistent and is reported as a tie.

    Example:

    \b
        spangate judge compare r-41 r-42
        spangate judge compare --attempts r-42 1 2 --json
    """
    from gateway.cli import render as cli_render
    from gateway.cli.options import read_db
    from judge.rubric import DEFAULT_RUBRIC, load_rubric
    from judge.trajectory import load_trajectory
    from store.errors import NotFound

    wanted = 3 if attempts else 2
    if len(ids) != wanted:
        shape = "ROLLOUT ATTEMPT_A ATTEMPT_B" if attempts else "two rollout ids, A B"
        raise click.UsageError(f"expected {shape}, got {len(ids)} argument(s)")
    settings = _settings(config_path)
    if judge_name == "rules":
        raise click.ClickException("the rules judge does not compare; use llm or a rubric name")
    if judge_name == "llm":
        rubric = DEFAULT_RUBRIC
    elif judge_name in settings.judge.rubrics:
        try:
            rubric = load_rubric(settings.judge.rubrics[judge_name], name=judge_name)
        except (ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        known = ", ".join(["llm", *settings.judge.rubrics])
        raise click.ClickException(f"unknown judge {judge_name!r}; known: {known}")
    if not settings.judge.model:
        raise click.ClickException("comparing needs a judge model: set `judge.model` in the config")
    require_db(db)

    def load(conn: Any, rollout_id: str) -> Trajectory:
        try:
            return load_trajectory(conn, rollout_id)
        except NotFound as exc:
            raise click.ClickException(f"rollout {rollout_id} not found") from exc

    with read_db(db) as conn:
        if attempts:
            from judge.llm import attempt_view

            whole = load(conn, ids[0])
            by_id = {attempt.id: attempt for attempt in whole.attempts}
            for attempt_id in ids[1:]:
                if attempt_id not in by_id:
                    have = ", ".join(by_id) or "none"
                    raise click.ClickException(
                        f"attempt {attempt_id} of rollout {ids[0]} not found (it has: {have})"
                    )
            a, b = (attempt_view(whole, by_id[attempt_id]) for attempt_id in ids[1:])
        else:
            a, b = load(conn, ids[0]), load(conn, ids[1])

    model = JudgeModel(settings)
    result = _asyncio().run(_compare(model, db, gateway_url, a, b, rubric))
    if as_json:
        click.echo(cli_render.json_line(result.model_dump()))
        return
    names = {"a": result.a, "b": result.b}
    if result.preferred == "tie":
        verdict = (
            "tie (neither is better)"
            if result.consistent
            else "tie (the judge was not position-consistent)"
        )
    else:
        verdict = f"{result.preferred.upper()}: {names[result.preferred]}"
    # Ids are the user's, reasons the judge model's: both shown escaped.
    show = cli_render.printable
    click.echo(show(f"A = {result.a}"))
    click.echo(show(f"B = {result.b}"))
    click.echo(show(f"preferred: {verdict}"))
    for order in result.orders:
        shown = "A first" if order["order"] == "a,b" else "B first"
        picked = order["preferred"]
        picked_text = "tie" if picked == "tie" else f"{picked.upper()} ({names[picked]})"
        reason = f" — {order['reason']}" if order.get("reason") else ""
        click.echo(show(f"  {shown}: {picked_text}{reason}"))
    click.echo(f"position-consistent: {'yes' if result.consistent else 'no'}")


async def _compare(
    model: JudgeModel,
    db: str,
    gateway_url: str | None,
    a: Trajectory,
    b: Trajectory,
    rubric: Rubric,
) -> PairwiseResult:
    from judge.llm import JudgeModelError, compare

    async with model.connected(db, gateway_url):
        try:
            return await compare(
                a, b, rubric, model.get(), budget_tokens=model.settings.judge.budget_tokens
            )
        except JudgeModelError as exc:
            raise click.ClickException(f"the judge model failed: {exc}") from exc
