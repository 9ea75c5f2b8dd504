"""Fixtures for the reliability suite: `spangate serve` subprocesses in front of the fake provider.

The shared `fake_provider`, `make_gateway`, `gateway` and `db_path` fixtures come from
`tests/conftest.py`; this adds `served_process`, a factory that starts real `spangate serve`
processes (killed at teardown if a test left one running), and makes `fake_provider` clean up
after itself (these tests queue hundreds of faults and change its latency, and the fake is
shared by the whole session).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_provider import FakeProviderThread

from .support import ServedProcess, ServeFactory, start_served, write_config


@pytest.fixture
def fake_provider(fake_provider: FakeProviderThread) -> Iterator[FakeProviderThread]:
    """The shared fake upstream, with leftover faults and latency cleared after the test too."""
    yield fake_provider
    fake_provider.state.reset()
    fake_provider.state.latency = 0.0


@pytest.fixture
def served_process(tmp_path: Path, db_path: Path) -> Iterator[ServeFactory]:
    """`served_process(groups={name: api_base}, **settings)` starts `spangate serve` on `db_path`
    with those model groups (plus `mock`); calling it again restarts on the same database."""
    started: list[ServedProcess] = []

    def serve(groups: dict[str, str] | None = None, **settings: Any) -> ServedProcess:
        config = write_config(tmp_path / f"spangate-{len(started)}.yaml", groups or {}, **settings)
        served = start_served(config, db_path, tmp_path / f"serve-{len(started)}.log")
        started.append(served)
        return served

    yield serve
    for served in started:
        served.stop()
