"""The `spangate` command: one module per command family, registered by `main`."""

from gateway.cli.main import cli

__all__ = ["cli"]
