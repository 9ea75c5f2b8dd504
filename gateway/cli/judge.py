"""`spangate judge`: the command group; each subcommand lives in its own `judge_*` module."""

from __future__ import annotations

import click

from gateway.cli.judge_calibrate import calibrate_command
from gateway.cli.judge_compare import compare_command
from gateway.cli.judge_run import run_command


@click.group()
def judge() -> None:
    """Score recorded rollouts with a judge, check a judge against human labels, compare two."""


for command in (run_command, calibrate_command, compare_command):
    judge.add_command(command)
