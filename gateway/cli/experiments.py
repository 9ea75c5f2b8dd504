"""`spangate experiments`: how each experiment's variants compare, and promote/stop/resume.

Decisions are written straight into the database; every gateway on it picks them up within
`experiment_refresh` seconds. scipy (judge.experiments) loads inside the command body.
"""

from __future__ import annotations

from typing import Any

import click

from gateway.cli import render as cli_render
from gateway.cli.options import db_option, json_option, read_db, write_db

HEADERS = (
    "VARIANT",
    "ROLLOUTS",
    "REWARDED",
    "MEAN",
    "95% CI",
    "SUCCESS",
    "$/POINT",
    "P50",
    "P95",
    "VS CONTROL",
    "P(BEST)",
)
RIGHT = frozenset({1, 2, 3, 5, 6, 7, 8, 10})


class ExperimentsGroup(click.Group):
    """`spangate experiments [NAME]` shows; `promote`, `stop` and `resume` decide."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A name (or nothing, or --json) means `show`: the group cannot take an optional
        # argument of its own without swallowing the subcommand names.
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["show", *args]
        return super().parse_args(ctx, args)


@click.group(cls=ExperimentsGroup)
def experiments() -> None:
    """Compare experiment variants by reward, and promote or stop them.

    Example:

    \b
        spangate experiments
        spangate experiments concise-v2 --json
        spangate experiments promote concise-v2 guideline-v3
    """


def _number(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _vs_control(row: dict[str, Any]) -> str:
    result = row["vs_control"]
    if row["control"]:
        return "(control)"
    if not result or result["p_value"] is None:
        return "-"
    p = result["p_value"]
    shown = "p<0.001" if p < 0.001 else f"p={p:.2g}"
    effect = result["effect_size"]
    d = f" d={effect:+.2f}" if effect is not None else ""
    return f"{result['difference']:+.3f}{d} {shown}"


def experiment_lines(result: dict[str, Any]) -> list[str]:
    """One experiment as a header, a table of its variants and the verdict."""
    head = (
        f"{result['name']}  model {result['model']}, reward `{result['reward']}`, "
        f"{result['policy']}, {result['status']}"
    )
    rows = [list(HEADERS)]
    for row in result["variants"]:
        ci = f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if row["ci_low"] is not None else "-"
        rows.append(
            [
                row["name"],
                str(row["rollouts"]),
                str(row["rewarded"]),
                _number(row["mean_reward"]),
                ci,
                _number(row["success_rate"], "{:.0%}"),
                cli_render.cost(row["cost_per_reward_point"])
                if row["cost_per_reward_point"] is not None
                else "-",
                cli_render.millis(row["latency_p50_ms"]),
                cli_render.millis(row["latency_p95_ms"]),
                _vs_control(row),
                _number(row["prob_best"], "{:.1%}"),
            ]
        )
    table = ["  " + "  ".join(cells).rstrip() for cells in cli_render._align(rows, RIGHT)]
    return [head, *table, f"  verdict: {result['verdict']}"]


@experiments.command()
@click.argument("name", required=False)
@json_option
@db_option
def show(name: str | None, as_json: bool, db: str) -> None:
    """Every experiment (or NAME): reward, cost and latency per variant, and a verdict.

    Example:

    \b
        spangate experiments show concise-v2
    """
    from judge.experiments import analyse_all, analyse_experiment
    from store.errors import NotFound

    with read_db(db) as conn:
        try:
            results = [analyse_experiment(conn, name)] if name else analyse_all(conn)["data"]
        except NotFound as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        for result in results:
            click.echo(cli_render.json_line(result))
        return
    if not results:
        click.echo("no experiments yet: add `experiments:` to the config and serve")
    for index, result in enumerate(results):
        if index:
            click.echo()
        for line in experiment_lines(result):
            click.echo(line)


def _decide(db: str, name: str, action: str, variant: str | None = None) -> dict[str, Any]:
    """The decision written into the database, once NAME (and VARIANT) are known there."""
    from store.experiments import decide, get_config

    with write_db(db) as conn:
        config = get_config(conn, name)
        names = [v["name"] for v in config["variants"]]
        if variant is not None and variant not in names:
            raise click.ClickException(f"{name} has no variant {variant!r}; it has {names}")
        return decide(conn, name, action, variant)


def _decision_command(action: str, summary: str, said: str, *, variant: bool = False) -> None:
    """Add `spangate experiments ACTION NAME [VARIANT]`: write the decision, then `said` it
    (formatted with `name`, `variant` and `at`, the decision's time)."""

    def command(name: str, as_json: bool, db: str, variant: str | None = None) -> None:
        decision = _decide(db, name, action, variant)
        if as_json:
            click.echo(cli_render.json_line(decision))
            return
        at = cli_render.timestamp(decision["created_ns"])
        click.echo(said.format(name=name, variant=variant, at=at))

    example = f"spangate experiments {action} concise-v2" + (" guideline-v3" if variant else "")
    command.__doc__ = f"{summary}\n\nExample:\n\n\b\n    {example}\n"
    decorated = json_option(db_option(command))
    if variant:
        decorated = click.argument("variant")(decorated)
    experiments.command(action)(click.argument("name")(decorated))


_decision_command(
    "promote",
    "Send all of NAME's traffic to VARIANT, from now on and after restarts.",
    "{name}: promoted {variant} at {at}; all traffic goes to it",
    variant=True,
)
_decision_command(
    "stop",
    "Stop NAME: calls go to the plain model group, unchanged.",
    "{name}: stopped at {at}; calls go to the plain model group",
)
_decision_command(
    "resume",
    "Undo a promote or stop: NAME assigns variants again.",
    "{name}: running again at {at}",
)
