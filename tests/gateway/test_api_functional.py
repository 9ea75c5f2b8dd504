"""The `/api` routes over real HTTP: rollouts, attempts, spans, rewards and stats.

Every test talks to a real gateway on a loopback port: calls go through the `openai` SDK
(so response ids and `X-Span-Id` headers are the ones a client really sees) and the API is
driven with httpx. Errors must come back in the OpenAI shape
`{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from servers import GatewayThread, read_rows, read_spans
from shapes import assert_openai_error

pytestmark = pytest.mark.both_backends

# -- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """What a client learns from one call: the provider's response id and the gateway's span."""

    response_id: str
    span_id: str
    rollout_id: str | None
    attempt_id: str | None


class Caller:
    """Makes calls through one SDK client (one connection pool), under any rollout prefix."""

    def __init__(self, gateway: GatewayThread, fake_provider: FakeProviderThread) -> None:
        self.gateway = gateway
        self.fake_provider = fake_provider
        self.client = openai.OpenAI(base_url=gateway.url(), api_key="x", max_retries=0)

    def chat(
        self,
        rollout: str | None = None,
        attempt: str | None = None,
        *,
        content: str = "hello",
        model: str = "gpt-test",
        headers: dict[str, str] | None = None,
    ) -> Call:
        """One chat call, with the raw response kept for its headers."""
        client = self.client.with_options(base_url=self.gateway.url(rollout, attempt))
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            extra_headers=headers,
        )
        return Call(
            response_id=raw.parse().id,
            span_id=raw.headers["x-span-id"],
            rollout_id=raw.headers.get("x-rollout-id"),
            attempt_id=raw.headers.get("x-attempt-id"),
        )

    def fail(self, rollout: str) -> None:
        """A call the upstream refuses with a 400 (not retried), recorded as an error span."""
        self.fake_provider.state.add_fault(status=400, message="bad prompt")
        client = self.client.with_options(base_url=self.gateway.url(rollout))
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "fail"}]
            )


@pytest.fixture
def caller(gateway: GatewayThread, fake_provider: FakeProviderThread) -> Iterator[Caller]:
    made = Caller(gateway, fake_provider)
    yield made
    made.client.close()


def names_field(error: dict[str, Any], field: str) -> bool:
    """A 422 names the offending field in `param` or, for cross-field rules, in the message."""
    return field in (error["param"] or "") or field in error["message"]


def iso(ns: int) -> str:
    """ISO 8601 of a ns timestamp, truncated (never rounded up) to microseconds."""
    seconds, micros = divmod(ns // 1000, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros).isoformat()


def collect_pages(api: httpx.Client, path: str, **params: Any) -> list[list[dict[str, Any]]]:
    """Follow `next_cursor` to the end; returns the pages."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = api.get(path, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "paging does not end"


@pytest.fixture
def api(gateway: GatewayThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base, timeout=10.0) as client:
        yield client


