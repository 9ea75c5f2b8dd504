"""`spangate tail --url`: a running gateway's calls over its API, followed over the event
stream and resumed after a dropped connection; and a closed pipe ends `tail` quietly.

The gateway is real (conftest's, in front of the fake provider) and calls are made with the
openai SDK; the follower runs as its own process and its lines are read with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from servers import GatewayThread
from shapes import CLI_ARGV

from gateway.cli import remote as cli_remote
from gateway.cli.main import BROKEN_PIPE_EXIT, cli
from gateway.cli.remote import Follow, follow_spans, parse_events
from store.schema import SPAN_COLUMNS, connect
from store.span_inserts import insert_spans

# A call made while following must show within this long.
LIVE_LATENCY = 1.0


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def call(gateway: GatewayThread, rollout: str, text: str | None = None) -> None:
    client = openai.OpenAI(base_url=gateway.url(rollout, "a1"), api_key="sk-test", max_retries=0)
    try:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": text or f"hello {rollout}"}]
        )
    finally:
        client.close()


@pytest.fixture
def busy(gateway: GatewayThread) -> GatewayThread:
    """The gateway after three calls, r-1 to r-3, all written."""
    for rollout in ("r-1", "r-2", "r-3"):
        call(gateway, rollout)
    gateway.flush()
    return gateway


# -- without --follow -----------------------------------------------------------------


def test_tail_url_prints_the_same_lines_as_local_tail(busy: GatewayThread) -> None:
    remote = run("tail", "--url", busy.base)
    assert remote.exit_code == 0, remote.output
    lines = remote.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["r-1/a1#1", "r-2/a1#1", "r-3/a1#1"]
    assert lines[0].endswith("echo: hello r-1")
    assert remote.stdout == run("tail", "--db", str(busy.db_path)).stdout


@pytest.mark.parametrize("flags", [["--json"], ["--json", "--bodies"]])
def test_tail_url_json_matches_local_tail(busy: GatewayThread, flags: list[str]) -> None:
    remote = run("tail", "--url", busy.base, *flags)
    assert remote.exit_code == 0, remote.output
    assert remote.stdout == run("tail", "--db", str(busy.db_path), *flags).stdout
    assert [json.loads(line)["rollout_id"] for line in remote.stdout.splitlines()] == [
        "r-1",
        "r-2",
        "r-3",
    ]


def test_tail_url_limit_and_rollout(busy: GatewayThread) -> None:
    last_two = run("tail", "--url", busy.base, "-n", "2")
    assert [line.split()[1] for line in last_two.stdout.splitlines()] == ["r-2/a1#1", "r-3/a1#1"]
    one = run("tail", "--url", busy.base, "--rollout", "r-2")
    assert [line.split()[1] for line in one.stdout.splitlines()] == ["r-2/a1#1"]


def test_tail_url_pages_through_to_the_latest(
    busy: GatewayThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    call(busy, "r-4")
    call(busy, "r-5")
    busy.flush()
    monkeypatch.setattr(cli_remote, "PAGE_LIMIT", 2)
    result = run("tail", "--url", busy.base, "-n", "3", "--json")
    assert [json.loads(line)["rollout_id"] for line in result.stdout.splitlines()] == [
        "r-3",
        "r-4",
        "r-5",
    ]


def test_tail_url_reaches_back_past_the_recent_window(gateway: GatewayThread) -> None:
    # Two calls from two hours ago, then a fresh one: the last hour alone holds too few.
    _many_spans(gateway.db_path, 2, start_ns=time.time_ns() - 2 * 3600 * 10**9)
    call(gateway, "r-new")
    gateway.flush()
    result = run("tail", "--url", gateway.base, "--json")
    assert [json.loads(line)["rollout_id"] for line in result.stdout.splitlines()] == [
        "r-0",
        "r-1",
        "r-new",
    ]
    newest = run("tail", "--url", gateway.base, "-n", "1", "--json")
    assert [json.loads(line)["rollout_id"] for line in newest.stdout.splitlines()] == ["r-new"]


def test_tail_url_on_an_empty_gateway_says_so(gateway: GatewayThread) -> None:
    result = run("tail", "--url", gateway.base)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no calls recorded yet" in result.output


def test_tail_url_sends_the_key(make_gateway: Callable[..., GatewayThread]) -> None:
    gateway = make_gateway(auth={"keys": [{"key": "sk-reader-1234", "scopes": ["read"]}]})
    refused = run("tail", "--url", gateway.base)
    assert refused.exit_code == 1
    assert "401" in refused.output and "Traceback" not in refused.output
    allowed = run("tail", "--url", gateway.base, "--key", "sk-reader-1234")
    assert allowed.exit_code == 0, allowed.output
    assert "no calls recorded yet" in allowed.output


def test_tail_url_that_cannot_be_reached_is_a_clear_error() -> None:
    result = run("tail", "--url", "127.0.0.1:9")
    assert result.exit_code == 1
    assert "cannot reach the gateway at http://127.0.0.1:9" in result.output


def test_tail_url_does_not_import_litellm_or_the_server(busy: GatewayThread) -> None:
    code = (
        "import sys\n"
        "from gateway.cli.main import cli\n"
        f"cli(['tail', '--url', {busy.base!r}], standalone_mode=False)\n"
        "heavy = ('litellm', 'aiohttp', 'gateway.compose', 'gateway.server', 'judge.jobs')\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in heavy"
        " or m in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "echo: hello r-3" in out
    assert out.splitlines()[-1] == "LOADED []"


# -- --follow (a real process) --------------------------------------------------------


class Follower:
    """`spangate tail --url ... --follow` in its own process; its lines arrive on a queue."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI_ARGV, "tail", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put)),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.errors.append)),
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    @staticmethod
    def _pump(stream: Any, put: Callable[[Any], None]) -> None:
        for line in stream:
            put(line)
        put(None)

    def next_line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s; stderr: {self.errors}") from None
        assert line is not None, f"the follower exited; stderr: {self.errors}"
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def follow() -> Iterator[Callable[..., Follower]]:
    started: list[Follower] = []

    def start(*args: str) -> Follower:
        follower = Follower(*args)
        started.append(follower)
        return follower

    yield start
    for follower in started:
        follower.stop()


