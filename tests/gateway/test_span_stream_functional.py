"""`GET /api/spans/stream`: recorded calls as server-sent events, filtered and resumable.

A subscriber connects with httpx, waits for the `: connected` comment (the stream starts at
the live edge from then on), makes calls through the SDK and reads `event: span` frames
with a read timeout, so nothing here sleeps: a missing event fails on the timeout, and an
unexpected one is caught by making a sentinel call and checking it is the next event.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from servers import GatewayThread

pytestmark = pytest.mark.both_backends

READ_TIMEOUT = 5.0
# A call made after subscribing must show up on the stream within this long.
LIVE_LATENCY = 1.0
# GatewayThread's own shutdown_timeout is 10 s; a gateway with an open or dropped stream
# must stop well within it.
PROMPT_STOP = 3.0


class QuickStopGateway(GatewayThread):
    """A gateway whose runner waits at most 1 s for handlers at shutdown.

    The shutdown test below checks that streams end promptly on their own; every other test
    here uses this so that a stream still polling after its subscriber left cannot stretch
    each teardown to the full shutdown timeout.
    """

    async def _start(self) -> None:
        await super()._start()
        assert self._runner is not None
        # aiohttp's own knob (BaseRunner keeps it here; TCPSite sets it the same way).
        self._runner._shutdown_timeout = 1.0


@pytest.fixture
def gateway(fake_provider: FakeProviderThread, db_path: Path) -> Iterator[GatewayThread]:
    started = QuickStopGateway(gateway_settings(fake_provider.url), db_path).start()
    yield started
    started.stop()


@dataclass(frozen=True)
class Event:
    id: str | None
    event: str | None
    data: dict[str, Any]


class EventReader:
    """Parses SSE frames from a streaming httpx response, one `next()` at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()
        self.comments: list[str] = []

    def _frame(self) -> list[str]:
        lines: list[str] = []
        for line in self._lines:
            if line == "":
                if lines:
                    return lines
                continue
            lines.append(line)
        raise AssertionError("the event stream ended")

    def wait_connected(self) -> None:
        frame = self._frame()
        assert frame == [": connected"], frame

    def next(self) -> Event:
        """The next `span` event; comments (keepalives) are skipped and remembered."""
        while True:
            fields: dict[str, str] = {}
            data: list[str] = []
            for line in self._frame():
                if line.startswith(":"):
                    self.comments.append(line)
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                else:
                    fields[name] = value
            if data:
                return Event(fields.get("id"), fields.get("event"), json.loads("\n".join(data)))

    def take(self, count: int) -> list[Event]:
        return [self.next() for _ in range(count)]

    def ends(self) -> bool:
        """Read to the end of the stream: True if the server ended it, False on a read timeout."""
        try:
            for _ in self._lines:
                pass
        except httpx.ReadTimeout:
            return False
        except (httpx.RemoteProtocolError, httpx.ReadError):
            return True  # closed without the final chunk: ended all the same
        return True


@contextmanager
def subscribe(
    gateway: GatewayThread,
    headers: dict[str, str] | None = None,
    *,
    read_timeout: float = READ_TIMEOUT,
    **params: str,
) -> Iterator[EventReader]:
    """An open subscription, already past the `: connected` comment; closed on exit."""
    timeout = httpx.Timeout(10.0, read=read_timeout)
    with (
        httpx.Client(base_url=gateway.base, timeout=timeout) as client,
        client.stream("GET", "/api/spans/stream", params=params, headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = EventReader(response)
        reader.wait_connected()
        yield reader


@pytest.fixture
def sdk(gateway: GatewayThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url(), api_key="x", max_retries=0) as client:
        yield client


def call(
    sdk: openai.OpenAI,
    gateway: GatewayThread,
    rollout: str,
    *,
    content: str = "hi",
    model: str = "gpt-test",
) -> str:
    """One chat call; returns its span id from `X-Span-Id`."""
    raw = sdk.with_options(
        base_url=gateway.url(rollout, "1")
    ).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}]
    )
    raw.parse()
    return raw.headers["x-span-id"]


def test_calls_made_after_subscribing_arrive_as_span_events_within_a_second(
    gateway: GatewayThread, sdk: openai.OpenAI
) -> None:
    call(sdk, gateway, "before")  # history: a new subscriber starts at the live edge
    gateway.flush()
    with subscribe(gateway, rollout_id="live") as stream:
        for n in range(3):
            span_id = call(sdk, gateway, "live", content=f"message {n}")
            returned = time.monotonic()
            event = stream.next()
            assert time.monotonic() - returned < LIVE_LATENCY
            assert event.event == "span"
            assert event.id is not None and event.id.isdigit()
            assert event.data["span_id"] == span_id
            assert event.data["rollout_id"] == "live"
            assert event.data["attempt_id"] == "1"
            assert event.data["seq"] == n + 1
            assert event.data["status"] == "ok"
            assert "_rowid" not in event.data


def test_event_ids_rise_and_data_matches_the_stored_span(
    gateway: GatewayThread, sdk: openai.OpenAI
) -> None:
    with subscribe(gateway) as stream:
        span_ids = [call(sdk, gateway, "ids", content=f"c{i}") for i in range(4)]
        events = stream.take(4)
    assert [e.data["span_id"] for e in events] == span_ids
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 4
    with httpx.Client(base_url=gateway.base, timeout=10.0) as api:
        listed = api.get("/api/spans", params={"rollout_id": "ids"}).json()["data"]
    assert [e.data for e in events] == listed


