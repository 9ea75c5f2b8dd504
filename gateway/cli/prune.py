"""`spangate prune`: delete old records on demand, as `retention.days` does in the background."""

from __future__ import annotations

import click

from gateway.cli.options import at_most_max, db_option, json_option, store_writer


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
    callback=at_most_max,
    help="Rollouts a transaction.",
)
@click.option(
    "--vacuum",
    is_flag=True,
    help="Then give the freed space back to the file system at once (SQLite; rewrites an "
    "older file). On PostgreSQL autovacuum reuses the space: nothing to do.",
)
@json_option
@db_option
def prune(older_than: str, dry_run: bool, batch: int, vacuum: bool, as_json: bool, db: str) -> None:
    """Delete spans, rewards, attempts and rollouts older than AGE (running rollouts are kept).

    Example:

    \b
        spangate prune --older-than 30d --dry-run
        spangate prune --older-than 30d --vacuum
    """
    import asyncio

    from gateway.cli.render import json_line
    from store.retention import prune_all
    from store.retention import vacuum as store_vacuum
    from store.times import parse_since

    try:
        cutoff = parse_since(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from exc
    writer = store_writer(db)
    freed: int | None = None
    try:
        counts = asyncio.run(
            writer.execute(
                lambda conn: prune_all(conn, cutoff_ns=cutoff, batch=batch, dry_run=dry_run)
            )
        )
        if vacuum and not dry_run:
            freed = asyncio.run(writer.execute(store_vacuum))
    finally:
        writer.close()
    if as_json:
        extra = {} if freed is None else {"freed_bytes": freed}
        click.echo(json_line({"dry_run": dry_run, **counts, **extra}))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb}: " + ", ".join(f"{n} {table}" for table, n in counts.items()))
    if freed is not None:
        click.echo(f"gave back {freed / 1e6:.1f} MB to the file system")