def who(line: str) -> str:
    return line.split()[1]


def test_tail_url_follow_shows_a_new_call_within_a_second(
    busy: GatewayThread, follow: Callable[..., Follower]
) -> None:
    follower = follow("--url", busy.base, "--follow", "-n", "1")
    # The backlog line proves the follower is up (past its imports) before the next call.
    assert who(follower.next_line(timeout=15)) == "r-3/a1#1"
    for rollout in ("r-4", "r-5"):
        called = time.monotonic()
        call(busy, rollout, "fresh off the wire")
        line = follower.next_line(timeout=5)
        shown_after = time.monotonic() - called
        assert who(line) == f"{rollout}/a1#1" and line.rstrip().endswith("fresh off the wire")
        assert shown_after < LIVE_LATENCY, f"new call took {shown_after:.2f}s to show"


def test_tail_url_follow_with_rollout_shows_only_that_rollout(
    busy: GatewayThread, follow: Callable[..., Follower]
) -> None:
    follower = follow("--url", busy.base, "-f", "--rollout", "r-new", "--json")
    call(busy, "r-other")
    call(busy, "r-new")
    assert json.loads(follower.next_line(timeout=15))["rollout_id"] == "r-new"
    call(busy, "r-other")
    call(busy, "r-new", "second")
    line = json.loads(follower.next_line(timeout=5))
    assert (line["rollout_id"], line["seq"]) == ("r-new", 2)


