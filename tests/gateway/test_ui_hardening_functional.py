"""The `/ui` pages and the report over odd recorded data: whatever agents, judges and upstreams
recorded, every page renders (a 500 there hides the very rollout a person is debugging)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, read_spans, wait_until
from shapes import assert_openai_error, span_record

from gateway.web.ui.views import MISSING

TRACE_ID = "5b8efff798038103d269b633813fc60c"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def otlp_export(rollout_id: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "rollout.id", "value": {"stringValue": rollout_id}}]
                },
                "scopeSpans": [{"scope": {"name": "agent"}, "spans": spans}],
            }
        ]
    }


def otlp_span(span_id: str, attributes: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    start = 1_700_000_000_000_000_000 + offset * 1000
    return {
        "traceId": TRACE_ID,
        "spanId": span_id,
        "name": "step",
        "kind": 1,
        "startTimeUnixNano": str(start),
        "endTimeUnixNano": str(start + 500),
        "attributes": attributes,
    }


def pages_of(rollout_id: str, span_ids: list[str]) -> list[str]:
    """The rollout's page, its report, and each span's page."""
    return [
        f"/ui/rollouts/{rollout_id}",
        f"/api/rollouts/{rollout_id}/report",
        *(f"/ui/spans/{span_id}" for span_id in span_ids),
    ]


def statuses(gateway: GatewayThread, paths: list[str]) -> dict[str, int]:
    return {path: httpx.get(gateway.base + path, timeout=60).status_code for path in paths}


def create_rollout(gateway: GatewayThread, rollout_id: str) -> None:
    created = httpx.post(f"{gateway.base}/api/rollouts", json={"id": rollout_id}, timeout=10)
    assert created.status_code == 201, created.text


def test_a_span_with_odd_spangate_tries_renders(gateway: GatewayThread) -> None:
    """OTLP ingest once kept an agent's own `spangate.tries` attribute, of any shape: tries
    that were strings, or dicts missing their fields, made the rollout page, its report and
    the span's page answer 500. Such spans are planted as the store holds them."""
    planted = {
        "odd-tries": ["x", 1, None],
        "odd-tries-2": [{"group": "g"}, {"duration_ms": "slow", "status": {"a": 1}}],
    }
    span_ids = []
    for rollout_id, tries in planted.items():
        record = span_record(rollout_id, 1, attributes={"spangate.tries": tries})
        gateway.gw.writer.put(record)
        span_ids.append(record["span_id"])
    wait_until(
        lambda: all(read_spans(gateway.db_path, span_id=s) for s in span_ids),
        timeout=10,
        what="the planted spans to be written",
    )
    paths = pages_of("odd-tries", span_ids[:1]) + pages_of("odd-tries-2", span_ids[1:])
    assert statuses(gateway, paths) == {path: 200 for path in paths}
    # The tries that are dicts show, what they lack as a dash.
    page = httpx.get(f"{gateway.base}/ui/spans/{span_ids[1]}", timeout=10).text
    assert f"<td>1</td><td>g</td><td>{MISSING}</td><td>{MISSING}</td>" in page
    assert f"<td>2</td><td>{MISSING}</td><td>{MISSING}</td><td>{{" in page


def test_a_judge_verdict_scored_in_words_shows_its_score_as_text(gateway: GatewayThread) -> None:
    """`POST /api/rewards` takes any `details`: a `judge:` verdict whose criterion is scored
    "high" (or [1]) made the rollout page and the report answer 500."""
    for rollout_id, criteria in (
        ("odd-judge", [{"name": "tone", "score": "high"}]),
        ("odd-judge-2", {"tone": {"score": [1]}}),
    ):
        create_rollout(gateway, rollout_id)
        reward = httpx.post(
            f"{gateway.base}/api/rewards",
            json={
                "rollout_id": rollout_id,
                "value": 0.5,
                "source": "judge:mine",
                "details": {"criteria": criteria},
            },
            timeout=10,
        )
        assert reward.status_code == 201, reward.text
    paths = pages_of("odd-judge", []) + pages_of("odd-judge-2", [])
    assert statuses(gateway, paths) == {path: 200 for path in paths}
    page = httpx.get(gateway.base + "/ui/rollouts/odd-judge", timeout=10).text
    assert '<td>tone</td><td class="num">high</td>' in page
    page = httpx.get(gateway.base + "/ui/rollouts/odd-judge-2", timeout=10).text
    assert f'<td>tone</td><td class="num">{MISSING}</td>' in page


