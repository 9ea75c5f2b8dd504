"""The `spangate` command group; each command family lives in its own module."""

from __future__ import annotations

from typing import Any

import click

from gateway.cli.experiments import experiments
from gateway.cli.export import export_command
from gateway.cli.judge import judge
from gateway.cli.options import BROKEN_PIPE_EXIT, quiet_stdout
from gateway.cli.patterns import patterns
from gateway.cli.prune import prune
from gateway.cli.read import rollouts, show, tail
from gateway.cli.report import report
from gateway.cli.reward import reward
from gateway.cli.serve import serve


class SpangateGroup(click.Group):
    """The command group, plus a quiet exit when the reader of our output goes away, and
    arguments that are not UTF-8 refused as a usage error.

    `spangate tail --json | head -1`: head exits, the next write raises BrokenPipeError,
    and the command ends with the status a SIGPIPE would give (141), not a traceback.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # An argument that is not UTF-8 (a rollout id pasted from a Latin-1 terminal) reaches
        # Python with lone surrogates, which no store, URL or output can take.
        for arg in args:
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise click.UsageError(f"argument '{shown}' is not UTF-8 text", ctx) from None
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            quiet_stdout()
            ctx.exit(BROKEN_PIPE_EXIT)


@click.group(cls=SpangateGroup)
@click.version_option(package_name="spangate")
def cli() -> None:
    """spangate: an OpenAI-compatible gateway that records every call an agent makes."""


for command in (
    serve,
    tail,
    rollouts,
    show,
    reward,
    export_command,
    judge,
    patterns,
    report,
    experiments,
    prune,
):
    cli.add_command(command)
