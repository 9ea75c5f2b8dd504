"""`spangate judge compare`: ask the judge model which of two rollouts (or two attempts of
one rollout) did the task better, in both orders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from gateway.cli.judge_setup import (
    JudgeModel,
    judge_context_options,
    judge_option,
    judge_settings,
    run_async,
)
from gateway.cli.options import configured_db, require_db

if TYPE_CHECKING:
    from judge.llm import PairwiseResult
    from judge.rubric import Rubric
    from judge.trajectory import Trajectory


@click.command("compare")
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
    settings = judge_settings(config_path)
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
    db = configured_db(db, settings.store.url)
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
    result = run_async(_compare(model, db, gateway_url, a, b, rubric))
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
    from judge.jobs import first_open_run
    from judge.llm import JudgeModelError, compare
    from store.reader import Reader

    asked: dict[str, tuple[str, str]] = {}
    status = "failed"
    reader = Reader(db, workers=1)
    try:
        async with model.connected(db, gateway_url):
            client = model.get()
            client.asked = asked

            async def run_of(judge: str, about: str) -> int:
                # Comparing the pair again records under a judge rollout of its own.
                return int(await reader.run(first_open_run, judge, about))

            client.run_of = run_of
            try:
                result = await compare(
                    a, b, rubric, client, budget_tokens=model.settings.judge.budget_tokens
                )
            except JudgeModelError as exc:
                raise click.ClickException(f"the judge model failed: {exc}") from exc
            status = "succeeded"
            return result
    finally:
        reader.close()
        if asked:
            await _end_judge_rollouts(db, asked, status)


async def _end_judge_rollouts(db: str, asked: dict[str, tuple[str, str]], status: str) -> None:
    """End the rollouts the pairwise calls were recorded under, as a judgement ends its own
    (failed if the comparison did not finish), so retention ages them out. Only housekeeping:
    a store that takes no writes (a read-only file or role) costs a warning, not the answer."""
    from judge.jobs import JudgeStore
    from store.errors import StoreError

    try:
        store = JudgeStore(db)
    except StoreError as exc:
        click.echo(f"warning: judge rollouts not ended: {exc}", err=True)
        return
    try:
        for rollout_id, (judge, about) in asked.items():
            await store.end_judge_rollout(rollout_id, status, agent=f"judge-{judge}", judged=about)
    finally:
        store.close()
