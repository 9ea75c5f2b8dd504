"""The `/ui` pages and the report over HTTP (no browser): status codes, HTML errors, the
security headers, and which requests the sign-in cookie may and may not authorise."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from servers import GatewayThread

from gateway.cli.main import cli

READ_KEY = "sk-gw-read-abcdefghij"
PROXY_KEY = "sk-gw-proxy-abcdefghij"
KEYS = {
    "keys": [
        {"key": READ_KEY, "name": "me", "scopes": ["read"]},
        {"key": PROXY_KEY, "name": "agents", "scopes": ["proxy"]},
    ]
}
PAGES = (
    "/ui/",
    "/ui/rollouts",
    "/ui/rollouts?status=running&sort=cost&dir=asc",
    "/ui/rollouts/r-ui",
    "/ui/leaderboard",
    "/ui/patterns",
    "/ui/live?rollout=r-ui",
)


def call(gateway: GatewayThread, rollout: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{gateway.url(rollout)}/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "hello"}]},
        headers=headers,
        timeout=10,
    )


@pytest.fixture
def open_gateway(gateway: GatewayThread) -> GatewayThread:
    assert call(gateway, "r-ui").status_code == 200
    gateway.flush()
    return gateway


@pytest.fixture
def keyed(make_gateway: Callable[..., GatewayThread]) -> Iterator[httpx.Client]:
    gateway = make_gateway(auth=KEYS)
    assert call(gateway, "r-ui", PROXY_KEY).status_code == 200
    gateway.flush()
    with httpx.Client(base_url=gateway.base, timeout=10) as client:
        yield client


@pytest.mark.parametrize("path", PAGES)
def test_every_page_renders_with_its_security_headers(
    open_gateway: GatewayThread, path: str
) -> None:
    response = httpx.get(open_gateway.base + path, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    # Everything the page loads comes from this gateway.
    assert not re.search(r'(src|href)="(https?:)?//', response.text)


def test_an_htmx_request_gets_the_page_without_its_frame(open_gateway: GatewayThread) -> None:
    response = httpx.get(
        open_gateway.base + "/ui/rollouts/r-ui", headers={"HX-Request": "true"}, timeout=10
    )
    assert response.status_code == 200
    assert "<html" not in response.text and 'id="live"' in response.text


def test_an_unknown_rollout_or_span_is_an_html_404(open_gateway: GatewayThread) -> None:
    for path in ("/ui/rollouts/nope", "/ui/spans/0123456789abcdef"):
        response = httpx.get(open_gateway.base + path, timeout=10)
        assert response.status_code == 404
        assert response.headers["Content-Type"].startswith("text/html")
        assert "not found" in response.text


def test_a_bad_cursor_or_time_is_shown_on_the_page(open_gateway: GatewayThread) -> None:
    for query in ("cursor=garbage", "since=yesterday-ish"):
        response = httpx.get(f"{open_gateway.base}/ui/rollouts?{query}", timeout=10)
        assert response.status_code == 200
        assert 'class="notice"' in response.text


def test_the_static_files_ship_with_their_licenses(open_gateway: GatewayThread) -> None:
    for name in ("ui.css", "ui.js", "vendor/htmx-2.0.8.min.js", "vendor/LICENSE.uplot"):
        response = httpx.get(f"{open_gateway.base}/ui/static/{name}", timeout=10)
        assert response.status_code == 200, name


def test_the_report_is_one_html_file_that_fetches_nothing(open_gateway: GatewayThread) -> None:
    response = httpx.get(f"{open_gateway.base}/api/rollouts/r-ui/report", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    html = response.text
    assert 'data-span-id="' in html and "hello" in html
    assert not re.search(r"<(link|img|iframe)\b|<script[^>]*\bsrc=", html)
    missing = httpx.get(f"{open_gateway.base}/api/rollouts/nope/report", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


def test_spangate_report_writes_the_same_file(open_gateway: GatewayThread, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["report", "r-ui", "-o", str(out), "--db", str(open_gateway.db_path)]
    )
    assert result.exit_code == 0, result.output
    assert 'data-span-id="' in out.read_text() and "wrote" in result.output
    missing = runner.invoke(cli, ["report", "nope", "--db", str(open_gateway.db_path)])
    assert missing.exit_code == 1 and "rollout nope not found" in missing.output


def test_without_a_key_a_page_sends_you_to_sign_in(keyed: httpx.Client) -> None:
    response = keyed.get("/ui/rollouts?status=running")
    assert response.status_code == 303
    assert response.headers["Location"] == "/ui/login?next=%2Fui%2Frollouts%3Fstatus%3Drunning"
    assert keyed.get("/ui/login").status_code == 200
    assert keyed.get("/ui/static/ui.css").status_code == 200
    # The API still answers in its own JSON shape.
    assert keyed.get("/api/stats").status_code == 401


def test_sign_in_sets_a_strict_httponly_cookie_for_a_read_key(keyed: httpx.Client) -> None:
    response = keyed.post("/ui/login", data={"key": READ_KEY, "next": "/ui/rollouts/r-ui"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/ui/rollouts/r-ui"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("spangate_key=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert keyed.get("/ui/rollouts/r-ui").status_code == 200
    assert keyed.get("/api/stats").status_code == 200


def test_a_proxy_key_or_a_wrong_key_gets_no_cookie(keyed: httpx.Client) -> None:
    refused = keyed.post("/ui/login", data={"key": PROXY_KEY})
    assert refused.status_code == 403 and "set-cookie" not in refused.headers
    assert "read" in refused.text
    wrong = keyed.post("/ui/login", data={"key": "sk-nope"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    # A proxy key sent as a header does not open the pages either.
    page = keyed.get("/ui/", headers={"Authorization": f"Bearer {PROXY_KEY}"})
    assert page.status_code == 403


def test_the_cookie_never_authorises_a_write_or_a_model_call(keyed: httpx.Client) -> None:
    keyed.cookies.set("spangate_key", READ_KEY)
    assert keyed.get("/api/rollouts").status_code == 200
    assert keyed.post("/api/rollouts", json={}).status_code == 401
    chat = keyed.post(
        "/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
    )
    assert chat.status_code == 401


def test_sign_in_only_returns_to_a_dashboard_page(keyed: httpx.Client) -> None:
    for target in ("https://example.com/", "//example.com/ui", "/api/stats"):
        response = keyed.post("/ui/login", data={"key": READ_KEY, "next": target})
        assert response.headers["Location"] == "/ui/"


def test_sign_out_clears_the_cookie(keyed: httpx.Client) -> None:
    keyed.post("/ui/login", data={"key": READ_KEY})
    response = keyed.post("/ui/logout")
    assert response.status_code == 303
    assert (
        'spangate_key=""' in response.headers["Set-Cookie"]
        or "Max-Age=0" in (response.headers["Set-Cookie"])
    )
    assert keyed.get("/ui/").status_code == 303