@pytest.fixture(scope="module")
def validation_api(
    fake_provider_server: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """One gateway, with rollout `r`, shared by the many bad-body cases (none writes a row)."""
    settings = gateway_settings(fake_provider_server.url)
    gateway = GatewayThread(settings, tmp_path_factory.mktemp("validation") / "spangate.db")
    gateway.start()
    try:
        with httpx.Client(base_url=gateway.base, timeout=10.0) as client:
            create_rollout(client, id="r")
            yield client
    finally:
        gateway.stop()


def create_rollout(api: httpx.Client, **body: Any) -> dict[str, Any]:
    response = api.post("/api/rollouts", json=body)
    assert response.status_code == 201, response.text
    return response.json()


# -- rollouts ---------------------------------------------------------------------------------


def test_create_rollout_returns_201_with_the_row_then_200_for_the_same_id(
    api: httpx.Client,
) -> None:
    body = {
        "id": "task-7",
        "input": {"question": "2+2?", "choices": [3, 4]},
        "agent": "solver-v1",
        "metadata": {"dataset": "arith", "split": "dev"},
        "tags": ["eval", "arith"],
    }
    created = api.post("/api/rollouts", json=body)
    assert created.status_code == 201, created.text
    row = created.json()
    assert row["id"] == "task-7"
    assert row["status"] == "running"
    assert row["input"] == body["input"]
    assert row["agent"] == "solver-v1"
    assert row["metadata"] == body["metadata"]
    assert sorted(row["tags"]) == ["arith", "eval"]
    assert row["created_ns"] > 0 and row["ended_ns"] is None

    again = api.post("/api/rollouts", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == "task-7"
    assert again.json()["created_ns"] == row["created_ns"]
    assert again.json()["input"] == body["input"]

    fetched = api.get("/api/rollouts/task-7")
    assert fetched.status_code == 200
    assert fetched.json()["agent"] == "solver-v1"


def test_create_rollout_without_an_id_generates_one(api: httpx.Client) -> None:
    first = create_rollout(api, input="hi")
    second = create_rollout(api, input="hi")
    assert first["id"] and second["id"] and first["id"] != second["id"]
    assert api.get(f"/api/rollouts/{first['id']}").status_code == 200


def test_create_rollout_with_a_different_agent_or_input_conflicts(api: httpx.Client) -> None:
    create_rollout(api, id="task-c", agent="a1", input="x")
    assert_openai_error(
        api.post("/api/rollouts", json={"id": "task-c", "agent": "a2"}), 409, type_="conflict_error"
    )
    assert_openai_error(api.post("/api/rollouts", json={"id": "task-c", "input": "y"}), 409)
    assert api.get("/api/rollouts/task-c").json()["agent"] == "a1"


def test_create_rollout_again_with_an_input_string_that_reads_as_json_is_no_conflict(
    api: httpx.Client,
) -> None:
    body = {"id": "task-js", "input": '{"question": "2+2?"}'}
    assert api.post("/api/rollouts", json=body).status_code == 201
    again = api.post("/api/rollouts", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["input"] == body["input"]


def test_create_rollout_rejects_invalid_bodies_naming_the_field(api: httpx.Client) -> None:
    assert_openai_error(api.post("/api/rollouts", json={"id": "has space"}), 422, param="id")
    assert_openai_error(api.post("/api/rollouts", json={"tags": "not-a-list"}), 422, param="tags")
    assert_openai_error(api.post("/api/rollouts", json={"metadata": [1]}), 422, param="metadata")
    assert_openai_error(api.post("/api/rollouts", json={"colour": "red"}), 422, param="colour")
    assert_openai_error(api.post("/api/rollouts", content=b"{not json"), 400)
    assert_openai_error(api.post("/api/rollouts", json=[1, 2]), 400)


def test_list_rollouts_filters_by_status_agent_and_tag(api: httpx.Client) -> None:
    create_rollout(api, id="f-1", agent="alpha", tags=["red"])
    create_rollout(api, id="f-2", agent="alpha", tags=["blue"])
    create_rollout(api, id="f-3", agent="beta", tags=["red", "blue"])
    assert api.patch("/api/rollouts/f-2", json={"status": "failed"}).status_code == 200

    def ids(**params: Any) -> list[str]:
        response = api.get("/api/rollouts", params=params)
        assert response.status_code == 200, response.text
        return [row["id"] for row in response.json()["data"]]

    assert ids() == ["f-3", "f-2", "f-1"]  # newest first
    assert ids(agent="alpha") == ["f-2", "f-1"]
    assert ids(status="running") == ["f-3", "f-1"]
    assert ids(status="failed") == ["f-2"]
    assert ids(tag="red") == ["f-3", "f-1"]
    assert ids(tag="blue", agent="beta") == ["f-3"]
    assert ids(tag="green") == []
    assert_openai_error(
        api.get("/api/rollouts", params={"status": "exploded"}), 422, param="status"
    )


def test_list_rollouts_filters_by_time_range(api: httpx.Client) -> None:
    rows = [create_rollout(api, id=f"t-{i}") for i in range(4)]
    all_ids = ["t-3", "t-2", "t-1", "t-0"]

    def ids(**params: Any) -> list[str]:
        response = api.get("/api/rollouts", params=params)
        assert response.status_code == 200, response.text
        return [row["id"] for row in response.json()["data"]]

    # ISO times: microsecond precision rounds down, so `since` of t-2 includes t-2.
    assert ids(since=iso(rows[2]["created_ns"])) == ["t-3", "t-2"]
    assert ids(until=iso(rows[2]["created_ns"])) == ["t-1", "t-0"]
    assert ids(since=iso(rows[1]["created_ns"]), until=iso(rows[3]["created_ns"])) == [
        "t-2",
        "t-1",
    ]
    # Durations ago.
    assert ids(since="1h") == all_ids
    assert ids(until="1h") == []
    assert ids(since="2200-01-01T00:00:00Z") == []
    assert ids(until="2200-01-01") == all_ids
    error = assert_openai_error(api.get("/api/rollouts", params={"since": "yesterday-ish"}), 422)
    assert error["param"] == "since"
    assert_openai_error(api.get("/api/rollouts", params={"until": "soon"}), 422, param="until")


def test_list_rollouts_with_a_time_beyond_the_storable_range_is_not_a_server_error(
    api: httpx.Client,
) -> None:
    """Valid times that do not fit SQLite's 64-bit integers: an empty page or a 422, no 500."""
    create_rollout(api, id="far-1")
    for params in (
        {"since": "9999-12-31T23:59:59+00:00"},
        {"until": "9999-12-31"},
        {"since": "99999999999999w"},
    ):
        response = api.get("/api/rollouts", params=params)
        assert response.status_code in (200, 422), (params, response.text)
        if response.status_code == 422:
            assert_openai_error(response, 422, param=next(iter(params)))


def test_list_rollouts_pages_with_a_cursor_without_gaps_or_duplicates(api: httpx.Client) -> None:
    created = [create_rollout(api, id=f"p-{i}", agent="pager")["id"] for i in range(7)]
    pages = collect_pages(api, "/api/rollouts", agent="pager", limit=3)
    assert [len(page) for page in pages] == [3, 3, 1]
    seen = [row["id"] for page in pages for row in page]
    assert seen == list(reversed(created))
    # A rollout created while paging does not shift later pages (it is newer than the cursor).
    first = api.get("/api/rollouts", params={"agent": "pager", "limit": 3}).json()
    create_rollout(api, id="p-late", agent="pager")
    rest = collect_pages(api, "/api/rollouts", agent="pager", limit=3, cursor=first["next_cursor"])
    assert [row["id"] for page in rest for row in page] == list(reversed(created))[3:]


def test_list_rollouts_rejects_a_bad_cursor_and_a_bad_limit(api: httpx.Client) -> None:
    create_rollout(api, id="b-1")
    for cursor in ("garbage!", "bm90LWpzb24", "WzFd"):  # not base64 JSON; not JSON; wrong shape
        assert_openai_error(
            api.get("/api/rollouts", params={"cursor": cursor}), 422, param="cursor"
        )
    for limit in ("0", "-1", "abc", "5000"):
        assert_openai_error(api.get("/api/rollouts", params={"limit": limit}), 422, param="limit")
    assert_openai_error(api.get("/api/rollouts", params={"colour": "red"}), 422, param="colour")


def test_get_rollout_has_attempts_with_spans_in_seq_order_and_a_summary(
    api: httpx.Client, gateway: GatewayThread, caller: Caller
) -> None:
    create_rollout(api, id="g-1", agent="solver")
    first = [caller.chat("g-1", "a1", content=f"step {i}") for i in range(3)]
    caller.fail("g-1")  # joins the current attempt, a1
    second = caller.chat("g-1", "a2", content="retry")
    reward = api.post("/api/rewards", json={"rollout_id": "g-1", "value": 1.0, "final": True})
    assert reward.status_code == 201, reward.text

    response = api.get("/api/rollouts/g-1")
    assert response.status_code == 200, response.text
    detail = response.json()
    assert detail["id"] == "g-1" and detail["agent"] == "solver"
    assert [a["id"] for a in detail["attempts"]] == ["a1", "a2"]
    assert [a["number"] for a in detail["attempts"]] == [1, 2]
    a1, a2 = detail["attempts"]
    assert [s["span_id"] for s in a1["spans"]][:3] == [c.span_id for c in first]
    assert len(a1["spans"]) == 4 and a1["spans"][3]["status"] == "error"
    assert [s["span_id"] for s in a2["spans"]] == [second.span_id]
    seqs = [s["seq"] for a in detail["attempts"] for s in a["spans"]]
    assert seqs == [1, 2, 3, 4, 5]
    for span in a1["spans"] + a2["spans"]:
        assert "request_body" not in span and "response_body" not in span
    assert detail["rewards"] == [reward.json()]
    assert detail["rewards"][0]["final"] is True  # a JSON boolean, not SQLite's 1

    stored = read_spans(gateway.db_path, rollout_id="g-1")
    summary = detail["summary"]
    assert summary["calls"] == 5
    assert summary["errors"] == 1
    assert summary["input_tokens"] == sum(s["input_tokens"] or 0 for s in stored) > 0
    assert summary["output_tokens"] == sum(s["output_tokens"] or 0 for s in stored) > 0
    assert summary["cost_usd"] == pytest.approx(sum(s["cost_usd"] or 0.0 for s in stored))
    expected_ms = (max(s["end_ns"] for s in stored) - min(s["start_ns"] for s in stored)) / 1e6
    assert summary["duration_ms"] == pytest.approx(expected_ms)
    assert summary["rewards"] == 1


def test_get_unknown_rollout_is_404_in_the_error_shape(api: httpx.Client) -> None:
    error = assert_openai_error(
        api.get("/api/rollouts/no-such-rollout"), 404, type_="not_found_error"
    )
    assert "no-such-rollout" in error["message"]


def test_rollout_status_follows_the_state_machine(
    api: httpx.Client, gateway: GatewayThread, caller: Caller
) -> None:
    caller.chat("sm-1", "1")
    gateway.flush()
    same = api.patch("/api/rollouts/sm-1", json={"status": "running"})
    assert same.status_code == 200 and same.json()["ended_ns"] is None

    done = api.patch("/api/rollouts/sm-1", json={"status": "succeeded"})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "succeeded"
    ended = done.json()["ended_ns"]
    assert isinstance(ended, int) and ended >= done.json()["created_ns"]
    # Attempts still running end with their rollout.
    (attempt,) = api.get("/api/rollouts/sm-1").json()["attempts"]
    assert attempt["status"] == "succeeded" and attempt["ended_ns"] is not None

    again = api.patch("/api/rollouts/sm-1", json={"status": "succeeded"})
    assert again.status_code == 200, again.text
    assert again.json()["ended_ns"] == ended

    for status in ("failed", "running", "cancelled", "timeout"):
        error = assert_openai_error(
            api.patch("/api/rollouts/sm-1", json={"status": status}), 409, type_="conflict_error"
        )
        assert "succeeded" in error["message"]
    assert api.get("/api/rollouts/sm-1").json()["status"] == "succeeded"


def test_rollout_patch_rejects_invalid_status_and_unknown_rollouts(api: httpx.Client) -> None:
    create_rollout(api, id="sm-2")
    error = assert_openai_error(api.patch("/api/rollouts/sm-2", json={"status": "exploded"}), 422)
    assert error["param"] == "status"
    assert_openai_error(api.patch("/api/rollouts/sm-2", json={"status": 3}), 422, param="status")
    assert_openai_error(api.patch("/api/rollouts/sm-2", json={"owner": "me"}), 422, param="owner")
    assert_openai_error(api.patch("/api/rollouts/nope", json={"status": "failed"}), 404)


def test_rollout_patch_merges_metadata_and_replaces_tags(api: httpx.Client) -> None:
    create_rollout(api, id="sm-3", metadata={"a": 1}, tags=["x"])
    row = api.patch("/api/rollouts/sm-3", json={"metadata": {"b": 2}, "tags": ["y", "z"]})
    assert row.status_code == 200, row.text
    assert row.json()["metadata"] == {"a": 1, "b": 2}
    assert row.json()["tags"] == ["y", "z"]
    assert row.json()["status"] == "running"


def test_new_attempt_is_numbered_next_and_later_unnamed_calls_join_it(
    api: httpx.Client, gateway: GatewayThread, caller: Caller
) -> None:
    before = caller.chat("at-1")
    assert before.attempt_id == "1"
    gateway.flush()

    second = api.post("/api/rollouts/at-1/attempts", json={})
    assert second.status_code == 201, second.text
    assert second.json()["number"] == 2 and second.json()["id"] == "2"
    assert second.json()["status"] == "running" and second.json()["rollout_id"] == "at-1"
    after = caller.chat("at-1")
    assert after.attempt_id == "2"

    named = api.post("/api/rollouts/at-1/attempts", json={"id": "retry-b"})
    assert named.status_code == 201, named.text
    assert named.json()["number"] == 3 and named.json()["id"] == "retry-b"
    last = caller.chat("at-1")
    assert last.attempt_id == "retry-b"

    by_span = {s["span_id"]: s["attempt_id"] for s in gateway.spans(rollout_id="at-1")}
    assert by_span == {before.span_id: "1", after.span_id: "2", last.span_id: "retry-b"}
    detail = api.get("/api/rollouts/at-1").json()
    assert [(a["id"], a["number"]) for a in detail["attempts"]] == [
        ("1", 1),
        ("2", 2),
        ("retry-b", 3),
    ]


def test_new_attempt_on_a_rollout_created_through_the_api_is_used_by_calls(
    api: httpx.Client, caller: Caller
) -> None:
    create_rollout(api, id="at-2")
    first = api.post("/api/rollouts/at-2/attempts", json={"id": "first-try"})
    assert first.status_code == 201 and first.json()["number"] == 1
    assert caller.chat("at-2").attempt_id == "first-try"


def test_new_attempt_conflicts_on_duplicates_and_terminal_rollouts(api: httpx.Client) -> None:
    create_rollout(api, id="at-3")
    assert api.post("/api/rollouts/at-3/attempts", json={"id": "x"}).status_code == 201
    assert_openai_error(api.post("/api/rollouts/at-3/attempts", json={"id": "x"}), 409)
    assert_openai_error(
        api.post("/api/rollouts/at-3/attempts", json={"id": "bad id"}), 422, param="id"
    )
    assert_openai_error(api.post("/api/rollouts/missing/attempts", json={}), 404)
    assert api.patch("/api/rollouts/at-3", json={"status": "cancelled"}).status_code == 200
    error = assert_openai_error(api.post("/api/rollouts/at-3/attempts", json={}), 409)
    assert "cancelled" in error["message"]


def test_attempt_status_can_end_once(api: httpx.Client) -> None:
    create_rollout(api, id="at-4")
    assert api.post("/api/rollouts/at-4/attempts", json={}).status_code == 201
    failed = api.patch("/api/rollouts/at-4/attempts/1", json={"status": "failed"})
    assert failed.status_code == 200, failed.text
    assert failed.json()["status"] == "failed" and failed.json()["ended_ns"] is not None
    assert_openai_error(
        api.patch("/api/rollouts/at-4/attempts/1", json={"status": "succeeded"}), 409
    )
    assert_openai_error(api.patch("/api/rollouts/at-4/attempts/9", json={"status": "failed"}), 404)
    assert_openai_error(api.patch("/api/rollouts/at-4/attempts/1", json={}), 422, param="status")
    # The rollout itself is still open for another attempt.
    assert api.post("/api/rollouts/at-4/attempts", json={}).json()["number"] == 2


# -- spans ------------------------------------------------------------------------------------


def test_list_spans_filters_by_rollout_attempt_model_status_tag_and_time(
    api: httpx.Client, gateway: GatewayThread, caller: Caller
) -> None:
    tagged = [caller.chat("sp-a", "1", headers={"X-Tags": "alpha,beta"}) for _ in range(2)]
    other_attempt = caller.chat("sp-a", "2", headers={"X-Tags": "beta"})
    mocked = caller.chat("sp-b", "1", model="mock")
    caller.fail("sp-b")
    gateway.flush()
    everything = [
        s["span_id"] for s in read_rows(gateway.db_path, "select span_id from spans order by rowid")
    ]
    assert len(everything) == 5

    def ids(**params: Any) -> list[str]:
        response = api.get("/api/spans", params=params)
        assert response.status_code == 200, response.text
        return [row["span_id"] for row in response.json()["data"]]

    assert ids() == everything  # write order
    assert ids(rollout_id="sp-a") == [c.span_id for c in [*tagged, other_attempt]]
    assert ids(rollout_id="sp-a", attempt_id="2") == [other_attempt.span_id]
    assert ids(model="mock") == [mocked.span_id]
    assert len(ids(model="gpt-test")) == 4
    (error_span,) = ids(status="error")
    assert error_span not in {c.span_id for c in [*tagged, other_attempt, mocked]}
    assert len(ids(status="ok")) == 4
    assert ids(tag="alpha") == [c.span_id for c in tagged]
    assert ids(tag="beta") == [c.span_id for c in [*tagged, other_attempt]]
    assert ids(tag="gamma") == []
    assert ids(since="1h") == everything
    assert ids(since="2200-01-01") == []
    assert ids(until="1h") == []
    assert_openai_error(api.get("/api/spans", params={"status": "meh"}), 422, param="status")
    assert_openai_error(api.get("/api/spans", params={"since": "whenever"}), 422, param="since")


def test_list_spans_pages_with_a_cursor(
    api: httpx.Client, gateway: GatewayThread, caller: Caller
) -> None:
    calls = [caller.chat("pg-1", "1", content=f"n{i}") for i in range(5)]
    gateway.flush()
    pages = collect_pages(api, "/api/spans", rollout_id="pg-1", limit=2)
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [row["span_id"] for page in pages for row in page] == [c.span_id for c in calls]
    for row in pages[0]:
        assert "request_body" not in row and "_rowid" not in row
    assert_openai_error(api.get("/api/spans", params={"cursor": "%%%"}), 422, param="cursor")
    assert_openai_error(api.get("/api/spans", params={"limit": "0"}), 422, param="limit")


def test_get_span_has_full_request_and_response_bodies(
    api: httpx.Client, gateway: GatewayThread, caller: Caller
) -> None:
    call = caller.chat("sb-1", "1", content="what is in the body")
    gateway.flush()
    response = api.get(f"/api/spans/{call.span_id}")
    assert response.status_code == 200, response.text
    span = response.json()
    assert span["span_id"] == call.span_id
    assert span["rollout_id"] == "sb-1" and span["attempt_id"] == "1"
    assert span["response_id"] == call.response_id
    assert span["request_body"]["messages"] == [{"role": "user", "content": "what is in the body"}]
    assert span["response_body"]["id"] == call.response_id
    assert span["response_body"]["choices"][0]["message"]["content"] == (
        "echo: what is in the body"
    )
    assert "_rowid" not in span


def test_get_unknown_span_is_404(api: httpx.Client) -> None:
    assert_openai_error(api.get("/api/spans/0123456789abcdef"), 404, type_="not_found_error")


# -- rewards ----------------------------------------------------------------------------------


def test_rewards_land_on_a_rollout_an_attempt_a_span_and_a_response_id(
    api: httpx.Client, caller: Caller
) -> None:
    first = caller.chat("rw-1", "a1")
    second = caller.chat("rw-1", "a2")

    def post(**body: Any) -> dict[str, Any]:
        response = api.post("/api/rewards", json={"value": 0.5, **body})
        assert response.status_code == 201, response.text
        return response.json()

    on_rollout = post(rollout_id="rw-1")
    assert (on_rollout["rollout_id"], on_rollout["attempt_id"], on_rollout["span_id"]) == (
        "rw-1",
        None,
        None,
    )
    on_attempt = post(rollout_id="rw-1", attempt_id="a2")
    assert (on_attempt["rollout_id"], on_attempt["attempt_id"], on_attempt["span_id"]) == (
        "rw-1",
        "a2",
        None,
    )
    on_span = post(span_id=first.span_id)
    assert (on_span["rollout_id"], on_span["attempt_id"], on_span["span_id"]) == (
        "rw-1",
        "a1",
        first.span_id,
    )
    on_response = post(response_id=second.response_id)
    assert (on_response["rollout_id"], on_response["attempt_id"], on_response["span_id"]) == (
        "rw-1",
        "a2",
        second.span_id,
    )
    listed = api.get("/api/rewards", params={"rollout_id": "rw-1"}).json()["data"]
    assert [r["id"] for r in listed] == [
        on_rollout["id"],
        on_attempt["id"],
        on_span["id"],
        on_response["id"],
    ]


def test_reward_stores_every_field(api: httpx.Client, caller: Caller) -> None:
    call = caller.chat("rw-2", "1")
    body = {
        "span_id": call.span_id,
        "name": "accuracy",
        "value": 0.75,
        "dimensions": {"correctness": 0.9, "style": 0.6},
        "final": True,
        "source": "judge:rubric",
        "comment": "mostly right",
        "tags": ["graded", "v2"],
        "details": {"criteria": [{"name": "correctness", "score": 0.9}], "model": "judge-1"},
    }
    response = api.post("/api/rewards", json=body)
    assert response.status_code == 201, response.text
    stored = response.json()
    for key, value in body.items():
        assert stored[key] == value, key
    assert stored["id"] and stored["created_ns"] > 0

    (listed,) = api.get("/api/rewards", params={"span_id": call.span_id}).json()["data"]
    assert listed == stored

    defaults = api.post("/api/rewards", json={"rollout_id": "rw-2", "value": 1}).json()
    assert defaults["name"] == "reward" and defaults["source"] == "user"
    assert defaults["final"] is False and defaults["value"] == 1.0
    assert defaults["dimensions"] == {} and defaults["details"] == {} and defaults["tags"] == []
    assert defaults["comment"] is None


def test_reward_with_a_client_id_is_idempotent(api: httpx.Client, caller: Caller) -> None:
    call = caller.chat("rw-3", "1")
    body = {
        "id": "reward-once",
        "response_id": call.response_id,
        "value": 1.0,
        "dimensions": {"a": 1.0},
        "tags": ["t"],
        "details": {"k": [1, 2]},
    }
    first = api.post("/api/rewards", json=body)
    assert first.status_code == 201, first.text
    again = api.post("/api/rewards", json=body)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    # The same target named another way is the same body.
    same_target = {**body, "response_id": None, "span_id": call.span_id}
    assert api.post("/api/rewards", json=same_target).status_code == 200

    for change in ({"value": 0.0}, {"name": "other"}, {"final": True}, {"dimensions": {"a": 2}}):
        error = assert_openai_error(api.post("/api/rewards", json={**body, **change}), 409)
        assert "reward-once" in error["message"]
    listed = api.get("/api/rewards", params={"rollout_id": "rw-3"}).json()["data"]
    assert [r["id"] for r in listed] == ["reward-once"]
    assert listed[0]["value"] == 1.0


def test_reward_to_an_unknown_target_is_404(api: httpx.Client, caller: Caller) -> None:
    caller.chat("rw-4", "1")
    for body in (
        {"rollout_id": "no-such-rollout"},
        {"rollout_id": "rw-4", "attempt_id": "no-such-attempt"},
        {"span_id": "ffffffffffffffff"},
        {"response_id": "chatcmpl-never-seen"},
    ):
        assert_openai_error(api.post("/api/rewards", json={"value": 1, **body}), 404)
    assert api.get("/api/rewards").json()["data"] == []


def test_reward_naming_a_span_of_another_rollout_conflicts(
    api: httpx.Client, caller: Caller
) -> None:
    call = caller.chat("rw-5", "1")
    create_rollout(api, id="rw-5-other")
    body = {"value": 1, "span_id": call.span_id, "rollout_id": "rw-5-other"}
    response = api.post("/api/rewards", json=body)
    assert response.status_code in (409, 422), response.text
    assert_openai_error(response, response.status_code)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rollout_id": "r", "value": "high"}, "value"),
        ({"rollout_id": "r"}, "value"),
        ({"rollout_id": "r", "value": None}, "value"),
        ({"value": 1.0}, "rollout_id"),
        ({"value": 1.0, "attempt_id": "1"}, "rollout_id"),
        ({"rollout_id": "r", "value": 1, "dimensions": {"accuracy": "good"}}, "dimensions"),
        ({"rollout_id": "r", "value": 1, "dimensions": [0.5]}, "dimensions"),
        ({"rollout_id": "r", "value": 1, "final": "maybe"}, "final"),
        ({"rollout_id": "r", "value": 1, "tags": "x"}, "tags"),
        ({"rollout_id": "r", "value": 1, "name": ""}, "name"),
        ({"rollout_id": "r", "value": 1, "id": "has space"}, "id"),
        ({"rollout_id": "r", "value": 1, "score": 3}, "score"),
    ],
    ids=[
        "value-not-a-number",
        "value-missing",
        "value-null",
        "no-target",
        "attempt-without-rollout",
        "dimension-not-a-number",
        "dimensions-not-an-object",
        "final-not-a-bool",
        "tags-not-a-list",
        "empty-name",
        "bad-id",
        "unknown-field",
    ],
)
def test_invalid_reward_body_is_422_naming_the_field(
    validation_api: httpx.Client, body: dict[str, Any], field: str
) -> None:
    error = assert_openai_error(validation_api.post("/api/rewards", json=body), 422)
    assert names_field(error, field), error
    assert validation_api.get("/api/rewards").json()["data"] == []


def test_reward_under_a_rollout_path_targets_that_rollout(
    api: httpx.Client, caller: Caller
) -> None:
    call = caller.chat("rw-6", "2")
    on_rollout = api.post("/api/rollouts/rw-6/rewards", json={"value": 1, "final": True})
    assert on_rollout.status_code == 201, on_rollout.text
    assert on_rollout.json()["rollout_id"] == "rw-6" and on_rollout.json()["final"] is True
    on_attempt = api.post("/api/rollouts/rw-6/rewards", json={"value": 0.2, "attempt_id": "2"})
    assert on_attempt.status_code == 201, on_attempt.text
    assert on_attempt.json()["attempt_id"] == "2"
    on_call = api.post(
        "/api/rollouts/rw-6/rewards", json={"value": 0.3, "response_id": call.response_id}
    )
    assert on_call.status_code == 201, on_call.text
    assert on_call.json()["span_id"] == call.span_id
    assert_openai_error(api.post("/api/rollouts/nope/rewards", json={"value": 1}), 404)
    assert_openai_error(
        api.post("/api/rollouts/rw-6/rewards", json={"value": 1, "rollout_id": "other"}),
        422,
        param="rollout_id",
    )
    assert api.get("/api/rollouts/rw-6").json()["summary"]["rewards"] == 3


def test_list_rewards_filters_and_pages(api: httpx.Client, caller: Caller) -> None:
    call = caller.chat("lr-1", "1")
    caller.chat("lr-2", "1")
    posted = [
        {"rollout_id": "lr-1", "value": 1, "name": "success", "source": "user"},
        {"rollout_id": "lr-1", "attempt_id": "1", "value": 0.5, "source": "agent"},
        {"span_id": call.span_id, "value": 0.1, "name": "step", "source": "judge:len"},
        {"rollout_id": "lr-2", "value": 0, "name": "success", "source": "judge:len"},
    ]
    ids = []
    for body in posted:
        response = api.post("/api/rewards", json=body)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])

    def listed(**params: Any) -> list[str]:
        response = api.get("/api/rewards", params=params)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["data"]]

    assert listed() == ids
    assert listed(rollout_id="lr-1") == ids[:3]
    assert listed(rollout_id="lr-1", attempt_id="1") == ids[1:3]
    assert listed(span_id=call.span_id) == [ids[2]]
    assert listed(name="success") == [ids[0], ids[3]]
    assert listed(source="judge:len") == ids[2:]
    assert listed(rollout_id="nobody") == []
    pages = collect_pages(api, "/api/rewards", limit=3)
    assert [len(p) for p in pages] == [3, 1]
    assert [r["id"] for p in pages for r in p] == ids
    assert_openai_error(api.get("/api/rewards", params={"cursor": "zz"}), 422, param="cursor")
    assert_openai_error(api.get("/api/rewards", params={"limit": "x"}), 422, param="limit")


