"""`spangate judge run`: judge the recorded rollouts a filter picks and print the summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from gateway.cli.judge_setup import (
    JobRun,
    concurrency_option,
    judge_context_options,
    judge_option,
    ready_judge,
    score_text,
    table_lines,
)
from gateway.cli.options import rollout_filter_options

if TYPE_CHECKING:
    from judge.jobs import JobSummary


def _summary_lines(summary: JobSummary) -> list[str]:
    from gateway.cli.render import clip, printable

    head = printable(
        f"judge {summary.judge} ({summary.version}): {summary.count('judged')} judged, "
        f"{summary.count('skipped')} skipped, {summary.count('failed')} failed · "
        f"mean score {score_text(summary.mean_score)}"
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
        rows.append([outcome.rollout_id, outcome.status, score_text(outcome.score), clip(note, 80)])
    return [head, "", *table_lines(rows, right=frozenset({2}))]


def _missing_rollouts(db: str, rollout_ids: Sequence[str]) -> list[str]:
    from gateway.cli.options import read_db
    from store.export import missing_rollouts

    with read_db(db) as conn:
        return missing_rollouts(conn, rollout_ids)


@click.command("run")
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
    model, chosen, db = ready_judge(judge_name, config_path, db, will_run=True)
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
