"""The dashboard and the report in a real Chromium, over rollouts recorded through the gateway.

Calls go through the real `openai` SDK (plain, streamed, a tool round trip, an error), rewards
and the rules judge through the API; then the pages are driven as a person would.
Needs Debian's `chromium` (installed by `.ci/run`); without it these tests fail, not skip.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from playwright.sync_api import Browser, Page, Playwright, sync_playwright
from servers import GatewayThread, wait_until

CHROMIUM = os.environ.get("SPANGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Set SPANGATE_SCREENSHOTS=docs/screenshots to refresh the README's pictures.
SCREENSHOTS = os.environ.get("SPANGATE_SCREENSHOTS")
LIVE_DEADLINE_S = 2.0
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_RESULT = '{"city": "Paris", "temp_c": 18, "sky": "light rain"}'
READ_KEY = "sk-gw-reader-0123456789"
PROXY_KEY = "sk-gw-agent-0123456789"


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no browser at {CHROMIUM}: install Debian's chromium (`apt-get install chromium`, "
            "as .ci/run does) or point SPANGATE_CHROMIUM at one"
        )
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    browser = playwright_driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def client(gateway: GatewayThread, rollout: str, attempt: str = "a1") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.url(rollout, attempt),
        api_key="sk-client",
        max_retries=0,
        default_headers={"X-Agent-Id": "weather-bot"},
    )


def ask(gateway: GatewayThread, rollout: str, text: str) -> None:
    with client(gateway, rollout) as c:
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": text}])


def tool_round_trip(gateway: GatewayThread, rollout: str) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    with client(gateway, rollout) as c:
        first = c.chat.completions.create(model="gpt-test", messages=messages, tools=[WEATHER_TOOL])
        call = first.choices[0].message.tool_calls[0]
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT})
        c.chat.completions.create(model="gpt-test", messages=messages, tools=[WEATHER_TOOL])


def snap(page: Page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=False)


class Recorded:
    def __init__(self, gateway: GatewayThread) -> None:
        self.gateway = gateway
        self.api = httpx.Client(base_url=gateway.base, timeout=30)

    def spans(self, rollout: str) -> list[dict[str, Any]]:
        return self.gateway.spans(rollout_id=rollout)


@pytest.fixture(scope="module")
def recorded(
    fake_provider_server: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Recorded]:
    """A gateway holding: a plain call, a streamed one, a tool round trip and an error,
    rewards on two rollouts and a rules-judge verdict on each."""
    fake_provider_server.state.reset()
    settings = gateway_settings(fake_provider_server.url)
    gateway = GatewayThread(settings, tmp_path_factory.mktemp("ui") / "spangate.db").start()
    rec = Recorded(gateway)
    try:
        ask(gateway, "ui-plain", "What is 2 + 2?")
        with client(gateway, "ui-stream") as c:
            stream = c.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "Count to five, slowly."}],
                stream=True,
                stream_options={"include_usage": True},
            )
            assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        tool_round_trip(gateway, "ui-tools")
        fake_provider_server.state.add_fault(status=400, message="Unsupported value: 'tempo'.")
        with pytest.raises(openai.BadRequestError), client(gateway, "ui-tools") as c:
            c.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "Summarise."}]
            )
        gateway.flush()
        for rollout, value, status in (
            ("ui-plain", 1.0, "succeeded"),
            ("ui-tools", 0.25, "failed"),
        ):
            r = rec.api.post(
                f"/api/rollouts/{rollout}/rewards",
                json={"value": value, "final": True, "comment": f"graded {rollout}"},
            )
            assert r.status_code == 201, r.text
            r = rec.api.patch(f"/api/rollouts/{rollout}", json={"status": status})
            assert r.status_code == 200, r.text
        run = rec.api.post(
            "/api/judge/runs", json={"judge": "rules", "rollout_ids": ["ui-plain", "ui-tools"]}
        )
        assert run.status_code == 202, run.text
        run_id = run.json()["id"]
        wait_until(
            lambda: rec.api.get(f"/api/judge/runs/{run_id}").json()["status"] != "running",
            timeout=30,
            what="the rules judge",
        )
        assert rec.api.get(f"/api/judge/runs/{run_id}").json()["judged"] == 2
        yield rec
    finally:
        rec.api.close()
        gateway.stop()


def test_the_overview_shows_the_calls(recorded: Recorded, page: Page) -> None:
    calls = [
        s
        for rollout in ("ui-plain", "ui-stream", "ui-tools")
        for s in recorded.spans(rollout)
        if s["operation"] != "execute_tool"
    ]
    page.goto(f"{recorded.gateway.base}/ui/")
    assert page.locator("[data-testid=calls]").inner_text() == str(len(calls))
    # uPlot drew the four time series.
    wait_until(lambda: page.locator(".uplot canvas").count() >= 4, what="the charts")
    assert page.locator("#rollout-table").get_by_text("ui-tools").count() == 1
    snap(page, "overview")


def test_the_rollouts_page_filters_by_status(recorded: Recorded, page: Page) -> None:
    page.goto(f"{recorded.gateway.base}/ui/rollouts")
    table = page.locator("#rollout-table")
    for rollout in ("ui-plain", "ui-stream", "ui-tools"):
        assert table.get_by_text(rollout, exact=True).count() == 1
    page.select_option("select[name=status]", "failed")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/ui/rollouts?*status=failed*")
    wait_until(
        lambda: page.locator("#rollout-table [data-rollout-id]").count() == 1,
        what="the filtered table",
    )
    assert page.locator("#rollout-table [data-rollout-id]").get_attribute("data-rollout-id") == (
        "ui-tools"
    )
    snap(page, "rollouts")
    # The URL is the view: opening it fresh shows the same rows.
    page.goto(page.url)
    assert page.locator("#rollout-table [data-rollout-id]").count() == 1


def test_the_rollout_page_shows_every_span_the_tool_the_error_and_the_reward(
    recorded: Recorded, page: Page
) -> None:
    spans = recorded.spans("ui-tools")
    assert {s["operation"] for s in spans} == {"chat", "execute_tool"}
    page.goto(f"{recorded.gateway.base}/ui/rollouts/ui-tools")
    rows = page.locator(".wf-row[data-span-id]")
    assert rows.count() == len(spans)
    shown = [rows.nth(i).get_attribute("data-span-id") for i in range(rows.count())]
    assert shown == [s["span_id"] for s in spans]
    assert page.locator(".wf-row.tool").count() == 1
    assert "execute_tool get_weather" in page.locator(".wf-row.tool").inner_text()
    failed = page.locator(".wf-row.failed")
    assert failed.count() == 1
    assert "invalid_request_error" in failed.inner_text() or "400" in failed.inner_text()
    rewards = page.locator("table.rewards")
    assert "0.25" in rewards.inner_text() and "graded ui-tools" in rewards.inner_text()
    verdict = page.locator(".verdict")
    assert "judge:rules" in verdict.inner_text()
    assert "error_handling" in verdict.inner_text()
    snap(page, "rollout")


def test_clicking_the_tool_span_shows_its_arguments_and_result(
    recorded: Recorded, page: Page
) -> None:
    page.goto(f"{recorded.gateway.base}/ui/rollouts/ui-tools")
    page.locator(".wf-row.tool a").first.click()
    page.wait_for_url("**/ui/spans/*")
    assert '"city"' in page.locator("#conversation .toolcall .args").inner_text()
    assert "get_weather" in page.locator("#conversation .toolcall").inner_text()
    assert "light rain" in page.locator("#reply").inner_text()
    # From there, back to the rollout.
    assert page.locator("a[href='/ui/rollouts/ui-tools']").count() >= 1
    # And the model call that asked for the tool shows the conversation as messages.
    tool = next(s for s in recorded.spans("ui-tools") if s["operation"] == "execute_tool")
    page.goto(f"{recorded.gateway.base}/ui/spans/{tool['parent_span_id']}")
    assert page.locator("#conversation .msg.system").count() == 1
    assert "get_weather" in page.locator("#reply .toolcall").inner_text()
    page.locator("details summary", has_text="request JSON").click()
    assert '"messages"' in page.locator("#raw-request").inner_text()
    snap(page, "span")


def test_a_call_made_while_the_rollout_page_is_open_appears_without_reload(
    recorded: Recorded, page: Page
) -> None:
    gateway = recorded.gateway
    ask(gateway, "ui-live", "first")
    gateway.flush()
    page.goto(f"{gateway.base}/ui/rollouts/ui-live")
    assert page.locator(".wf-row[data-span-id]").count() == 1
    wait_until(lambda: page.locator("[data-live-dot].on").count(), what="the span stream")
    marker = page.evaluate("window.__marker = Math.random()")
    ask(gateway, "ui-live", "second")
    answered = time.monotonic()
    # The page's CSP forbids eval, so the wait polls from here rather than in the page.
    wait_until(
        lambda: page.locator(".wf-row[data-span-id]").count() == 2,
        timeout=LIVE_DEADLINE_S,
        interval=0.02,
        what="the new span on the open page",
    )
    elapsed = time.monotonic() - answered
    assert elapsed < LIVE_DEADLINE_S
    assert page.evaluate("window.__marker") == marker, "the page was reloaded"
    assert page.locator("[data-testid=calls]").inner_text() == "2"


def test_the_live_tail_shows_calls_as_they_land(recorded: Recorded, page: Page) -> None:
    gateway = recorded.gateway
    page.goto(f"{gateway.base}/ui/live?rollout=ui-tail")
    wait_until(lambda: page.locator("[data-live-dot].on").count(), what="the span stream")
    ask(gateway, "ui-tail", "hello tail")
    wait_until(
        lambda: page.locator("#tail tbody tr").count() == 1,
        timeout=1.0,
        interval=0.02,
        what="the call in the tail",
    )
    assert "ui-tail" in page.locator("#tail tbody tr").inner_text()
    snap(page, "live")


def test_leaderboard_and_patterns_pages_render(recorded: Recorded, page: Page) -> None:
    page.goto(f"{recorded.gateway.base}/ui/leaderboard")
    board = page.locator("table[data-board=agent]")
    assert "weather-bot" in board.inner_text()
    assert page.locator("svg.whisker").count() >= 1
    snap(page, "leaderboard")
    page.goto(f"{recorded.gateway.base}/ui/patterns")
    assert page.locator("h2", has_text="Success patterns").count() == 1
    snap(page, "patterns")


def test_the_report_opens_from_a_file_with_the_network_off(
    recorded: Recorded, browser: Browser, tmp_path: Path
) -> None:
    response = recorded.api.get("/api/rollouts/ui-tools/report")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    report = tmp_path / "report.html"
    report.write_bytes(response.content)
    context = browser.new_context(offline=True)
    asked: list[str] = []

    def refuse(route: Any) -> None:
        if not route.request.url.startswith("file://"):
            asked.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    context.route("**/*", refuse)
    page = context.new_page()
    try:
        page.goto(report.as_uri())
        spans = recorded.spans("ui-tools")
        sections = page.locator("section.report-span")
        assert [sections.nth(i).get_attribute("data-span-id") for i in range(sections.count())] == [
            s["span_id"] for s in spans
        ]
        assert page.locator(".wf-row[data-span-id]").count() == len(spans)
        assert "light rain" in page.locator("section.report-span").nth(1).inner_text()
        assert "0.25" in page.locator("table.rewards").inner_text()
        # Times were rewritten by the inline script (no "UTC" suffix left).
        assert "UTC" not in page.locator("section.report-span time").first.inner_text()
        snap(page, "report")
    finally:
        context.close()
    assert asked == []


@pytest.fixture(scope="module")
def keyed_gateway(
    fake_provider_server: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayThread]:
    settings = gateway_settings(
        fake_provider_server.url,
        auth={
            "keys": [
                {"key": READ_KEY, "name": "dashboard", "scopes": ["read"]},
                {"key": PROXY_KEY, "name": "agents", "scopes": ["proxy"]},
            ]
        },
    )
    gateway = GatewayThread(settings, tmp_path_factory.mktemp("ui-auth") / "spangate.db").start()
    with openai.OpenAI(base_url=gateway.url("ui-keyed"), api_key=PROXY_KEY, max_retries=0) as c:
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    gateway.flush()
    yield gateway
    gateway.stop()


def test_sign_in_refuses_a_proxy_key_and_accepts_a_read_key(
    keyed_gateway: GatewayThread, page: Page
) -> None:
    page.goto(f"{keyed_gateway.base}/ui/rollouts/ui-keyed")
    page.wait_for_url("**/ui/login?*")
    page.fill("input[name=key]", PROXY_KEY)
    page.click("form.login button[type=submit]")
    assert "read" in page.locator("[role=alert]").inner_text()
    assert page.context.cookies() == []
    snap(page, "sign-in")
    page.fill("input[name=key]", READ_KEY)
    page.click("form.login button[type=submit]")
    page.wait_for_url("**/ui/rollouts/ui-keyed")
    assert page.locator(".wf-row[data-span-id]").count() == 1
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    # Scripts cannot read it, and it works for the API reads the pages make, not for writes.
    assert page.evaluate("document.cookie") == ""
    status = page.evaluate("fetch('/api/stats').then(r => r.status)")
    assert status == 200
    refused = page.evaluate(
        "fetch('/api/rollouts', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: '{}'}).then(r => r.status)"
    )
    assert refused == 401