def test_the_overview_renders_rewards_at_the_ends_of_the_float_range(
    gateway: GatewayThread,
) -> None:
    """Rewards of ±1.7e308 (finite, so the API takes them) overflowed the histogram's bin
    width to inf, and the overview answered 500."""
    for i, value in enumerate((1.7e308, -1.7e308, 0.5)):
        create_rollout(gateway, f"extreme-{i}")
        reward = httpx.post(
            f"{gateway.base}/api/rewards",
            json={"rollout_id": f"extreme-{i}", "value": value},
            timeout=10,
        )
        assert reward.status_code == 201, reward.text
    response = httpx.get(f"{gateway.base}/ui/", timeout=30)
    assert response.status_code == 200, response.text[:200]
    assert "-1.7e+308" in response.text and "1.7e+308" in response.text


@pytest.mark.parametrize("rollout_id", [".", "..", "..."])
def test_a_rollout_id_of_only_dots_is_refused(gateway: GatewayThread, rollout_id: str) -> None:
    """A browser resolves the dashboard's link `/ui/rollouts/..` to `/ui/` (dot segments):
    such a rollout could be created, and called under, but never opened."""
    created = httpx.post(f"{gateway.base}/api/rollouts", json={"id": rollout_id}, timeout=10)
    assert created.status_code == 422, created.text
    called = httpx.post(
        f"{gateway.base}/v1/chat/completions",
        json=CHAT,
        headers={"X-Rollout-Id": rollout_id},
        timeout=10,
    )
    assert_openai_error(called, 400, code="invalid_id", param="rollout_id")
    ingest = httpx.post(
        gateway.base + "/v1/traces",
        json=otlp_export(rollout_id, [otlp_span("aaa91f3b8ff4e0c1", [])]),
        timeout=10,
    )
    assert ingest.json()["partialSuccess"]["rejectedSpans"] == "1"


def test_dots_among_other_characters_still_make_an_id(gateway: GatewayThread) -> None:
    create_rollout(gateway, "v1..2.")
    page = httpx.get(f"{gateway.base}/ui/rollouts/v1..2.", timeout=10)
    assert page.status_code == 200 and "<title>Rollout v1..2. " in page.text


def test_an_empty_rollout_and_odd_messages_render(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    create_rollout(gateway, "empty")
    odd_requests = {
        "content-dict": [{"role": "user", "content": {"a": 1}}],
        "content-mixed": [
            {"role": "user", "content": [1, None, {"type": "text", "text": None}, "s"]}
        ],
        "name-dict": [
            {"role": "tool", "content": "r", "tool_call_id": {"x": 1}, "name": {"y": 2}},
            {"role": "user", "content": "hi"},
        ],
    }
    for rollout_id, messages in odd_requests.items():
        answer = httpx.post(
            f"{gateway.url(rollout_id)}/chat/completions",
            json={"model": "gpt-test", "messages": messages},
            timeout=20,
        )
        assert answer.status_code == 200, answer.text
    odd_replies = {
        "reply-choices": {"choices": ["x", {"message": "s"}, {"message": None}, {"text": None}]},
        "reply-error": {"error": None},
        "reply-output": {"output": [{"type": "function_call", "name": None, "arguments": None}]},
    }
    for rollout_id, body in odd_replies.items():
        fake_provider.state.add_fault(status=200, body=orjson.dumps(body).decode())
        answer = httpx.post(f"{gateway.url(rollout_id)}/chat/completions", json=CHAT, timeout=20)
        assert answer.status_code == 200
    gateway.flush()
    paths = pages_of("empty", [])
    for rollout_id in [*odd_requests, *odd_replies]:
        spans = gateway.spans(rollout_id=rollout_id)
        paths += pages_of(rollout_id, [s["span_id"] for s in spans])
    assert statuses(gateway, paths) == {path: 200 for path in paths}


def test_odd_query_parameters_are_never_a_500(gateway: GatewayThread) -> None:
    paths = [
        "/ui/rollouts?since=99999999999999d",
        "/ui/rollouts?until=9999-12-31",
        "/ui/rollouts?sort=cost&cursor=garbage",
        "/ui/rollouts?q=%00&agent=%ff&status=nope&dir=sideways",
        "/ui/leaderboard?success_threshold=nan",
        "/ui/patterns?min_support=-5",
        "/ui/live?rollout=%00&agent=%ff",
    ]
    assert all(code < 500 for code in statuses(gateway, paths).values())
    for path in ("/ui/rollouts/" + "x" * 5000, "/ui/spans/%C3%28", "/ui/rollouts/%00"):
        response = httpx.get(gateway.base + path, timeout=10)
        assert response.status_code == 404
        assert response.headers["Content-Type"].startswith("text/html")


def test_a_rollout_of_three_thousand_agent_spans_renders(gateway: GatewayThread) -> None:
    spans = [otlp_span(f"{i:016x}", [], offset=i) for i in range(1, 3001)]
    response = httpx.post(gateway.base + "/v1/traces", json=otlp_export("big", spans), timeout=60)
    assert response.status_code == 200
    gateway.flush(timeout=60)
    paths = pages_of("big", [f"{1:016x}"])
    assert statuses(gateway, paths) == {path: 200 for path in paths}
