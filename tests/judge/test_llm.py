"""The `llm` judge and pairwise comparison, with the judge model's HTTP calls mocked by respx.

`JudgeClient` talks httpx to the gateway's OpenAI route under a judge rollout
(`/rollout/judge-<judge>-<rollout>/v1/chat/completions`); respx stands in for the gateway
so each test decides exactly what the judge model answers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import respx
from judge_builders import AgentRun, completion_body, trajectory, verdict_json

from judge.llm import (
    InvalidVerdict,
    JudgeClient,
    JudgeModelError,
    attempt_view,
    compare,
    judge_llm,
    parse_verdict,
)
from judge.rubric import DEFAULT_RUBRIC, RubricError, load_rubric
from judge.trajectory import Trajectory
from judge.verdict import weighted_score

GATEWAY = "http://gw.test"
JUDGE_ROUTE = r"^/rollout/judge-[^/]+/v1/chat/completions$"
BOGUS_SPAN = "deadbeefdeadbeef"
DEFAULT_CRITERIA = [c.name for c in DEFAULT_RUBRIC.criteria]


def completion(content: str) -> httpx.Response:
    """The gateway's (OpenAI-shaped) answer carrying the judge model's text."""
    return httpx.Response(200, json=completion_body(content))


def sent(request: httpx.Request) -> dict[str, Any]:
    return json.loads(request.content)


def test_the_default_rubric_has_the_four_criteria_the_issue_names() -> None:
    assert DEFAULT_CRITERIA == [
        "task_completion",
        "tool_efficiency",
        "decision_quality",
        "error_handling",
    ]


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def gateway() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=GATEWAY, assert_all_mocked=True, assert_all_called=False) as router:
        yield router


@pytest.fixture
def client(http: httpx.AsyncClient) -> JudgeClient:
    return JudgeClient(GATEWAY, "judge-model", http)


@pytest.fixture
def weather(db_path: Path) -> Trajectory:
    run = AgentRun("weather", tools=["get_weather"])
    run.call_tool("get_weather")
    run.tool_result("18C and sunny")
    run.ok("It is 18C and sunny in Paris.")
    return trajectory(db_path, run)


@pytest.mark.asyncio
async def test_a_valid_verdict_gets_the_rubrics_weighted_score_and_criteria(
    gateway: respx.MockRouter, client: JudgeClient, weather: Trajectory
) -> None:
    scores = {
        "task_completion": 1.0,
        "tool_efficiency": 0.5,
        "decision_quality": 0.8,
        "error_handling": 0.0,
    }
    gateway.post(path__regex=JUDGE_ROUTE).mock(return_value=completion(verdict_json(scores)))

    verdict = await judge_llm(weather, DEFAULT_RUBRIC, client)

    weights = {
        "task_completion": 3.0,
        "tool_efficiency": 1.0,
        "decision_quality": 1.5,
        "error_handling": 1.0,
    }
    expected = sum(scores[n] * w for n, w in weights.items()) / sum(weights.values())
    assert verdict.score == pytest.approx(round(expected, 4))
    assert verdict.judge == "llm"
    assert verdict.rubric_version == "llm-1"
    assert verdict.rollout_id == "weather"
    assert list(verdict.criteria) == DEFAULT_CRITERIA
    assert {n: c.score for n, c in verdict.criteria.items()} == scores
    assert verdict.criteria["tool_efficiency"].explanation == "tool_efficiency explained"
    assert verdict.summary == "ok"


@pytest.mark.asyncio
async def test_evidence_keeps_only_span_ids_of_the_judged_rollout(
    gateway: respx.MockRouter, client: JudgeClient, weather: Trajectory
) -> None:
    real = weather.steps[0].span_id
    reply = verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 1.0), evidence=[real, BOGUS_SPAN])
    gateway.post(path__regex=JUDGE_ROUTE).mock(return_value=completion(reply))

    verdict = await judge_llm(weather, DEFAULT_RUBRIC, client)

    assert verdict.evidence == [real]
    for criterion in verdict.criteria.values():
        assert criterion.evidence == [real]


@pytest.mark.asyncio
async def test_the_judge_asks_through_the_gateway_under_a_judge_rollout(
    gateway: respx.MockRouter, http: httpx.AsyncClient, weather: Trajectory
) -> None:
    route = gateway.post(path__regex=JUDGE_ROUTE).mock(
        return_value=completion(verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 1.0)))
    )
    client = JudgeClient(GATEWAY + "/", "judge-model", http, api_key="sk-gateway")

    await judge_llm(weather, DEFAULT_RUBRIC, client)

    request = route.calls.last.request
    body = sent(request)
    assert request.url.path == "/rollout/judge-llm-weather/v1/chat/completions"
    assert request.headers["X-Agent-Id"] == "judge-llm"
    assert request.headers["X-Tags"] == "judge"
    assert request.headers["Authorization"] == "Bearer sk-gateway"
    assert body["model"] == "judge-model"
    assert body["temperature"] == 0
    assert body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    for name in DEFAULT_CRITERIA:
        assert name in system["content"]
    assert user["content"].startswith("TASK: What is the weather in Paris?")
    assert "FINAL ANSWER: It is 18C and sunny in Paris." in user["content"]


@pytest.mark.asyncio
async def test_invalid_json_is_asked_for_again_with_what_was_wrong(
    gateway: respx.MockRouter, client: JudgeClient, weather: Trajectory
) -> None:
    valid = verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 0.5))
    route = gateway.post(path__regex=JUDGE_ROUTE).mock(
        side_effect=[completion("Sure! The agent did well."), completion(valid)]
    )

    verdict = await judge_llm(weather, DEFAULT_RUBRIC, client)

    assert verdict.score == pytest.approx(0.5)
    assert route.call_count == 2
    first = sent(route.calls[0].request)["messages"]
    second = sent(route.calls[1].request)["messages"]
    assert len(first) == 2
    assert second[:2] == first
    assert second[2] == {"role": "assistant", "content": "Sure! The agent did well."}
    assert second[3]["role"] == "user"
    assert second[3]["content"].startswith("That is not a valid verdict (not valid JSON")


@pytest.mark.asyncio
@pytest.mark.parametrize("retries", [0, 2])
async def test_a_verdict_that_stays_invalid_is_reported_after_the_retries(
    gateway: respx.MockRouter, client: JudgeClient, weather: Trajectory, retries: int
) -> None:
    route = gateway.post(path__regex=JUDGE_ROUTE).mock(return_value=completion("{not json"))

    with pytest.raises(InvalidVerdict, match="not valid JSON"):
        await judge_llm(weather, DEFAULT_RUBRIC, client, max_invalid_retries=retries)

    assert route.call_count == retries + 1


@pytest.mark.asyncio
async def test_a_verdict_missing_a_criterion_is_invalid(
    gateway: respx.MockRouter, client: JudgeClient, weather: Trajectory
) -> None:
    partial = verdict_json(dict.fromkeys(DEFAULT_CRITERIA[:-1], 1.0))
    route = gateway.post(path__regex=JUDGE_ROUTE).mock(return_value=completion(partial))

    with pytest.raises(InvalidVerdict, match="missing criteria: error_handling"):
        await judge_llm(weather, DEFAULT_RUBRIC, client, max_invalid_retries=1)

    assert route.call_count == 2
    assert (
        "missing criteria: error_handling"
        in sent(route.calls[1].request)["messages"][-1]["content"]
    )


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 1.5)), "less than or equal to 1"),
        (verdict_json(dict.fromkeys(DEFAULT_CRITERIA, -0.1)), "greater than or equal to 0"),
        ('{"summary": "no criteria at all"}', "criteria"),
        ('["a", "list"]', "valid dictionary"),
    ],
)
def test_verdicts_that_do_not_fit_the_schema_are_invalid(
    weather: Trajectory, reply: str, problem: str
) -> None:
    with pytest.raises(InvalidVerdict, match=problem):
        parse_verdict(reply, DEFAULT_RUBRIC, weather)


def test_a_code_fenced_verdict_is_accepted(weather: Trajectory) -> None:
    fenced = "```json\n" + verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 0.25)) + "\n```"

    verdict = parse_verdict(fenced, DEFAULT_RUBRIC, weather)

    assert verdict.score == pytest.approx(0.25)


def test_extra_criteria_the_rubric_does_not_name_are_dropped(weather: Trajectory) -> None:
    reply = verdict_json({**dict.fromkeys(DEFAULT_CRITERIA, 1.0), "vibes": 0.0})

    verdict = parse_verdict(reply, DEFAULT_RUBRIC, weather)

    assert list(verdict.criteria) == DEFAULT_CRITERIA
    assert verdict.score == 1.0


@pytest.mark.asyncio
async def test_an_http_error_from_the_gateway_is_a_model_error_and_not_retried(
    gateway: respx.MockRouter, client: JudgeClient, weather: Trajectory
) -> None:
    route = gateway.post(path__regex=JUDGE_ROUTE).mock(
        return_value=httpx.Response(500, json={"error": {"message": "upstream down"}})
    )

    with pytest.raises(JudgeModelError, match="judge model answered 500") as caught:
        await judge_llm(weather, DEFAULT_RUBRIC, client)

    assert not isinstance(caught.value, InvalidVerdict)
    assert route.call_count == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("effect", "problem"),
    [
        (httpx.ConnectError("connection refused"), "unreachable"),
        (httpx.Response(200, json={"no": "choices"}), "not a chat completion"),
        (httpx.Response(200, text="<html>proxy</html>"), "not a chat completion"),
    ],
)
async def test_an_unreachable_or_garbled_gateway_is_a_model_error(
    gateway: respx.MockRouter,
    client: JudgeClient,
    weather: Trajectory,
    effect: Any,
    problem: str,
) -> None:
    gateway.post(path__regex=JUDGE_ROUTE).mock(side_effect=[effect])

    with pytest.raises(JudgeModelError, match=problem):
        await judge_llm(weather, DEFAULT_RUBRIC, client)


SUPPORT_RUBRIC = """\
name: support
version: support-2
instructions: You grade customer support agents.
criteria:
  - name: politeness
    description: Was the agent polite?
    weight: 3
  - name: resolution
    description: Was the customer's problem solved?
