"""What the pages show, shaped from store rows: timelines, conversations, charts' data.

Pure functions with no aiohttp in them, shared by the live pages and the one-file report.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, TypeGuard

import jinja2
import orjson
from markupsafe import Markup, escape

from gateway.proxy.tool_items import (
    chat_tool_call,
    is_call_item,
    objects_in,
    response_tool_call,
    result_of,
)

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
# A bar narrower than this (in % of the timeline) could not be seen or clicked.
MIN_BAR_PERCENT = 0.4
HISTOGRAM_BINS = 10
MAX_TEXT_CHARS = 20_000
MISSING = "\u2013"  # an en dash where a value is missing


def _ts(ns: int | None) -> Markup:
    """A `<time>` in UTC that the page's script rewrites into the browser's time zone."""
    if not ns:
        return Markup("")
    moment = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)
    iso = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    text = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup(f'<time datetime="{iso}">{text}</time>')


def _ms(value: float | None) -> str:
    if value is None:
        return MISSING
    if value >= 10_000:
        return f"{value / 1000:.1f} s"
    if value >= 100:
        return f"{value:.0f} ms"
    return f"{value:.1f} ms"


def _usd(value: float | None) -> str:
    if value is None:
        return MISSING
    if value == 0:
        return "$0"
    return f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def _num(value: Any, digits: int = 3) -> str:
    """A number for reading; text as it is (a judge may score "high"); anything else a dash."""
    if isinstance(value, str):
        return value
    if not _is_number(value):
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "∞" if value > 0 else MISSING
    # Past a trillion the digits say nothing more than the exponent does.
    return f"{value:,.0f}" if 1000 <= abs(value) < 1e12 else f"{value:.{digits}g}"


def _is_number(value: Any) -> TypeGuard[int | float]:
    """An int or a float, as JSON gave it; not a bool, which Python counts as an int."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{value * 100:.0f}%"


