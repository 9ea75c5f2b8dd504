"""Export of recorded rollouts (store/export.py and `spangate export`) on databases built the
way the gateway writes them."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from conftest import BACKENDS, new_store
from sqlite_utils import Database

from gateway.cli.main import cli
from store.errors import NotFound
from store.export import (
    TRIPLET_REWARD_RULE,
    export_rollout,
    iter_rollouts,
    iter_triplets,
    missing_rollouts,
    write_jsonl,
)
from store.schema import SPAN_COLUMNS, connect
from store.span_inserts import insert_spans
from store.times import parse_since

T0 = 1_795_334_400_000_000_000  # 2026-11-22T08:00:00Z, in ns
SECOND = 1_000_000_000
HOUR = 3600 * SECOND
_ids = itertools.count(1)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def _chat_answer(content: str | None, tool_calls: list[dict[str, Any]] | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": f"chatcmpl-{next(_ids)}",
        "object": "chat.completion",
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


def _span(
    span_id: str,
    *,
    rollout: str | None,
    attempt: str | None,
    seq: int | None,
    at: int = T0,
    operation: str = "chat",
    request: Any = None,
    response: Any = None,
    agent: str | None = "planner",
    status: str = "ok",
    finish_reasons: list[str] | None = None,
) -> dict[str, Any]:
    """A record with every key `Call.publish` (gateway/web/routes_openai.py) gives the writer."""
    if request is None:
        request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    if response is None and status == "ok":
        response = _chat_answer("hello")
    record: dict[str, Any] = dict.fromkeys(SPAN_COLUMNS)
    record.update(
        {
            "span_id": span_id,
            "trace_id": "ab" * 16,
            "rollout_id": rollout,
            "attempt_id": attempt,
            "seq": seq,
            "name": f"{operation} gpt-4o-mini",
            "operation": operation,
            "provider": "openai",
            "deployment": "openai/gpt-4o-mini",
            "model_group": "gpt-4o-mini",
            "request_model": "gpt-4o-mini",
            "response_model": "gpt-4o-mini-2024-07-18" if status == "ok" else None,
            "status": status,
            "http_status": 200 if status == "ok" else 500,
            "stream": 0,
            "start_ns": at,
            "end_ns": at + SECOND // 2,
            "duration_ms": 500.0,
            "retries": 0,
            "input_tokens": 12 if status == "ok" else None,
            "output_tokens": 8 if status == "ok" else None,
            "finish_reasons": finish_reasons or (["stop"] if status == "ok" else None),
            # The gateway records the raw request bytes and the parsed (or assembled) answer.
            "request_body": orjson.dumps(request) if request != "absent" else None,
            "response_body": response,
            "attributes": {"gen_ai.request.temperature": 0.2},
            "tags": ["eval"],
            "agent": agent,
            "metadata": {"task": "capitals"},
        }
    )
    return record


def _reward(
    db: Database,
    *,
    rollout: str | None,
    value: float,
    attempt: str | None = None,
    span: str | None = None,
    name: str = "reward",
    final: bool = False,
    at: int = T0 + HOUR,
    dimensions: dict[str, float] | None = None,
) -> str:
    reward_id = f"rw-{next(_ids)}"
    row = {
        "id": reward_id,
        "rollout_id": rollout,
        "attempt_id": attempt,
        "span_id": span,
        "name": name,
        "value": value,
        "dimensions": orjson.dumps(dimensions or {}).decode(),
        "final": int(final),
        "source": "user",
        "comment": None,
        "details": "{}",
        "tags": "[]",
        "created_ns": at,
    }
    db.execute(
        f"insert into rewards ({', '.join(row)}) values ({', '.join(':' + k for k in row)})", row
    )
    return reward_id


def _build(path: Path) -> None:
    """Three rollouts (r1 rich, r2 other APIs, r3 a day later and failed) and a stray call."""
    db = connect(path)
    try:
        insert_spans(
            db,
            [
                # Written out of seq order on purpose: export must order by seq.
                _span("s-r1-2", rollout="r1", attempt="a1", seq=2, at=T0 + 2 * SECOND),
                _span(
                    "s-r1-1",
                    rollout="r1",
                    attempt="a1",
                    seq=1,
                    at=T0 + SECOND,
                    request={
                        "model": "gpt-4o-mini",
                        "messages": [
                            {"role": "system", "content": "Answer briefly."},
                            {"role": "user", "content": "Capital of France?"},
                        ],
                    },
                    response=_chat_answer("Paris"),
                ),
                _span(
                    "s-r1-3",
                    rollout="r1",
                    attempt="a2",
                    seq=3,
                    at=T0 + 3 * SECOND,
                    request={
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "Weather in Paris?"}],
                        "tools": [WEATHER_TOOL],
                    },
                    response=_chat_answer(None, [WEATHER_CALL]),
                    finish_reasons=["tool_calls"],
                ),
                _span(
                    "s-r1-4",
                    rollout="r1",
                    attempt="a2",
                    seq=4,
                    at=T0 + 4 * SECOND,
                    operation="embeddings",
                    request={"model": "text-embedding-3-small", "input": ["a"]},
                    response={"object": "list", "data": [{"embedding": [0.1, 0.2]}]},
                ),
                _span("s-r1-5", rollout="r1", attempt=None, seq=5, at=T0 + 5 * SECOND),
                _span(
                    "s-r2-1",
                    rollout="r2",
                    attempt="b1",
                    seq=1,
                    at=T0 + 10 * SECOND,
                    agent="coder",
                    operation="responses",
                    request={
                        "model": "gpt-4o-mini",
                        "instructions": "Be brief.",
                        "input": [{"role": "user", "content": "Capital of Italy?"}],
                    },
                    response={
                        "id": "resp_1",
                        "object": "response",
                        "status": "completed",
                        "output": [
                            {
                                "type": "message",
                                "role": "assistant",
                                "content": [{"type": "output_text", "text": "Rome"}],
                            }
                        ],
                        "usage": {"input_tokens": 12, "output_tokens": 8},
                    },
                    finish_reasons=["completed"],
                ),
                _span(
                    "s-r2-2",
                    rollout="r2",
                    attempt="b1",
                    seq=2,
                    at=T0 + 11 * SECOND,
                    agent="coder",
                    operation="text_completion",
                    request={"model": "gpt-4o-mini", "prompt": "Once upon"},
                    response={
                        "object": "text_completion",
                        "choices": [{"index": 0, "text": " a time", "finish_reason": "length"}],
                    },
                    finish_reasons=["length"],
                ),
                _span(
                    "s-r3-1",
                    rollout="r3",
                    attempt="c1",
                    seq=1,
                    at=T0 + 24 * HOUR,
                    status="error",
                    response={"error": {"message": "boom", "type": "server_error"}},
                ),
                # Bodies not stored (recorder.store_bodies off).
                _span("s-r3-2", rollout="r3", attempt="c1", seq=2, at=T0 + 24 * HOUR + SECOND),
                _span("s-none", rollout=None, attempt=None, seq=None, at=T0),
            ],
        )
        db.execute(
            "update spans set request_body = null, response_body = null where span_id = 's-r3-2'"
        )
        db.execute("update rollouts set status = 'succeeded' where id = 'r1'")
        db.execute("update rollouts set status = 'failed' where id = 'r3'")
        db.execute("""update rollouts set input = '{"question": "capitals"}' where id = 'r1'""")

        # r1: every level of the reward rule, plus decoys the rule must skip.
        _reward(db, rollout="r1", attempt="a1", span="s-r1-1", value=0.1, at=T0 + HOUR)
        _reward(db, rollout="r1", attempt="a1", span="s-r1-1", value=0.9, at=T0 + 2 * HOUR)
        _reward(db, rollout="r1", attempt="a1", span="s-r1-1", value=0.42, name="accuracy")
        _reward(db, rollout="r1", attempt="a1", value=0.5, final=True, at=T0 + HOUR)
        # Later but not final: the final one still wins.
        _reward(db, rollout="r1", attempt="a1", value=0.3, at=T0 + 3 * HOUR)
        _reward(db, rollout="r1", attempt="a2", value=0.6, at=T0 + HOUR)
        _reward(db, rollout="r1", attempt="a2", value=0.7, at=T0 + 2 * HOUR)
        _reward(db, rollout="r1", value=1.0, final=True, dimensions={"accuracy": 0.9, "style": 0.5})
        # r3: only a non-final rollout reward, which no call may take.
        _reward(db, rollout="r3", value=0.2)
    finally:
        db.close()


@pytest.fixture(params=BACKENDS)
def db_file(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The built store, as a SQLite file and as a PostgreSQL database."""
    path = new_store(request, tmp_path / "spangate.db", request.param)
    _build(path)
    return path


