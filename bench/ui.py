"""Dashboard and report budgets (issue 13): server render of a 2,000-span rollout page, the
overview's page weight, a 500-span report's size, and the rollouts list over 100,000 rollouts.

    python bench/ui.py [--rollouts 100000] [--runs 20] [--out bench/results/ui.md]

Seeds synthetic rollouts into a fresh SQLite file, serves it with the real app (`create_app`)
on a loopback port, and measures. With Debian's chromium present it also times the rollout
page in a real browser (load, then the last waterfall row drawn).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from aiohttp import web

from config import default_settings
from gateway.compose import create_app
from gateway.web.report import build_report
from gateway.web.ui.routes import rollout_page
from store import dashboard
from store.schema import SPAN_COLUMNS, connect
from store.span_inserts import insert_spans
from store.writes import add_reward

MS = 1_000_000
CHROMIUM = os.environ.get("SPANGATE_CHROMIUM", "/usr/bin/chromium")
BUDGETS = {
    "rollout page, 2,000 spans: server render (median)": ("ms", 300.0),
    "rollout page, 2,000 spans: usable in the browser": ("ms", 1000.0),
    "overview page weight (HTML + CSS + JS)": ("KB", 300.0),
    "report of a 500-span rollout": ("KB", 2048.0),
}
TOOL = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
USER_TEXT = "Find the three cheapest flights from Lisbon to Oslo next week and compare them. "


def _span(rollout: str, seq: int, start_ns: int, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(SPAN_COLUMNS)
    record.update(
        span_id=f"{abs(hash((rollout, seq))) % 16**16:016x}",
        trace_id="ab" * 16,
        rollout_id=rollout,
        attempt_id="a1",
        seq=seq,
        name="chat gpt-4o-mini",
        operation="chat",
        provider="openai",
        deployment="openai/gpt-4o-mini",
        model_group="gpt-4o-mini",
        request_model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18",
        status="ok",
        http_status=200,
        stream=seq % 3 == 0,
        start_ns=start_ns,
        end_ns=start_ns + 400 * MS,
        duration_ms=400.0,
        ttft_ms=120.0,
        retries=0,
        input_tokens=900,
        output_tokens=60,
        cost_usd=0.0002,
        attributes={"gen_ai.agent.id": "planner"},
        tags=[],
        agent="planner",
        metadata={},
    )
    record.update(fields)
    return record


def agent_rollout(rollout: str, spans: int, *, history_cap: int | None) -> list[dict[str, Any]]:
    """A tool loop: chat asks for `search`, the tool runs, chat again with the result.

    Each chat resends its history (capped at `history_cap` messages when given, to keep the
    page benchmark's database small: the page never reads bodies).
    """
    t0 = time.time_ns() - spans * 600 * MS
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a travel agent. Use tools; be brief."},
        {"role": "user", "content": USER_TEXT},
    ]
    out: list[dict[str, Any]] = []
    seq = 0
    while seq < spans:
        seq += 1
        call_id = f"call_{seq:06d}"
        arguments = f'{{"query": "flights LIS-OSL page {seq}"}}'
        answer = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "search", "arguments": arguments},
                }
            ],
        }
        sent = messages[-history_cap:] if history_cap else messages
        start = t0 + seq * 600 * MS
        chat = _span(
            rollout,
            seq,
            start,
            request_body={"model": "gpt-4o-mini", "messages": sent, "tools": [TOOL]},
            response_body={
                "choices": [{"index": 0, "message": answer, "finish_reason": "tool_calls"}]
            },
            tool_calls=[{"id": call_id, "name": "search", "arguments": arguments}],
            finish_reasons=["tool_calls"],
            status="error" if seq % 97 == 0 else "ok",
            error_type="rate_limit_error" if seq % 97 == 0 else None,
            retries=1 if seq % 41 == 0 else 0,
        )
        out.append(chat)
        if seq >= spans:
            break
        seq += 1
        result = f'{{"flights": [{{"price": {100 + seq}, "carrier": "TP", "stops": 1}}]}}'
        out.append(
            _span(
                rollout,
                seq,
                start + 400 * MS,
                name="execute_tool search",
                operation="execute_tool",
                parent_span_id=chat["span_id"],
                duration_ms=180.0,
                end_ns=start + 580 * MS,
                stream=0,
                ttft_ms=None,
                input_tokens=None,
                output_tokens=None,
                cost_usd=None,
                request_body={"name": "search", "arguments": arguments, "call_id": call_id},
                response_body={"content": result, "error": False},
            )
        )
        messages += [answer, {"role": "tool", "tool_call_id": call_id, "content": result}]
    return out


def seed(db_path: Path, rollouts: int) -> None:
    db = connect(db_path)
    try:
        insert_spans(db.conn, agent_rollout("big-2000", 2000, history_cap=12))
        insert_spans(db.conn, agent_rollout("report-500", 500, history_cap=None))
        add_reward(db, {"rollout_id": "report-500", "value": 0.7, "final": True})
        now = time.time_ns() - rollouts * 1000 * MS
        batch: list[dict[str, Any]] = []
        for i in range(rollouts):
            batch.append(
                _span(
                    f"r-{i:07d}",
                    1,
                    now + i * 1000 * MS,
                    agent=f"agent-{i % 7}",
                    request_body={"messages": [{"role": "user", "content": "hi"}]},
                    response_body={
                        "choices": [{"message": {"role": "assistant", "content": "ok"}}]
                    },
                    status="error" if i % 13 == 0 else "ok",
                )
            )
            if len(batch) == 5000:
                insert_spans(db.conn, batch)
                batch = []
        if batch:
            insert_spans(db.conn, batch)
        db.execute("ANALYZE")
    finally:
        db.close()


class Server:
    """The real app on a loopback port, in a thread."""

    def __init__(self, db_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.db_path = db_path
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def __enter__(self) -> Server:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    async def _start(self) -> None:
        self.runner = web.AppRunner(create_app(default_settings(), self.db_path), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def timed(fn: Any, runs: int) -> tuple[float, float]:
    """(median, max) milliseconds over `runs` calls, after one warm-up."""
    fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), max(samples)


def render_rollout_page(db: Any, rollout_id: str) -> str:
    """What the `/ui/rollouts/{id}` handler runs on a read thread: read, shape, render."""
    return rollout_page(db, rollout_id, partial=False, signed_in=False)


def page_weight(base: str, path: str) -> tuple[int, list[tuple[str, int]]]:
    with httpx.Client(base_url=base, timeout=30) as client:
        html = client.get(path).content
        parts = [(path, len(html))]
        for asset in re.findall(rb'(?:src|href)="(/ui/static/[^"]+)"', html):
            parts.append((asset.decode(), len(client.get(asset.decode()).content)))
    return sum(size for _, size in parts), parts


def browser_time(base: str, path: str, runs: int) -> float | None:
    """Median ms from navigation to the last waterfall row in the DOM, in Chromium."""
    if not Path(CHROMIUM).exists():
        return None
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    samples = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        for _ in range(runs + 1):
            started = time.perf_counter()
            page.goto(base + path, wait_until="load")
            page.locator(".wf-row[data-span-id]").nth(1999).wait_for(state="attached")
            samples.append((time.perf_counter() - started) * 1000)
        browser.close()
    return statistics.median(samples[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=100_000, help="Rollouts for the list.")
    parser.add_argument("--runs", type=int, default=20, help="Timed repetitions per measure.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ui.md")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="spangate-ui-") as tmp:
        db_path = Path(tmp) / "ui.db"
        started = time.perf_counter()
        seed(db_path, args.rollouts)
        notes.append(
            f"seeded {args.rollouts:,} one-call rollouts + a 2,000-span and a 500-span agent "
            f"rollout in {time.perf_counter() - started:.1f} s "
            f"({db_path.stat().st_size / 2**20:.0f} MiB database)"
        )
        db = connect(db_path, read_only=True)
        median, worst = timed(lambda: render_rollout_page(db, "big-2000"), args.runs)
        rows.append(
            (
                "rollout page, 2,000 spans: server render (median)",
                f"{median:.0f} ms",
                f"max {worst:.0f} ms",
            )
        )
        html = build_report(db, "report-500")
        rows.append(
            (
                "report of a 500-span rollout",
                f"{len(html.encode()) / 1024:.0f} KB",
                "250 chat calls resending their whole history",
            )
        )
        report_ms, _ = timed(lambda: build_report(db, "report-500"), max(args.runs // 4, 3))
        rows.append(("report of a 500-span rollout: build time", f"{report_ms:.0f} ms", ""))
        for sort in ("created", "calls", "reward"):
            ms, _ = timed(lambda s=sort: dashboard.browse_rollouts(db, sort=s, limit=50), 5)
            rows.append(
                (
                    f"rollouts list, {args.rollouts:,} rollouts, sort by {sort}: first page",
                    f"{ms:.0f} ms",
                    "median of 5",
                )
            )
        page1 = dashboard.browse_rollouts(db, sort="calls", limit=50)
        ms, _ = timed(
            lambda: dashboard.browse_rollouts(db, sort="calls", cursor=page1.next_cursor, limit=50),
            5,
        )
        rows.append(
            (
                f"rollouts list, {args.rollouts:,} rollouts, sort by calls: next page",
                f"{ms:.0f} ms",
                "keyset cursor",
            )
        )
        db.close()
        with Server(db_path) as server:
            with httpx.Client(base_url=server.base, timeout=60) as client:
                http_ms, _ = timed(
                    lambda: client.get("/ui/rollouts/big-2000").raise_for_status(), args.runs
                )
                size = len(client.get("/ui/rollouts/big-2000").content)
            rows.append(
                (
                    "rollout page, 2,000 spans: HTTP GET (median)",
                    f"{http_ms:.0f} ms",
                    f"{size / 1024:.0f} KB of HTML",
                )
            )
            total, parts = page_weight(server.base, "/ui/")
            rows.append(
                (
                    "overview page weight (HTML + CSS + JS)",
                    f"{total / 1024:.0f} KB",
                    ", ".join(f"{p.rsplit('/', 1)[-1] or 'html'} {s / 1024:.0f}" for p, s in parts),
                )
            )
            browser_ms = browser_time(server.base, "/ui/rollouts/big-2000", 5)
            rows.append((
                "rollout page, 2,000 spans: usable in the browser",
                f"{browser_ms:.0f} ms" if browser_ms is not None else "not measured",
                "Chromium: navigation to load event with all 2,000 rows in the DOM" if browser_ms is not None else f"no browser at {CHROMIUM}",
            ))  # fmt: skip
    # The machine is shared: say how busy it was, or a slow number reads as a slow page.
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    notes.append(f"load average at the end (1, 5, 15 min) on {os.cpu_count()} cores: {load}")
    lines = ["| measure | value | budget | notes |", "|---|---|---|---|"]
    for name, value, note in rows:
        unit, limit = BUDGETS.get(name, ("", None))
        budget = f"< {limit:g} {unit}" if limit is not None else ""
        lines.append(f"| {name} | {value} | {budget} | {note} |")
    table = "\n".join(lines)
    print(table)
    for note in notes:
        print(note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Dashboard and report (bench/ui.py)\n\n"
        + f"`python bench/ui.py --rollouts {args.rollouts} --runs {args.runs}`, "
        + time.strftime("%Y-%m-%d")
        + f", {os.cpu_count()} cores shared with other work.\n\n"
        + table
        + "\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n"
    )


if __name__ == "__main__":
    main()
