"""One call's span while it is being built: timings, tries, fields, and the record itself.

`Call.publish()` turns everything known about the call into the span record (its shape is
`store.schema.SPAN_COLUMNS` plus `agent` and `metadata`) and hands it to the recorder once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from config.models import Deployment
from gateway.errors import scrub
from gateway.providers.base import JSONValue
from gateway.proxy.attribution import Attribution, new_span_id
from gateway.proxy.budgets import Reservation
from gateway.proxy.context import ProxyContext
from gateway.proxy.cost import cost_usd
from gateway.proxy.forward import Job, Outcome
from gateway.proxy.limits import stored_body
from gateway.proxy.record import SpanRecord
from gateway.proxy.redact import Redactor
from gateway.proxy.spans import request_attributes
from gateway.proxy.tool_items import ToolResult, executed_in
from gateway.proxy.tool_spans import pending_tool, tool_span

log = logging.getLogger("spangate.call")

# A span's status when the client got no answer: it went away (http_status 499) or the
# gateway shut down under it (http_status null).
CANCELLED = "cancelled"


@dataclass(slots=True)
class Call:
    """One call's span while it is being built; `publish()` hands it to the recorder once."""

    gw: ProxyContext
    operation: str
    attribution: Attribution
    raw_request: bytes
    payload: dict[str, JSONValue]
    group_name: str
    t0: int
    start_ns: int
    stream: bool = False
    span_id: str = field(default_factory=new_span_id)
    trace_id: str = ""
    seq: int | None = None
    attempt_id: str | None = None
    job: Job | None = None
    outcome: Outcome | None = None
    upstream_done_ns: int | None = None
    first_token_ns: int | None = None
    processing_ns: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    # Bytes relayed from an upstream stream: tells `publish` whether its assembled answer
    # can be over the stored-body limit without serialising it to find out.
    stream_bytes: int = 0
    published: bool = False
    # The gateway's secrets plus any key this client sent for the provider.
    redactor: Redactor | None = None
    # Span attributes set before forwarding (the experiment and variant the call ran under).
    extra_attributes: dict[str, Any] = field(default_factory=dict)
    # What the call reserved in its rollout's budget (or was refused).
    budget: Reservation | None = None
    # Stored instead of the raw request when that is not JSON (a multipart form's fields).
    request_record: Any = None
    # Tools the provider ran within this answer (web search, MCP, ...), with their results.
    executed: list[tuple[dict[str, Any], ToolResult]] = field(default_factory=list)
    record: SpanRecord | None = None

    @property
    def deployment(self) -> Deployment | None:
        if self.outcome is not None:
            return self.outcome.guard.deployment
        guard = self.job.guard if self.job else None
        return guard.deployment if guard else None

    def overhead_ms(self, now: int | None = None) -> float:
        """Time spent in the gateway itself: not upstream, not backoff, not rate-limit waits."""
        now = now or time.perf_counter_ns()
        job = self.job
        if job is None or job.sent_ns is None:
            return (now - self.t0) / 1e6
        # Before the last send: rate-limit waits, every backoff pause, and earlier tries.
        tries = job.tries
        waited_ms = (self.fields.get("held_ms") or 0.0) + job.limiter_wait * 1000
        if len(tries) == 1:
            waited_ms += tries[0].get("wait_ms", 0.0)  # nearly every call: one try, no pause
        else:
            waited_ms += sum(t.get("wait_ms", 0.0) for t in tries) + sum(
                t.get("duration_ms", 0.0) for t in tries[:-1]
            )
        before = (job.sent_ns - self.t0) / 1e6 - waited_ms
        after = (now - self.upstream_done_ns) / 1e6 if self.upstream_done_ns else 0.0
        return max(before, 0.0) + after + self.processing_ns / 1e6

    def headers(self) -> dict[str, str]:
        headers = {
            "X-Span-Id": self.span_id,
            "X-Trace-Id": self.trace_id,
            "X-Gateway-Overhead-Ms": f"{self.overhead_ms():.3f}",
            "X-Upstream-Retries": str(self.job.retries if self.job else 0),
        }
        if self.attribution.rollout_id:
            headers["X-Rollout-Id"] = self.attribution.rollout_id
        if self.attempt_id:
            headers["X-Attempt-Id"] = self.attempt_id
        if self.outcome is not None:
            # The upstream's own limits, when it sends them, are what the client should see.
            ours = self.outcome.guard.ratelimit_headers()
            if ours:
                sent = {name.lower() for name in self.outcome.response.headers}
                headers.update((k, v) for k, v in ours.items() if k not in sent)
        if self.budget is not None and self.budget.limited:
            headers.update(self.budget.headers())
        return headers

    def fail(self, http_status: int, error_type: str | None, message: str | None) -> None:
        self.fields.update(
            status="error",
            http_status=http_status,
            error_type=error_type,
            error_message=scrub(message) if message else message,
        )

    def fail_after_answer(
        self, error_type: str | None, message: str | None, upstream_status: int | None = None
    ) -> None:
        """The call failed after its status went out (mid-stream, or inside a 200 answer):
        `http_status` stays what the client got; `upstream_status` says whose failure it was."""
        self.fields.update(
            status="error",
            error_type=error_type,
            error_message=scrub(message) if message else message,
        )
        if upstream_status is not None:
            self.fields["upstream_status"] = upstream_status

    def redact(self, value: Any) -> Any:
        return self.redactor.value(value) if self.redactor is not None else value

    def cancel(self, *, client_gone: bool) -> None:
        """The call was cancelled: by the client leaving (499), or by shutdown (no answer)."""
        if client_gone:
            self.client_closed("the client went away before the answer was complete")
        else:
            self.fields.update(
                status=CANCELLED,
                http_status=None,
                error_type="gateway_shutdown",
                error_message="the gateway shut down before the answer was complete",
            )

    def client_closed(self, message: str) -> None:
        """The client went away (or stopped reading): what it got is no answer at all."""
        self.fields.update(
            status=CANCELLED, http_status=499, error_type="client_closed", error_message=message
        )

    def publish(self, response_body: Any = None, *, redacted: bool = False) -> None:
        """Build the call's span and hand it on; `redacted`: the body was redacted already
        (the answer the client got)."""
        if self.published:
            return
        self.published = True
        now = time.perf_counter_ns()
        fields = self.fields
        attribution = self.attribution
        deployment = self.deployment
        job = self.job
        attributes = request_attributes(self.payload) | self.extra_attributes
        if attribution.agent_id:
            attributes["gen_ai.agent.id"] = attribution.agent_id
        if attribution.metadata:
            attributes["metadata"] = attribution.metadata
        if job is not None and job.tries:
            attributes["spangate.tries"] = job.tries
            attributes["spangate.limiter_wait_ms"] = round(job.limiter_wait * 1000, 3)
            if job.fallback:
                attributes["spangate.fallback"] = job.fallback
        store_bodies = self.gw.settings.recorder.store_bodies
        request_body: Any = None
        if store_bodies:
            limit = self.gw.settings.limits.max_stored_body_bytes
            sent = self.raw_request if self.request_record is None else self.request_record
            request_body = self._stored("request_body", self.redact(sent), limit, attributes)
            response_body = self._stored(
                "response_body",
                response_body if redacted else self.redact(response_body),
                limit,
                attributes,
                self.stream_bytes or None,
            )
        duration_ns = now - self.t0
        sent_ns = job.sent_ns if job else None
        record: SpanRecord = {
            "span_id": self.span_id,
            "trace_id": self.trace_id,
            "parent_span_id": attribution.parent_span_id,
            "rollout_id": attribution.rollout_id,
            "attempt_id": self.attempt_id,
            "seq": self.seq,
            "name": f"{self.operation} {self.payload.get('model')}",
            "operation": self.operation,
            "provider": deployment.provider if deployment else None,
            "deployment": deployment.label if deployment else None,
            "model_group": self.outcome.group.name if self.outcome else self.group_name,
            "request_model": model if isinstance(model := self.payload.get("model"), str) else None,
            "status": fields.get("status", "ok"),
            "http_status": fields.get("http_status"),
            "error_type": fields.get("error_type"),
            "error_message": self.redact(fields.get("error_message")),
            "stream": int(self.stream),
            "start_ns": self.start_ns,
            "end_ns": self.start_ns + duration_ns,
            "duration_ms": duration_ns / 1e6,
            "ttft_ms": (self.first_token_ns - self.t0) / 1e6 if self.first_token_ns else None,
            "upstream_ms": ((self.upstream_done_ns or now) - sent_ns) / 1e6 if sent_ns else None,
            "overhead_ms": self.overhead_ms(now),
            "retries": job.retries if job else 0,
            "request_body": request_body,
            "response_body": response_body if store_bodies else None,
            "attributes": attributes,
            "tags": attribution.tags,
            "agent": attribution.agent_id,
            "metadata": attribution.metadata,
            "response_id": fields.get("response_id"),
            "response_model": fields.get("response_model"),
            "input_tokens": fields.get("input_tokens"),
            "output_tokens": fields.get("output_tokens"),
            "cached_tokens": fields.get("cached_tokens"),
            "reasoning_tokens": fields.get("reasoning_tokens"),
            "finish_reasons": fields.get("finish_reasons"),
            "tool_calls": fields.get("tool_calls"),
            "cost_usd": None,
            "model_version": deployment.version if deployment else None,
            "mode": fields.get("mode"),
            "held_ms": fields.get("held_ms"),
            "upstream_status": fields.get("upstream_status"),
            "prompt_token_ids": None,
            "completion_token_ids": None,
            "logprobs": None,
        }
        if self.outcome is not None and self.outcome.capture is not None:
            captured = self.outcome.capture.fields()
            record["prompt_token_ids"] = captured["prompt_token_ids"]
            record["completion_token_ids"] = captured["completion_token_ids"]
            record["logprobs"] = captured["logprobs"]
        if deployment is not None:
            record["cost_usd"] = cost_usd(
                self.gw.prices_for(deployment),
                record["input_tokens"],
                record["output_tokens"],
                record["cached_tokens"],
            )
            outcome = self.outcome
            # An error answer gave its estimate back when its try ended (forward.py).
            if (
                outcome is not None
                and outcome.guard.tpm is not None
                and outcome.response.ok
                and job is not None
            ):
                outcome.guard.correct_tokens(
                    job.estimated_tokens(),
                    (record["input_tokens"] or 0) + (record["output_tokens"] or 0),
                )
        if self.budget is not None and self.gw.budgets is not None:
            self.gw.budgets.settle(self.budget, record)
        self.gw.recorder.publish(record)
        self.record = record
        if record["tool_calls"]:
            try:
                self._note_tools(record, response_body)
            except Exception:
                # The call is recorded and its answer is the client's: tool bookkeeping
                # that trips on an odd answer costs only that bookkeeping.
                log.exception("tool calls of span %s not followed", record["span_id"])

    def _note_tools(self, record: SpanRecord, response_body: Any) -> None:
        answer = response_body if isinstance(response_body, dict) else None
        if answer is None and self.outcome is not None:
            answer = self.outcome.parsed
        if self.operation == "responses" and isinstance(answer, dict):
            self.executed = executed_in(answer.get("output"))
        self.gw.tools.note(record, frozenset(call["id"] for call, _ in self.executed))

    async def record_executed_tools(self) -> None:
        """`execute_tool` spans for the tools the provider ran within this answer, numbered
        right after it (only a rollout's calls are numbered, so only theirs get them)."""
        record, rollout_id = self.record, self.attribution.rollout_id
        if not self.executed or record is None or not rollout_id or not self.attempt_id:
            return
        first = await self.gw.sequencer.reserve(rollout_id, len(self.executed))
        rules = self.gw.settings.tools
        for offset, (call, result) in enumerate(self.executed):
            tool = pending_tool(call, record)
            # Run inside the call: the span ends with it, its length unknown.
            self.gw.recorder.publish(
                tool_span(
                    tool,
                    result,
                    rollout_id=rollout_id,
                    attempt_id=self.attempt_id,
                    seq=first + offset,
                    now_ns=tool.asked_end_ns,
                    rule=rules.rule_for(tool.name),
                )
            )

    @staticmethod
    def _stored(
        name: str, body: Any, limit: int, attributes: dict[str, Any], hint: int | None = None
    ) -> Any:
        """The body cut to `limit`, with its size and a flag in `attributes` if it was cut."""
        kept, size = stored_body(body, limit, size_hint=hint)
        if size is not None:
            attributes[f"spangate.{name}.size"] = size
            attributes[f"spangate.{name}.truncated"] = True
        return kept


async def number_call(
    gw: ProxyContext, call: Call, rollout_id: str, attempt_id: str | None
) -> None:
    """Give the call its seq, after the tool executions whose results it carries."""
    call.attempt_id = attempt = await gw.sequencer.attempt_of(rollout_id, attempt_id)
    executed = gw.tools.resolve(rollout_id, attempt, call.payload)
    first = await gw.sequencer.reserve(rollout_id, len(executed) + 1)
    rules = gw.settings.tools
    for offset, (tool, result) in enumerate(executed):
        gw.recorder.publish(
            tool_span(
                tool,
                result,
                rollout_id=rollout_id,
                attempt_id=attempt,
                seq=first + offset,
                now_ns=call.start_ns,
                rule=rules.rule_for(tool.name),
            )
        )
    call.seq = first + len(executed)
