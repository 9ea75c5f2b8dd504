"""Text rendering for the read-only CLI commands: tail lines, the rollouts table, a rollout tree.

Pure functions from stored rows to strings, so the commands stay thin and the output is testable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import click
import orjson

# A span row as the store or the API gives it.
Span = dict[str, Any]

PREVIEW_CHARS = 60
# Body columns (and packed token arrays) are left out of `--json` lines unless asked for:
# they dwarf everything else.
BODY_COLUMNS = (
    "request_body",
    "response_body",
    "prompt_token_ids",
    "completion_token_ids",
    "logprobs",
)
STATUS_COLORS = {
    "ok": "green",
    "error": "red",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "timeout": "red",
}


# -- escaping -----------------------------------------------------------------

# Characters a terminal acts on instead of showing: C0 controls (ESC starts ANSI sequences
# that clear the screen or retitle the window, CR and BS overwrite what was printed), DEL,
# C1 controls (0x9b is a one-byte CSI), and the bidi and line-separator characters that
# reorder or hide the text after them. Recorded content is an agent's or a model's, so it
# is shown with these escaped. rich's Text strips only BEL, BS, VT, FF and CR, which is why
# this is our own.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_CONTROL_KEEP_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
)
_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED_ESCAPES.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def printable(text: str, *, lines: bool = False) -> str:
    """`text` safe for a terminal: control characters shown as escapes (`\\x1b`, `\\r`,
    `\\u202e`). With `lines`, newlines and tabs are kept. Escaping twice changes nothing."""
    return (_CONTROL_KEEP_LINES if lines else _CONTROL).sub(_escape, text)


# JSON lines: orjson escapes C0 controls but writes DEL, C1 and bidi characters raw. They
# can only occur inside strings, where `\\uXXXX` means the same character to a parser.
_JSON_RAW = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


# -- small formatters ---------------------------------------------------------


def clock(ns: int | None) -> str:
    """Local time of day with milliseconds, e.g. 14:03:07.123."""
    if ns is None:
        return "--:--:--.---"
    return datetime.fromtimestamp(ns / 1e9).strftime("%H:%M:%S.%f")[:-3]


def timestamp(ns: int | None) -> str:
    """Local date and time to the second."""
    if ns is None:
        return "-"
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def cost(usd: float | None) -> str:
    if usd is None:
        return ""
    if 0 < usd < 0.000_000_5:
        # Six decimals would print a real (tiny) cost as $0.000000.
        return "$" + f"{usd:.12f}".rstrip("0")
    return f"${usd:.6f}"


def tokens(given: int | None, taken: int | None) -> str:
    if given is None and taken is None:
        return ""
    return f"{given if given is not None else '?'}/{taken if taken is not None else '?'} tok"


def millis(ms: float | None) -> str:
    return "" if ms is None else f"{ms:.0f}ms"


def duration(ms: float | None) -> str:
    """A span of time at a readable scale: 812ms, 3.2s, 2m05s, 1h02m."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def clip(text: str, width: int = PREVIEW_CHARS) -> str:
    """One line of at most `width` characters; whitespace runs (newlines too) become one space,
    and other control characters show escaped (see `printable`)."""
    flat = " ".join(printable(text, lines=True).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def styled(text: str, status: str | None) -> str:
    color = STATUS_COLORS.get(status or "")
    return click.style(text, fg=color) if color else text


def json_line(obj: Any) -> str:
    """One JSON object; no character in it can act on a terminal (see `_JSON_RAW`)."""
    return _JSON_RAW.sub(_json_escape, orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode())


# -- what a span says ---------------------------------------------------------


def who(span: dict[str, Any]) -> str:
    """`rollout/attempt#seq`, or `-` for a call that named no rollout."""
    rollout = span.get("rollout_id")
    if not rollout:
        return "-"
    attempt = span.get("attempt_id")
    label = f"{rollout}/{attempt}" if attempt else rollout
    return f"{label}#{span['seq']}" if span.get("seq") is not None else label


def model(span: dict[str, Any]) -> str:
    if span.get("operation") == "execute_tool":
        return f"tool {span.get('name', '').removeprefix('execute_tool ')}"
    asked, answered = span.get("request_model"), span.get("response_model")
    if answered and answered != asked:
        return f"{asked or '?'} → {answered}"
    return asked or answered or "?"


def status(span: dict[str, Any]) -> str:
    if span.get("status") == "error":
        code = span.get("http_status")
        if not code or code < 400:
            # It failed after its 200 went out (mid-stream): the upstream's status says more.
            code = span.get("upstream_status")
        return f"error {code}" if code else "error"
    return span.get("status") or "?"


def _tool_call_text(calls: Iterable[dict[str, Any]]) -> str:
    return "→ " + ", ".join(f"{c.get('name') or '?'}({c.get('arguments') or ''})" for c in calls)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Content given as parts: keep the text ones.
        return " ".join(
            p.get("text") or "" for p in content if isinstance(p, dict) and p.get("text")
        )
    return ""


def _chat_reply(body: dict[str, Any]) -> str | None:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if "text" in choice:  # a legacy text completion
        return _content_text(choice.get("text"))
    message = choice.get("message") or {}
    calls = [
        {
            "name": (c.get("function") or {}).get("name"),
            "arguments": (c.get("function") or {}).get("arguments"),
        }
        for c in message.get("tool_calls") or ()
        if isinstance(c, dict)
    ]
    if calls:
        return _tool_call_text(calls)
    text = _content_text(message.get("content"))
    if not text and message.get("refusal"):
        return f"refusal: {message['refusal']}"
    return text


def _responses_reply(body: dict[str, Any]) -> str | None:
    if isinstance(body.get("output_text"), str):
        return body["output_text"]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in body.get("output") or ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            calls.append(item)
        elif item.get("type") == "message":
            texts.extend(
                part.get("text") or ""
                for part in item.get("content") or ()
                if isinstance(part, dict) and part.get("type") == "output_text"
            )
    if calls:
        return _tool_call_text(calls)
    return "".join(texts)


def _error_text(span: dict[str, Any]) -> str:
    body = span.get("response_body")
    message = span.get("error_message")
    if not message and isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    return str(message or span.get("error_type") or "")


def reply(span: dict[str, Any]) -> str:
    """What the model answered, as full text (clip it for a preview); `span` must be decoded."""
    if span.get("status") == "error":
        return _error_text(span)
    body = span.get("response_body")
    operation = span.get("operation")
    if operation == "execute_tool":
        result = body.get("content") if isinstance(body, dict) else body
        return f"← {result or ''}"
    if isinstance(span.get("tool_calls"), list) and span["tool_calls"]:
        # Read off every tool type already (custom, built-in, MCP), body or no body.
        return _tool_call_text(span["tool_calls"])
    if isinstance(body, dict):
        if operation == "embeddings":
            data = body.get("data")
            return f"[{len(data) if isinstance(data, list) else '?'} vectors]"
        found = _responses_reply(body) if operation == "responses" else _chat_reply(body)
        if found is not None:
            return found
    # Bodies are optional (recorder.store_bodies); the tool_calls column is always there.
    if span.get("tool_calls"):
        return _tool_call_text(span["tool_calls"])
    return body if isinstance(body, str) else ""


# -- tail ---------------------------------------------------------------------


# Starting widths of time, who, model, status, latency, tokens and cost; the reply comes last.
TAIL_MIN_WIDTHS = (12, 14, 12, 5, 6, 10, 9)
TAIL_RIGHT = frozenset({4, 5, 6})


def _tail_cells(span: dict[str, Any]) -> list[str]:
    return [
        clock(span.get("start_ns")),
        printable(who(span)),
        printable(model(span)),
        printable(status(span)),
        millis(span.get("duration_ms")),
        tokens(span.get("input_tokens"), span.get("output_tokens")),
        cost(span.get("cost_usd")),
    ]


class TailColumns:
    """Column widths that only grow, so lines printed later by --follow stay aligned."""

    def __init__(self) -> None:
        self.widths = list(TAIL_MIN_WIDTHS)

    def fit(self, spans: Iterable[dict[str, Any]]) -> None:
        """Widen the columns for a batch up front, so the whole batch lines up."""
        for span in spans:
            for i, cell in enumerate(_tail_cells(span)):
                self.widths[i] = max(self.widths[i], len(cell))

    def line(self, span: dict[str, Any]) -> str:
        self.fit([span])
        cells = [
            cell.rjust(width) if i in TAIL_RIGHT else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(_tail_cells(span), self.widths, strict=True))
        ]
        cells[0] = click.style(cells[0], dim=True)
        cells[3] = styled(cells[3], span.get("status"))
        return "  ".join([*cells, clip(reply(span))]).rstrip()


