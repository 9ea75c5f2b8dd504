"""One rollout as a single self-contained HTML file: inline CSS and JS, no other host, opens
from `file://`. Served at `GET /api/rollouts/{id}/report` and written by `spangate report`."""

from __future__ import annotations

import time
from typing import Any

from sqlite_utils import Database

from config.version import package_version
from gateway.web.ui import views
from store.queries import get_rollout

# All the report's script does: show times in the reader's time zone.
REPORT_JS = """
document.querySelectorAll("time[datetime]").forEach(function (el) {
  var d = new Date(el.getAttribute("datetime"));
  if (!isNaN(d)) { el.title = el.getAttribute("datetime"); el.textContent = d.toLocaleString(); }
});
"""


def _items(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each span with the messages it added: an agent resends its history on every call, and
    printing it again each time would make a long rollout's report grow with its square."""
    items = []
    previous: dict[str | None, tuple[str, list[Any], list[Any]]] = {}
    for span in spans:
        answer = views.reply(span)
        repeated, before = 0, None
        if span.get("operation") == "execute_tool":
            messages = views.conversation(span)
        else:
            raw = views.request_messages(span)
            attempt = span.get("attempt_id")
            if attempt in previous:
                before, sent, replied = previous[attempt]
                repeated = views.repeated_count(sent, replied, raw)
            # Only what is new is shaped for display.
            messages = [views.message(m) for m in raw[repeated:]]
            if not raw:
                messages = views.conversation(span)
            previous[attempt] = (span["span_id"], raw, views.reply_messages(span))
        items.append(
            {
                "span": span,
                "messages": messages,
                "reply": answer,
                "repeated": repeated,
                "previous": before,
            }
        )
    return items


def render_report(rollout: dict[str, Any]) -> str:
    """The report for a rollout as `store.queries.get_rollout` returns it (bodies included)."""
    spans = views.rollout_spans(rollout)
    plain, verdicts = views.split_rewards(rollout["rewards"])
    return views.render(
        "report.html",
        r=rollout,
        summary=rollout["summary"],
        tl=views.timeline(spans),
        items=_items(spans),
        rewards=plain,
        verdicts=verdicts,
        criteria=views.criteria,
        rationale=views.rationale,
        css=(views.STATIC / "ui.css").read_text(encoding="utf-8"),
        js=REPORT_JS,
        version=package_version(),
        generated_ns=time.time_ns(),
    )


def build_report(db: Database, rollout_id: str) -> str:
    """Read a rollout and render its report (raises store.errors.NotFound)."""
    return render_report(get_rollout(db, rollout_id))