def pretty_json(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()


def _arguments(raw: Any) -> str:
    """Tool-call arguments, indented when they are JSON (they arrive as a JSON string)."""
    if isinstance(raw, str):
        try:
            return pretty_json(orjson.loads(raw))
        except orjson.JSONDecodeError:
            return raw
    return pretty_json(raw)


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(ts=_ts, ms=_ms, usd=_usd, num=_num, pct=_pct, json=pretty_json)
    env.globals.update(escape=escape, waterfall_rows=waterfall_rows)
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


# -- a rollout's timeline ---------------------------------------------------------------


def tries(span: dict[str, Any]) -> list[dict[str, Any]]:
    """The upstream tries the gateway recorded on a span, each with every field shown.

    An agent's OTLP span may carry a `spangate.tries` of its own, of any shape (spans
    ingested before ingest set agents' `spangate.*` attributes apart do): only dicts count,
    and each field is read as the pages can show it.
    """
    attributes = span.get("attributes")
    found = attributes.get("spangate.tries") if isinstance(attributes, dict) else None
    if not isinstance(found, list):
        return []
    return [_try(t) for t in found if isinstance(t, dict)]


def _try(raw: dict[str, Any]) -> dict[str, Any]:
    duration = raw.get("duration_ms")
    return {
        "group": _label(raw.get("group")),
        "deployment": _label(raw.get("deployment")),
        "status": _label(raw.get("status")),
        "error": _label(raw.get("error")),
        "duration_ms": duration if _is_number(duration) else None,
    }


def _label(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else pretty_json(value)


def timeline(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """Each span's bar as percentages of the rollout's time span, plus what marks it."""
    if not spans:
        return {"rows": [], "duration_ms": 0.0, "start_ns": None}
    start = min(s["start_ns"] for s in spans)
    end = max(s["end_ns"] or s["start_ns"] for s in spans)
    total = max(end - start, 1)
    rows = []
    for span in spans:
        left = (span["start_ns"] - start) / total * 100
        width = max(((span["end_ns"] or span["start_ns"]) - span["start_ns"]) / total * 100, 0)
        width = min(max(width, MIN_BAR_PERCENT), 100 - left) if left < 100 else MIN_BAR_PERCENT
        duration = span.get("duration_ms") or 0.0
        ttft = span.get("ttft_ms")
        found = tries(span)
        groups = [t["group"] for t in found if t["group"]]
        rows.append(
            {
                "span": span,
                "left": round(left, 3),
                "width": round(width, 3),
                "kind": "tool" if span.get("operation") == "execute_tool" else "model",
                "failed": span.get("status") == "error",
                "ttft_at": (
                    round(min(ttft / duration, 1.0) * 100, 2)
                    if span.get("stream") and ttft is not None and duration > 0
                    else None
                ),
                "tries": found,
                "fallback": groups[-1] if groups and groups[-1] != groups[0] else None,
                "offset_ms": (span["start_ns"] - start) / 1e6,
            }
        )
    return {"rows": rows, "duration_ms": total / 1e6, "start_ns": start}


def waterfall_rows(tl: dict[str, Any], href: str) -> Markup:
    """The waterfall's rows as HTML, built here rather than in the template: a rollout of
    2,000 spans renders about five times faster, and the page budget is 300 ms."""
    out = []
    for row in tl["rows"]:
        s = row["span"]
        span_id = escape(s["span_id"])
        classes = row["kind"] + (" failed" if row["failed"] else "")
        tags = []
        if row["failed"]:
            what = s.get("error_type") or s.get("http_status") or "error"
            tags.append(f'<span class="badge error">{escape(what)}</span>')
        if s.get("retries"):
            tags.append(f'<span class="wf-tag" title="upstream tries">↻{int(s["retries"])}</span>')
        if row["fallback"]:
            fallback = escape(row["fallback"])
            tags.append(f'<span class="wf-tag" title="fell back to {fallback}">→ {fallback}</span>')
        ttft = ""
        if row["ttft_at"] is not None:
            ttft = (
                f'<span class="wf-ttft" style="left:{row["ttft_at"]}%" '
                f'title="first token after {_ms(s.get("ttft_ms"))}"></span>'
            )
        seq = "" if s.get("seq") is None else s["seq"]
        duration = _ms(s.get("duration_ms") or 0.0)
        out.append(
            f'<div class="wf-row {classes}" data-span-id="{span_id}">'
            f'<span class="muted">{seq}</span>'
            f'<span class="wf-name"><a href="{escape(href)}{span_id}">{escape(s["name"])}</a>'
            f"{' '.join(tags)}</span>"
            f'<span class="wf-track"><span class="wf-bar" style="left:{row["left"]}%;'
            f'width:{row["width"]}%" title="+{_ms(row["offset_ms"])}">{ttft}</span></span>'
            f'<span class="num">{duration}</span></div>\n'
        )
    return Markup("".join(out))


def rollout_spans(rollout: dict[str, Any]) -> list[dict[str, Any]]:
    """Every span of a rollout (attempted or not) in sequence order."""
    spans = [s for a in rollout["attempts"] for s in a["spans"]] + rollout["unattempted_spans"]
    return sorted(spans, key=lambda s: (s.get("seq") or 0, s["start_ns"]))


def split_rewards(rewards: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(rewards from users and agents, judge verdicts)."""
    plain: list[dict[str, Any]] = []
    verdicts: list[Any] = []
    for reward in rewards:
        (verdicts if str(reward.get("source", "")).startswith("judge:") else plain).append(reward)
    return plain, verdicts


def criteria(reward: dict[str, Any]) -> list[dict[str, Any]]:
    """A verdict's per-criterion details as rows (name, score, rationale), whatever the judge."""
    details = reward.get("details") or {}
    found = details.get("criteria") if isinstance(details, dict) else None
    rows: list[dict[str, Any]] = []
    if isinstance(found, list):
        for item in found:
            if isinstance(item, dict):
                rows.append(_criterion(str(item.get("name") or item.get("id") or ""), item))
    elif isinstance(found, dict):
        for name, item in found.items():
            rows.append(_criterion(name, item if isinstance(item, dict) else {"score": item}))
    if not rows:
        for name, value in (reward.get("dimensions") or {}).items():
            rows.append(_criterion(name, {"score": value}))
    return rows


def _criterion(name: str, item: dict[str, Any]) -> dict[str, Any]:
    evidence = item.get("evidence")
    score = item.get("score", item.get("value"))
    return {
        "name": name,
        # A judge's own scale may be words ("high"); anything but a number or text: a dash.
        "score": score if _is_number(score) or isinstance(score, str) else None,
        "low": _is_number(score) and score < 1,
        "rationale": str(
            item.get("explanation") or item.get("rationale") or item.get("reason") or ""
        ),
        "evidence": [e for e in evidence if isinstance(e, str)]
        if isinstance(evidence, list)
        else [],
    }


def rationale(reward: dict[str, Any]) -> str:
    details = reward.get("details") or {}
    text = details.get("rationale") if isinstance(details, dict) else None
    return str(text or reward.get("comment") or "")


# -- one call's conversation ------------------------------------------------------------


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content[:MAX_TEXT_CHARS]
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if "text" in part:
                    parts.append(str(part["text"]))
                elif part.get("type") in ("image_url", "input_image"):
                    parts.append("[image]")
                else:
                    parts.append(pretty_json(part))
            else:
                parts.append(str(part))
        return "\n".join(parts)[:MAX_TEXT_CHARS]
    return pretty_json(content)[:MAX_TEXT_CHARS]


def _msg(
    role: str,
    text: str = "",
    tool_calls: list[dict[str, Any]] | None = None,
    tool_call_id: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    return {
        "role": role,
        "text": text,
        "tool_calls": tool_calls or [],
        "tool_call_id": tool_call_id,
        "name": name,
    }


def _message(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return _msg("user", _text(raw))
    # Every tool type (function, custom, built-in Responses items), read as the span reads it.
    asked = [chat_tool_call(call) for call in objects_in(raw.get("tool_calls"))]
    role = raw.get("role") or raw.get("type") or "message"
    if is_call_item(raw):  # Responses API items
        asked.append(response_tool_call(raw))
        role = "assistant"
    calls = [
        {"id": c["id"], "name": c["name"], "arguments": _arguments(c["arguments"])} for c in asked
    ]
    text = _text(raw.get("content"))
    result = result_of(raw)
    if result is not None:
        role, text = "tool", result.text[:MAX_TEXT_CHARS]
    return _msg(
        role,
        text,
        calls,
        raw.get("tool_call_id") or raw.get("call_id"),
        raw.get("name") if role != "assistant" else None,
    )


def request_messages(span: dict[str, Any]) -> list[Any]:
    """The messages a model call sent, as recorded (chat, Responses API or completions)."""
    body = span.get("request_body")
    if not isinstance(body, dict) or span.get("operation") == "execute_tool":
        return []
    messages: list[Any] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    if isinstance(body.get("messages"), list):
        messages += body["messages"]
    elif isinstance(body.get("input"), list):
        messages += body["input"]
    elif body.get("input") is not None:
        messages.append({"role": "user", "content": body["input"]})
    elif body.get("prompt") is not None:
        messages.append({"role": "user", "content": body["prompt"]})
    return messages


def reply_messages(span: dict[str, Any]) -> list[Any]:
    """The assistant messages a model call got back, as recorded."""
    body = span.get("response_body")
    if not isinstance(body, dict) or span.get("operation") == "execute_tool":
        return []
    if isinstance(body.get("choices"), list):
        return [c["message"] for c in body["choices"] if isinstance(c, dict) and "message" in c]
    if isinstance(body.get("output"), list):
        return [item for item in body["output"] if isinstance(item, dict)]
    return []


def message_key(raw: Any) -> tuple[Any, ...]:
    """What makes two messages the same, cheaply: a reply as recorded and the same message
    resent by a client differ in fields such as `refusal` or `annotations`."""
    if not isinstance(raw, dict):
        return ("user", _text(raw))
    calls = tuple(
        (str(call["name"]), str(call["arguments"]))
        for call in map(chat_tool_call, objects_in(raw.get("tool_calls")))
    )
    return (
        raw.get("role") or raw.get("type"),
        _text(raw.get("content", raw.get("output"))),
        calls,
        raw.get("tool_call_id") or raw.get("call_id"),
    )


def message(raw: Any) -> dict[str, Any]:
    return _message(raw)


def conversation(span: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages the call sent, whatever the operation, as role/text/tool calls."""
    body = span.get("request_body")
    if span.get("operation") == "execute_tool" and isinstance(body, dict):
        call = {
            "id": body.get("call_id"),
            "name": body.get("name", ""),
            "arguments": _arguments(body.get("arguments", "")),
        }
        return [_msg("assistant", "", [call])]
    if body and not isinstance(body, dict):
        return [_msg("request", _text(body))]
    return [_message(m) for m in request_messages(span)]


def reply(span: dict[str, Any]) -> list[dict[str, Any]]:
    """What came back: the assistant's message(s), a tool's result, or the error."""
    body = span.get("response_body")
    if span.get("operation") == "execute_tool":
        content = body.get("content") if isinstance(body, dict) else body
        asked = span.get("request_body")
        call_id = asked.get("call_id") if isinstance(asked, dict) else None
        return [_msg("tool", _text(content), tool_call_id=call_id)]
    if not isinstance(body, dict):
        return [_msg("response", _text(body))] if body else []
    if isinstance(body.get("choices"), list):
        out = []
        for choice in body["choices"]:
            if not isinstance(choice, dict):
                continue
            if "message" in choice:
                out.append(_message(choice["message"]))
            elif "text" in choice:
                out.append(_msg("assistant", _text(choice["text"])))
        return out
    if isinstance(body.get("output"), list):
        return [_message(item) for item in body["output"] if isinstance(item, dict)]
    if "error" in body:
        return [_msg("error", _text(body["error"]))]
    return []


def repeated_count(before: list[Any], replied: list[Any], current: list[Any]) -> int:
    """How many leading messages of `current` repeat the previous call's messages (`before`)
    and its reply. An agent resends its whole history each call; a report shows each once.

    The resent history is compared as recorded (one C-level list comparison); only the
    reply, which the client re-serialises with other fields, is compared by `message_key`.
    """
    same = 0
    if current[: len(before)] == before:
        same = len(before)
    else:
        for old, new in zip(before, current, strict=False):
            if message_key(old) != message_key(new):
                return same
            same += 1
    for old, new in zip(replied, current[same:], strict=False):
        if message_key(old) != message_key(new):
            break
        same += 1
    return same


# -- charts -----------------------------------------------------------------------------


def histogram(values: list[float], bins: int = HISTOGRAM_BINS) -> list[dict[str, Any]]:
    """Equal-width bins from min to max, each with its share of the tallest (for CSS bars)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return []
    low, high = min(finite), max(finite)
    if low == high:
        return [{"low": low, "high": high, "count": len(finite), "height": 100.0}]
    counts = [0] * bins
    for value in finite:
        counts[min(int(_share(value, low, high) * bins), bins - 1)] += 1
    tallest = max(counts)
    return [
        {
            "low": _between(low, high, i / bins),
            "high": _between(low, high, (i + 1) / bins),
            "count": count,
            "height": round(count / tallest * 100, 1),
        }
        for i, count in enumerate(counts)
    ]


def _share(value: float, low: float, high: float) -> float:
    """Where `value` lies from `low` (0) to `high` (1); `high - low` alone overflows to inf
    for finite values far apart (±1.7e308), and inf / inf is NaN."""
    span = high - low
    if math.isfinite(span):
        return (value - low) / span
    return (value / 2 - low / 2) / (high / 2 - low / 2)


def _between(low: float, high: float, share: float) -> float:
    # Weighted, rather than low + share * (high - low), which can overflow the same way.
    return low * (1 - share) + high * share


def whisker_scale(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """One horizontal scale for every row's confidence interval, so rows compare by eye."""
    points = [
        v
        for r in rows
        for v in (r.get("reward_ci_low"), r.get("reward_ci_high"), r.get("mean_reward"))
        if v is not None and math.isfinite(v)
    ]
    if not points:
        return 0.0, 1.0
    low, high = min(points), max(points)
    if low == high:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    return low - pad, high + pad


def whisker(
    row: dict[str, Any], scale: tuple[float, float], width: int = 160
) -> dict[str, Any] | None:
    mean = row.get("mean_reward")
    if mean is None:
        return None
    low, high = scale

    def x(value: float | None) -> float:
        value = mean if value is None or not math.isfinite(value) else value
        return round((value - low) / (high - low) * width, 1)

    return {
        "lo": x(row.get("reward_ci_low")),
        "hi": x(row.get("reward_ci_high")),
        "mean": x(mean),
        "width": width,
    }


BUDGET_UNITS = {
    "max_calls": "calls",
    "max_tokens": "tokens",
    "max_cost_usd": "USD",
    "max_seconds": "s",
}


def budget_bars(view: dict[str, Any]) -> list[dict[str, Any]]:
    """One bar per rollout limit in force: used, limit, and the share spent (0..1)."""
    used = dict(zip(BUDGET_UNITS, view["used"].values(), strict=True))
    bars = []
    for name, limit in view["limits"]["rollout"].items():
        if limit is None:
            continue
        spent = used[name]
        bars.append(
            {
                "name": name,
                "unit": BUDGET_UNITS[name],
                "used": spent,
                "limit": limit,
                "share": min(spent / limit, 1.0) if limit else 1.0,
            }
        )
    return bars
