"""A journal line stores the same row as the record it was written from, odd values included."""

from __future__ import annotations

import datetime
from typing import Any

import orjson
import pytest
from shapes import span_record

from store.records import clean_span, journal_line, span_row


def _row_after_replay(line: bytes) -> list[Any]:
    return span_row(orjson.loads(line))


def _plain() -> dict[str, Any]:
    return span_record("r1", 1, attributes={"gen_ai.request.temperature": 0.5, "n": [1, 2]})


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"response_body": "réponse".encode()},  # bodies are bytes until stored
        {"response_body": b"\xff\xfe not utf-8"},
        {"error_message": "lone \udc80 surrogate"},
        {"input_tokens": 2**70},  # past 64 bits
        {"output_tokens": -3},
        {"duration_ms": float("nan")},
        {"attributes": {1: "a key that is not a string"}},
        {"attributes": {"when": datetime.datetime(2026, 12, 1, 11, 0)}},
        {"metadata": {"nested": {"deep": [1.5, None, True]}}},
    ],
    ids=lambda change: ",".join(change) or "plain",
)
def test_a_journal_line_replays_to_the_row_the_record_would_have_stored(
    change: dict[str, Any],
) -> None:
    record = {**_plain(), **change}
    line = journal_line(record)
    assert b"\n" not in line
    assert _row_after_replay(line) == span_row(record)
    assert _row_after_replay(line) == _row_after_replay(orjson.dumps(clean_span(record)))