@pytest.fixture
def db(db_file: Path) -> Iterator[Database]:
    conn = connect(db_file, read_only=True)
    yield conn
    conn.close()


def _by_id(items: list[dict[str, Any]], key: str = "span_id") -> dict[str, dict[str, Any]]:
    return {item[key]: item for item in items}


# -- iter_rollouts -----------------------------------------------------------------------


def test_rollouts_hold_attempts_calls_in_seq_order_and_rewards_at_their_level(
    db: Database,
) -> None:
    rollouts = list(iter_rollouts(db))

    assert [r["id"] for r in rollouts] == ["r1", "r2", "r3"]  # oldest first; s-none has no rollout
    r1 = rollouts[0]
    assert r1["status"] == "succeeded"
    assert r1["agent"] == "planner"
    assert r1["input"] == {"question": "capitals"}
    assert r1["metadata"] == {"task": "capitals"}
    assert r1["tags"] == ["eval"]
    assert r1["created_ns"] <= r1["updated_ns"]

    a1, a2 = r1["attempts"]
    assert (a1["id"], a1["number"], a2["id"], a2["number"]) == ("a1", 1, "a2", 2)
    assert [c["seq"] for c in a1["calls"]] == [1, 2]
    assert [c["span_id"] for c in a2["calls"]] == ["s-r1-3", "s-r1-4"]
    assert [c["span_id"] for c in r1["unattributed_calls"]] == ["s-r1-5"]

    first = a1["calls"][0]
    assert first["request_body"]["messages"][1] == {"role": "user", "content": "Capital of France?"}
    assert first["response_body"]["choices"][0]["message"]["content"] == "Paris"
    assert first["attributes"] == {"gen_ai.request.temperature": 0.2}
    assert first["finish_reasons"] == ["stop"]

    # Attempt rewards include those on the attempt's calls; oldest first, ties in insert order.
    assert [(w["span_id"], w["value"]) for w in a1["rewards"]] == [
        ("s-r1-1", 0.1),
        ("s-r1-1", 0.42),
        (None, 0.5),
        ("s-r1-1", 0.9),
        (None, 0.3),
    ]
    assert [w["value"] for w in a2["rewards"]] == [0.6, 0.7]
    (rollout_reward,) = r1["rewards"]
    assert rollout_reward["value"] == 1.0
    assert rollout_reward["final"] == 1
    assert rollout_reward["dimensions"] == {"accuracy": 0.9, "style": 0.5}
    assert rollout_reward["attempt_id"] is None

    r3 = rollouts[2]
    assert r3["attempts"][0]["rewards"] == []
    assert [w["value"] for w in r3["rewards"]] == [0.2]
    assert r3["attempts"][0]["calls"][1]["request_body"] is None
    # The whole export is plain JSON.
    assert orjson.loads(orjson.dumps(rollouts)) == rollouts


