"""Stored and reflected XSS in a real Chromium: markup planted everywhere an agent, an upstream
or an API client can write text shows as text on every page, the live tail and the report.

Planted: the rollout's agent, tags, metadata and input; messages, tool names, arguments and
results; the upstream's reply and model; an agent span's name, error and attributes; a reward's
name, comment, dimensions, judge source, rationale, criteria and evidence; query parameters.
Needs Debian's `chromium` (installed by `.ci/run`); without it these tests fail, not skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from playwright.sync_api import Browser, Page, sync_playwright
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
# Each way in: an attribute, an element, a script, an SVG handler, a `javascript:` link.
PLANTED = (
    '"\'><img src=x id=pwn onerror="window.__xss=1"></script><script>window.__xss=2</script>'
    "<svg onload=window.__xss=3>javascript:window.__xss=4"
)
ROLLOUT = "xss-1"


def kv(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def plant(gateway: GatewayThread, fake_provider_server: FakeProviderThread) -> None:
    """Record the markup through every way in: the API, calls, the upstream, OTLP, rewards."""
    base = gateway.base
    created = httpx.post(
        f"{base}/api/rollouts",
        json={
            "id": ROLLOUT,
            "agent": PLANTED[:256],
            "tags": [PLANTED],
            "metadata": {PLANTED: PLANTED},
            "input": PLANTED,
        },
    )
    assert created.status_code == 201, created.text
    messages = [
        {"role": "system", "content": PLANTED},
        {"role": "user", "content": PLANTED},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": PLANTED,
                    "type": "function",
                    "function": {"name": PLANTED, "arguments": PLANTED},
                }
            ],
        },
        {"role": "tool", "tool_call_id": PLANTED, "name": PLANTED, "content": PLANTED},
        {"role": "user", "content": [{"type": "text", "text": PLANTED}]},
    ]
    sent = httpx.post(
        f"{gateway.url(ROLLOUT)}/chat/completions",
        json={"model": "gpt-test", "messages": messages},
        timeout=20,
    )
    assert sent.status_code == 200, sent.text
    reply = {
        "id": "x",
        "object": "chat.completion",
        "model": PLANTED,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": PLANTED,
                    "tool_calls": [
                        {
                            "id": PLANTED,
                            "type": "function",
                            "function": {"name": PLANTED, "arguments": PLANTED},
                        }
                    ],
                },
                "finish_reason": PLANTED,
            }
        ],
    }
    fake_provider_server.state.add_fault(status=200, body=orjson.dumps(reply).decode())
    sent = httpx.post(
        f"{gateway.url(ROLLOUT)}/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "again"}]},
        timeout=20,
    )
    assert sent.status_code == 200
    fake_provider_server.state.add_fault(
        status=400, message=PLANTED, error_type=PLANTED, code=PLANTED
    )
    failed = httpx.post(
        f"{gateway.url(ROLLOUT)}/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "fail"}]},
        timeout=20,
    )
    assert failed.status_code == 400
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "aaa91f3b8ff4e0b9",
        "name": PLANTED,
        "kind": 1,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000001000000000",
        "status": {"code": 2, "message": PLANTED},
        "attributes": [
            kv("rollout.id", ROLLOUT),
            kv("gen_ai.operation.name", "execute_tool"),
            kv("gen_ai.tool.name", PLANTED),
            kv("gen_ai.request.model", PLANTED),
            kv("error.type", PLANTED),
            kv(PLANTED, PLANTED),
        ],
    }
    ingest = httpx.post(
        f"{base}/v1/traces",
        json={"resourceSpans": [{"scopeSpans": [{"scope": {"name": PLANTED}, "spans": [span]}]}]},
    )
    assert ingest.status_code == 200, ingest.text
    gateway.flush()
    some_span = gateway.spans(rollout_id=ROLLOUT)[0]["span_id"]
    reward = httpx.post(
        f"{base}/api/rewards",
        json={
            "rollout_id": ROLLOUT,
            "span_id": some_span,
            "name": PLANTED[:128],
            "value": 0.5,
            "final": True,
            "comment": PLANTED,
            "dimensions": {PLANTED: 0.5},
            "source": ("judge:" + PLANTED)[:128],
            "details": {
                "rationale": PLANTED,
                "criteria": [
                    {
                        "name": PLANTED,
                        "score": 0.5,
                        "explanation": PLANTED,
                        "evidence": [PLANTED, some_span],
                    },
                    {"name": PLANTED, "score": PLANTED},
                ],
            },
            "tags": [PLANTED],
        },
    )
    assert reward.status_code == 201, reward.text
    plain = httpx.post(
        f"{base}/api/rewards", json={"rollout_id": ROLLOUT, "value": 0.2, "comment": PLANTED}
    )
    assert plain.status_code == 201
    gateway.flush()


@pytest.fixture(scope="module")
def planted(
    fake_provider_server: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayThread]:
    fake_provider_server.state.reset()
    settings = gateway_settings(fake_provider_server.url)
    gateway = GatewayThread(settings, tmp_path_factory.mktemp("xss") / "spangate.db").start()
    try:
        plant(gateway, fake_provider_server)
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no browser at {CHROMIUM}: install Debian's chromium (`apt-get install chromium`, "
            "as .ci/run does) or point SPANGATE_CHROMIUM at one"
        )
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.dismiss())
    yield page
    context.close()


def assert_inert(page: Page, where: str) -> None:
    assert page.evaluate("window.__xss") is None, f"script ran on {where}"
    assert page.locator("#pwn").count() == 0, f"an element was injected on {where}"
    assert page.locator("svg[onload]").count() == 0, f"an element was injected on {where}"
    assert page.locator("a[href^='javascript:']").count() == 0, f"a javascript: link on {where}"


def test_no_page_injects_what_was_recorded(planted: GatewayThread, page: Page) -> None:
    base = planted.base
    spans = [s["span_id"] for s in planted.spans(rollout_id=ROLLOUT)]
    assert len(spans) >= 3
    paths = [
        "/ui/",
        "/ui/rollouts",
        f"/ui/rollouts/{ROLLOUT}",
        *(f"/ui/spans/{s}" for s in spans),
        "/ui/leaderboard",
        "/ui/patterns",
        "/ui/experiments",
    ]
    for path in paths:
        response = page.goto(base + path)
        assert response is not None and response.status == 200, path
        assert_inert(page, path)
    # The planted text is on the rollout page, as text.
    page.goto(f"{base}/ui/rollouts/{ROLLOUT}")
    assert PLANTED[:40] in page.inner_text("body")


def test_reflected_query_parameters_are_inert(planted: GatewayThread, page: Page) -> None:
    query = httpx.QueryParams(
        {"agent": PLANTED, "tag": PLANTED, "model": PLANTED, "q": PLANTED, "since": PLANTED}
    )
    for path in (
        f"/ui/rollouts?{query}",
        f"/ui/leaderboard?{query}",
        f"/ui/patterns?{query}",
        f"/ui/live?{httpx.QueryParams({'rollout': PLANTED, 'agent': PLANTED})}",
        f"/ui/spans/{httpx.URL(PLANTED)}",
    ):
        page.goto(planted.base + path)
        assert_inert(page, path)


def test_the_live_tail_shows_a_new_call_as_text(planted: GatewayThread, page: Page) -> None:
    page.goto(f"{planted.base}/ui/live?rollout={ROLLOUT}")
    wait_until(lambda: page.locator(".live-dot.on").count() > 0, timeout=10, what="stream open")
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "aaa91f3b8ff4e0c9",
        "name": PLANTED,
        "kind": 1,
        "startTimeUnixNano": "1700000002000000000",
        "endTimeUnixNano": "1700000003000000000",
        "status": {"code": 2, "message": PLANTED},
        "attributes": [kv("rollout.id", ROLLOUT)],
    }
    httpx.post(
        f"{planted.base}/v1/traces",
        json={"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]},
    )
    wait_until(
        lambda: page.locator("#tail tbody tr").count() > 0, timeout=10, what="a row in the tail"
    )
    assert PLANTED[:20] in page.inner_text("#tail")
    assert_inert(page, "/ui/live")


def test_the_report_opened_from_a_file_runs_nothing_planted(
    planted: GatewayThread, page: Page, tmp_path: Path
) -> None:
    report = httpx.get(f"{planted.base}/api/rollouts/{ROLLOUT}/report", timeout=30)
    assert report.status_code == 200
    path = tmp_path / "report.html"
    path.write_text(report.text, encoding="utf-8")
    page.goto(path.as_uri())
    assert_inert(page, "the report")
    assert PLANTED[:40] in page.inner_text("body")
