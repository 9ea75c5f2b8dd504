"""The `rules` judge on hand-built rollouts with known faults.

Each rollout is written with the store's own `insert_spans` and read back with
`load_trajectory`, so the judge sees exactly what it sees behind a real gateway. Every
fault must cost points on its own criterion and name the spans that show it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from judge_builders import AgentRun, trajectory

from judge.rules import WEIGHTS, Peers, judge_rules
from judge.verdict import as_reward, reward_id


def test_a_clean_rollout_scores_one_with_no_evidence(db_path: Path) -> None:
    run = AgentRun("clean", tools=["get_weather"])
    run.call_tool("get_weather")
    run.tool_result("18C and sunny")
    run.ok("It is 18C and sunny in Paris.")

    verdict = judge_rules(trajectory(db_path, run))

    assert verdict.score == 1.0
    assert {name: c.score for name, c in verdict.criteria.items()} == dict.fromkeys(WEIGHTS, 1.0)
    assert verdict.evidence == []
    assert verdict.summary == "clean run"
    assert verdict.judge == "rules"
    assert verdict.rollout_id == "clean"


def test_an_unhandled_upstream_error_costs_more_than_one_recovered_from(db_path: Path) -> None:
    unhandled = AgentRun("gave-up")
    unhandled.ok("Let me check.")
    failed = unhandled.error()
    recovered = AgentRun("recovered")
    failed_then_ok = recovered.error()
    recovered.ok("It is sunny.")

    bad = judge_rules(trajectory(db_path, unhandled)).criteria["error_handling"]
    good = judge_rules(trajectory(db_path, recovered)).criteria["error_handling"]

    assert bad.score == pytest.approx(0.2)
    assert bad.evidence == [failed]
    assert "0 recovered from, 1 left unhandled" in bad.explanation
    assert good.score == pytest.approx(0.8)
    assert good.evidence == [failed_then_ok]
    assert "1 recovered from, 0 left unhandled" in good.explanation


def test_upstream_retries_cost_points_per_retry(db_path: Path) -> None:
    run = AgentRun("retried")
    run.ok("Step one.")
    retried = run.ok("Step two.", retries=2)

    criterion = judge_rules(trajectory(db_path, run)).criteria["retries"]

    assert criterion.score == pytest.approx(0.8)
    assert criterion.evidence == [retried]
    assert "2 upstream retries over 1 calls" in criterion.explanation


def test_a_reply_cut_at_the_token_limit_is_truncation(db_path: Path) -> None:
    run = AgentRun("cut")
    cut = run.ok("The weather in Paris is", finish_reason="length")
    run.user("Go on.")
    run.ok("sunny.")

    criterion = judge_rules(trajectory(db_path, run)).criteria["truncation"]

    assert criterion.score == pytest.approx(0.5)
    assert criterion.evidence == [cut]
    assert "1 of 2 replies stopped at the token limit" in criterion.explanation


@pytest.mark.parametrize("arguments", ['{"q": "Par', "[1, 2]", "not json"])
def test_tool_call_arguments_that_are_not_a_json_object_are_invalid(
    db_path: Path, arguments: str
) -> None:
    run = AgentRun("bad-args", tools=["get_weather"])
    good = run.call_tool("get_weather", '{"q": "Paris"}')
    run.tool_result("18C")
    bad = run.call_tool("get_weather", arguments)

    t = trajectory(db_path, run)
    criterion = judge_rules(t).criteria["tool_validity"]

    assert [use.arguments_valid for step in t.steps for use in step.tool_uses] == [True, False]
    assert criterion.score == pytest.approx(0.5)
    assert criterion.evidence == [bad]
    assert good not in criterion.evidence
    assert "1 with arguments that are not a JSON object" in criterion.explanation


def test_a_call_to_a_tool_not_offered_is_invalid(db_path: Path) -> None:
    run = AgentRun("rogue-tool", tools=["get_weather", "search"])
    run.call_tool("search")
    run.tool_result("Paris, France")
    rogue = run.call_tool("delete_files", '{"q": "/"}')

    t = trajectory(db_path, run)
    criterion = judge_rules(t).criteria["tool_validity"]

    assert t.steps[1].offered_tools == ["get_weather", "search"]
    assert t.steps[1].tool_uses[0].offered is False
    assert criterion.evidence == [rogue]
    assert criterion.score == pytest.approx(0.5)
    assert "1 to tools that were not offered" in criterion.explanation


def test_the_same_tool_call_three_times_in_a_row_is_a_loop(db_path: Path) -> None:
    run = AgentRun("loop", tools=["search"])
    spans = []
    for _ in range(4):
        spans.append(run.call_tool("search", '{"q": "weather Paris"}'))
        run.tool_result("no results")
    run.ok("I could not find it.")

    criterion = judge_rules(trajectory(db_path, run)).criteria["loops"]

    # The third and fourth identical calls are the loop; the first two are fair tries.
    assert criterion.evidence == spans[2:]
    assert criterion.score < 1.0
    assert "repeat the same action 3+ times" in criterion.explanation


def test_two_identical_calls_or_changing_arguments_are_not_a_loop(db_path: Path) -> None:
    twice = AgentRun("twice", tools=["search"])
    for query in ('{"q": "a"}', '{"q": "a"}', '{"q": "b"}', '{"q": "c"}'):
        twice.call_tool("search", query)
        twice.tool_result("nothing")

    criterion = judge_rules(trajectory(db_path, twice)).criteria["loops"]

    assert criterion.score == 1.0
    assert criterion.evidence == []


def test_efficiency_ranks_tokens_and_latency_against_the_agents_other_rollouts(
    db_path: Path,
) -> None:
    lean = AgentRun("lean")
    lean.ok("Sunny.", input_tokens=10, output_tokens=5, duration_ms=50)
    heavy = AgentRun("heavy")
    heavy.ok("Sunny.", input_tokens=5000, output_tokens=1000, duration_ms=9000)
    peers = Peers(tokens=[100, 200, 300, 400], durations_ms=[500.0, 600.0, 700.0, 800.0])

    lean_verdict = judge_rules(trajectory(db_path, lean), peers)
    heavy_verdict = judge_rules(trajectory(db_path, heavy), peers)

    assert lean_verdict.criteria["token_efficiency"].score == 1.0
    assert lean_verdict.criteria["latency_efficiency"].score == 1.0
    assert heavy_verdict.criteria["token_efficiency"].score == 0.0
    assert heavy_verdict.criteria["latency_efficiency"].score == 0.0
    assert "6000 tokens" in heavy_verdict.criteria["token_efficiency"].explanation
    assert heavy_verdict.score < lean_verdict.score


def test_efficiency_is_not_judged_with_fewer_than_three_peers(db_path: Path) -> None:
    run = AgentRun("alone")
    run.ok("Sunny.", input_tokens=5000, output_tokens=1000)

    verdict = judge_rules(trajectory(db_path, run), Peers(tokens=[10, 20], durations_ms=[1, 2]))

    assert verdict.criteria["token_efficiency"].score == 1.0
    assert "too few rollouts" in verdict.criteria["token_efficiency"].explanation


def test_evidence_points_at_exactly_the_faulty_spans(db_path: Path) -> None:
    run = AgentRun("many-faults", tools=["search"])
    clean = run.call_tool("search")
    run.tool_result("found it")
    retried = run.ok("Thinking", retries=1)
    cut = run.ok("The answer is", finish_reason="length")
    bad_json = run.call_tool("search", "{oops")
    failed = run.error()

    verdict = judge_rules(trajectory(db_path, run))

    assert verdict.criteria["retries"].evidence == [retried]
    assert verdict.criteria["truncation"].evidence == [cut]
    assert verdict.criteria["tool_validity"].evidence == [bad_json]
    assert verdict.criteria["error_handling"].evidence == [failed]
    assert verdict.evidence == sorted({retried, cut, bad_json, failed})
    assert clean not in verdict.evidence
    assert verdict.summary.startswith("points lost on ")
    for name in ("retries", "truncation", "tool_validity", "error_handling"):
        assert name in verdict.summary


def test_tool_results_are_joined_from_the_later_tool_message(db_path: Path) -> None:
    run = AgentRun("joined", tools=["get_weather"])
    asked = run.call_tool("get_weather", '{"q": "Paris"}')
    run.tool_result("18C and sunny")
    answered = run.ok("It is 18C and sunny.")

    t = trajectory(db_path, run)
    (use,) = t.steps[0].tool_uses

    assert t.steps[0].span_id == asked
    assert use.name == "get_weather"
    assert use.result == "18C and sunny"
    assert use.result_span_id == answered
    assert t.task == "What is the weather in Paris?"
    assert t.final_answer == "It is 18C and sunny."


def test_a_tool_call_whose_result_never_came_has_no_result(db_path: Path) -> None:
    run = AgentRun("no-result", tools=["get_weather"])
    run.call_tool("get_weather")

    (use,) = trajectory(db_path, run).steps[0].tool_uses

    assert use.result is None
    assert use.result_span_id is None


def test_a_rules_verdict_is_stored_as_a_judge_reward_with_its_criteria(db_path: Path) -> None:
    run = AgentRun("as-reward")
    run.ok("Step.", retries=1)

    verdict = judge_rules(trajectory(db_path, run))
    reward = as_reward(verdict)

    assert reward["id"] == reward_id("rules", verdict.rubric_version, "as-reward")
    assert reward["source"] == "judge:rules"
    assert reward["rollout_id"] == "as-reward"
    assert reward["value"] == pytest.approx(verdict.score)
    assert set(reward["dimensions"]) == set(WEIGHTS)
    assert reward["details"]["criteria"]["retries"]["explanation"]
    assert reward["details"]["evidence"] == verdict.evidence