def test_filters_select_rollouts(db: Database) -> None:
    def ids(**filters: Any) -> list[str]:
        return [r["id"] for r in iter_rollouts(db, **filters)]

    assert ids(rollout_ids=["r3", "r1"]) == ["r1", "r3"]
    assert ids(rollout_ids=[]) == []
    assert ids(rollout_ids=["nope"]) == []
    assert ids(since_ns=T0 + HOUR) == ["r3"]
    assert ids(until_ns=T0 + 10 * SECOND) == ["r1"]
    assert ids(since_ns=T0 + 10 * SECOND, until_ns=T0 + HOUR) == ["r2"]
    assert ids(status="failed") == ["r3"]
    assert ids(agent="coder") == ["r2"]
    assert ids(agent="planner", status="succeeded") == ["r1"]
    assert ids(agent="coder", status="failed") == []


def test_a_bare_string_of_ids_is_refused(db: Database) -> None:
    with pytest.raises(TypeError, match="list of ids"):
        list(iter_rollouts(db, rollout_ids="r1"))


def test_export_rollout_and_missing_rollouts(db: Database) -> None:
    r2 = export_rollout(db, "r2")
    assert [c["operation"] for c in r2["attempts"][0]["calls"]] == ["responses", "text_completion"]
    with pytest.raises(NotFound):
        export_rollout(db, "nope")
    assert missing_rollouts(db, ["r1", "x", "r2", "y", "x"]) == ["x", "y"]