def test_reward_is_queryable_the_moment_the_post_returns(api: httpx.Client, caller: Caller) -> None:
    for i in range(15):
        call = caller.chat("now-1", "1", content=f"q{i}")
        # No flush: the call's span must be findable by its response id straight away.
        posted = api.post("/api/rewards", json={"response_id": call.response_id, "value": i})
        assert posted.status_code == 201, posted.text
        assert posted.json()["span_id"] == call.span_id
        listed = api.get("/api/rewards", params={"span_id": call.span_id}).json()["data"]
        assert [r["id"] for r in listed] == [posted.json()["id"]]
        assert api.get("/api/rollouts/now-1").json()["summary"]["rewards"] == i + 1


def test_rewards_posted_concurrently_with_calls_land_on_the_right_spans(
    gateway: GatewayThread,
) -> None:
    callers, calls_each, posters = 8, 6, 4
    done: queue.Queue[Call | None] = queue.Queue()
    results: list[tuple[Call, dict[str, Any]]] = []
    lock = threading.Lock()

    def make_calls(worker: int) -> list[Call]:
        made = []
        with openai.OpenAI(
            base_url=gateway.url(f"conc-{worker}"), api_key="x", max_retries=0
        ) as client:
            for n in range(calls_each):
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-test",
                    messages=[{"role": "user", "content": f"worker {worker} call {n}"}],
                )
                call = Call(
                    raw.parse().id,
                    raw.headers["x-span-id"],
                    raw.headers["x-rollout-id"],
                    raw.headers["x-attempt-id"],
                )
                made.append(call)
                done.put(call)
        return made

    def post_rewards() -> None:
        with httpx.Client(base_url=gateway.base, timeout=10.0) as client:
            while (call := done.get()) is not None:
                response = client.post(
                    "/api/rewards",
                    json={
                        "id": f"rw-{call.span_id}",
                        "response_id": call.response_id,
                        "value": 1.0,
                    },
                )
                assert response.status_code == 201, response.text
                with lock:
                    results.append((call, response.json()))

    with ThreadPoolExecutor(max_workers=callers + posters) as pool:
        poster_futures = [pool.submit(post_rewards) for _ in range(posters)]
        caller_futures = [pool.submit(make_calls, w) for w in range(callers)]
        made = [call for f in caller_futures for call in f.result(timeout=30)]
        for _ in range(posters):
            done.put(None)
        for f in poster_futures:
            f.result(timeout=30)

    assert len(made) == callers * calls_each
    assert len({c.response_id for c in made}) == len(made)
    assert len(results) == len(made)
    for call, reward in results:
        assert reward["span_id"] == call.span_id
        assert reward["rollout_id"] == call.rollout_id
        assert reward["attempt_id"] == call.attempt_id
    # And in the database, every span carries exactly its own reward.
    rows = read_rows(
        gateway.db_path,
        "select r.id, r.span_id, s.response_id from rewards r join spans s using (span_id)",
    )
    by_response = {c.response_id: c.span_id for c in made}
    assert len(rows) == len(made)
    for row in rows:
        assert by_response[row["response_id"]] == row["span_id"]
        assert row["id"] == f"rw-{row['span_id']}"


