"""The store on a real PostgreSQL: a bad URL, a wrong password or a server that is not there is
one clear line with the password masked; a server stopped and started again mid-load loses
nothing and doubles nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from pg import PASSWORD, PostgresServer, start_postgres
from servers import GatewayThread, read_rows, wait_until

from gateway.cli.main import cli


def test_a_wrong_password_is_one_line_with_the_password_masked(postgres: PostgresServer) -> None:
    url = postgres.new_database().replace(PASSWORD, "not-the-password")
    for command in (["rollouts"], ["tail"], ["export"], ["prune", "--older-than", "30d"]):
        result = CliRunner().invoke(cli, [*command, "--db", url])
        assert result.exit_code == 1, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith("Error: cannot open postgresql://spangate:***@127.0.0.1:")
        assert "password authentication failed" in line
        assert "not-the-password" not in result.output


def test_an_unreachable_server_and_a_bad_url_are_one_line_each() -> None:
    runner = CliRunner()
    down = runner.invoke(cli, ["rollouts", "--db", "postgresql://u:secret@127.0.0.1:1/x"])
    assert down.exit_code == 1
    assert down.output.startswith("Error: cannot open postgresql://u:***@127.0.0.1:1/x:")
    assert "secret" not in down.output and len(down.output.strip().splitlines()) == 1
    bad = runner.invoke(cli, ["rollouts", "--db", "postgresql://u:secret@127.0.0.1:notaport/x"])
    assert bad.exit_code == 1
    assert "secret" not in bad.output and len(bad.output.strip().splitlines()) == 1


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own, since the test stops it."""
    server = start_postgres()
    yield server
    server.stop()


def test_postgres_stopped_and_started_mid_load_loses_and_doubles_nothing(
    own_postgres: PostgresServer,
    fake_provider: FakeProviderThread,
    tmp_path: Any,
) -> None:
    url = own_postgres.new_database()
    settings = gateway_settings(
        fake_provider.url, recorder={"journal_dir": str(tmp_path / "journal")}
    )
    gateway = GatewayThread(settings, url).start()
    try:
        client = httpx.Client(base_url=gateway.url("r-restart"), timeout=10)

        def call(i: int) -> int:
            message = {"role": "user", "content": f"{i}"}
            body = {"model": "gpt-test", "messages": [message]}
            return client.post("/chat/completions", json=body).status_code

        assert [call(i) for i in range(10)] == [200] * 10
        gateway.flush()
        own_postgres.pause()
        # Calls go on while the store is away; their spans go to the journal.
        assert [call(i) for i in range(10, 30)] == [200] * 20
        wait_until(
            lambda: httpx.get(f"{gateway.base}/health/ready").status_code == 503,
            timeout=10,
            what="readiness to say the store is down",
        )
        problems = httpx.get(f"{gateway.base}/health/ready").json()["problems"]
        assert any("store not writable" in p for p in problems), problems
        own_postgres.resume()
        assert [call(i) for i in range(30, 40)] == [200] * 10
        gateway.flush(timeout=30)
        wait_until(lambda: httpx.get(f"{gateway.base}/health/ready").status_code == 200, timeout=15)
        client.close()
    finally:
        gateway.stop()
    rows = read_rows(url, "select seq from spans where rollout_id = 'r-restart' order by seq")
    assert [r["seq"] for r in rows] == list(range(1, 41))
