"""The read-only CLI commands (tail, rollouts, show) against a database built like the gateway's."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from conftest import BACKENDS, new_store
from shapes import CLI_ARGV

from gateway.cli import render as cli_render
from gateway.cli.main import cli
from gateway.cli.render import clock
from store.schema import connect
from store.span_inserts import insert_spans

T0 = 1_714_572_000_000_000_000  # 2024-05-01 14:00 UTC, in ns
SECOND = 1_000_000_000


def _span(
    *,
    rollout: str | None,
    attempt: str | None,
    seq: int | None,
    start_s: float,
    duration_ms: float,
    messages: list[dict[str, Any]] | None = None,
    response: Any = None,
    operation: str = "chat",
    model: str = "gpt-4o-mini",
    response_model: str | None = "gpt-4o-mini-2024-07-18",
    stream: bool = False,
    ttft_ms: float | None = None,
    usage: tuple[int, int] | None = (12, 8),
    cost_usd: float | None = 0.000012,
    tool_calls: list[dict[str, Any]] | None = None,
    error: tuple[int, str, str] | None = None,
) -> dict[str, Any]:
    """A record shaped like `Call.publish` in gateway/web/routes_openai.py builds it."""
    start_ns = T0 + int(start_s * SECOND)
    request: dict[str, Any] = {"model": model}
    if operation == "embeddings":
        request["input"] = ["a", "b"]
    else:
        request["messages"] = messages or [{"role": "user", "content": "hi"}]
    if stream:
        request["stream"] = True
    record: dict[str, Any] = {
        "span_id": os.urandom(8).hex(),
        "trace_id": os.urandom(16).hex(),
        "parent_span_id": None,
        "rollout_id": rollout,
        "attempt_id": attempt,
        "seq": seq,
        "name": f"{operation} {model}",
        "operation": operation,
        "provider": "openai",
        "deployment": f"openai/{model}",
        "model_group": model,
        "request_model": model,
        "status": "ok",
        "http_status": 200,
        "error_type": None,
        "error_message": None,
        "stream": int(stream),
        "start_ns": start_ns,
        "end_ns": start_ns + int(duration_ms * 1e6),
        "duration_ms": duration_ms,
        "ttft_ms": ttft_ms,
        "upstream_ms": duration_ms - 1.5,
        "overhead_ms": 1.5,
        "retries": 0,
        # Plain answers are recorded as the raw bytes; streams as the assembled object.
        "request_body": orjson.dumps(request),
        "response_body": response,
        "attributes": {"gen_ai.request.temperature": 0.2},
        "tags": ["eval"] if rollout else [],
        "agent": "planner" if rollout else None,
        "metadata": {"task": "capitals"} if rollout else {},
        "response_id": "chatcmpl-" + os.urandom(4).hex(),
        "response_model": response_model,
        "input_tokens": usage[0] if usage else None,
        "output_tokens": usage[1] if usage else None,
        "cached_tokens": 0 if usage else None,
        "reasoning_tokens": None,
        "finish_reasons": ["tool_calls" if tool_calls else "stop"],
        "tool_calls": tool_calls,
        "cost_usd": cost_usd,
    }
    if error is not None:
        http_status, kind, message = error
        record.update(
            status="error",
            http_status=http_status,
            error_type=kind,
            error_message=message,
            response_body=orjson.dumps(
                {"error": {"message": message, "type": kind, "param": None, "code": None}}
            ),
            response_id=None,
            response_model=None,
            input_tokens=None,
            output_tokens=None,
            cached_tokens=None,
            finish_reasons=None,
            cost_usd=None,
        )
    return record


def _chat_body(content: str | None, tool_calls: list[dict[str, Any]] | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_714_572_000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if tool_calls else "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    }


WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def _records() -> list[dict[str, Any]]:
    """Two rollouts (the first with two attempts) and one unattributed call, in write order."""
    return [
        _span(
            rollout="r-alpha",
            attempt="a1",
            seq=1,
            start_s=0,
            duration_ms=812.4,
            response=orjson.dumps(_chat_body("The capital of France is Paris.")),
        ),
        _span(
            rollout="r-alpha",
            attempt="a1",
            seq=2,
            start_s=1,
            duration_ms=640,
            stream=True,
            ttft_ms=88.2,
            response=_chat_body("Streaming:\nit is\nParis, really, and the answer is long enough"),
        ),
        _span(
            rollout="r-alpha",
            attempt="a1",
            seq=3,
            start_s=2,
            duration_ms=300,
            response=orjson.dumps(_chat_body(None, [WEATHER_CALL])),
            tool_calls=[{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}],
        ),
        _span(
            rollout="r-alpha",
            attempt="a2",
            seq=4,
            start_s=3,
            duration_ms=45,
            error=(429, "rate_limit_error", "Rate limit reached for gpt-4o-mini"),
        ),
        _span(
            rollout="r-alpha",
            attempt="a2",
            seq=5,
            start_s=4,
            duration_ms=500,
            response=orjson.dumps(_chat_body("Paris.")),
        ),
        _span(
            rollout="r-beta",
            attempt="default",
            seq=1,
            start_s=5,
            duration_ms=30,
            operation="embeddings",
            model="text-embedding-3-small",
            response_model="text-embedding-3-small",
            usage=(4, 0),
            cost_usd=0.0000001,
            response=orjson.dumps(
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]},
                        {"object": "embedding", "index": 1, "embedding": [0.3, 0.4]},
                    ],
                    "model": "text-embedding-3-small",
                    "usage": {"prompt_tokens": 4, "total_tokens": 4},
                }
            ),
        ),
        _span(
            rollout=None,
            attempt=None,
            seq=None,
            start_s=6,
            duration_ms=120,
            operation="responses",
            model="gpt-4o",
            response_model="gpt-4o",
            cost_usd=None,
            response=orjson.dumps(
                {
                    "id": "resp_1",
                    "object": "response",
                    "status": "completed",
                    "model": "gpt-4o",
                    "output": [
                        {
                            "type": "message",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hello from responses"}],
                        }
                    ],
                    "usage": {"input_tokens": 12, "output_tokens": 8},
                }
            ),
        ),
    ]


def _insert(path: Path, records: list[dict[str, Any]]) -> None:
    db = connect(path)
    try:
        insert_spans(db, records)
    finally:
        db.close()


@pytest.fixture(params=BACKENDS)
def db_path(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The recorded calls, in a SQLite file or in PostgreSQL: every read command reads both."""
    path = new_store(request, tmp_path / "spangate.db", request.param)
    _insert(path, _records())
    return path


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# -- tail ---------------------------------------------------------------------