def test_paging_visits_every_rollout_once_even_with_equal_creation_times(tmp_path: Path) -> None:
    path = tmp_path / "same-time.db"
    writer = connect(path)
    try:
        # All 23 rollouts share one created_ns: only the rowid tie-break keeps pages apart.
        records = [
            _span(f"s-{i}-{k}", rollout=f"r{i:02}", attempt=f"r{i:02}-a", seq=k, at=T0)
            for i in range(23)
            for k in (2, 1)
        ]
        insert_spans(writer.conn, records)
    finally:
        writer.close()
    db = connect(path, read_only=True)
    try:
        paged = list(iter_rollouts(db, batch_size=5))
        whole = list(iter_rollouts(db))
        assert paged == whole
        assert [r["id"] for r in paged] == [f"r{i:02}" for i in range(23)]
        for rollout in paged:
            calls = rollout["attempts"][0]["calls"]
            assert [c["seq"] for c in calls] == [1, 2]
            assert {c["rollout_id"] for c in calls} == {rollout["id"]}
        triplets = list(iter_triplets(db, batch_size=4))
        assert len(triplets) == 46
    finally:
        db.close()


# -- iter_triplets -----------------------------------------------------------------------


def test_triplets_apply_the_reward_rule_branch_by_branch(db: Database) -> None:
    triplets = list(iter_triplets(db))

    assert [t["span_id"] for t in triplets] == [
        "s-r1-1",
        "s-r1-2",
        "s-r1-3",  # s-r1-4 is an embeddings call: skipped
        "s-r1-5",
        "s-r2-1",
        "s-r2-2",
        "s-r3-1",
        "s-r3-2",
    ]
    got = {t["span_id"]: (t["reward"], t["reward_source"]) for t in triplets}
    assert got == {
        "s-r1-1": (0.9, "span"),  # its own latest reward beats the attempt's final one
        "s-r1-2": (0.5, "attempt_final"),  # final beats a later non-final attempt reward
        "s-r1-3": (0.7, "attempt"),  # no final: the attempt's latest
        "s-r1-5": (1.0, "rollout_final"),  # no attempt: the rollout's final reward
        "s-r2-1": (None, None),  # nothing recorded
        "s-r2-2": (None, None),
        "s-r3-1": (None, None),  # a non-final rollout reward does not count
        "s-r3-2": (None, None),
    }
    own = _by_id(triplets)["s-r1-1"]
    assert own["reward_name"] == "reward"
    assert own["reward_id"].startswith("rw-")
    assert _by_id(triplets)["s-r2-1"]["reward_name"] is None
    assert "attempt_final" in TRIPLET_REWARD_RULE
    assert "rollout_final" in TRIPLET_REWARD_RULE


def test_triplet_chat_prompt_and_completion(db: Database) -> None:
    t = _by_id(iter_triplets(db, rollout_ids=["r1"]))["s-r1-1"]
    assert t["rollout_id"] == "r1"
    assert t["attempt_id"] == "a1"
    assert t["seq"] == 1
    assert t["model"] == "gpt-4o-mini-2024-07-18"
    assert t["prompt"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert t["tools"] is None
    assert t["completion"] == {"role": "assistant", "content": "Paris"}
    assert t["finish_reason"] == "stop"
    assert t["usage"] == {"input_tokens": 12, "output_tokens": 8}
    assert t["status"] == "ok"


def test_an_agents_own_chat_span_is_no_triplet(tmp_path: Path) -> None:
    # An OTLP-ingested span may name a chat operation, but the gateway's call holds the turn.
    agent_span = _span("s-agent", rollout="ra", attempt="a1", seq=2, at=T0 + 2 * SECOND)
    agent_span.update(
        {"http_status": None, "attributes": {"spangate.source": "otlp"}, "request_body": None}
    )
    call = _span("s-call", rollout="ra", attempt="a1", seq=1, at=T0 + SECOND)
    db = connect(tmp_path / "agent.db")
    try:
        insert_spans(db, [call, agent_span])
        assert [t["span_id"] for t in iter_triplets(db, rollout_ids=["ra"])] == ["s-call"]
    finally:
        db.close()


def test_triplet_of_a_tool_call(db: Database) -> None:
    t = _by_id(iter_triplets(db, rollout_ids=["r1"]))["s-r1-3"]
    assert t["tools"] == [WEATHER_TOOL]
    assert t["completion"] == {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]}
    assert t["finish_reason"] == "tool_calls"


