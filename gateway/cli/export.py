"""`spangate export`: rollouts or training triplets as JSON lines."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import click

from gateway.cli.options import (
    db_option,
    output_file,
    output_option,
    read_db,
    replaces_file,
    rollout_filter_options,
    time_option,
)


@click.command("export")
@rollout_filter_options
@click.option(
    "--until",
    "until_ns",
    metavar="T",
    callback=time_option,
    help="Rollouts created before T (same forms as --since).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "triplets", "parquet", "otlp"]),
    default="jsonl",
    show_default=True,
    help="jsonl: one rollout per line; triplets: one prompt/completion/reward per call "
    "(with token ids and logprobs when recorded); parquet: the triplets as a Parquet file "
    "(needs spangate[parquet]); otlp: one OTLP/JSON trace export per rollout.",
)
@click.option(
    "--reward-rule",
    type=click.Choice(["every", "last", "discounted"]),
    default=None,
    help="Triplets: how an attempt's or rollout's reward is spread over its turns: every "
    "turn, the last only, or discounted by --gamma per later turn (default every).",
)
@click.option(
    "--gamma",
    type=click.FloatRange(0, 1),
    default=None,
    help="With --reward-rule discounted: the discount per later turn (default 1).",
)
@click.option("--model-version", default=None, help="Triplets: only calls of this model version.")
@click.option(
    "--with-reward", is_flag=True, default=False, help="Triplets: only calls that got a reward."
)
@click.option(
    "--reward-name",
    default=None,
    metavar="N",
    help="With --format triplets: the reward name that counts (default reward).",
)
@output_option("File")
@db_option
def export_command(
    rollout_ids: tuple[str, ...],
    since_ns: int | None,
    until_ns: int | None,
    status: str | None,
    agent: str | None,
    fmt: str,
    reward_name: str | None,
    reward_rule: str | None,
    gamma: float | None,
    model_version: str | None,
    with_reward: bool,
    output: str,
    db: str,
) -> None:
    """Export rollouts for training or analysis, as JSON lines.

    jsonl gives each rollout with its attempts, their calls (request and response
    bodies) and rewards. triplets gives one line per chat/responses/completion call:
    prompt, tools, completion, token ids and logprobs (when recorded) and a reward, the
    call's own reward, else its attempt's final one, else its attempt's latest, else the
    rollout's final one, spread over the attempt's turns by --reward-rule.

    Example:

    \b
        spangate export --since 7d --status succeeded -o rollouts.jsonl
        spangate export --format triplets --reward-name accuracy | jq .reward
        spangate export --format parquet --reward-rule discounted --gamma 0.9 -o rl.parquet
        spangate export --format otlp --rollout task-42 -o task-42.otlp.jsonl
    """
    from store.export import (
        DEFAULT_GAMMA,
        DEFAULT_REWARD_NAME,
        iter_rollouts,
        iter_triplets,
        missing_rollouts,
        write_jsonl,
    )
    from store.schema import ROLLOUT_STATUSES

    if status is not None and status not in ROLLOUT_STATUSES:
        raise click.BadParameter(
            f"{status!r} is not one of {', '.join(ROLLOUT_STATUSES)}", param_hint="--status"
        )
    triplet_options = {
        "--reward-name": reward_name,
        "--reward-rule": reward_rule,
        "--gamma": gamma,
        "--model-version": model_version,
        "--with-reward": with_reward or None,
    }
    for flag, value in triplet_options.items():
        if value is not None and fmt not in ("triplets", "parquet"):
            raise click.UsageError(f"{flag} applies only to --format triplets or parquet")
    if gamma is not None and reward_rule != "discounted":
        raise click.UsageError("--gamma applies only to --reward-rule discounted")
    if fmt == "parquet" and output == "-":
        raise click.UsageError("--format parquet needs --output FILE")
    if since_ns is not None and until_ns is not None and since_ns >= until_ns:
        raise click.BadParameter("must be later than --since", param_hint="--until")
    filters: dict[str, Any] = {
        "rollout_ids": list(rollout_ids) or None,
        "since_ns": since_ns,
        "until_ns": until_ns,
        "status": status,
        "agent": agent,
    }
    with read_db(db) as conn:
        missing = missing_rollouts(conn, rollout_ids) if rollout_ids else []
        if missing:
            raise click.ClickException(f"rollout not found: {', '.join(missing)}")
        if fmt == "otlp":
            from gateway.exporters.otlp_mapping import iter_otlp_json

            items = iter_otlp_json(iter_rollouts(conn, **filters))
            unit = "rollouts"
        elif fmt in ("triplets", "parquet"):
            items = iter_triplets(
                conn,
                reward_name=reward_name or DEFAULT_REWARD_NAME,
                reward_rule=reward_rule or "every",
                gamma=DEFAULT_GAMMA if gamma is None else gamma,
                model_version=model_version,
                with_reward=with_reward,
                **filters,
            )
            unit = "calls"
        else:
            items = iter_rollouts(conn, **filters)
            unit = "rollouts"
        if fmt == "parquet":
            count = _write_parquet(items, output)
        else:
            with output_file(output, "wb") as fp:
                count = write_jsonl(items, fp)
    if count == 0:
        click.echo(f"no {unit} match; nothing exported", err=True)
    elif output != "-":
        click.echo(f"exported {count} {unit} to {output}", err=True)


def _write_parquet(items: Any, output: str) -> int:
    """Triplets to a Parquet file, written beside `output` and moved over it when complete
    (a pipe is written into: see `output_file`)."""
    from store.export import write_parquet

    atomic = replaces_file(output)
    target = f"{output}.partial" if atomic else output
    try:
        count = write_parquet(items, target)
        if atomic:
            os.replace(target, output)
    except ImportError as exc:
        raise click.ClickException(
            "--format parquet needs pyarrow: pip install 'spangate[parquet]'"
        ) from exc
    except OSError as exc:
        _remove(target, atomic)
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from exc
    except BaseException:
        _remove(target, atomic)
        raise
    return count


def _remove(partial: str, atomic: bool) -> None:
    if atomic:
        with contextlib.suppress(OSError):
            os.unlink(partial)