"""


@pytest.mark.asyncio
async def test_a_custom_yaml_rubric_brings_its_own_criteria_and_weights(
    gateway: respx.MockRouter, client: JudgeClient, weather: Trajectory, tmp_path: Path
) -> None:
    path = tmp_path / "support.yaml"
    path.write_text(SUPPORT_RUBRIC, encoding="utf-8")
    rubric = load_rubric(path)
    route = gateway.post(path__regex=JUDGE_ROUTE).mock(
        return_value=completion(verdict_json({"politeness": 1.0, "resolution": 0.0}))
    )

    verdict = await judge_llm(weather, rubric, client)

    assert verdict.judge == "support"
    assert verdict.rubric_version == "support-2"
    assert list(verdict.criteria) == ["politeness", "resolution"]
    assert verdict.score == pytest.approx(0.75)
    request = route.calls.last.request
    assert request.url.path == "/rollout/judge-support-weather/v1/chat/completions"
    system = sent(request)["messages"][0]["content"]
    assert system.startswith("You grade customer support agents.")
    assert "- politeness: Was the agent polite?" in system
    assert "task_completion" not in system


def test_a_rubric_file_takes_its_name_from_config_when_it_has_none(tmp_path: Path) -> None:
    path = tmp_path / "unnamed.yaml"
    path.write_text(SUPPORT_RUBRIC.replace("name: support\n", ""), encoding="utf-8")

    assert load_rubric(path, name="helpdesk").name == "helpdesk"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: x\ncriteria: []\n", "criteria"),
        ("name: x\ncriteria:\n  - name: Bad-Name\n    description: d\n", "criteria.0.name"),
        ("name: x\ncriteria:\n  - name: a\n    description: d\n    weight: 0\n", "weight"),
        ("name: x\nshoe_size: 9\ncriteria:\n  - name: a\n    description: d\n", "shoe_size"),
        ("name: [unclosed\n", "cannot read rubric"),
    ],
)
def test_a_bad_rubric_file_names_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(RubricError, match=problem):
        load_rubric(path)


def test_a_rubric_without_version_is_versioned_by_its_content(tmp_path: Path) -> None:
    one = tmp_path / "one.yaml"
    one.write_text(SUPPORT_RUBRIC.replace("version: support-2\n", ""), encoding="utf-8")
    two = tmp_path / "two.yaml"
    two.write_text(
        SUPPORT_RUBRIC.replace("version: support-2\n", "").replace("weight: 3", "weight: 2"),
        encoding="utf-8",
    )

    first = load_rubric(one).fingerprint()

    assert first == load_rubric(one).fingerprint()
    assert first != load_rubric(two).fingerprint()
    assert len(first) == 12


def test_weighted_score_of_no_criteria_is_zero() -> None:
    assert weighted_score({}, {}) == 0.0


# -- pairwise -------------------------------------------------------------------------------

GOOD = "GOOD-MARKER It is 18C and sunny in Paris."


def fair_judge(request: httpx.Request) -> httpx.Response:
    """Prefers whichever attempt holds the good answer, wherever it is shown."""
    user = sent(request)["messages"][1]["content"]
    shown_first = user.split("=== ATTEMPT B ===")[0]
    preferred = "A" if GOOD in shown_first else "B"
    return completion(json.dumps({"preferred": preferred, "reason": f"{preferred} answered"}))


def biased_judge(request: httpx.Request) -> httpx.Response:
    """Always prefers whatever is shown first: position bias."""
    return completion('{"preferred": "A", "reason": "first looked fine"}')


def _pair(db_path: Path) -> tuple[Trajectory, Trajectory]:
    good = AgentRun("good")
    good.ok(GOOD)
    bad = AgentRun("bad")
    bad.error()
    bad.ok("I do not know.")
    return trajectory(db_path, good), trajectory(db_path, bad)


@pytest.mark.asyncio
@pytest.mark.parametrize("good_first", [True, False])
async def test_pairwise_preference_that_survives_the_swap_is_consistent(
    gateway: respx.MockRouter, client: JudgeClient, db_path: Path, good_first: bool
) -> None:
    route = gateway.post(path__regex=JUDGE_ROUTE).mock(side_effect=fair_judge)
    good, bad = _pair(db_path)
    a, b = (good, bad) if good_first else (bad, good)

    result = await compare(a, b, DEFAULT_RUBRIC, client)

    assert result.consistent is True
    assert result.preferred == ("a" if good_first else "b")
    assert (result.a, result.b) == (a.rollout_id, b.rollout_id)
    assert [o["order"] for o in result.orders] == ["a,b", "b,a"]
    assert [o["preferred"] for o in result.orders] == [result.preferred] * 2
    assert route.call_count == 2
    first, second = (sent(call.request)["messages"][1]["content"] for call in route.calls)
    assert first.index(a.final_answer) < first.index("=== ATTEMPT B ===")
    assert second.index(b.final_answer) < second.index("=== ATTEMPT B ===")
    assert route.calls[0].request.url.path == (
        f"/rollout/judge-llm-pairwise-{a.rollout_id}-vs-{b.rollout_id}/v1/chat/completions"
    )


@pytest.mark.asyncio
async def test_a_position_biased_preference_is_inconsistent_and_reported_as_a_tie(
    gateway: respx.MockRouter, client: JudgeClient, db_path: Path
) -> None:
    gateway.post(path__regex=JUDGE_ROUTE).mock(side_effect=biased_judge)
    good, bad = _pair(db_path)

    result = await compare(good, bad, DEFAULT_RUBRIC, client)

    assert result.consistent is False
    assert result.preferred == "tie"
    assert [o["preferred"] for o in result.orders] == ["a", "b"]


@pytest.mark.asyncio
async def test_a_tie_in_both_orders_is_a_consistent_tie(
    gateway: respx.MockRouter, client: JudgeClient, db_path: Path
) -> None:
    gateway.post(path__regex=JUDGE_ROUTE).mock(
        return_value=completion('{"preferred": "tie", "reason": "same"}')
    )
    good, bad = _pair(db_path)

    result = await compare(good, bad, DEFAULT_RUBRIC, client)

    assert (result.preferred, result.consistent) == ("tie", True)


@pytest.mark.asyncio
async def test_a_pairwise_answer_that_is_not_a_preference_is_invalid(
    gateway: respx.MockRouter, client: JudgeClient, db_path: Path
) -> None:
    gateway.post(path__regex=JUDGE_ROUTE).mock(
        return_value=completion('{"preferred": "both", "reason": "?"}')
    )
    good, bad = _pair(db_path)

    with pytest.raises(InvalidVerdict, match="not a preference"):
        await compare(good, bad, DEFAULT_RUBRIC, client)


@pytest.mark.asyncio
async def test_two_attempts_of_one_rollout_can_be_compared(
    gateway: respx.MockRouter, client: JudgeClient, db_path: Path
) -> None:
    route = gateway.post(path__regex=JUDGE_ROUTE).mock(side_effect=fair_judge)
    run = AgentRun("retry-task")
    run.error()
    run.ok("I do not know.")
    run.new_attempt("a2").ok(GOOD)
    t = trajectory(db_path, run)
    first, second = (attempt_view(t, attempt) for attempt in t.attempts)

    result = await compare(first, second, DEFAULT_RUBRIC, client)

    assert (first.rollout_id, second.rollout_id) == ("retry-task#a1", "retry-task#a2")
    assert len(first.steps) == 2 and len(second.steps) == 1
    assert (result.preferred, result.consistent) == ("b", True)
    # `#` is not an id character: it is replaced, and a hash of the whole id keeps the
    # rollout apart from one whose id really says `_`.
    path = route.calls[0].request.url.path
    assert path.startswith("/rollout/judge-llm-pairwise-retry-task_a1-vs-retry-task_a2~")
    assert path.endswith("/v1/chat/completions")


def test_attempt_view_is_one_attempt_without_rewards(weather: Trajectory) -> None:
    view = attempt_view(weather, weather.attempts[0])

    assert view.task == weather.task
    assert view.final_answer == weather.final_answer
    assert view.rewards == []