def test_triplets_of_responses_and_completions_calls(db: Database) -> None:
    got = _by_id(iter_triplets(db, agent="coder"))
    responses, completion = got["s-r2-1"], got["s-r2-2"]
    assert responses["operation"] == "responses"
    assert responses["instructions"] == "Be brief."
    assert responses["prompt"] == [{"role": "user", "content": "Capital of Italy?"}]
    assert responses["completion"] == [
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Rome"}],
        }
    ]
    assert responses["finish_reason"] == "completed"
    assert completion["prompt"] == "Once upon"
    assert completion["completion"] == " a time"
    assert completion["finish_reason"] == "length"


def test_triplets_of_failed_calls_and_calls_without_bodies(db: Database) -> None:
    got = _by_id(iter_triplets(db, status="failed"))
    failed, bodiless = got["s-r3-1"], got["s-r3-2"]
    assert failed["status"] == "error"
    assert failed["completion"] is None
    assert failed["model"] == "gpt-4o-mini"  # no response model: the requested one
    assert failed["usage"] == {"input_tokens": None, "output_tokens": None}
    assert bodiless["prompt"] is None
    assert bodiless["completion"] is None


def test_reward_name_chooses_which_rewards_count(db: Database) -> None:
    got = _by_id(iter_triplets(db, rollout_ids=["r1"], reward_name="accuracy"))
    assert (got["s-r1-1"]["reward"], got["s-r1-1"]["reward_source"]) == (0.42, "span")
    assert got["s-r1-1"]["reward_name"] == "accuracy"
    # No other reward is named accuracy, so nothing else gets one.
    assert {got[s]["reward"] for s in ("s-r1-2", "s-r1-3", "s-r1-5")} == {None}


def test_write_jsonl_writes_one_line_per_item() -> None:
    out = io.BytesIO()
    assert write_jsonl(iter([{"a": 1}, {"b": [1, 2]}]), out) == 2
    assert out.getvalue() == b'{"a":1}\n{"b":[1,2]}\n'


# -- parse_since -------------------------------------------------------------------------


def test_parse_since_reads_iso_8601_and_durations() -> None:
    assert parse_since("2026-11-22T08:00:00Z") == T0
    assert parse_since("2026-11-22T10:00:00+02:00") == T0
    assert parse_since("2026-11-22T08:00:00.000001Z") == T0 + 1000
    # Without an offset it is local time, as the CLI prints times.
    local = datetime(2026, 11, 22, 8, 0, 0).astimezone()
    assert parse_since("2026-11-22T08:00:00") == int(local.timestamp()) * SECOND
    assert parse_since("2026-11-22") == int(datetime(2026, 11, 22).timestamp()) * SECOND
    assert parse_since("1h", now_ns=T0) == T0 - HOUR
    assert parse_since("30m", now_ns=T0) == T0 - 1800 * SECOND
    assert parse_since("7d", now_ns=T0) == T0 - 7 * 24 * HOUR
    assert parse_since(" 90s ", now_ns=T0) == T0 - 90 * SECOND
    now = int(datetime.now(UTC).timestamp()) * SECOND
    assert abs(parse_since("1h") - (now - HOUR)) < 5 * SECOND


@pytest.mark.parametrize("text", ["yesterday", "1y", "", "-1h", "2026-13-01"])
def test_parse_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="not a time"):
        parse_since(text)


# -- the CLI -----------------------------------------------------------------------------


def _lines(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines()]


