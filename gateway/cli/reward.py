"""`spangate reward`: score a rollout, attempt or call."""

from __future__ import annotations

from typing import Any

import click

from config.models import DEFAULT_REWARD_NAME
from gateway.cli.options import db_option, json_option, key_option, write_db


def _dimensions(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, float]:
    import math

    parsed: dict[str, float] = {}
    for item in values:
        name, sep, number = item.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not math.isfinite(value):
            raise click.BadParameter(
                f"{item!r} is not NAME=NUMBER (e.g. accuracy=0.9)", ctx=ctx, param=param
            )
        parsed[name.strip()] = value
    return parsed


def _reward_line(row: dict[str, Any], created: bool) -> str:
    from gateway.cli.render import printable

    target = [f"rollout {row.get('rollout_id') or '-'}"]
    if row.get("attempt_id"):
        target.append(f"attempt {row['attempt_id']}")
    if row.get("span_id"):
        target.append(f"span {row['span_id']}")
    final = " (final)" if row.get("final") else ""
    verb = "stored" if created else "already stored"
    # The row may come from a remote gateway, or hold what another client stored.
    return printable(
        f"{verb} {row['id']}: {row['name']} = {row['value']:g}{final} on "
        f"{' / '.join(target)} · source {row.get('source') or 'user'}"
    )


@click.command()
@click.argument("rollout_id", metavar="ROLLOUT")
@click.option("--value", required=True, type=float, help="The reward value.")
@click.option(
    "--name",
    default=DEFAULT_REWARD_NAME,
    show_default=True,
    help="Which reward (e.g. accuracy, pass).",
)
@click.option("--final", is_flag=True, help="The outcome of the rollout or attempt, not a step.")
@click.option("--attempt", "attempt_id", default=None, metavar="A", help="Reward this attempt.")
@click.option("--span", "span_id", default=None, metavar="S", help="Reward one call by span id.")
@click.option(
    "--response-id",
    default=None,
    metavar="R",
    help="Reward one call by the provider's response id (the `id` the client got back).",
)
@click.option(
    "--dimension",
    "-d",
    "dimensions",
    multiple=True,
    metavar="K=V",
    callback=_dimensions,
    help="A per-dimension score (repeatable): -d accuracy=0.9 -d style=0.5.",
)
@click.option("--comment", default=None, help="Free text.")
@click.option("--source", default="user", show_default=True, help="user, agent, judge:<name>…")
@click.option(
    "--id",
    "reward_id",
    default=None,
    metavar="ID",
    help="Your id for the reward: the same command twice stores it once.",
)
@json_option
@db_option
@click.option(
    "--url",
    default=None,
    metavar="URL",
    help="Post to a running gateway (POST /api/rewards) instead of writing the file.",
)
@key_option
def reward(
    rollout_id: str,
    value: float,
    name: str,
    final: bool,
    attempt_id: str | None,
    span_id: str | None,
    response_id: str | None,
    dimensions: dict[str, float],
    comment: str | None,
    source: str,
    reward_id: str | None,
    as_json: bool,
    db: str,
    url: str | None,
    key: str | None,
) -> None:
    """Record a reward for a rollout, one of its attempts, or one call.

    Without --url it is written straight into the database file (safe while
    `spangate serve` runs); with --url it is posted to the gateway.

    Example:

    \b
        spangate reward r-42 --value 1 --final
        spangate reward r-42 --value 0.3 --name accuracy --span 3fa85f6457d1c0de
        spangate reward r-42 --value 0.9 -d accuracy=1 -d style=0.8 --id r-42-grade
        spangate reward r-42 --value 1 --url http://127.0.0.1:8400 --key $SPANGATE_KEY
    """
    from pydantic import ValidationError

    from gateway.cli import render as cli_render
    from gateway.web.api_models import RewardCreate

    given = {
        "id": reward_id,
        "rollout_id": rollout_id,
        "attempt_id": attempt_id,
        "span_id": span_id,
        "response_id": response_id,
        "name": name,
        "value": value,
        "dimensions": dimensions,
        "final": final,
        "source": source,
        "comment": comment,
    }
    try:
        body = RewardCreate.model_validate(given).model_dump(exclude_none=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "reward"
        raise click.ClickException(f"{where}: {first['msg']}") from exc
    if url is not None:
        from gateway.cli.remote import post_reward

        row, created = post_reward(url, key, body)
    else:
        row, created = _write_reward(db, body)
    click.echo(cli_render.json_line(row) if as_json else _reward_line(row, created))


def _write_reward(path: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The reward written straight into the store, beside a running gateway."""
    from store.backend import atomic
    from store.writes import add_reward

    with write_db(path) as conn, atomic(conn):
        return add_reward(conn, body)
