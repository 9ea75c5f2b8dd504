"""Shared fixtures: a real fake provider, the real gateway in front of it, and its database."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# A shell starts a background job (`pytest ... &`) with SIGINT ignored, and the CLI processes
# the tests interrupt would inherit that and never see their Ctrl-C: handled here, it is
# reset to the default in every child at exec, as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, str(Path(__file__).parent))

from fake_provider import FakeProviderThread
from pg import PostgresServer, start_postgres
from redis_server import RedisServer, start_redis
from servers import GatewayThread, ServedProcess, ServeFactory, start_served, write_config

from config.loader import parse_settings
from config.models import Settings

ClientT = TypeVar("ClientT")

UPSTREAM_MODEL = "upstream-model"


@pytest.fixture(scope="session")
def fake_provider_server() -> Iterator[FakeProviderThread]:
    server = FakeProviderThread().start()
    yield server
    server.stop()


@pytest.fixture
def fake_provider(fake_provider_server: FakeProviderThread) -> FakeProviderThread:
    """The fake upstream, with its recorded requests and planned faults cleared."""
    fake_provider_server.state.reset()
    fake_provider_server.state.latency = 0.0
    return fake_provider_server


def gateway_settings(provider_url: str, **overrides: Any) -> Settings:
    """`gpt-test` goes to the fake provider (as `upstream-model`); `mock` is the built-in one."""
    data: dict[str, Any] = {
        "models": [
            {
                "name": "gpt-test",
                "deployments": [
                    {
                        "provider": "openai",
                        "model": UPSTREAM_MODEL,
                        "api_base": provider_url,
                        "api_key": "sk-upstream-secret",
                    }
                ],
            },
            {"name": "mock", "deployments": [{"provider": "mock", "model": "mock"}]},
        ]
    }
    data.update(overrides)
    return parse_settings(data, env={})


# Clients a test opened (the openai SDK's, httpx's), closed when it ends: one left to the
# garbage collector may be finalized after its socket, whose ResourceWarning then fails
# whichever test runs next.
_SDK_CLIENTS: list[Any] = []


def closed_after_test(client: ClientT) -> ClientT:
    """`client` (anything with `close()`), closed when the test that opened it ends."""
    _SDK_CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    while _SDK_CLIENTS:
        _SDK_CLIENTS.pop().close()


@pytest.fixture(scope="module")
def module_gateway(
    fake_provider_server: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayThread]:
    """One gateway (default settings) for a whole module whose tests each use their own
    rollouts; starting one per test would cost more than the tests."""
    settings = gateway_settings(fake_provider_server.url)
    gateway = GatewayThread(settings, tmp_path_factory.mktemp("module") / "spangate.db").start()
    yield gateway
    gateway.stop()


BACKENDS = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_backends: run the test on SQLite and on a real PostgreSQL (db_path)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_path" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_backends"
    ):
        metafunc.parametrize("db_path", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the session (never a mock, never skipped when missing)."""
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session."""
    server = start_redis()
    yield server
    server.stop()


def new_store(request: pytest.FixtureRequest, path: Path, backend: str) -> Any:
    """`path` for SQLite, or a fresh PostgreSQL database URL (what `--db` takes)."""
    if backend == "postgresql":
        return request.getfixturevalue("postgres").new_database()
    return path


@pytest.fixture
def db_path(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The store of this test: a SQLite file, or (tests marked `both_backends`, second
    run) a fresh PostgreSQL database URL."""
    return new_store(request, tmp_path / "spangate.db", getattr(request, "param", "sqlite"))


@pytest.fixture
def make_gateway(
    fake_provider: FakeProviderThread, db_path: Path
) -> Iterator[Callable[..., GatewayThread]]:
    """Start a gateway with settings overrides (or a whole `settings=`) on the test's store
    (or `db=`, another one, say a database replicas share); stopped at teardown."""
    started: list[GatewayThread] = []

    def make(
        *, settings: Settings | None = None, db: Any = None, **overrides: Any
    ) -> GatewayThread:
        chosen = settings or gateway_settings(fake_provider.url, **overrides)
        gateway = GatewayThread(chosen, db if db is not None else db_path).start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in reversed(started):
        gateway.stop()


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayThread]) -> GatewayThread:
    return make_gateway()


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