def test_tail_prints_calls_oldest_first_with_their_details(db_path: Path) -> None:
    result = run("tail", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 7
    first = lines[0]
    assert first.startswith(clock(T0))
    for part in (
        "r-alpha/a1#1",
        "gpt-4o-mini → gpt-4o-mini-2024-07-18",
        "ok",
        "812ms",
        "12/8 tok",
        "$0.000012",
        "The capital of France is Paris.",
    ):
        assert part in first
    assert "Streaming: it is Paris, really" in lines[1]  # newlines flattened
    assert lines[1].endswith("…")
    assert "→ get_weather(" in lines[2] and "Paris" in lines[2]
    assert "error 429" in lines[3] and "Rate limit reached for gpt-4o-mini" in lines[3]
    assert "$" not in lines[3]  # no cost recorded, so none shown
    assert "r-beta/default#1" in lines[5] and "[2 vectors]" in lines[5]
    assert lines[6].split()[1] == "-" and "Hello from responses" in lines[6]
    assert [line.split()[1] for line in lines[:5]] == [
        "r-alpha/a1#1",
        "r-alpha/a1#2",
        "r-alpha/a1#3",
        "r-alpha/a2#4",
        "r-alpha/a2#5",
    ]


def test_tail_limit_keeps_the_newest_calls(db_path: Path) -> None:
    result = run("tail", "--limit", "2", "--db", str(db_path))
    lines = result.output.splitlines()
    assert len(lines) == 2
    assert "r-beta/default#1" in lines[0]
    assert "Hello from responses" in lines[1]


def test_tail_rollout_filters_to_that_rollout(db_path: Path) -> None:
    result = run("tail", "--rollout", "r-alpha", "-n", "3", "--db", str(db_path))
    lines = result.output.splitlines()
    assert [line.split()[1] for line in lines] == ["r-alpha/a1#3", "r-alpha/a2#4", "r-alpha/a2#5"]


def test_tail_json_is_one_object_per_line_without_bodies(db_path: Path) -> None:
    result = run("tail", "--json", "--db", str(db_path))
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 1, None]
    assert rows[2]["tool_calls"][0]["name"] == "get_weather"  # JSON columns come decoded
    assert rows[0]["tags"] == ["eval"]
    assert all("request_body" not in r and "response_body" not in r for r in rows)
    assert all("_rowid" not in r for r in rows)


