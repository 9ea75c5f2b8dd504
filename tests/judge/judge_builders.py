"""Hand-built rollouts for judge tests: span records shaped like `Call.publish` makes them
(gateway/web/routes_openai.py), inserted with the store's own `insert_spans`.

An `AgentRun` plays an agent: each call's request repeats the conversation so far (task,
earlier replies, tool results), exactly as an OpenAI client does, so the judge's joining of
tool results and its "new messages" rendering see realistic requests.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from shapes import span_record as span_record_of

from judge.trajectory import Trajectory, load_trajectory
from store.schema import connect
from store.span_inserts import insert_spans

T0 = 1_795_334_400_000_000_000  # 2026-11-22T08:00:00Z, in ns
MS = 1_000_000
_span_numbers = itertools.count(1)


DEFAULT_CRITERIA = ("task_completion", "tool_efficiency", "decision_quality", "error_handling")


def verdict_json(
    scores: dict[str, float], *, evidence: list[str] | None = None, summary: str = "ok"
) -> str:
    """What a judge model answers: a score, explanation and evidence per criterion."""
    return json.dumps(
        {
            "criteria": {
                name: {
                    "score": score,
                    "explanation": f"{name} explained",
                    "evidence": evidence or [],
                }
                for name, score in scores.items()
            },
            "evidence": evidence or [],
            "summary": summary,
        }
    )


def completion_body(content: str, model: str = "judge-model") -> dict[str, Any]:
    """An OpenAI chat completion carrying `content`, as the gateway relays it."""
    return {
        "id": "chatcmpl-judge",
        "object": "chat.completion",
        "created": 1_795_334_400,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
    }


def new_span_id() -> str:
    """16 hex digits, as the gateway assigns them."""
    return f"{next(_span_numbers):016x}"


def tool_def(name: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_answer(
    content: str | None,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": f"chatcmpl-{new_span_id()}",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop"),
            }
        ],
    }


def span_record(
    *,
    rollout: str,
    attempt: str | None,
    seq: int,
    request: dict[str, Any],
    response: dict[str, Any] | None,
    agent: str | None,
    status: str = "ok",
    error_type: str | None = None,
    error_message: str | None = None,
    retries: int = 0,
    duration_ms: float = 100.0,
    input_tokens: int | None = 10,
    output_tokens: int | None = 5,
    span_id: str | None = None,
) -> dict[str, Any]:
    """A record with every key `Call.publish` gives the writer."""
    start = T0 + seq * 1000 * MS
    finish = None
    if response is not None:
        finish = [response["choices"][0]["finish_reason"]]
    return span_record_of(
        rollout,
        seq,
        span_id=span_id or new_span_id(),
        trace_id="ab" * 16,
        attempt_id=attempt,
        name="chat gpt-4o-mini",
        deployment="openai/gpt-4o-mini",
        model_group="gpt-4o-mini",
        request_model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18" if status == "ok" else None,
        response_id=None,
        status=status,
        http_status=200 if status == "ok" else 502,
        error_type=error_type,
        error_message=error_message,
        start_ns=start,
        end_ns=start + int(duration_ms * MS),
        duration_ms=duration_ms,
        overhead_ms=None,
        retries=retries,
        input_tokens=input_tokens if status == "ok" else None,
        output_tokens=output_tokens if status == "ok" else None,
        cost_usd=0.0001 if status == "ok" else None,
        finish_reasons=finish,
        # The gateway records the raw request bytes and the parsed answer.
        request_body=orjson.dumps(request),
        response_body=response,
        attributes={},
        tags=[],
        agent=agent,
    )


class AgentRun:
    """One rollout, built call by call; `records` is what the gateway would have published."""

    def __init__(
        self,
        rollout_id: str,
        *,
        task: str = "What is the weather in Paris?",
        agent: str | None = "agent-a",
        attempt: str = "a1",
        tools: Iterable[str] = (),
        first_seq: int = 1,
    ) -> None:
        self.rollout_id = rollout_id
        self.agent = agent
        self.attempt = attempt
        self.task = task
        self.tools = [tool_def(name) for name in tools]
        self.records: list[dict[str, Any]] = []
        self.conversation: list[dict[str, Any]] = [{"role": "user", "content": task}]
        self._seq = itertools.count(first_seq)

    def new_attempt(self, attempt: str) -> AgentRun:
        """Start over (a new attempt sees only the task again)."""
        self.attempt = attempt
        self.conversation = [{"role": "user", "content": self.task}]
        return self

    def _request(self) -> dict[str, Any]:
        request: dict[str, Any] = {"model": "gpt-4o-mini", "messages": list(self.conversation)}
        if self.tools:
            request["tools"] = self.tools
        return request

    def ok(
        self,
        reply: str | None = "Done.",
        *,
        tool_calls: list[dict[str, Any]] | None = None,
        finish_reason: str | None = None,
        retries: int = 0,
        duration_ms: float = 100.0,
        input_tokens: int = 10,
        output_tokens: int = 5,
    ) -> str:
        """A successful call; returns its span id."""
        answer = chat_answer(reply, tool_calls, finish_reason)
        record = span_record(
            rollout=self.rollout_id,
            attempt=self.attempt,
            seq=next(self._seq),
            request=self._request(),
            response=answer,
            agent=self.agent,
            retries=retries,
            duration_ms=duration_ms,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        self.records.append(record)
        self.conversation.append(answer["choices"][0]["message"])
        return str(record["span_id"])

    def call_tool(self, name: str, arguments: str = '{"q": "Paris"}', **kwargs: Any) -> str:
        """A call whose answer is one tool call; returns its span id."""
        call_id = f"call_{new_span_id()}"
        return self.ok(None, tool_calls=[tool_call(call_id, name, arguments)], **kwargs)

    def tool_result(self, content: str) -> None:
        """The agent runs the tool the last reply asked for and sends its result next time."""
        last = self.conversation[-1]
        for call in last.get("tool_calls") or []:
            self.conversation.append(
                {"role": "tool", "tool_call_id": call["id"], "content": content}
            )

    def user(self, content: str) -> None:
        self.conversation.append({"role": "user", "content": content})

    def error(
        self,
        message: str = "upstream answered 502: bad gateway",
        *,
        retries: int = 0,
        duration_ms: float = 100.0,
    ) -> str:
        """A call the upstream failed (after any retries); returns its span id."""
        record = span_record(
            rollout=self.rollout_id,
            attempt=self.attempt,
            seq=next(self._seq),
            request=self._request(),
            response=None,
            agent=self.agent,
            status="error",
            error_type="upstream_error",
            error_message=message,
            retries=retries,
            duration_ms=duration_ms,
        )
        self.records.append(record)
        return str(record["span_id"])


def seed(db_path: str | Path, *runs: AgentRun) -> None:
    """Write the runs' spans as the store writer does (rollouts and attempts made on sight)."""
    db = connect(db_path)
    try:
        insert_spans(db.conn, [record for run in runs for record in run.records])
    finally:
        db.close()


def set_status(db_path: str | Path, rollout_id: str, status: str) -> None:
    db = connect(db_path)
    try:
        db.execute("update rollouts set status = ? where id = ?", [status, rollout_id])
    finally:
        db.close()


def trajectory(db_path: str | Path, run: AgentRun) -> Trajectory:
    """Seed one run into the database and read it back the way judges do."""
    seed(db_path, run)
    return load(db_path, run.rollout_id)


def load(db_path: str | Path, rollout_id: str) -> Trajectory:
    db = connect(db_path)
    try:
        return load_trajectory(db, rollout_id)
    finally:
        db.close()