def test_stream_filter_leaves_out_other_rollouts(
    gateway: GatewayThread, sdk: openai.OpenAI
) -> None:
    with subscribe(gateway, rollout_id="mine") as stream:
        expected = []
        for n in range(3):
            call(sdk, gateway, "theirs", content=f"other {n}")
            expected.append(call(sdk, gateway, "mine", content=f"mine {n}"))
        call(sdk, gateway, "theirs", content="other last")
        sentinel = call(sdk, gateway, "mine", content="sentinel")
        events = stream.take(4)
    assert [e.data["span_id"] for e in events] == [*expected, sentinel]
    assert {e.data["rollout_id"] for e in events} == {"mine"}


def test_stream_filters_by_model_and_status(gateway: GatewayThread, sdk: openai.OpenAI) -> None:
    with subscribe(gateway, model="mock") as by_model:
        call(sdk, gateway, "mixed", content="to gpt-test")
        mocked = call(sdk, gateway, "mixed", model="mock")
        assert by_model.next().data["span_id"] == mocked
    with subscribe(gateway, status="error") as errors:
        call(sdk, gateway, "mixed")
        with pytest.raises(openai.NotFoundError):
            sdk.with_options(base_url=gateway.url("mixed", "1")).chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
        event = errors.next()
        assert event.data["status"] == "error" and event.data["rollout_id"] == "mixed"


def test_reconnecting_with_last_event_id_replays_exactly_the_missed_spans(
    gateway: GatewayThread, sdk: openai.OpenAI
) -> None:
    with subscribe(gateway, rollout_id="resume") as stream:
        seen = [call(sdk, gateway, "resume", content=f"seen {n}") for n in range(2)]
        first_two = stream.take(2)
    # The connection is dropped; calls keep happening meanwhile.
    assert [e.data["span_id"] for e in first_two] == seen
    last_id = first_two[-1].id
    assert last_id is not None
    missed = [call(sdk, gateway, "resume", content=f"missed {n}") for n in range(3)]
    call(sdk, gateway, "elsewhere")
    gateway.flush()

    with subscribe(gateway, headers={"Last-Event-ID": last_id}, rollout_id="resume") as stream:
        replayed = stream.take(3)
        assert [e.data["span_id"] for e in replayed] == missed
        assert [e.data["seq"] for e in replayed] == [3, 4, 5]
        assert all(int(e.id or 0) > int(last_id) for e in replayed)
        # Nothing else was queued: the next event is the next live call.
        sentinel = call(sdk, gateway, "resume", content="after resume")
        assert stream.next().data["span_id"] == sentinel


def test_resume_also_works_with_the_after_query_parameter(
    gateway: GatewayThread, sdk: openai.OpenAI
) -> None:
    with subscribe(gateway, rollout_id="after-q") as stream:
        call(sdk, gateway, "after-q")
        (first,) = stream.take(1)
    second = call(sdk, gateway, "after-q", content="second")
    gateway.flush()
    with subscribe(gateway, rollout_id="after-q", after=first.id or "") as stream:
        assert stream.next().data["span_id"] == second


def test_a_bad_last_event_id_or_filter_is_422(gateway: GatewayThread) -> None:
    with httpx.Client(base_url=gateway.base, timeout=10.0) as api:
        response = api.get("/api/spans/stream", headers={"Last-Event-ID": "not-a-number"})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "Last-Event-ID"
        response = api.get("/api/spans/stream", params={"status": "sideways"})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "status"


def test_two_subscribers_each_get_every_event(gateway: GatewayThread, sdk: openai.OpenAI) -> None:
    with subscribe(gateway) as first, subscribe(gateway, rollout_id="both") as second:
        span_ids = [call(sdk, gateway, "both", content=f"n{i}") for i in range(3)]
        assert [e.data["span_id"] for e in first.take(3)] == span_ids
        assert [e.data["span_id"] for e in second.take(3)] == span_ids


def test_gateway_stops_promptly_with_a_subscriber_connected_and_one_dropped(
    fake_provider: FakeProviderThread, db_path: Path
) -> None:
    """Shutdown ends open streams (their subscribers see the end) instead of waiting them out,
    and a subscriber that already hung up holds nothing up either."""
    gateway = GatewayThread(gateway_settings(fake_provider.url), db_path).start()
    took: list[float] = []

    def stop() -> None:
        began = time.monotonic()
        gateway.stop()
        took.append(time.monotonic() - began)

    stopper = threading.Thread(target=stop, daemon=True)
    try:
        with subscribe(gateway):
            pass  # this subscriber hangs up at once
        with subscribe(gateway, read_timeout=PROMPT_STOP) as stream:
            stopper.start()
            ended = stream.ends()
        stopper.join(timeout=60)
        assert ended, f"the open stream was not ended within {PROMPT_STOP}s of shutdown"
        assert took and took[0] < PROMPT_STOP, f"stopping took {took[0] if took else '>60'}s"
    finally:
        if stopper.ident is None:
            gateway.stop()  # failed before stopping began
        else:
            stopper.join(timeout=60)
