"""A rollout as a judge reads it: attempts, each a list of steps with messages, tool use and errors.

Built from the store's export of the rollout, with tool results joined to the calls
that asked for them (a later request of the same attempt carries `role: tool`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlite_utils import Database

from store.export import export_rollout


def text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                parts.append(str(part.get("text") or part.get("content") or ""))
            else:
                parts.append(str(part))
        return " ".join(p for p in parts if p)
    return orjson.dumps(content).decode()


@dataclass
class ToolUse:
    """One tool call the model made, and what came back if the agent sent a result."""

    call_id: str | None
    name: str
    arguments: str
    arguments_valid: bool
    offered: bool
    result: str | None = None
    result_span_id: str | None = None


@dataclass
class Step:
    """One recorded model call."""

    span_id: str
    seq: int | None
    model: str | None
    status: str
    error: str | None
    finish_reason: str | None
    duration_ms: float
    input_tokens: int
    output_tokens: int
    cost_usd: float
    retries: int
    messages: list[dict[str, Any]]
    reply: str
    tool_uses: list[ToolUse]
    offered_tools: list[str]


@dataclass
class AttemptTrace:
    id: str
    number: int
    status: str
    steps: list[Step] = field(default_factory=list)


@dataclass
class Trajectory:
    rollout_id: str
    agent: str | None
    status: str
    input: Any
    attempts: list[AttemptTrace]
    rewards: list[dict[str, Any]]

    @property
    def steps(self) -> list[Step]:
        return [step for attempt in self.attempts for step in attempt.steps]

    @property
    def task(self) -> str:
        """What the agent was asked: the rollout input, else the first user message."""
        if self.input not in (None, "", {}):
            return text_of(self.input)
        for step in self.steps:
            for message in step.messages:
                if message.get("role") == "user":
                    return text_of(message.get("content"))
        return ""

    @property
    def final_answer(self) -> str:
        for step in reversed(self.steps):
            if step.status == "ok" and step.reply:
                return step.reply
        return ""

    @property
    def total_tokens(self) -> int:
        return sum(s.input_tokens + s.output_tokens for s in self.steps)

    @property
    def duration_ms(self) -> float:
        return sum(s.duration_ms for s in self.steps)

    @property
    def cost_usd(self) -> float:
        return sum(s.cost_usd for s in self.steps)


def _valid_json(arguments: str) -> bool:
    try:
        return isinstance(orjson.loads(arguments or "{}"), dict)
    except orjson.JSONDecodeError:
        return False


def _offered(request: dict[str, Any]) -> list[str]:
    names = []
    for tool in request.get("tools") or []:
        if isinstance(tool, dict):
            function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
            if function.get("name"):
                names.append(str(function["name"]))
    return names


def _reply(response: Any) -> tuple[str, list[dict[str, Any]], str | None]:
    """(text, raw tool calls, finish reason) of a chat, responses or completion answer."""
    if not isinstance(response, dict):
        return "", [], None
    choices = response.get("choices")
    if isinstance(choices, list) and choices:
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        text = text_of(message.get("content")) if message else str(choice.get("text") or "")
        calls = [
            {
                "id": c.get("id"),
                "name": (c.get("function") or {}).get("name", ""),
                "arguments": (c.get("function") or {}).get("arguments", ""),
            }
            for c in message.get("tool_calls") or []
            if isinstance(c, dict)
        ]
        return text, calls, choice.get("finish_reason")
    output = response.get("output")
    if isinstance(output, list):
        texts, calls = [], []
        for item in output:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                texts.append(text_of(item.get("content")))
            elif item.get("type") == "function_call":
                calls.append(
                    {
                        "id": item.get("call_id"),
                        "name": item.get("name", ""),
                        "arguments": item.get("arguments", ""),
                    }
                )
        return " ".join(texts), calls, response.get("status")
    return "", [], None


def _messages(request: Any) -> list[dict[str, Any]]:
    if not isinstance(request, dict):
        return []
    if isinstance(request.get("messages"), list):
        return [m for m in request["messages"] if isinstance(m, dict)]
    given = request.get("input")
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if isinstance(given, list):
        return [m for m in given if isinstance(m, dict)]
    if request.get("prompt") is not None:
        return [{"role": "user", "content": text_of(request["prompt"])}]
    return []


def _step(call: dict[str, Any]) -> Step:
    request = call.get("request_body") if isinstance(call.get("request_body"), dict) else {}
    text, raw_calls, finish = _reply(call.get("response_body"))
    offered = _offered(request)
    return Step(
        span_id=call["span_id"],
        seq=call.get("seq"),
        model=call.get("response_model") or call.get("request_model"),
        status=call.get("status") or "ok",
        error=call.get("error_message") or call.get("error_type"),
        finish_reason=finish or ((call.get("finish_reasons") or [None])[0]),
        duration_ms=float(call.get("duration_ms") or 0.0),
        input_tokens=int(call.get("input_tokens") or 0),
        output_tokens=int(call.get("output_tokens") or 0),
        cost_usd=float(call.get("cost_usd") or 0.0),
        retries=int(call.get("retries") or 0),
        messages=_messages(request),
        reply=text,
        tool_uses=[
            ToolUse(
                call_id=c["id"],
                name=str(c["name"]),
                arguments=str(c["arguments"] or ""),
                arguments_valid=_valid_json(str(c["arguments"] or "")),
                offered=not offered or c["name"] in offered,
            )
            for c in raw_calls
        ],
        offered_tools=offered,
    )


def _join_tool_results(steps: list[Step]) -> None:
    """A later request that carries `role: tool` with a call's id holds that call's result."""
    pending: dict[str, ToolUse] = {}
    for step in steps:
        for message in step.messages:
            if message.get("role") == "tool" and message.get("tool_call_id") in pending:
                use = pending.pop(message["tool_call_id"])
                use.result = text_of(message.get("content"))
                use.result_span_id = step.span_id
            elif (
                message.get("type") == "function_call_output" and message.get("call_id") in pending
            ):
                use = pending.pop(message["call_id"])
                use.result = text_of(message.get("output"))
                use.result_span_id = step.span_id
        for use in step.tool_uses:
            if use.call_id:
                pending[use.call_id] = use


def from_export(exported: dict[str, Any]) -> Trajectory:
    attempts = []
    for attempt in exported.get("attempts") or []:
        steps = [_step(call) for call in attempt.get("calls") or []]
        _join_tool_results(steps)
        attempts.append(
            AttemptTrace(
                attempt["id"], attempt.get("number") or 0, attempt.get("status") or "", steps
            )
        )
    loose = [_step(call) for call in exported.get("unattributed_calls") or []]
    if loose:
        _join_tool_results(loose)
        attempts.append(AttemptTrace("-", 0, exported.get("status") or "", loose))
    rewards = list(exported.get("rewards") or [])
    for attempt in exported.get("attempts") or []:
        rewards.extend(attempt.get("rewards") or [])
    return Trajectory(
        rollout_id=exported["id"],
        agent=exported.get("agent"),
        status=exported.get("status") or "running",
        input=exported.get("input"),
        attempts=attempts,
        # A judge weighs what users and agents said, not what other judges said.
        rewards=[r for r in rewards if not str(r.get("source", "")).startswith("judge:")],
    )


def load_trajectory(db: Database, rollout_id: str) -> Trajectory:
    """Raises store.errors.NotFound for an unknown rollout."""
    return from_export(export_rollout(db, rollout_id))
