"""Rendering a trajectory for the `llm` judge inside a token budget.

Short trajectories are shown whole. Long ones are fitted into the budget, and whatever is
cut, the task, the final answer and every error step must survive.
"""

from __future__ import annotations

from pathlib import Path

from judge_builders import AgentRun, trajectory

from judge.render import CHARS_PER_TOKEN, render
from judge.trajectory import Trajectory

TASK = "Find the cheapest flight from Oslo to Lima next Tuesday."
FINAL = "FINAL-MARKER The cheapest flight is KL1234 via Amsterdam for 612 EUR."


def _long_trajectory(db_path: Path, *, steps: int = 60, errors_at: tuple[int, ...]) -> tuple:
    """`steps` calls with 3,000-character tool results, errors at the given step indexes."""
    run = AgentRun("long", task=TASK, tools=["search_flights"])
    error_spans: dict[str, str] = {}
    for index in range(steps - 1):
        if index in errors_at:
            message = f"ERRMARK-{index} upstream answered 502: bad gateway"
            error_spans[run.error(message)] = message
            continue
        run.call_tool("search_flights", f'{{"q": "page {index}"}}')
        run.tool_result(f"results page {index}: " + "lorem ipsum dolor sit amet " * 110)
    run.ok(FINAL + " " + "details " * 50)
    return trajectory(db_path, run), error_spans


def test_a_long_trajectory_fits_the_budget_and_keeps_task_answer_and_errors(
    db_path: Path,
) -> None:
    t, errors = _long_trajectory(db_path, errors_at=(10, 30, 45))
    budget_tokens = 2000

    text = render(t, budget_tokens)

    assert len(t.steps) == 60
    assert len(text) <= budget_tokens * CHARS_PER_TOKEN
    assert f"TASK: {TASK}" in text
    assert "FINAL ANSWER: FINAL-MARKER The cheapest flight is KL1234" in text
    for span_id, message in errors.items():
        assert f"span={span_id}] model=gpt-4o-mini status=error" in text
        assert f"ERROR: {message}" in text
    assert "steps omitted to fit the budget" in text


def test_the_first_and_last_steps_survive_the_elision(db_path: Path) -> None:
    t, _ = _long_trajectory(db_path, errors_at=(20,))

    text = render(t, 1500)

    assert f"span={t.steps[0].span_id}]" in text
    assert f"span={t.steps[1].span_id}]" in text
    assert f"span={t.steps[-2].span_id}]" in text
    assert f"span={t.steps[-1].span_id}]" in text
    assert f"span={t.steps[5].span_id}]" not in text


def test_task_and_final_answer_survive_when_even_the_kept_steps_overflow(
    db_path: Path,
) -> None:
    # Thirty errors with long messages cannot all fit in 1,000 tokens; something must give,
    # but never the task or the final answer.
    t, _ = _long_trajectory(db_path, errors_at=tuple(range(2, 58, 2)))
    for step in t.steps:
        if step.status == "error":
            step.error = (step.error or "") + " stack trace " * 40

    text = render(t, 1000)

    assert len(text) <= 1000 * CHARS_PER_TOKEN
    assert f"TASK: {TASK}" in text
    assert "FINAL ANSWER: FINAL-MARKER" in text


def test_a_short_trajectory_is_shown_whole(db_path: Path) -> None:
    run = AgentRun("short", task=TASK, tools=["search_flights"])
    run.call_tool("search_flights", '{"q": "OSL-LIM"}')
    run.tool_result("KL1234 612 EUR; LA8000 655 EUR")
    failed = run.error("upstream answered 429: rate limited")
    run.ok(FINAL)
    t: Trajectory = trajectory(db_path, run)

    text = render(t, 6000)

    assert "omitted" not in text
    assert "chars cut" not in text
    for step in t.steps:
        assert f"span={step.span_id}]" in text
    assert '→ calls search_flights({"q": "OSL-LIM"})' in text
    assert "tool result (" in text and "KL1234 612 EUR; LA8000 655 EUR" in text
    assert f"span={failed}] model=gpt-4o-mini status=error" in text
    assert "ERROR: upstream answered 429: rate limited" in text
    assert text.endswith(f"FINAL ANSWER: {FINAL}")


def test_repeated_conversation_history_is_rendered_once(db_path: Path) -> None:
    run = AgentRun("history", task=TASK)
    run.ok("Which date exactly?")
    run.user("Tuesday the 24th.")
    run.ok("KL1234.")

    text = render(trajectory(db_path, run), 6000)

    # Once in the TASK header, once as the first step's user message; the second request
    # repeats it, but only what is new since the previous call is shown.
    assert text.count(TASK) == 2
    assert text.count("Tuesday the 24th.") == 1


def test_invalid_tool_calls_are_marked_for_the_judge(db_path: Path) -> None:
    run = AgentRun("marked", task=TASK, tools=["search_flights"])
    run.call_tool("search_flights", "{broken")
    run.call_tool("book_flight", '{"q": "KL1234"}')

    text = render(trajectory(db_path, run), 6000)

    assert "→ calls search_flights({broken) [INVALID JSON ARGUMENTS]" in text
    assert '→ calls book_flight({"q": "KL1234"}) [TOOL NOT OFFERED]' in text
