"""The `/ui` pages and the report over HTTP (no browser): status codes, HTML errors, the
security headers, and which requests the sign-in cookie may and may not authorise."""

from __future__ import annotations

import re
import socket
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


def raw_get(client: httpx.Client, path: str) -> bytes:
    """GET these exact path bytes (httpx would resolve dot segments first)."""
    port = client.base_url.port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


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


def test_the_static_files_ship_with_their_licenses_and_are_never_sniffed(
    open_gateway: GatewayThread,
) -> None:
    for name in ("ui.css", "ui.js", "vendor/htmx-2.0.8.min.js", "vendor/LICENSE.uplot"):
        response = httpx.get(f"{open_gateway.base}/ui/static/{name}", timeout=10)
        assert response.status_code == 200, name
        assert response.headers["X-Content-Type-Options"] == "nosniff", name


def test_the_report_is_one_html_file_that_fetches_nothing(open_gateway: GatewayThread) -> None:
    response = httpx.get(f"{open_gateway.base}/api/rollouts/r-ui/report", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    # Every message of the rollout: no cache keeps a copy.
    assert response.headers["Cache-Control"] == "no-store"
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
    for method, path, body in (
        ("POST", "/api/rewards", {"rollout_id": "r-ui", "value": 1}),
        ("PATCH", "/api/rollouts/r-ui", {"status": "succeeded"}),
        ("POST", "/api/proxy/pause", {}),
        ("POST", "/api/models", {}),
    ):
        response = keyed.request(method, path, json=body)
        assert response.status_code == 401, (method, path, response.status_code)
    chat = keyed.post(
        "/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
    )
    assert chat.status_code == 401


def test_sign_in_only_returns_to_a_dashboard_page(keyed: httpx.Client) -> None:
    for target in (
        "https://example.com/",
        "//example.com/ui",
        "/api/stats",
        "/\\example.com",
        "\\\\example.com",
        "javascript:alert(1)",
        " https://example.com",
    ):
        response = keyed.post("/ui/login", data={"key": READ_KEY, "next": target})
        assert response.headers["Location"] == "/ui/", target
    form = keyed.get("/ui/login", params={"next": '"><script>x</script>'})
    assert "<script>x" not in form.text


def test_sign_in_whose_next_holds_a_control_character_returns_to_the_overview(
    keyed: httpx.Client,
) -> None:
    """`/ui/login?next=/ui%0A` puts the newline into the form; signing in put it into
    `Location`, which aiohttp refused after the page returned: no answer at all."""
    for target in ("/ui/\r\nSet-Cookie: x=y", "/ui/\n", "/ui/\x00", "/ui/\x7f"):
        response = keyed.post("/ui/login", data={"key": READ_KEY, "next": target})
        assert response.status_code == 303, repr(target)
        assert response.headers["Location"] == "/ui/"
        assert response.headers.get_list("Set-Cookie")[0].startswith("spangate_key=")
        assert "x=y" not in response.headers.get_list("Set-Cookie")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xff\xfe=1", "application/x-www-form-urlencoded"),
        (b"key=a", "application/x-www-form-urlencoded; charset=no-such-charset"),
        (b"not a multipart body", "multipart/form-data; boundary=zz"),
        (
            b"--zz\r\nContent-Disposition: form-data; name=key\r\n"
            b"Content-Transfer-Encoding: odd\r\n\r\nabc\r\n--zz--\r\n",
            "multipart/form-data; boundary=zz",
        ),
    ],
    ids=["not-utf8", "unknown-charset", "broken-multipart", "unknown-transfer-encoding"],
)
def test_a_sign_in_form_that_cannot_be_read_is_a_400_page(
    keyed: httpx.Client, body: bytes, content_type: str
) -> None:
    """aiohttp raises on each of these while reading the form: they were 500s."""
    response = keyed.post("/ui/login", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 400, (response.status_code, response.text[:200])
    assert response.headers["Content-Type"].startswith("text/html")
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "same-site", "Origin": "https://sub.evil.example"},
    ],
    ids=["cross-site", "fetch-metadata-only", "origin-only", "opaque-origin", "same-site"],
)
def test_a_form_on_another_site_can_neither_sign_in_nor_out(
    keyed: httpx.Client, headers: dict[str, str]
) -> None:
    """Login CSRF: another site's auto-submitting form posted its own read key, the gateway
    set the cookie (a top-level navigation: SameSite=Strict does not stop a Set-Cookie), and
    the victim browsed the other site's gateway identity."""
    signed_in = keyed.post("/ui/login", data={"key": READ_KEY, "next": "/ui/"}, headers=headers)
    assert signed_in.status_code == 403
    assert "set-cookie" not in signed_in.headers
    assert signed_in.headers["Content-Type"].startswith("text/html")
    keyed.cookies.set("spangate_key", READ_KEY)
    signed_out = keyed.post("/ui/logout", headers=headers)
    assert signed_out.status_code == 403 and "set-cookie" not in signed_out.headers


