"""`spangate reward`: written straight into the database file, or posted to a running gateway."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import respx
from click.testing import CliRunner, Result
from servers import GatewayThread, read_rows

from gateway.cli.main import cli
from store.schema import connect
from store.span_inserts import insert_spans

T0 = 1_795_334_400_000_000_000  # 2026-11-22T08:00:00Z, in ns
MS = 1_000_000


def _span(rollout: str, attempt: str, seq: int, *, response_id: str) -> dict[str, Any]:
    start = T0 + seq * 1000 * MS
    return {
        "span_id": os.urandom(8).hex(),
        "trace_id": os.urandom(16).hex(),
        "rollout_id": rollout,
        "attempt_id": attempt,
        "seq": seq,
        "name": "chat gpt-test",
        "operation": "chat",
        "request_model": "gpt-test",
        "response_id": response_id,
        "status": "ok",
        "http_status": 200,
        "stream": 0,
        "start_ns": start,
        "end_ns": start + 50 * MS,
        "duration_ms": 50.0,
        "retries": 0,
        "request_body": {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
        "response_body": None,
        "attributes": {},
        "tags": [],
    }


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """r-1 with attempts a1 (two calls) and a2 (one call); r-2 with one call."""
    spans = [
        _span("r-1", "a1", 1, response_id="chatcmpl-one"),
        _span("r-1", "a1", 2, response_id="chatcmpl-two"),
        _span("r-1", "a2", 3, response_id="chatcmpl-three"),
        _span("r-2", "a1", 1, response_id="chatcmpl-other"),
    ]
    path = tmp_path / "spangate.db"
    db = connect(path)
    try:
        insert_spans(db.conn, spans)
    finally:
        db.close()
    return path, spans


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def rewards(path: Path) -> list[dict[str, Any]]:
    return read_rows(path, "select * from rewards order by rowid")


# -- straight into the file -----------------------------------------------------------


def test_reward_on_a_rollout_is_stored_and_printed(
    seeded: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, _ = seeded
    result = run("reward", "r-1", "--value", "1", "--final", "--db", str(path))
    assert result.exit_code == 0, result.output
    [row] = rewards(path)
    assert (row["rollout_id"], row["attempt_id"], row["span_id"]) == ("r-1", None, None)
    assert (row["name"], row["value"], row["final"], row["source"]) == ("reward", 1.0, 1, "user")
    assert result.output == f"stored {row['id']}: reward = 1 (final) on rollout r-1 · source user\n"


def test_reward_on_an_attempt(seeded: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = seeded
    result = run("reward", "r-1", "--value", "0.5", "--attempt", "a2", "--db", str(path))
    assert result.exit_code == 0, result.output
    [row] = rewards(path)
    assert (row["rollout_id"], row["attempt_id"], row["span_id"]) == ("r-1", "a2", None)
    assert "on rollout r-1 / attempt a2" in result.output


def test_reward_on_a_span_fills_in_its_attempt(seeded: tuple[Path, list[dict[str, Any]]]) -> None:
    path, spans = seeded
    span_id = spans[1]["span_id"]
    result = run(
        "reward", "r-1", "--value", "0.25", "--name", "step", "--span", span_id, "--db", str(path)
    )
    assert result.exit_code == 0, result.output
    [row] = rewards(path)
    assert (row["rollout_id"], row["attempt_id"], row["span_id"]) == ("r-1", "a1", span_id)
    assert row["name"] == "step"
    assert f"on rollout r-1 / attempt a1 / span {span_id}" in result.output


def test_reward_by_response_id_finds_the_call(seeded: tuple[Path, list[dict[str, Any]]]) -> None:
    path, spans = seeded
    result = run(
        "reward",
        "r-1",
        "--value",
        "1",
        "--response-id",
        "chatcmpl-three",
        "--json",
        "--db",
        str(path),
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["span_id"] == spans[2]["span_id"]
    assert printed["attempt_id"] == "a2"
    assert rewards(path)[0]["span_id"] == spans[2]["span_id"]


def test_reward_json_carries_dimensions_comment_and_source(
    seeded: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, _ = seeded
    result = run(
        "reward",
        "r-2",
        "--value",
        "0.75",
        "-d",
        "accuracy=0.9",
        "--dimension",
        "style=0.5",
        "--comment",
        "close enough",
        "--source",
        "agent",
        "--json",
        "--db",
        str(path),
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["dimensions"] == {"accuracy": 0.9, "style": 0.5}
    assert (printed["comment"], printed["source"], printed["value"]) == (
        "close enough",
        "agent",
        0.75,
    )
    assert printed["final"] is False
    assert json.loads(rewards(path)[0]["dimensions"]) == {"accuracy": 0.9, "style": 0.5}


def test_reward_with_client_id_is_idempotent(seeded: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = seeded
    args = ["reward", "r-1", "--value", "1", "--final", "--id", "r-1-grade", "--db", str(path)]
    first, second = run(*args), run(*args)
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    assert first.output.startswith("stored r-1-grade:")
    assert second.output.startswith("already stored r-1-grade:")
    assert len(rewards(path)) == 1


def test_reward_with_client_id_and_a_different_body_conflicts(
    seeded: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, _ = seeded
    assert run("reward", "r-1", "--value", "1", "--id", "x-1", "--db", str(path)).exit_code == 0
    result = run("reward", "r-1", "--value", "0", "--id", "x-1", "--db", str(path))
    assert result.exit_code == 1
    assert "reward 'x-1' already exists with a different body" in result.output
    assert [r["value"] for r in rewards(path)] == [1.0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "rollout 'r-nope' not found"),
        (["--attempt", "a9"], "attempt 'a9' of rollout 'r-nope' not found"),
        (["--span", "0123456789abcdef"], "span '0123456789abcdef' not found"),
        (["--response-id", "chatcmpl-nope"], "no recorded call has response id 'chatcmpl-nope'"),
    ],
)
def test_reward_on_an_unknown_target_fails_with_the_message(
    seeded: tuple[Path, list[dict[str, Any]]], extra: list[str], message: str
) -> None:
    path, _ = seeded
    result = run("reward", "r-nope", "--value", "1", *extra, "--db", str(path))
    assert result.exit_code == 1
    assert f"Error: {message}" in result.output
    assert "Traceback" not in result.output
    assert rewards(path) == []


def test_reward_on_a_span_of_another_rollout_fails(
    seeded: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, spans = seeded
    result = run("reward", "r-2", "--value", "1", "--span", spans[0]["span_id"], "--db", str(path))
    assert result.exit_code == 1
    assert "belongs to rollout_id 'r-1'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--value", "nan"], "value: Input should be a finite number"),
        (["--value", "1", "-d", "accuracy"], "'accuracy' is not NAME=NUMBER"),
        (["--value", "1", "-d", "accuracy=high"], "'accuracy=high' is not NAME=NUMBER"),
        (["--value", "1", "--id", "has space"], "id: String should match pattern"),
    ],
)
def test_reward_rejects_bad_input_before_writing(
    seeded: tuple[Path, list[dict[str, Any]]], args: list[str], message: str
) -> None:
    path, _ = seeded
    result = run("reward", "r-1", *args, "--db", str(path))
    assert result.exit_code in (1, 2)
    assert message in result.output
    assert rewards(path) == []


def test_reward_without_a_database_is_a_clear_error(tmp_path: Path) -> None:
    result = run("reward", "r-1", "--value", "1", "--db", str(tmp_path / "none.db"))
    assert result.exit_code == 1
    assert "no database at" in result.output
    assert not (tmp_path / "none.db").exists()


# -- posted to a running gateway --------------------------------------------------------


def test_reward_url_posts_to_the_gateway(gateway: GatewayThread) -> None:
    client = openai.OpenAI(base_url=gateway.url("r-live", "a1"), api_key="sk-test", max_retries=0)
    try:
        completion = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}]
        )
    finally:
        client.close()
    args = [
        "reward",
        "r-live",
        "--value",
        "0.5",
        "--response-id",
        completion.id,
        "--id",
        "live-1",
        "--url",
        gateway.base,
    ]
    first = run(*args)
    assert first.exit_code == 0, first.output
    [span] = gateway.spans(rollout_id="r-live")
    assert first.output == (
        f"stored live-1: reward = 0.5 on rollout r-live / attempt a1 / span {span['span_id']}"
        " · source user\n"
    )
    again = run(*args, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["span_id"] == span["span_id"]
    assert len(read_rows(gateway.db_path, "select * from rewards")) == 1


def test_reward_url_reports_the_gateways_errors(gateway: GatewayThread) -> None:
    missing = run("reward", "r-nope", "--value", "1", "--url", gateway.base)
    assert missing.exit_code == 1
    assert "404" in missing.output and "rollout 'r-nope' not found" in missing.output
    assert "Traceback" not in missing.output


def test_reward_url_reports_a_conflict(gateway: GatewayThread) -> None:
    client = openai.OpenAI(base_url=gateway.url("r-c"), api_key="sk-test", max_retries=0)
    try:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}]
        )
    finally:
        client.close()
    gateway.flush()
    base = ["reward", "r-c", "--id", "c-1", "--url", gateway.base]
    assert run(*base, "--value", "1").exit_code == 0
    clash = run(*base, "--value", "0")
    assert clash.exit_code == 1
    assert "409" in clash.output and "already exists with a different body" in clash.output


def test_reward_url_sends_the_key_as_a_bearer_token() -> None:
    with respx.mock(base_url="http://gw.test") as mock:
        route = mock.post("/api/rewards").mock(
            return_value=httpx.Response(
                201,
                json={
                    "id": "rw-1",
                    "rollout_id": "r-1",
                    "attempt_id": None,
                    "span_id": None,
                    "name": "reward",
                    "value": 1.0,
                    "final": True,
                    "source": "user",
                },
            )
        )
        result = run(
            "reward",
            "r-1",
            "--value",
            "1",
            "--final",
            "--url",
            "http://gw.test/",
            "--key",
            "sk-gw-123",
        )
    assert result.exit_code == 0, result.output
    request = route.calls.last.request
    assert request.headers["Authorization"] == "Bearer sk-gw-123"
    assert json.loads(request.content) == {
        "rollout_id": "r-1",
        "name": "reward",
        "value": 1.0,
        "dimensions": {},
        "final": True,
        "source": "user",
        "details": {},
        "tags": [],
    }
    assert result.output.startswith("stored rw-1: reward = 1 (final) on rollout r-1")


def test_reward_url_that_cannot_be_reached_is_a_clear_error() -> None:
    result = run("reward", "r-1", "--value", "1", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "cannot reach the gateway at http://127.0.0.1:9" in result.output
