"""`spangate prune`: delete old records on demand, as `retention.days` does in the background."""

from __future__ import annotations

import click

from gateway.cli.options import db_option, json_option, store_writer


@click.command()
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="AGE",
    help="Prune what ended before this long ago (30d, 12h) or before a time (2026-11-01).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
@click.option(
    "--batch",
    default=500,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rollouts a transaction.",
)
@json_option
@db_option
def prune(older_than: str, dry_run: bool, batch: int, as_json: bool, db: str) -> None:
    """Delete spans, rewards, attempts and rollouts older than AGE (running rollouts are kept).

    Example:

    \b
        spangate prune --older-than 30d --dry-run
    """
    import asyncio

    from gateway.cli.render import json_line
    from store.retention import prune_all
    from store.times import parse_since

    try:
        cutoff = parse_since(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from exc
    writer = store_writer(db)
    try:
        counts = asyncio.run(
            writer.execute(
                lambda conn: prune_all(conn, cutoff_ns=cutoff, batch=batch, dry_run=dry_run)
            )
        )
    finally:
        writer.close()
    if as_json:
        click.echo(json_line({"dry_run": dry_run, **counts}))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb}: " + ", ".join(f"{n} {table}" for table, n in counts.items()))
