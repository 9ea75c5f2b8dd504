"""What tests build and check: span records shaped as `Call.publish` makes them, OpenAI's
error shape, and how to run the `spangate` command in a subprocess."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import httpx

from store.schema import SPAN_COLUMNS

CLI_ARGV = [sys.executable, "-c", "from gateway.cli import cli; cli()"]


def span_record(rollout: str | None, seq: int | None, **extra: Any) -> dict[str, Any]:
    """A finished span with every column, shaped like the one `Call.publish` builds."""
    start = time.time_ns() - 10_000_000_000 + (seq or 0) * 1_000_000
    record: dict[str, Any] = dict.fromkeys(SPAN_COLUMNS)
    record.update(
        span_id=os.urandom(8).hex(),
        trace_id=os.urandom(16).hex(),
        rollout_id=rollout,
        attempt_id="1" if rollout else None,
        seq=seq,
        name="chat gpt-test",
        operation="chat",
        provider="openai",
        deployment="openai/upstream-model",
        model_group="gpt-test",
        request_model="gpt-test",
        response_model="upstream-model",
        response_id=f"chatcmpl-planted-{seq}",
        status="ok",
        http_status=200,
        stream=0,
        start_ns=start,
        end_ns=start + 5_000_000,
        duration_ms=5.0,
        overhead_ms=0.4,
        retries=0,
        input_tokens=3,
        output_tokens=4,
        finish_reasons=["stop"],
        request_body=b'{"model":"gpt-test","messages":[]}',
        response_body={"id": f"chatcmpl-planted-{seq}", "choices": []},
        attributes={"gen_ai.operation.name": "chat"},
        tags=["planted"],
        agent=None,
        metadata={},
    )
    record.update(extra)
    return record


def assert_openai_error(
    response: httpx.Response,
    status: int | None = None,
    *,
    code: str | None = None,
    type_: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """The response is `{"error": {message, type, param, code}}` JSON with `status` (any 4xx
    when none is given) and a message that says something; returns the inner error."""
    if status is None:
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    else:
        assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and len(error["message"]) >= 10, error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    if type_ is not None:
        assert error["type"] == type_, error
    if param is not None:
        assert error["param"] == param, error
    return error