def test_a_form_on_the_gateway_own_pages_signs_in(keyed: httpx.Client) -> None:
    own = f"http://{keyed.base_url.netloc.decode()}"
    for headers in (
        {"Sec-Fetch-Site": "same-origin", "Origin": own},
        {"Origin": own},
        # Behind a proxy that names the browser's host rather than passing it on.
        {"Origin": "https://spangate.example", "X-Forwarded-Host": "spangate.example"},
        {"Origin": "https://spangate.example", "Forwarded": "proto=https;host=spangate.example"},
        # A browser that sends neither (curl, an old one): nothing says it is another site.
        {},
    ):
        response = keyed.post("/ui/login", data={"key": READ_KEY}, headers=headers)
        assert response.status_code == 303, headers


def test_the_cookie_is_secure_behind_an_https_proxy(keyed: httpx.Client) -> None:
    """The README: `Secure` "when served over HTTPS"; spangate has no TLS listener of its
    own, so HTTPS means a proxy in front, which says so in these headers."""
    for header in (
        {"X-Forwarded-Proto": "https"},
        {"Forwarded": "proto=https"},
        {"Forwarded": 'for=1.2.3.4;proto="https", for=10.0.0.1;proto=http'},
    ):
        response = keyed.post("/ui/login", data={"key": READ_KEY}, headers=header)
        assert response.status_code == 303
        assert "Secure" in response.headers["Set-Cookie"], header
    plain = keyed.post("/ui/login", data={"key": READ_KEY})
    assert "Secure" not in plain.headers["Set-Cookie"]


def test_sign_out_clears_the_cookie(keyed: httpx.Client) -> None:
    keyed.post("/ui/login", data={"key": READ_KEY})
    response = keyed.post("/ui/logout")
    assert response.status_code == 303
    assert (
        'spangate_key=""' in response.headers["Set-Cookie"]
        or "Max-Age=0" in (response.headers["Set-Cookie"])
    )
    assert keyed.get("/ui/").status_code == 303


def test_nothing_recorded_is_served_without_a_read_key(keyed: httpx.Client) -> None:
    proxy_cookie = {"Cookie": f"spangate_key={PROXY_KEY}"}
    for path in (
        "/ui",
        "/ui/",
        "/ui/rollouts/r-ui",
        "/ui/live",
        "/ui/leaderboard",
        "/ui/patterns",
        "/ui/experiments",
        "/api/rollouts/r-ui/report",
        "/api/rollouts/r-ui",
        "/api/spans",
        "/api/spans/stream",
        "/metrics",
    ):
        for headers in ({}, proxy_cookie, {"Authorization": f"Bearer {PROXY_KEY}"}):
            response = keyed.get(path, headers=headers)
            assert response.status_code in (303, 401, 403), (path, headers, response.status_code)
            assert "hello" not in response.text


def test_dot_segments_under_static_do_not_skip_the_sign_in(keyed: httpx.Client) -> None:
    for path in (
        "/ui/static/../rollouts",
        "/ui/static/%2E%2E/rollouts/r-ui",
        "/ui/static/..%2F..%2Fapi%2Fspans",
        "/ui/static/ui.css/../../rollouts",
    ):
        received = raw_get(keyed, path)
        assert not received.startswith(b"HTTP/1.1 200"), path
        assert b"hello" not in received


@pytest.mark.parametrize(
    "key",
    [
        "sk/AbC+def==",
        "sk,comma-abcdef",
        "sk;semi-abcdef",
        'sk"quote-abcdef',
        "sk\\back-abcdef",
        "sk space-abcdef",
    ],
)
def test_a_key_with_cookie_special_characters_stays_signed_in(
    make_gateway: Callable[..., GatewayThread], key: str
) -> None:
    gateway = make_gateway(auth={"keys": [{"key": key, "name": "odd", "scopes": ["read"]}]})
    signed = httpx.post(gateway.base + "/ui/login", data={"key": key}, timeout=10)
    assert signed.status_code == 303
    # The cookie exactly as a browser sends it back.
    cookie = signed.headers["Set-Cookie"].split(";")[0]
    page = httpx.get(gateway.base + "/ui/rollouts", headers={"Cookie": cookie}, timeout=10)
    assert page.status_code == 200, cookie


def test_a_removed_key_no_longer_opens_the_dashboard_through_its_cookie(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    first = make_gateway(auth=KEYS)
    signed = httpx.post(first.base + "/ui/login", data={"key": READ_KEY}, timeout=10)
    cookie = {"Cookie": signed.headers["Set-Cookie"].split(";")[0]}
    first.stop()
    second = make_gateway(
        auth={"keys": [{"key": "sk-gw-other-abcdefghij", "name": "x", "scopes": ["read"]}]}
    )
    page = httpx.get(second.base + "/ui/rollouts", headers=cookie, timeout=10)
    assert page.status_code == 303 and page.headers["Location"].startswith("/ui/login")
    assert httpx.get(second.base + "/api/rollouts", headers=cookie, timeout=10).status_code == 401
