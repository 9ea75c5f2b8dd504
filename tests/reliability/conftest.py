"""Fixtures for the reliability suite: `spangate serve` subprocesses in front of the fake provider.

The shared `fake_provider`, `make_gateway`, `gateway` and `db_path` fixtures come from
`tests/conftest.py`; this adds `served_process`, a factory that starts real `spangate serve`
processes (killed at teardown if a test left one running), and makes `fake_provider` clean up
after itself (these tests queue hundreds of faults and change its latency, and the fake is
shared by the whole session).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_provider import FakeProviderThread


@pytest.fixture
def fake_provider(fake_provider: FakeProviderThread) -> Iterator[FakeProviderThread]:
    """The shared fake upstream, with leftover faults and latency cleared after the test too."""
    yield fake_provider
    fake_provider.state.reset()
    fake_provider.state.latency = 0.0
