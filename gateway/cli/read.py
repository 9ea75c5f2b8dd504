"""`spangate tail`, `rollouts` and `show`: read what the gateway recorded."""

from __future__ import annotations

import time

import click

from gateway.cli.options import db_option, json_option, key_option, limit_option, read_db

POLL_SECONDS = 0.25  # --follow: a new call shows within a second, and idle polling stays cheap
FOLLOW_BATCH = 500


@click.command()
@click.option("--rollout", "rollout_id", default=None, help="Only calls of this rollout.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new calls as they are recorded.")
@limit_option(20, minimum=0, help="How many of the latest calls to print first.")
@json_option
@click.option("--bodies", is_flag=True, help="With --json: include request and response bodies.")
@db_option
@click.option(
    "--url",
    default=None,
    metavar="URL",
    help="Follow a running gateway over HTTP (its /api/spans stream) instead of the file.",
)
@key_option
def tail(
    rollout_id: str | None,
    follow: bool,
    limit: int,
    as_json: bool,
    bodies: bool,
    db: str,
    url: str | None,
    key: str | None,
) -> None:
    """Print the latest calls, oldest first, one line each.

    Each line: time, rollout/attempt#seq, model, status, latency, tokens in/out,
    cost and the start of the reply. With --url the calls come from a running
    gateway (possibly on another machine) instead of the database file; a
    dropped connection is resumed where it stopped.

    Example:

    \b
        spangate tail --rollout r-42 --follow
        spangate tail -n 100 --json | jq .cost_usd
        spangate tail --url http://gpu-box:8400 --key $SPANGATE_KEY -f
    """
    from gateway.cli import render as cli_render

    view = cli_render.TailView(rollout_id, follow, limit, as_json, bodies)
    if url is not None:
        from gateway.cli.remote import tail_remote

        try:
            tail_remote(url, key, view)
        except KeyboardInterrupt:
            return
        return

    from store.queries import list_spans, max_rowid

    try:
        with read_db(db) as conn:
            # Taken first: a call recorded while the backlog is read is printed once, by the loop.
            last = max_rowid(conn)
            backlog = list_spans(
                conn,
                rollout_id=rollout_id,
                limit=limit,
                newest_first=True,
                bodies=True,
                max_page=max(limit, 1),
            ).data[:limit]
            backlog = [s for s in reversed(backlog) if s["_rowid"] <= last]
            view.backlog(backlog)
            if not follow:
                return
            while True:
                fresh = list_spans(
                    conn, rollout_id=rollout_id, after_rowid=last, limit=FOLLOW_BATCH, bodies=True
                ).data
                for span in fresh:
                    view.emit(span)
                if fresh:
                    last = fresh[-1]["_rowid"]
                if len(fresh) < FOLLOW_BATCH:
                    time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        # Ctrl-C (at any point, even mid-backlog) is how a follow ends: exit 0, not "Aborted!".
        return


@click.command()
@click.option(
    "--status", default=None, help="Only rollouts in this status (running, succeeded, …)."
)
@limit_option(50, minimum=1, help="How many rollouts to list.")
@json_option
@db_option
def rollouts(status: str | None, limit: int, as_json: bool, db: str) -> None:
    """List rollouts, newest first, with their calls, errors, tokens and cost.

    Example:

    \b
        spangate rollouts --status failed --limit 10
    """
    from gateway.cli import render as cli_render
    from store.queries import list_rollouts
    from store.schema import ROLLOUT_STATUSES

    if status is not None and status not in ROLLOUT_STATUSES:
        raise click.BadParameter(
            f"{status!r} is not one of {', '.join(ROLLOUT_STATUSES)}", param_hint="--status"
        )
    with read_db(db) as conn:
        found = list_rollouts(conn, status=status, limit=limit, max_page=max(limit, 1)).data[:limit]
    if as_json:
        for rollout in found:
            click.echo(cli_render.json_line(rollout))
    elif not found:
        click.echo(f"no {status} rollouts" if status else "no rollouts yet", err=True)
    else:
        for line in cli_render.rollouts_table(found):
            click.echo(line)


@click.command()
@click.argument("rollout_id", metavar="ROLLOUT")
@json_option
@db_option
def show(rollout_id: str, as_json: bool, db: str) -> None:
    """Show one rollout: its attempts with their calls in order, rewards and totals.

    Example:

    \b
        spangate show r-42
        spangate show r-42 --json | jq .summary
    """
    from gateway.cli import render as cli_render
    from store.errors import NotFound
    from store.queries import get_rollout

    with read_db(db) as conn:
        try:
            rollout = get_rollout(conn, rollout_id)
        except NotFound as exc:
            raise click.ClickException(f"rollout {rollout_id} not found") from exc
    if as_json:
        click.echo(cli_render.json_line(rollout))
        return
    for line in cli_render.rollout_tree(rollout):
        click.echo(line)
