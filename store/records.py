"""The store's boundary for span records: every value made storable (clamped, nulled, valid
UTF-8) before it reaches SQLite or the journal, so one absurd number never costs a record."""

from __future__ import annotations

import json
import math
import operator
import re
from typing import Any

import orjson

from store.schema import SPAN_COLUMNS

INT64_MAX = 2**63 - 1
# An upstream's answer id longer than this is not kept as `response_id`: PostgreSQL cannot
# index a text past ~2.7 kB, and no provider's id comes near (OpenAI's are ~40 characters).
MAX_RESPONSE_ID = 512

JSON_SPAN_COLUMNS = frozenset(
    {"finish_reasons", "tool_calls", "request_body", "response_body", "attributes", "tags"}
)
# Counts and times: an integer in [0, 2**63 - 1] or nothing.
INT_SPAN_COLUMNS = frozenset(
    {
        "seq",
        "http_status",
        "upstream_status",
        "start_ns",
        "end_ns",
        "retries",
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "reasoning_tokens",
    }
)
# Durations and money: a finite number >= 0 or nothing.
FLOAT_SPAN_COLUMNS = frozenset(
    {"duration_ms", "ttft_ms", "upstream_ms", "overhead_ms", "cost_usd", "held_ms"}
)
# Packed arrays (base64 text): kept only when they are ASCII base64, else nothing.
PACKED_SPAN_COLUMNS = frozenset({"prompt_token_ids", "completion_token_ids", "logprobs"})
# Columns the schema declares NOT NULL get a neutral value rather than nothing.
NOT_NULL_NUMBERS = frozenset({"start_ns", "end_ns", "retries", "stream", "duration_ms"})
NOT_NULL_TEXT = {
    "trace_id": "0" * 32,
    "name": "unknown",
    "operation": "unknown",
    "status": "error",
    "attributes": "{}",
    "tags": "[]",
}


def clean_int(value: Any) -> int | None:
    """An integer the store can hold, or None (negative, too big, not a number)."""
    if value.__class__ is int:
        return value if 0 <= value <= INT64_MAX else None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and 0 <= value <= INT64_MAX:
        return int(value)
    return None


def clean_float(value: Any) -> float | None:
    """A finite, non-negative float, or None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) and number >= 0 else None
    return None


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def clean_packed(value: Any) -> str | None:
    """A packed array's base64 text, or None for anything else."""
    if isinstance(value, str) and _BASE64.fullmatch(value):
        return value
    return None


