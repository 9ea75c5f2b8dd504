"""`spangate patterns`: what successful and failed rollouts do differently, and guidelines.

scipy (through judge.patterns) loads inside the command bodies, so `spangate --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from config.models import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_SUPPORT,
    DEFAULT_REWARD_NAME,
    DEFAULT_SUCCESS_THRESHOLD,
)
from gateway.cli import render as cli_render
from gateway.cli.options import db_option, json_option, read_db, since_option, store_writer

if TYPE_CHECKING:
    from sqlite_utils import Database

F = TypeVar("F", bound=Callable[..., Any])

DESCRIPTION_CHARS = 72
FINDING_SECTIONS = (
    ("Success patterns", "success_patterns"),
    ("Failure patterns", "failure_patterns"),
)
BOARD_SECTIONS = (
    ("Leaderboard by model", "models", "model"),
    ("Leaderboard by agent", "agents", "agent"),
)
NOT_APPLIED = (
    "Nothing is applied to any prompt: read it, and copy what you agree with into the "
    "agent's prompt yourself."
)


def analysis_options(fn: F) -> F:
    """--since, --min-support, --alpha, --reward-name, --success-threshold: the keyword
    arguments of `judge.patterns.analyse`, passed to it as they are."""
    options = [
        since_option,
        click.option(
            "--min-support",
            default=DEFAULT_MIN_SUPPORT,
            show_default=True,
            metavar="N",
            type=click.IntRange(min=1),
            help="Test a feature only when at least N attempts show it.",
        ),
        click.option(
            "--alpha",
            default=DEFAULT_ALPHA,
            show_default=True,
            metavar="Q",
            type=click.FloatRange(0, 1, min_open=True),
            help="Report findings with a Benjamini-Hochberg q-value at most Q.",
        ),
        click.option(
            "--reward-name",
            default=DEFAULT_REWARD_NAME,
            show_default=True,
            metavar="N",
            help="The reward that decides success (judge verdicts are not counted).",
        ),
        click.option(
            "--success-threshold",
            default=DEFAULT_SUCCESS_THRESHOLD,
            show_default=True,
            metavar="X",
            type=float,
            help="An attempt succeeded when its reward is at least X (without a reward: "
            "its rollout's status).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run_analysis(db: Database, **params: Any) -> dict[str, Any]:
    from judge.patterns import analyse

    return analyse(db, **params)


# -- rendering ------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    aligned = cli_render._align([list(headers), *rows], right=frozenset(right))
    lines = [click.style("  ".join(aligned[0]).rstrip(), bold=True)]
    lines += ["  ".join(row).rstrip() for row in aligned[1:]]
    return lines


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _heading(title: str) -> list[str]:
    return ["", click.style(title, bold=True, underline=True)]


def findings_table(findings: Sequence[dict[str, Any]]) -> list[str]:
    rows = [
        [
            f["feature"],
            cli_render.clip(f["description"], DESCRIPTION_CHARS),
            str(f["support"]),
            _pct(f["rate_with"]),
            _pct(f["rate_without"]),
            f"{f['effect']:+.2f} [{f['ci_low']:+.2f}, {f['ci_high']:+.2f}]",
            _num(f["odds_ratio"]) if f["odds_ratio"] is not None else "inf",
            _p(f["p_value"]),
            _p(f["q_value"]),
            ", ".join(e["rollout_id"] for e in f["evidence"][:3]),
        ]
        for f in findings
    ]
    headers = ("FEATURE", "DESCRIPTION", "SUPPORT", "WITH", "WITHOUT", "EFFECT [95% CI]",
               "ODDS", "P", "Q", "EXAMPLES")  # fmt: skip
    return _table(headers, rows, right={2, 3, 4, 6, 7, 8})


def tools_table(tools: Sequence[dict[str, Any]]) -> list[str]:
    rows = [
        [
            t["tool"],
            str(t["calls"]),
            str(t["attempts"]),
            str(t["executions"]),
            _pct(t["error_rate"]),
            cli_render.duration(t["median_duration_ms"]),
            _num(t["reward_with"]),
            _num(t["reward_without"]),
            _p(t["p_value"]),
        ]
        for t in tools
    ]
    headers = ("TOOL", "CALLS", "ATTEMPTS", "EXECUTIONS", "ERRORS", "MEDIAN TIME",
               "REWARD WITH", "WITHOUT", "P")  # fmt: skip
    return _table(headers, rows, right=set(range(1, 9)))


def _reward_ci(row: dict[str, Any]) -> str:
    if row["mean_reward"] is None:
        return "-"
    if row["reward_ci_low"] is None:
        return f"{row['mean_reward']:.2f}"
    half = (row["reward_ci_high"] - row["reward_ci_low"]) / 2
    return f"{row['mean_reward']:.2f} ± {half:.2f}"


def leaderboard_table(rows: Sequence[dict[str, Any]], by: str) -> list[str]:
    cells = [
        [
            str(r[by]),
            str(r["rollouts"]),
            str(r["attempts"]),
            _pct(r["success_rate"]),
            _reward_ci(r),
            cli_render.cost(r["mean_cost_usd"]) or "-",
            cli_render.duration(r["p50_latency_ms"]),
            cli_render.duration(r["p95_latency_ms"]),
            cli_render.cost(r["cost_per_reward_point"]) or "-",
        ]
        for r in rows
    ]
    headers = (by.upper(), "ROLLOUTS", "ATTEMPTS", "SUCCESS", "MEAN REWARD (95% CI)",
               "MEAN COST", "P50", "P95", "COST/REWARD")  # fmt: skip
    return _table(headers, cells, right=set(range(1, 9)))


def outliers_table(found: Sequence[dict[str, Any]]) -> list[str]:
    def value(o: dict[str, Any], key: str) -> str:
        if o["measure"] == "slowest":
            return cli_render.duration(o[key])
        return cli_render.cost(o[key])

    rows = [
        [
            o["rollout_id"],
            o["agent"],
            o["measure"].replace("_", " "),
            value(o, "value"),
            value(o, "agent_median"),
            f"{o['ratio']:.1f}x",
        ]
        for o in found
    ]
    headers = ("ROLLOUT", "AGENT", "MEASURE", "VALUE", "AGENT MEDIAN", "RATIO")
    return _table(headers, rows, right={3, 4, 5})


def report(result: dict[str, Any]) -> list[str]:
    """The whole analysis as text: findings, tools, leaderboards, outliers."""
    q = result["alpha"]
    lines = [
        f"{result['attempts']:,} attempts, {result['with_outcome']:,} with an outcome · "
        f"{result['tests_run']:,} features tested (min support {result['min_support']}) · "
        f"false discovery rate {q}"
    ]
    if result["attempts"] and not result["with_outcome"]:
        lines.append(
            "no attempt has an outcome yet: post rewards (spangate reward, POST /api/rewards) "
            "or mark rollouts succeeded/failed"
        )
    for title, key in FINDING_SECTIONS:
        lines += _heading(title)
        found = result[key]
        lines += findings_table(found) if found else [f"none at q ≤ {q}"]
    lines += _heading("Tool effectiveness")
    lines += tools_table(result["tools"]) if result["tools"] else ["no tool calls recorded"]
    for title, key, by in BOARD_SECTIONS:
        lines += _heading(title)
        rows = result["leaderboards"][key]
        lines += leaderboard_table(rows, by) if rows else ["no calls recorded"]
    lines += _heading("Outliers (slowest and most expensive rollouts for their agent)")
    lines += outliers_table(result["outliers"]) if result["outliers"] else ["none"]
    return lines


# -- commands -------------------------------------------------------------------------


@click.group("patterns", invoke_without_command=True)
@analysis_options
@click.option("--agent", default=None, help="Only rollouts of this agent.")
@json_option
@db_option
@click.pass_context
def patterns(
    ctx: click.Context,
    agent: str | None,
    as_json: bool,
    db: str,
    **analysis: Any,
) -> None:
    """What successful and failed rollouts do differently, with the statistics.

    Success and failure patterns are tool sequences (up to 3 calls), tool errors,
    upstream errors and finish reasons tested with Fisher's exact test and corrected
    for multiple testing (Benjamini-Hochberg); each has its support, success rate
    with and without it, the difference with a 95% CI, odds ratio, p and q, and
    example rollouts. Then tool effectiveness, leaderboards by model and by agent,
    and outliers. Opens the database read-only.

    Example:

    \b
        spangate patterns --since 7d --agent support-bot
        spangate patterns --json | jq '.failure_patterns[].feature'
    """
    if ctx.invoked_subcommand is not None:
        return
    with read_db(db) as conn:
        result = _run_analysis(conn, agent=agent, **analysis)
    if as_json:
        click.echo(cli_render.json_line(result))
        return
    if not result["attempts"]:
        where = f" for agent {agent}" if agent else ""
        click.echo(f"no attempts recorded{where}; nothing to analyse", err=True)
        return
    for line in report(result):
        click.echo(line)


def _emit_guideline(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(cli_render.json_line(row))
    else:
        # Written from recorded tool names and errors: lines kept, controls escaped.
        click.echo(cli_render.printable(row["content"], lines=True), nl=False)


@patterns.command()
@click.option("--agent", required=True, help="The agent the guideline is for.")
@click.option("--write", "write", is_flag=True, help="Write a new version (the default).")
@click.option("--list", "list_", is_flag=True, help="List the stored versions.")
@click.option("--show", type=click.IntRange(min=1), metavar="V", help="Print version V.")
@click.option(
    "--diff", type=(click.IntRange(min=1), click.IntRange(min=1)), metavar="V1 V2",
    help="Unified diff from version V1 to V2.",
)  # fmt: skip
@click.option(
    "--rollback", type=click.IntRange(min=1), metavar="V",
    help="Make version V current again, written as a new version.",
)  # fmt: skip
@analysis_options
@json_option
@db_option
def guidelines(
    agent: str,
    write: bool,
    list_: bool,
    show: int | None,
    diff: tuple[int, int] | None,
    rollback: int | None,
    as_json: bool,
    db: str,
    **analysis: Any,
) -> None:
    """Versioned Markdown guidelines for an agent: what to keep doing, what to avoid.

    By default, analyses the agent's rollouts and writes the findings as a new
    version (what to keep doing, what to avoid, tools that often fail, each with
    its evidence), and prints it. Versions are never changed: --rollback writes an
    old version's text again as the newest one. Nothing is applied to any prompt.

    Example:

    \b
        spangate patterns guidelines --agent support-bot
        spangate patterns guidelines --agent support-bot --diff 1 2
        spangate patterns guidelines --agent support-bot --rollback 1
    """
    from judge import guidelines as store_guidelines
    from store.errors import NotFound

    chosen = [name for name, on in (("--write", write), ("--list", list_), ("--show", show),
              ("--diff", diff), ("--rollback", rollback)) if on]  # fmt: skip
    if len(chosen) > 1:
        raise click.UsageError(f"choose one of {', '.join(chosen)}")
    try:
        if list_:
            with read_db(db) as conn:
                versions = store_guidelines.list_guidelines(conn, agent)
            _print_versions(agent, versions, as_json)
        elif show is not None:
            with read_db(db) as conn:
                _emit_guideline(store_guidelines.get_guideline(conn, agent, show), as_json)
        elif diff is not None:
            with read_db(db) as conn:
                text = store_guidelines.diff_guidelines(conn, agent, *diff)
            if text:
                click.echo(cli_render.printable(text, lines=True), nl=False)
            else:
                click.echo(f"v{diff[0]} and v{diff[1]} have the same text", err=True)
        elif rollback is not None:
            import asyncio

            writer = store_writer(db)
            try:
                row = asyncio.run(
                    writer.execute(
                        lambda conn: store_guidelines.rollback_guideline(conn, agent, rollback)
                    )
                )
            finally:
                writer.close()
            _emit_guideline(row, as_json)
            click.echo(
                f"wrote {agent} v{row['version']}: the text of v{rollback}. {NOT_APPLIED}",
                err=True,
            )
        else:
            _write_guideline(db, as_json, agent=agent, **analysis)
    except NotFound as exc:
        raise click.ClickException(str(exc)) from exc


def _write_guideline(db: str, as_json: bool, *, agent: str, **params: Any) -> None:
    from judge import guidelines as store_guidelines

    # Analysed on a read-only connection; the write connection is held only for the insert.
    with read_db(db) as conn:
        result = _run_analysis(conn, agent=agent, **params)
    if not result["attempts"]:
        raise click.ClickException(f"no attempts recorded for agent {agent}; nothing to write")
    import asyncio

    def write(conn: Any) -> dict[str, Any]:
        # The version named in the text is the version stored, even when another process
        # writes one meanwhile.
        return store_guidelines.write_next_guideline(
            conn,
            agent,
            lambda version: store_guidelines.render_guideline(agent, result, version),
            result["success_patterns"] + result["failure_patterns"],
        )

    writer = store_writer(db)
    try:
        row = asyncio.run(writer.execute(write))
    finally:
        writer.close()
    _emit_guideline(row, as_json)
    click.echo(f"wrote {agent} v{row['version']} to {db}. {NOT_APPLIED}", err=True)


def _print_versions(agent: str, versions: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for version in versions:
            click.echo(cli_render.json_line(version))
        return
    if not versions:
        click.echo(
            f"no guidelines for agent {agent} yet; write one with "
            f"`spangate patterns guidelines --agent {agent}`",
            err=True,
        )
        return
    rows = [
        [
            f"v{v['version']}",
            cli_render.timestamp(v["created_ns"]),
            f"{v['chars']:,}",
            v["note"] or "",
        ]
        for v in versions
    ]
    for line in _table(("VERSION", "CREATED", "CHARS", "NOTE"), rows, right={2}):
        click.echo(line)