def test_tail_json_bodies_includes_decoded_bodies(db_path: Path) -> None:
    result = run("tail", "--json", "--bodies", "-n", "1", "--db", str(db_path))
    (row,) = [json.loads(line) for line in result.output.splitlines()]
    assert row["request_body"]["model"] == "gpt-4o"
    assert row["response_body"]["output"][0]["content"][0]["text"] == "Hello from responses"


def test_tail_on_empty_database_says_so(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    connect(path).close()
    result = CliRunner().invoke(cli, ["tail", "--db", str(path)])
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no calls recorded yet" in result.stderr


def test_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    for command in (["tail"], ["rollouts"], ["show", "r-alpha"]):
        result = CliRunner().invoke(cli, [*command, "--db", str(tmp_path / "nope.db")])
        assert result.exit_code == 1
        assert "no database at" in result.output and "spangate serve" in result.output


def test_db_option_reads_spangate_db_env(db_path: Path) -> None:
    result = CliRunner(env={"SPANGATE_DB": str(db_path)}).invoke(cli, ["tail", "-n", "1"])
    assert result.exit_code == 0 and "Hello from responses" in result.output


def test_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not sqlite " * 100)
    result = CliRunner().invoke(cli, ["tail", "--db", str(path)])
    assert result.exit_code == 1
    assert "cannot read" in result.output


# -- tail --follow (a real process) -------------------------------------------


@pytest.fixture
def follower(db_path: Path) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str | None]]]:
    """`spangate tail --follow` running in its own process; its lines arrive on a queue."""
    with subprocess.Popen(
        [*CLI_ARGV, "tail", "--follow", "-n", "1", "--db", str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            yield proc, lines
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=5)
            reader.join(timeout=5)


def _next_line(lines: queue.Queue[str | None], deadline: float) -> str:
    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
    assert line is not None, "the follower exited"
    return line


def test_tail_follow_shows_a_new_call_within_a_second(
    db_path: Path, follower: tuple[subprocess.Popen[str], queue.Queue[str | None]]
) -> None:
    _, lines = follower
    # The backlog line proves the follower is up (and past its import time) before we insert.
    assert "Hello from responses" in _next_line(lines, time.monotonic() + 10)
    new = _span(
        rollout="r-gamma",
        attempt="a1",
        seq=1,
        start_s=10,
        duration_ms=100,
        response=orjson.dumps(_chat_body("fresh off the wire")),
    )
    _insert(db_path, [new])
    inserted = time.monotonic()
    line = _next_line(lines, inserted + 5)
    shown_after = time.monotonic() - inserted
    assert "r-gamma/a1#1" in line and "fresh off the wire" in line
    assert shown_after < 1.0, f"new call took {shown_after:.2f}s to show"


def test_tail_follow_exits_cleanly_on_ctrl_c(
    follower: tuple[subprocess.Popen[str], queue.Queue[str | None]],
) -> None:
    proc, lines = follower
    _next_line(lines, time.monotonic() + 10)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 0
    assert proc.stderr is not None
    assert "Traceback" not in proc.stderr.read()


def test_tail_does_not_import_litellm_or_the_server(db_path: Path) -> None:
    code = (
        "import sys\n"
        "from gateway.cli.main import cli\n"
        f"cli(['tail', '--db', {str(db_path)!r}], standalone_mode=False)\n"
        "heavy = ('litellm', 'aiohttp', 'gateway.compose', 'gateway.server')\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in heavy"
        " or m in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "Hello from responses" in out
    assert out.splitlines()[-1] == "LOADED []"


# -- rollouts -----------------------------------------------------------------


def test_rollouts_table_lists_rollouts_newest_first_with_counts(db_path: Path) -> None:
    result = run("rollouts", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split() == [
        "ID",
        "STATUS",
        "AGENT",
        "ATTEMPTS",
        "CALLS",
        "ERRORS",
        "TOKENS",
        "COST",
        "CREATED",
        "DURATION",
    ]
    assert [r.split()[0] for r in rows] == ["r-beta", "r-alpha"]
    alpha = rows[1].split()
    assert alpha[1:7] == ["running", "planner", "2", "5", "1", "80"]
    assert alpha[7] == "$0.000048"
    assert alpha[-1] == "4.5s"  # first call's start to last call's end
    beta = rows[0].split()
    assert beta[3:5] == ["1", "1"]


def test_rollouts_status_filter_and_json(db_path: Path) -> None:
    result = run("rollouts", "--status", "succeeded", "--db", str(db_path))
    assert result.exit_code == 0 and "no succeeded rollouts" in result.stderr
    rows = [
        json.loads(line)
        for line in run("rollouts", "--json", "--db", str(db_path)).stdout.splitlines()
    ]
    assert [(r["id"], r["calls"]) for r in rows] == [("r-beta", 1), ("r-alpha", 5)]
    assert rows[1]["metadata"] == {"task": "capitals"}


def test_rollouts_rejects_an_unknown_status(db_path: Path) -> None:
    result = CliRunner().invoke(cli, ["rollouts", "--status", "done", "--db", str(db_path)])
    assert result.exit_code == 2
    assert "'done' is not one of running" in result.output


# -- show ---------------------------------------------------------------------


def _add_reward(path: Path) -> None:
    db = connect(path)
    try:
        db.execute(
            "insert into rewards (id, rollout_id, name, value, source, comment, created_ns)"
            " values ('rw1', 'r-alpha', 'accuracy', 1.0, 'judge:exact', 'matched Paris', ?)",
            [T0 + 9 * SECOND],
        )
    finally:
        db.close()


def test_show_prints_attempts_calls_in_order_rewards_and_summary(db_path: Path) -> None:
    _add_reward(db_path)
    result = run("show", "r-alpha", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    out = result.output
    lines = out.splitlines()
    assert lines[0] == "rollout r-alpha  running"
    assert "planner" in out and "eval" in out and '{"task":"capitals"}' in out
    calls = [line for line in lines if line.startswith(("├─", "└─"))]
    assert [c.split()[1] for c in calls] == ["#1", "#2", "#3", "#4", "#5"]
    assert lines.index("attempt a1  #1  running") < out.splitlines().index(calls[0])
    assert lines.index("attempt a2  #2  running") < lines.index(calls[3])
    assert calls[0].split()[2] == "+0.000s" and calls[4].split()[2] == "+4.000s"
    assert "ttft 88ms" in calls[1] and "ttft" not in calls[0]
    assert calls[2].startswith("└─") and calls[4].startswith("└─")
    assert "error 429" in calls[3] and "Rate limit reached" in calls[3]
    assert "accuracy" in out and "judge:exact" in out and "matched Paris" in out
    assert lines[-1] == (
        "summary  5 calls · 1 error · 80 tokens (48 in, 32 out) · $0.000048 · 4.5s"
    )


def test_show_json_is_get_rollout_as_one_object(db_path: Path) -> None:
    result = run("show", "r-beta", "--json", "--db", str(db_path))
    (line,) = result.output.splitlines()
    rollout = json.loads(line)
    assert rollout["id"] == "r-beta"
    assert rollout["attempts"][0]["spans"][0]["operation"] == "embeddings"
    assert rollout["summary"]["calls"] == 1


def test_show_unknown_rollout_fails_with_a_message(db_path: Path) -> None:
    result = CliRunner().invoke(cli, ["show", "r-nope", "--db", str(db_path)])
    assert result.exit_code == 1
    assert "rollout r-nope not found" in result.output


def test_commands_have_help_with_an_example() -> None:
    for name in ("tail", "rollouts", "show"):
        result = run(name, "--help")
        assert result.exit_code == 0
        assert "Example:" in result.output and f"spangate {name}" in result.output


@pytest.mark.parametrize(
    ("span", "preview"),
    [
        # Bodies not stored (recorder.store_bodies off): the tool_calls column still tells.
        (
            {
                "operation": "chat",
                "status": "ok",
                "response_body": None,
                "tool_calls": [{"id": "c1", "name": "search", "arguments": '{"q": "x"}'}],
            },
            '→ search({"q": "x"})',
        ),
        (
            {
                "operation": "responses",
                "status": "ok",
                "response_body": {
                    "output": [
                        {
                            "type": "function_call",
                            "call_id": "c1",
                            "name": "lookup",
                            "arguments": "{}",
                        }
                    ]
                },
            },
            "→ lookup({})",
        ),
        (
            {
                "operation": "text_completion",
                "status": "ok",
                "response_body": {"choices": [{"index": 0, "text": "once upon"}]},
            },
            "once upon",
        ),
        (
            {
                "operation": "chat",
                "status": "error",
                "error_message": None,
                "response_body": {"error": {"message": "upstream timed out"}},
            },
            "upstream timed out",
        ),
    ],
)
def test_reply_preview_covers_every_answer_shape(span: dict[str, Any], preview: str) -> None:
    from gateway.cli.render import reply

    assert reply(span) == preview


# -- control characters in recorded content ---------------------------------------

# Clears the screen, retitles the window, rings, overwrites the line, moves back, a one-byte
# CSI (C1) and a right-to-left override: what a prompt could try on whoever reads the trace.
HOSTILE = "\x1b[2J\x1b]0;pwned\x07\r\b\x9b31m\u202e"
SHOWN = "\\x1b[2J\\x1b]0;pwned\\x07\\r\\x08\\x9b31m\\u202e"
# What a terminal would act on; click's own styles (SGR) are taken out before looking.
RAW_CONTROLS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
)
SGR = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def hostile_db(tmp_path: Path) -> Path:
    """A rollout whose agent, tags, metadata, model, reply, tool name, error and reward
    comment all carry terminal control sequences."""
    call = _tool_call("tool" + HOSTILE)
    records = [
        _span(
            rollout="evil",
            attempt="1",
            seq=1,
            start_s=0,
            duration_ms=5,
            model="gpt" + HOSTILE,
            response_model="served" + HOSTILE,
            response=orjson.dumps(_chat_body("answer" + HOSTILE)),
        ),
        _span(
            rollout="evil",
            attempt="1",
            seq=2,
            start_s=1,
            duration_ms=5,
            response=orjson.dumps(_chat_body(None, tool_calls=[call])),
            tool_calls=[{"id": "call_1", "name": call["function"]["name"], "arguments": "{}"}],
        ),
        _span(
            rollout="evil",
            attempt="1",
            seq=3,
            start_s=2,
            duration_ms=5,
            error=(500, "api_error", "boom" + HOSTILE),
        ),
    ]
    for record in records:
        record.update(agent="agent" + HOSTILE, tags=["tag" + HOSTILE], metadata={"k": HOSTILE})
    path = tmp_path / "hostile.db"
    _insert(path, records)
    db = connect(path)
    try:
        db.execute(
            "insert into rewards (id, rollout_id, name, value, source, comment, created_ns)"
            " values ('rw-evil', 'evil', ?, 0.0, 'user', ?, ?)",
            ["name" + HOSTILE, "comment" + HOSTILE, T0 + 9 * SECOND],
        )
    finally:
        db.close()
    return path


def _tool_call(name: str) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": "{}"}}


@pytest.mark.parametrize("color", [False, True], ids=["plain", "styled"])
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["tail"], ["gpt" + SHOWN, "answer" + SHOWN, "tool" + SHOWN, "boom" + SHOWN]),
        (["rollouts"], ["agent" + SHOWN]),
        (
            ["show", "evil"],
            ["agent" + SHOWN, "tag" + SHOWN, "name" + SHOWN, "comment" + SHOWN, "tool" + SHOWN],
        ),
    ],
    ids=["tail", "rollouts", "show"],
)
def test_recorded_control_characters_are_printed_escaped(
    hostile_db: Path, args: list[str], expected: list[str], color: bool
) -> None:
    result = CliRunner().invoke(cli, [*args, "--db", str(hostile_db)], color=color)

    assert result.exit_code == 0, result.output
    # With color=False click strips ANSI it recognises itself; color=True is a terminal's view.
    shown = SGR.sub("", result.output)
    assert not RAW_CONTROLS.search(shown), repr(shown)
    for text in expected:
        assert text in shown, (text, shown)


@pytest.mark.parametrize("args", [["tail", "--bodies"], ["rollouts"], ["show", "evil"]])
def test_json_output_escapes_control_characters_and_keeps_the_values(
    hostile_db: Path, args: list[str]
) -> None:
    result = run(*args, "--json", "--db", str(hostile_db))

    assert not RAW_CONTROLS.search(result.output), repr(result.output)
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert any(HOSTILE in text for text in _strings(rows))  # a parser gets them back as they were


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_printable_escapes_controls_once_and_can_keep_lines() -> None:
    text = "a\x1b[2J\tb\nc\r\u202e\\x"

    assert cli_render.printable(text) == "a\\x1b[2J\\tb\\nc\\r\\u202e\\x"
    assert cli_render.printable(text, lines=True) == "a\\x1b[2J\tb\nc\\r\\u202e\\x"
    assert cli_render.printable(cli_render.printable(text)) == cli_render.printable(text)
    assert cli_render.clip("one\ntwo\x07") == "one two\\x07"