def valid_utf8(text: str) -> str:
    """The text with lone surrogates replaced: neither SQLite nor orjson takes them."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _sanitize_json(value: Any) -> Any:
    """A JSON-able copy with oversized integers turned into strings and non-finite floats
    into None; only used when orjson refused the value as it was."""
    if isinstance(value, dict):
        return {valid_utf8(str(k)): _sanitize_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitize_json(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value <= 2**64 - 1 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return valid_utf8(value)
    return valid_utf8(str(value))


def json_text(value: Any) -> str | None:
    """A JSON column's text: bytes decoded, objects encoded, never an exception."""
    if value is None:
        return None
    kind = value.__class__
    if kind is str:
        return valid_utf8(value)
    if kind is bytes:
        return value.decode("utf-8", errors="replace")
    if isinstance(value, bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        # Integers past 64 bits, lone surrogates, odd types: kept, in a storable form.
        return json.dumps(_sanitize_json(value), ensure_ascii=False, default=str)


def _clean_text(value: Any) -> str | None:
    if value is None:
        return None
    if value.__class__ is str:
        return valid_utf8(value)
    return valid_utf8(str(value))


def _span_id(value: Any) -> str:
    if isinstance(value, str) and value:
        return valid_utf8(value)
    raise ValueError(f"span_id must be a non-empty string, not {value!r:.40}")


def _or(clean: Any, default: Any) -> Any:
    def cleaned(value: Any) -> Any:
        out = clean(value)
        return default if out is None else out

    return cleaned


def _cleaner(column: str) -> Any:
    if column == "span_id":
        return _span_id
    if column in NOT_NULL_TEXT:
        plain = json_text if column in JSON_SPAN_COLUMNS else _clean_text
        return _or(plain, NOT_NULL_TEXT[column])
    if column in JSON_SPAN_COLUMNS:
        return json_text
    if column == "duration_ms":
        return _or(clean_float, 0.0)
    if column in NOT_NULL_NUMBERS and column != "stream":
        return _or(clean_int, 0)
    if column in INT_SPAN_COLUMNS:
        return clean_int
    if column in FLOAT_SPAN_COLUMNS:
        return clean_float
    if column == "stream":
        return lambda v: 1 if v else 0
    if column in PACKED_SPAN_COLUMNS:
        return clean_packed
    return _clean_text


_CLEANERS = tuple((column, _cleaner(column)) for column in SPAN_COLUMNS)
_ALL_COLUMNS = operator.itemgetter(*SPAN_COLUMNS)
_INF = math.inf


def _positions(kind: frozenset[str]) -> tuple[int, ...]:
    return tuple(i for i, column in enumerate(SPAN_COLUMNS) if column in kind)


_INT_AT = _positions(INT_SPAN_COLUMNS)
_FLOAT_AT = _positions(FLOAT_SPAN_COLUMNS)
_JSON_AT = _positions(JSON_SPAN_COLUMNS)
_TEXT_AT = tuple(
    i
    for i, column in enumerate(SPAN_COLUMNS)
    if column not in INT_SPAN_COLUMNS | FLOAT_SPAN_COLUMNS | JSON_SPAN_COLUMNS
    and column not in ("span_id", "stream")
)


def span_row(record: dict[str, Any]) -> list[Any]:
    """The record as a row in `SPAN_COLUMNS` order, every value storable.

    The writer's hot loop: each value is checked in line against the plain case (an ASCII
    string, an int in range, a finite float); only the rest goes through its cleaner.
    """
    try:
        # A whole record (what the gateway publishes) is read in C.
        row = list(_ALL_COLUMNS(record))
    except KeyError:
        get = record.get
        row = [get(column) for column in SPAN_COLUMNS]
    for i in _INT_AT:
        v = row[i]
        if v is not None and not (v.__class__ is int and 0 <= v <= INT64_MAX):
            row[i] = _CLEANERS[i][1](v)
    for i in _FLOAT_AT:
        v = row[i]
        if v is not None and not (v.__class__ is float and 0.0 <= v < _INF):
            row[i] = _CLEANERS[i][1](v)
    for i in _TEXT_AT:
        v = row[i]
        if v is not None and not (v.__class__ is str and v.isascii()):
            row[i] = _CLEANERS[i][1](v)
    for i in _JSON_AT:
        v = row[i]
        if v is not None:
            row[i] = json_text(v)
    row[0] = _span_id(row[0])
    row[_STREAM_AT] = 1 if row[_STREAM_AT] else 0
    if row[_RESPONSE_ID_AT] is not None and len(row[_RESPONSE_ID_AT]) > MAX_RESPONSE_ID:
        row[_RESPONSE_ID_AT] = None
    for i, default in _DEFAULTS:
        if row[i] is None:
            row[i] = default
    return row


_STREAM_AT = SPAN_COLUMNS.index("stream")
_RESPONSE_ID_AT = SPAN_COLUMNS.index("response_id")
_DEFAULTS = tuple(
    (SPAN_COLUMNS.index(column), default)
    for column, default in (
        *NOT_NULL_TEXT.items(),
        *((c, 0.0 if c == "duration_ms" else 0) for c in NOT_NULL_NUMBERS if c != "stream"),
    )
)


# Types orjson would write its own way go to `_bytes_text` instead, which refuses them, so a
# record holding one is journaled through `clean_span` like any other odd value.
_JOURNAL_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _bytes_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    raise TypeError(f"{type(value).__name__} is left to clean_span")


def journal_line(record: dict[str, Any]) -> bytes:
    """The record as one journal line (without its newline).

    A plain record (the gateway's) is written by orjson in one pass, bodies decoded as
    `json_text` decodes them: half the CPU of `clean_span` first. Whatever orjson refuses (a
    lone surrogate, an integer past 64 bits, a key that is not a string) or would write its
    own way goes through `clean_span`. Replay cleans every column again on insert.
    """
    try:
        return orjson.dumps(record, default=_bytes_text, option=_JOURNAL_OPTIONS)
    except TypeError:
        return orjson.dumps(clean_span(record))


def clean_span(record: dict[str, Any]) -> dict[str, Any]:
    """The record with every span column storable and every other value JSON-able, for the
    journal (which must never refuse a record the database would have taken)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in JSON_SPAN_COLUMNS:
            out[key] = json_text(value)
        elif key in INT_SPAN_COLUMNS:
            out[key] = clean_int(value)
        elif key in FLOAT_SPAN_COLUMNS:
            out[key] = clean_float(value)
        elif key == "metadata" and value is not None and not isinstance(value, str):
            out[key] = json_text(value)
        elif isinstance(value, str):
            out[key] = valid_utf8(value)
        else:
            out[key] = _sanitize_json(value)
    return out