class PortGateway(GatewayThread):
    """A gateway on a given port, so a restarted one answers where the old one did."""

    def __init__(self, *args: Any, port: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.port = port

    async def _start(self) -> None:
        from gateway.compose import create_app
        from gateway.web.state import GATEWAY

        self.app = create_app(self.settings, self.db_path)
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.app[GATEWAY].base_url = self.base


def test_tail_url_follow_resumes_after_the_gateway_restarts(
    fake_provider: FakeProviderThread, db_path: Path, follow: Callable[..., Follower]
) -> None:
    settings = gateway_settings(fake_provider.url)
    first = GatewayThread(settings, db_path).start()
    try:
        call(first, "r-1")
        follower = follow("--url", first.base, "-f", "-n", "1")
        assert who(follower.next_line(timeout=15)) == "r-1/a1#1"
        call(first, "r-2")
        assert who(follower.next_line(timeout=5)) == "r-2/a1#1"
    finally:
        first.stop()
    second = PortGateway(settings, db_path, port=first.port).start()
    try:
        # Made at once, most likely before the follower is back: it must catch up on them.
        call(second, "r-3")
        call(second, "r-4")
        assert who(follower.next_line(timeout=15)) == "r-3/a1#1"
        assert who(follower.next_line(timeout=5)) == "r-4/a1#1"
        call(second, "r-5")
        assert who(follower.next_line(timeout=5)) == "r-5/a1#1"
    finally:
        follower.stop()
        second.stop()
    assert follower.lines.get_nowait() is None  # nothing printed twice
    notes = "".join(line for line in follower.errors if line)
    assert "stream interrupted" in notes and "reconnected after" in notes
    assert "Traceback" not in notes


# -- the stream client, against scripted answers ----------------------------------------


def _event(event_id: int, span: dict[str, Any]) -> bytes:
    return b"id: %d\nevent: span\ndata: %s\n\n" % (event_id, orjson.dumps(span))


class Dropping(httpx.SyncByteStream):
    """A stream that sends some bytes, then loses the connection."""

    def __init__(self, *chunks: bytes, drop: bool = True) -> None:
        self.chunks = chunks
        self.drop = drop

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.drop:
            raise httpx.ReadError("connection reset by peer")


def test_follow_resumes_with_last_event_id_and_backs_off() -> None:
    seen: list[httpx.Request] = []
    spans = [{"span_id": f"s{i}", "rollout_id": "r"} for i in range(5)]
    answers = [
        lambda: httpx.Response(
            200, stream=Dropping(b": connected\n\n", _event(7, spans[0]), _event(8, spans[1]))
        ),
        lambda: httpx.Response(503, json={"error": {"message": "not ready"}}),
        lambda: httpx.Response(200, stream=Dropping(_event(9, spans[2]), drop=False)),
        lambda: httpx.Response(200, stream=Dropping(_event(10, spans[3]))),
        lambda: httpx.Response(401, json={"error": {"message": "bad key"}}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[len(seen) - 1]()

    sleeps: list[float] = []
    notes: list[str] = []
    position = Follow(rollout_id="r", since_ns=0, skip_until="s0", last_id="0")
    got: list[dict[str, Any]] = []
    transport = httpx.MockTransport(handler)
    with (
        httpx.Client(base_url="http://gw.test", transport=transport) as client,
        pytest.raises(cli_remote.RemoteError, match="401"),
    ):
        for span in follow_spans(client, position, notify=notes.append, sleep=sleeps.append):
            got.append(span)
    assert [s["span_id"] for s in got] == ["s1", "s2", "s3"]  # s0 was the backlog's last
    assert [r.headers.get("Last-Event-ID") for r in seen] == ["0", "8", "8", "9", "10"]
    assert all(r.url.params["rollout_id"] == "r" for r in seen)
    assert seen[0].url.params["since"] == "1970-01-01T00:00:00+00:00"
    # Backoff doubles while failing, restarts after a good connection, and is bounded.
    assert sleeps == [0.2, 0.4, 0.2, 0.2]
    assert max(sleeps) <= cli_remote.BACKOFF_MAX
    assert notes[0].startswith("stream interrupted (connection reset by peer)")
    assert notes[1].startswith("reconnected after")


def test_follow_without_backlog_starts_at_the_beginning() -> None:
    position = Follow.after([], "r-1")
    assert (position.last_id, position.skip_until, position.since_ns) == ("0", None, None)
    backlog = [
        {"span_id": "a", "start_ns": 5_000_000_000_000},
        {"span_id": "b", "start_ns": 4_000_000_000_000},
    ]
    position = Follow.after(backlog, None)
    assert position.skip_until == "b"
    assert position.since_ns == 5_000_000_000_000 - cli_remote.IN_FLIGHT_MARGIN_NS


def test_parse_events_follows_the_sse_framing() -> None:
    lines = [": comment", "id: 1", "event: span", "data: {", "data: }", "", "", "retry: 5", ""]
    events = list(parse_events(iter([*lines, "id: 2", "data:x", ""])))
    assert [(e.id, e.event, e.data) for e in events] == [
        ("1", "span", ["{", "}"]),
        ("2", "message", ["x"]),
    ]


# -- a closed pipe --------------------------------------------------------------------


def _many_spans(path: Path, count: int, *, start_ns: int = 1_795_334_400_000_000_000) -> None:
    records = []
    for i in range(count):
        record: dict[str, Any] = dict.fromkeys(SPAN_COLUMNS)
        record.update(
            span_id=os.urandom(8).hex(),
            trace_id=os.urandom(16).hex(),
            rollout_id=f"r-{i}",
            attempt_id="a1",
            seq=1,
            name="chat gpt-test",
            operation="chat",
            status="ok",
            stream=0,
            start_ns=start_ns + i,
            end_ns=start_ns + i + 1000,
            duration_ms=0.001,
            retries=0,
            attributes={"padding": "x" * 500},
            tags=[],
        )
        records.append(record)
    db = connect(path)
    try:
        insert_spans(db.conn, records)
    finally:
        db.close()


@pytest.mark.parametrize("args", [["tail", "--json", "-n", "2000"], ["tail", "-n", "2000"]])
def test_tail_into_a_closed_pipe_exits_quietly(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "many.db"
    _many_spans(path, 2000)  # far more than a pipe buffer holds, so the write must fail
    command = shlex.join([*CLI_ARGV, *args, "--db", str(path)])
    result = subprocess.run(
        ["bash", "-c", f'{command} | head -1; echo "status=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert len(result.stdout.splitlines()) == 1
    assert "r-0" in result.stdout
    assert result.stderr == f"status={BROKEN_PIPE_EXIT}\n"  # no traceback, no "Exception ignored"
