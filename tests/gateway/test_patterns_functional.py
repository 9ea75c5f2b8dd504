"""`/api/patterns`, `/api/leaderboard` and `/api/guidelines/{agent}` over real HTTP.

Rollouts are made through the gateway with the `openai` SDK on the built-in `mock` model: a
call offering a tool (the mock asks for it), then a follow-up carrying the tool's result,
which the gateway records as an `execute_tool` span. Rewards are posted through the API.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from servers import GatewayThread, read_spans

import gateway.cli.main  # noqa: F401  (load it before cli_patterns, which imports from it)
from gateway.cli.patterns import patterns as patterns_command

pytestmark = pytest.mark.both_backends

AGENT = "agent-f"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look something up.",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        },
    }
]
OK_RESULT = '{"answer": 42}'
ERROR_RESULT = '{"error": "lookup service unavailable"}'
ROLLOUTS = 12  # half get an error from the tool and fail; min support is 5


def run_rollout(gateway: GatewayThread, rollout_id: str, tool_result: str) -> None:
    """Ask, get a tool call back, answer it with `tool_result`, get the final text."""
    client = openai.OpenAI(
        base_url=gateway.url(rollout_id, "1"),
        api_key="x",
        max_retries=0,
        default_headers={"X-Agent-Id": AGENT},
    )
    with client:
        messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the answer?"}]
        first = client.chat.completions.create(model="mock", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls"
        assert message.tool_calls and message.tool_calls[0].function.name == "lookup"
        messages.append(message.model_dump(exclude_none=True))
        messages.append(
            {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": tool_result}
        )
        second = client.chat.completions.create(model="mock", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        assert second.choices[0].finish_reason == "stop"


@pytest.fixture
def recorded(gateway: GatewayThread) -> GatewayThread:
    with httpx.Client(base_url=gateway.base, timeout=10.0) as api:
        for i in range(ROLLOUTS):
            failing = i % 2 == 1
            rollout_id = f"pf-{i:02d}"
            run_rollout(gateway, rollout_id, ERROR_RESULT if failing else OK_RESULT)
            # Written after every span queued before it, so the analysis below sees them all.
            reward = api.post(
                f"/api/rollouts/{rollout_id}/rewards",
                json={"value": 0.0 if failing else 1.0, "final": True},
            )
            assert reward.status_code == 201, reward.text
    return gateway


def get(gateway: GatewayThread, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{gateway.base}{path}", params=params, timeout=30.0)


def test_the_gateway_records_an_execute_tool_span_per_tool_result(
    recorded: GatewayThread,
) -> None:
    spans = read_spans(recorded.db_path, rollout_id="pf-01")
    assert [s["operation"] for s in spans] == ["chat", "execute_tool", "chat"]
    execution = spans[1]
    assert execution["name"] == "execute_tool lookup"
    assert execution["status"] == "error"
    assert execution["parent_span_id"] == spans[0]["span_id"]


def test_patterns_finds_the_failing_tool_and_reports_its_stats(recorded: GatewayThread) -> None:
    response = get(recorded, "/api/patterns")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert {
        "attempts", "with_outcome", "success_patterns", "failure_patterns", "tools",
        "leaderboards", "outliers", "tests_run", "alpha", "min_support",
    } <= data.keys()  # fmt: skip
    assert data["attempts"] == data["with_outcome"] == ROLLOUTS
    assert (data["alpha"], data["min_support"]) == (0.05, 5)

    [lookup] = data["tools"]
    assert lookup["tool"] == "lookup"
    assert lookup["calls"] == lookup["executions"] == ROLLOUTS
    assert lookup["error_rate"] == 0.5
    assert lookup["median_duration_ms"] is not None and lookup["median_duration_ms"] >= 0

    [failure] = [f for f in data["failure_patterns"] if f["feature"] == "tool_error:lookup"]
    assert failure["support"] == ROLLOUTS // 2
    assert failure["rate_with"] == 0.0 and failure["rate_without"] == 1.0
    assert failure["q_value"] < 0.05
    example = failure["evidence"][0]
    assert example["rollout_id"] in {f"pf-{i:02d}" for i in range(1, ROLLOUTS, 2)}
    [span] = read_spans(recorded.db_path, span_id=example["span_id"])
    assert span["operation"] == "execute_tool" and span["status"] == "error"

    assert [row["agent"] for row in data["leaderboards"]["agents"]] == [AGENT]
    assert [row["model"] for row in data["leaderboards"]["models"]] == ["mock"]


def test_patterns_query_parameters_narrow_the_analysis(recorded: GatewayThread) -> None:
    strict = get(recorded, "/api/patterns", min_support=7, alpha="0.01").json()
    assert (strict["min_support"], strict["alpha"]) == (7, 0.01)
    assert strict["failure_patterns"] == []  # 6 attempts show the error: below the support
    assert get(recorded, "/api/patterns", agent="nobody").json()["attempts"] == 0
    assert get(recorded, "/api/patterns", since="2200-01-01").json()["attempts"] == 0
    assert get(recorded, "/api/patterns", since="1h").json()["attempts"] == ROLLOUTS


def test_leaderboard_by_model_and_agent(recorded: GatewayThread) -> None:
    response = get(recorded, "/api/leaderboard", agent=AGENT)
    assert response.status_code == 200, response.text
    boards = response.json()
    assert boards.keys() == {"models", "agents", "model_versions"}
    [row] = boards["agents"]
    assert row["agent"] == AGENT
    assert row["rollouts"] == row["attempts"] == ROLLOUTS
    assert row["success_rate"] == 0.5 and row["mean_reward"] == 0.5
    assert row["reward_ci_low"] < 0.5 < row["reward_ci_high"]
    assert row["p50_latency_ms"] <= row["p95_latency_ms"]
    assert {"mean_cost_usd", "cost_per_reward_point"} <= row.keys()
    assert boards["models"][0]["model"] == "mock"


BAD_PARAMETERS = [
    ("/api/patterns", {"min_support": "0"}, "min_support"),
    ("/api/patterns", {"alpha": "2"}, "alpha"),
    ("/api/patterns", {"alpha": "often"}, "alpha"),
    ("/api/patterns", {"since": "last tuesday"}, "since"),
    ("/api/patterns", {"since": "2999-01-01"}, "since"),
    ("/api/patterns", {"limit": "5"}, "limit"),
    ("/api/leaderboard", {"success_threshold": "nan"}, "success_threshold"),
    ("/api/leaderboard", {"since": "soon"}, "since"),
]


def test_bad_parameters_answer_422_in_the_openai_error_shape(gateway: GatewayThread) -> None:
    # One gateway for every case: starting one per case would dominate the run time.
    for path, params, param in BAD_PARAMETERS:
        response = get(gateway, path, **params)
        assert response.status_code == 422, (path, params, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param, (path, params, error)


def test_guidelines_lists_versions_written_by_the_cli_while_serving(
    recorded: GatewayThread,
) -> None:
    empty = get(recorded, f"/api/guidelines/{AGENT}")
    assert empty.status_code == 200, empty.text
    assert empty.json() == {"agent": AGENT, "versions": [], "latest": None}

    written = CliRunner().invoke(
        patterns_command,
        ["guidelines", "--agent", AGENT, "--db", str(recorded.db_path)],
        catch_exceptions=False,
    )
    assert written.exit_code == 0, written.output
    assert "Nothing is applied to any prompt" in written.stderr

    listed = get(recorded, f"/api/guidelines/{AGENT}").json()
    assert [v["version"] for v in listed["versions"]] == [1]
    assert listed["versions"][0]["chars"] == len(listed["latest"]["content"])
    latest = listed["latest"]
    assert latest["version"] == 1
    assert latest["content"] == written.stdout
    assert "tool lookup returns an error" in latest["content"]
    assert [f["feature"] for f in latest["findings"]] == ["tool_error:lookup"]


def test_patterns_command_reads_the_gateways_database(recorded: GatewayThread) -> None:
    result = CliRunner().invoke(
        patterns_command, ["--db", str(recorded.db_path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "tool_error:lookup" in result.stdout
    assert any(line.startswith("lookup ") and "50%" in line for line in result.stdout.splitlines())


def test_openapi_describes_the_pattern_routes(gateway: GatewayThread) -> None:
    paths = httpx.get(f"{gateway.base}/openapi.json", timeout=10.0).json()["paths"]
    for path in ("/api/patterns", "/api/leaderboard", "/api/guidelines/{agent}"):
        assert "get" in paths[path], path
    names = {p["name"] for p in paths["/api/patterns"]["get"]["parameters"]}
    assert {"since", "agent", "min_support", "alpha"} <= names
