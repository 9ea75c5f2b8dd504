"""Who a call belongs to: rollout, attempt, agent, tags, metadata and the caller's trace.

Also hands out per-rollout sequence numbers, so the order of calls never depends on clocks.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.errors import InvalidRequest

MAX_ID_LENGTH = 256
MAX_TAGS = 64
MAX_META_HEADERS = 64
# fullmatch, not `$`: `$` also matches before a final newline, which no header may carry.
# Never only dots: `.` and `..` are path segments a browser resolves away in a page's link.
_ID_PATTERN = re.compile(r"(?!\.+$)[A-Za-z0-9._:@+=~-]+")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
META_PREFIX = "x-meta-"


@dataclass(slots=True)
class Attribution:
    rollout_id: str | None = None
    attempt_id: str | None = None
    agent_id: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    trace_id: str | None = None
    parent_span_id: str | None = None


def _check_id(value: str, what: str) -> str:
    if len(value) > MAX_ID_LENGTH or not _ID_PATTERN.fullmatch(value):
        raise InvalidRequest(
            f"{what} must be 1-{MAX_ID_LENGTH} characters of letters, digits and ._:@+=~-,"
            " not only dots",
            param=what,
            code="invalid_id",
        )
    return value


def valid_id(value: str) -> bool:
    """An id as `_check_id` accepts it, for callers that reject rather than raise."""
    return len(value) <= MAX_ID_LENGTH and bool(_ID_PATTERN.fullmatch(value))


def clean_text(value: str) -> str:
    """Header text as valid UTF-8: aiohttp keeps undecodable bytes as lone surrogates,
    which no JSON encoder or SQLite will take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def parse_traceparent(value: str | None) -> tuple[str | None, str | None]:
    """The W3C trace id and parent span id, or (None, None) for a missing or invalid header."""
    if not value:
        return None, None
    match = _TRACEPARENT.match(value.strip().lower())
    if not match or match.group(1) == "ff":
        return None, None
    trace_id, parent = match.group(2), match.group(3)
    if trace_id == "0" * 32 or parent == "0" * 16:
        return None, None
    return trace_id, parent


def read_attribution(match_info: Mapping[str, str], headers: Mapping[str, str]) -> Attribution:
    """Path prefixes win over headers; both are checked the same way."""
    rollout = match_info.get("rollout_id") or headers.get("x-rollout-id") or None
    attempt = match_info.get("attempt_id") or headers.get("x-attempt-id") or None
    if rollout is not None:
        _check_id(rollout, "rollout_id")
    if attempt is not None:
        if rollout is None:
            raise InvalidRequest(
                "an attempt id needs a rollout id (X-Rollout-Id or /rollout/{id}/...)",
                param="attempt_id",
                code="rollout_required",
            )
        _check_id(attempt, "attempt_id")
    agent = headers.get("x-agent-id") or None
    if agent is not None:
        _check_id(agent, "agent_id")
    tags = [clean_text(t.strip()) for t in headers.get("x-tags", "").split(",") if t.strip()][
        :MAX_TAGS
    ]
    metadata: dict[str, str] = {}
    for name, value in headers.items():
        if name.lower().startswith(META_PREFIX) and len(metadata) < MAX_META_HEADERS:
            metadata[clean_text(name[len(META_PREFIX) :].lower())] = clean_text(value)
    trace_id, parent = parse_traceparent(headers.get("traceparent"))
    return Attribution(rollout, attempt, agent, tags, metadata, trace_id, parent)


# Ids need to be unique, not secret: random.getrandbits skips a syscall per id that
# os.urandom would make on every call.
def new_trace_id() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


@functools.lru_cache(maxsize=4096)
def rollout_trace(rollout_id: str) -> tuple[str, str]:
    """(trace id, root span id) of a rollout: derived from its id, so every replica and the
    exporter agree on them without asking anyone, and a rollout is one trace."""
    digest = hashlib.sha256(b"spangate.rollout:" + rollout_id.encode()).hexdigest()
    return digest[:32], digest[32:48]


_SPAN_PREFIX = random.getrandbits(32) or 1
_span_counter = itertools.count(random.getrandbits(16))


def new_span_id() -> str:
    """A random per-process prefix and a counter: unique, and each new id sorts after the
    last, so the store appends to its span-id index instead of touching a random page."""
    return f"{_SPAN_PREFIX:08x}{next(_span_counter) & 0xFFFFFFFF:08x}"