def span_json(span: dict[str, Any], *, bodies: bool) -> str:
    row = {k: v for k, v in span.items() if k != "_rowid"}
    if not bodies:
        for key in BODY_COLUMNS:
            row.pop(key, None)
    return json_line(row)


@dataclass
class TailView:
    """What `spangate tail` was asked to show (from the file or `--url`), and how it prints
    each call: a JSON line or a column line."""

    rollout_id: str | None
    follow: bool
    limit: int
    as_json: bool
    bodies: bool
    columns: TailColumns = field(default_factory=TailColumns)

    def emit(self, span: Span) -> None:
        click.echo(span_json(span, bodies=self.bodies) if self.as_json else self.columns.line(span))

    def backlog(self, spans: list[Span]) -> None:
        """The calls recorded before `tail` started; a one-off listing that found none says so."""
        self.columns.fit(spans)
        for span in spans:
            self.emit(span)
        if not spans and not self.follow and self.limit and not self.as_json:
            where = f" for rollout {self.rollout_id}" if self.rollout_id else " yet"
            click.echo(f"no calls recorded{where}", err=True)


# -- tables -------------------------------------------------------------------


def _align(rows: Sequence[Sequence[str]], right: frozenset[int]) -> list[list[str]]:
    """Pad every cell to its column's width (numbers right-aligned); style only after this.

    Cells are escaped first (`printable`): every table prints recorded content, and the
    widths must be those of what is shown.
    """
    if not rows:
        return []
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        for row in rows
    ]