# -- stats ------------------------------------------------------------------------------------


def test_stats_totals_match_the_calls_made(
    api: httpx.Client, gateway: GatewayThread, caller: Caller
) -> None:
    for i in range(3):
        caller.chat("st-1", "1", content=f"s{i}")
    for _ in range(2):
        caller.chat("st-2", "1", model="mock")
    caller.fail("st-1")
    assert api.patch("/api/rollouts/st-2", json={"status": "succeeded"}).status_code == 200
    stored = gateway.spans()

    response = api.get("/api/stats")
    assert response.status_code == 200, response.text
    stats = response.json()
    totals = stats["totals"]
    assert totals["calls"] == 6
    assert totals["errors"] == 1
    assert totals["input_tokens"] == sum(s["input_tokens"] or 0 for s in stored) > 0
    assert totals["output_tokens"] == sum(s["output_tokens"] or 0 for s in stored) > 0
    assert totals["cost_usd"] == pytest.approx(sum(s["cost_usd"] or 0.0 for s in stored))
    by_model = {row["model"]: row for row in stats["by_model"]}
    assert by_model["gpt-test"]["calls"] == 4 and by_model["gpt-test"]["errors"] == 1
    assert by_model["mock"]["calls"] == 2 and by_model["mock"]["errors"] == 0
    assert stats["rollouts_by_status"] == {"running": 1, "succeeded": 1}

    future = api.get("/api/stats", params={"since": "2200-01-01"}).json()
    assert future["totals"]["calls"] == 0 and future["by_model"] == []
    assert api.get("/api/stats", params={"since": "1h"}).json()["totals"]["calls"] == 6
    assert_openai_error(api.get("/api/stats", params={"since": "later"}), 422, param="since")
