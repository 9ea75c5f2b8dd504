"""`spangate report`: one rollout as a self-contained HTML file to keep, mail or attach."""

from __future__ import annotations

import click

from gateway.cli.options import db_option, output_file, output_option, read_db


@click.command("report")
@click.argument("rollout_id", metavar="ROLLOUT")
@output_option("HTML file")
@db_option
def report(rollout_id: str, output: str, db: str) -> None:
    """Write one rollout as a single HTML file: timeline, every call with its
    messages, rewards and judge verdicts.

    CSS and JavaScript are inline and nothing is fetched from anywhere, so the
    file opens from disk with no network. The gateway serves the same file at
    GET /api/rollouts/{id}/report.

    Example:

    \b
        spangate report r-42 -o r-42.html
    """
    from gateway.web.report import build_report
    from store.errors import NotFound

    with read_db(db) as conn:
        try:
            html = build_report(conn, rollout_id)
        except NotFound as exc:
            raise click.ClickException(f"rollout {rollout_id} not found") from exc
    with output_file(output, "w", encoding="utf-8") as fp:
        fp.write(html)
    if output != "-":
        click.echo(f"wrote {output} ({len(html.encode()) / 1024:.0f} KiB)", err=True)