ROLLOUT_HEADERS = (
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
)


def _rollout_duration_ms(rollout: dict[str, Any]) -> float | None:
    # A running rollout has no end yet: measure to its last recorded activity.
    end = rollout.get("ended_ns") or rollout.get("updated_ns")
    if end is None or rollout.get("created_ns") is None:
        return None
    return max(0, end - rollout["created_ns"]) / 1e6


def rollouts_table(rollouts: Sequence[dict[str, Any]]) -> list[str]:
    rows = [list(ROLLOUT_HEADERS)]
    for r in rollouts:
        rows.append(
            [
                r["id"],
                r["status"],
                r.get("agent") or "-",
                str(r.get("attempts") or 0),
                str(r.get("calls") or 0),
                str(r.get("errors") or 0),
                f"{r.get('tokens') or 0:,}",
                cost(r.get("cost_usd")),
                timestamp(r.get("created_ns")),
                duration(_rollout_duration_ms(r)),
            ]
        )
    aligned = _align(rows, right=frozenset({3, 4, 5, 6, 7, 9}))
    lines = [click.style("  ".join(aligned[0]).rstrip(), bold=True)]
    for source, row in zip(rollouts, aligned[1:], strict=True):
        row[1] = styled(row[1], source["status"])
        lines.append("  ".join(row).rstrip())
    return lines


# -- show ---------------------------------------------------------------------


def _call_cells(span: dict[str, Any], origin_ns: int) -> list[str]:
    offset = (span["start_ns"] - origin_ns) / 1e9
    ttft = span.get("ttft_ms")
    return [
        f"#{span['seq']}" if span.get("seq") is not None else "#?",
        f"+{offset:.3f}s",
        model(span),
        status(span),
        millis(span.get("duration_ms")),
        f"ttft {ttft:.0f}ms" if span.get("stream") and ttft is not None else "",
        tokens(span.get("input_tokens"), span.get("output_tokens")),
        cost(span.get("cost_usd")),
        clip(reply(span)),
    ]


def _reward_target(reward: dict[str, Any]) -> str:
    if reward.get("span_id"):
        return f"span {reward['span_id']}"
    if reward.get("attempt_id"):
        return f"attempt {reward['attempt_id']}"
    return "rollout"