def test_cli_exports_jsonl_to_stdout(db_file: Path) -> None:
    result = CliRunner().invoke(cli, ["export", "--db", str(db_file)])
    assert result.exit_code == 0, result.output
    rollouts = _lines(result.stdout_bytes)
    assert [r["id"] for r in rollouts] == ["r1", "r2", "r3"]
    assert rollouts[0]["attempts"][0]["calls"][0]["response_body"]["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Paris",
    }


def test_cli_exports_triplets_with_filters(db_file: Path) -> None:
    args = ["--format", "triplets", "--rollout", "r1", "--rollout", "r2"]
    args += ["--until", "2026-11-22T08:00:10Z"]
    result = CliRunner().invoke(cli, ["export", "--db", str(db_file), *args])
    assert result.exit_code == 0, result.output
    triplets = _lines(result.stdout_bytes)
    assert [t["span_id"] for t in triplets] == ["s-r1-1", "s-r1-2", "s-r1-3", "s-r1-5"]
    assert triplets[0]["reward"] == 0.9


def test_cli_reward_name_and_status(db_file: Path) -> None:
    args = ["--format", "triplets", "--status", "succeeded", "--reward-name", "accuracy"]
    result = CliRunner().invoke(cli, ["export", "--db", str(db_file), *args])
    assert result.exit_code == 0, result.output
    assert [t["reward"] for t in _lines(result.stdout_bytes)] == [0.42, None, None, None]


def test_cli_writes_to_a_file(db_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    result = CliRunner().invoke(
        cli, ["export", "--db", str(db_file), "--since", "2026-11-22T09:00:00Z", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "exported 1 rollouts" in result.stderr
    assert [r["id"] for r in _lines(out.read_bytes())] == ["r3"]


def test_cli_says_when_nothing_matches(db_file: Path) -> None:
    result = CliRunner().invoke(cli, ["export", "--db", str(db_file), "--agent", "nobody"])
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "nothing exported" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "last tuesday"], "not a time"),
        (["--until", "5x"], "not a time"),
        (["--since", "1h", "--until", "2h"], "later than --since"),
        (["--status", "done"], "is not one of"),
        (["--reward-name", "accuracy"], "only to --format triplets"),
        (["--format", "csv"], "csv"),
    ],
)
def test_cli_refuses_bad_arguments(db_file: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["export", "--db", str(db_file), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_unknown_rollout_and_missing_database(db_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "never.jsonl"
    result = CliRunner().invoke(
        cli, ["export", "--db", str(db_file), "--rollout", "r1", "--rollout", "zz", "-o", str(out)]
    )
    assert result.exit_code == 1
    assert "rollout not found: zz" in result.output
    assert not out.exists()

    result = CliRunner().invoke(cli, ["export", "--db", str(tmp_path / "missing.db")])
    assert result.exit_code == 1
    assert "no database at" in result.output
    assert not (tmp_path / "missing.db").exists()


# -- size --------------------------------------------------------------------------------


def test_a_large_database_exports_page_by_page(tmp_path: Path) -> None:
    path = tmp_path / "large.db"
    writer = connect(path)
    try:
        for chunk in range(0, 2000, 250):
            records = [
                _span(
                    f"s{i:04}-{k}",
                    rollout=f"r{i:04}",
                    attempt=f"r{i:04}-a1",
                    seq=k,
                    at=T0 + i * SECOND + k,
                )
                for i in range(chunk, chunk + 250)
                for k in range(1, 6)
            ]
            insert_spans(writer.conn, records)
        _reward(writer, rollout="r1999", attempt="r1999-a1", value=1.0, final=True)
    finally:
        writer.close()

    out = tmp_path / "large.jsonl"
    result = CliRunner().invoke(cli, ["export", "--db", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    with out.open("rb") as fp:
        lines = fp.readlines()
    assert len(lines) == 2000
    last = orjson.loads(lines[-1])
    assert last["id"] == "r1999"
    assert [c["seq"] for c in last["attempts"][0]["calls"]] == [1, 2, 3, 4, 5]
    assert last["attempts"][0]["rewards"][0]["value"] == 1.0

    db = connect(path, read_only=True)
    try:
        triplets = iter_triplets(db)
        assert sum(1 for _ in triplets) == 10_000
    finally:
        db.close()