def _summary_line(summary: dict[str, Any]) -> str:
    given, taken = summary["input_tokens"], summary["output_tokens"]
    errors = summary["errors"]
    parts = [
        f"{summary['calls']} call{'' if summary['calls'] == 1 else 's'}",
        styled(f"{errors} error{'' if errors == 1 else 's'}", "error" if errors else None),
        f"{given + taken:,} tokens ({given:,} in, {taken:,} out)",
        cost(summary["cost_usd"]) or "$0",
        duration(summary["duration_ms"]),
    ]
    return "summary  " + " · ".join(parts)


def budget_line(rollout: dict[str, Any]) -> str:
    """The rollout's own limits (set over the API) with used and remaining, from its calls."""
    summary = rollout.get("summary") or {}
    used = {
        "max_calls": summary.get("calls", 0) - summary.get("budget_refusals", 0),
        "max_tokens": summary.get("input_tokens", 0) + summary.get("output_tokens", 0),
        "max_cost_usd": summary.get("cost_usd", 0.0),
    }
    parts = []
    for name, limit in ((rollout.get("budget") or {}).get("rollout") or {}).items():
        if name not in used:
            parts.append(f"{name} {limit:g}")
            continue
        spent = used[name]
        if name == "max_cost_usd":
            parts.append(f"{name} {limit:g} (used {spent:.6f}, left {max(limit - spent, 0):.6f})")
        else:
            parts.append(f"{name} {limit:g} (used {spent:g}, left {max(limit - spent, 0):g})")
    attempt = (rollout.get("budget") or {}).get("attempt")
    if attempt:
        parts.append("per attempt " + ", ".join(f"{k} {v:g}" for k, v in attempt.items()))
    return " · ".join(parts) or "-"


def rollout_tree(rollout: dict[str, Any]) -> list[str]:
    """A rollout from `get_rollout`: header, attempts and their calls, rewards, summary."""
    lines = [
        click.style(f"rollout {printable(rollout['id'])}", bold=True)
        + "  "
        + styled(printable(rollout["status"]), rollout["status"])
    ]
    tags = rollout.get("tags")
    fields = [
        ("agent", rollout.get("agent") or "-"),
        ("tags", ", ".join(map(str, tags)) if isinstance(tags, list) and tags else "-"),
        ("metadata", json_line(rollout.get("metadata")) if rollout.get("metadata") else "-"),
        ("created", f"{timestamp(rollout.get('created_ns'))}"),
        ("updated", f"{timestamp(rollout.get('updated_ns'))}"),
    ]
    if rollout.get("ended_ns"):
        fields.append(("ended", timestamp(rollout["ended_ns"])))
    if rollout.get("budget"):
        fields.append(("budget", budget_line(rollout)))
    lines += [f"  {name:<9} {printable(value)}" for name, value in fields]

    groups: list[tuple[str, list[dict[str, Any]]]] = [
        (
            click.style(f"attempt {printable(a['id'])}", bold=True)
            + f"  #{a['number']}  "
            + styled(printable(a["status"]), a["status"]),
            a["spans"],
        )
        for a in rollout["attempts"]
    ]
    if rollout.get("unattempted_spans"):
        groups.append(("calls outside any attempt", rollout["unattempted_spans"]))
    spans = [s for _, group in groups for s in group]
    # Offsets count from the rollout's start; a span can only predate it if clocks disagree.
    origin = min([rollout["created_ns"], *(s["start_ns"] for s in spans)])
    aligned = iter(
        _align([_call_cells(s, origin) for s in spans], right=frozenset({0, 1, 4, 6, 7}))
    )
    for title, group in groups:
        lines += ["", title]
        if not group:
            lines.append("└─ (no calls)")
        for i, span in enumerate(group):
            cells = next(aligned)
            cells[3] = styled(cells[3], span.get("status"))
            branch = "└─" if i == len(group) - 1 else "├─"
            lines.append(f"{branch} " + "  ".join(cells).rstrip())

    rewards = rollout.get("rewards") or []
    if rewards:
        rows = [["NAME", "VALUE", "SOURCE", "TARGET", "COMMENT"]]
        rows += [
            [
                r["name"],
                f"{r['value']:g}",
                r.get("source") or "-",
                _reward_target(r),
                clip(r.get("comment") or ""),
            ]
            for r in rewards
        ]
        table = _align(rows, right=frozenset({1}))
        lines += ["", click.style("rewards", bold=True)]
        lines += ["  " + "  ".join(row).rstrip() for row in table]

    lines += ["", _summary_line(rollout["summary"])]
    return lines
