"""`spangate judge run | calibrate | compare` on databases seeded with the store's own writer.

`run` uses the free `rules` judge on hand-built rollouts, and the `llm` judge through a gateway
started in-process in front of the fake provider; `compare` mocks the judge model with respx
(the judge client is httpx); `calibrate` reads verdicts stored as rewards and its numbers are
checked against ones computed here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import respx
from click.testing import CliRunner, Result
from fake_provider import FakeProviderThread
from scipy.stats import spearmanr
from servers import read_rows, wait_until
from shapes import CLI_ARGV, span_record

from gateway.cli.main import cli
from judge.llm import judge_rollout_id
from judge.rules import RULES_VERSION
from judge.verdict import REWARD_NAME, reward_id
from store.schema import connect
from store.span_inserts import insert_spans
from store.writes import add_reward, update_rollout

T0 = 1_795_334_400_000_000_000  # 2026-11-22T08:00:00Z, in ns
MS = 1_000_000
CRITERIA = ("task_completion", "tool_efficiency", "decision_quality", "error_handling")


def answer(content: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{os.urandom(4).hex()}",
        "object": "chat.completion",
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
    }


def span(
    rollout: str,
    attempt: str,
    seq: int,
    *,
    agent: str = "planner",
    reply: str = "done",
    error: tuple[int, str] | None = None,
) -> dict[str, Any]:
    start = T0 + seq * 1000 * MS
    record = span_record(
        rollout,
        seq,
        attempt_id=attempt,
        deployment=None,
        model_group=None,
        response_model="gpt-test",
        response_id=None,
        start_ns=start,
        end_ns=start + 200 * MS,
        duration_ms=200.0,
        overhead_ms=None,
        input_tokens=20,
        output_tokens=5,
        request_body={
            "model": "gpt-test",
            "messages": [{"role": "user", "content": f"task of {rollout}"}],
        },
        response_body=answer(reply),
        attributes={},
        tags=[],
        agent=agent,
    )
    if error is not None:
        record.update(
            status="error",
            http_status=error[0],
            error_type="rate_limit_error",
            error_message=error[1],
            response_body={"error": {"message": error[1], "type": "rate_limit_error"}},
            input_tokens=None,
            output_tokens=None,
            finish_reasons=None,
        )
    return record


def seed(path: Path, records: list[dict[str, Any]]) -> None:
    db = connect(path)
    try:
        insert_spans(db.conn, records)
    finally:
        db.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """r-clean (two good calls), r-error (a failed call, then a good one), r-other (agent
    coder, two attempts), and the judge's own rollout, which no job may pick."""
    path = tmp_path / "spangate.db"
    seed(
        path,
        [
            span("r-clean", "a1", 1, reply="looking"),
            span("r-clean", "a1", 2, reply="Paris"),
            span("r-error", "a1", 1, error=(429, "Rate limit reached")),
            span("r-error", "a1", 2, reply="Paris"),
            span("r-other", "a1", 1, agent="coder", reply="first try"),
            span("r-other", "a2", 2, agent="coder", reply="second try"),
            span("judge-llm-r-clean", "1", 1, agent="judge-llm", reply="{}"),
        ],
    )
    db = connect(path)
    try:
        update_rollout(db, "r-clean", status="succeeded")
        update_rollout(db, "r-error", status="failed")
    finally:
        db.close()
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def judge_rewards(path: Path, source: str = "judge:rules") -> dict[str, dict[str, Any]]:
    rows = read_rows(path, "select * from rewards where source = ? order by rowid", source)
    return {row["rollout_id"]: row for row in rows}


# -- judge run ------------------------------------------------------------------------


def test_judge_run_rules_judges_every_rollout_and_prints_a_summary(db_path: Path) -> None:
    result = run("judge", "run", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    stored = judge_rewards(db_path)
    assert set(stored) == {"r-clean", "r-error", "r-other"}  # never the judge's own rollout
    for rollout_id, row in stored.items():
        assert row["id"] == reward_id("rules", RULES_VERSION, rollout_id)
        assert row["name"] == REWARD_NAME
        assert json.loads(row["details"])["rubric_version"] == RULES_VERSION
    lines = result.stdout.splitlines()
    mean = sum(row["value"] for row in stored.values()) / 3
    assert lines[0] == (
        f"judge rules ({RULES_VERSION}): 3 judged, 0 skipped, 0 failed · mean score {mean:.3f}"
    )
    assert lines[2].split() == ["ROLLOUT", "RESULT", "SCORE", "SUMMARY"]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert list(rows) == ["r-clean", "r-error", "r-other"]  # in selection order
    for rollout_id, line in rows.items():
        assert line.split()[1:3] == ["judged", f"{stored[rollout_id]['value']:.3f}"]
    assert "clean run" in rows["r-clean"]
    assert stored["r-error"]["value"] < stored["r-clean"]["value"]


def test_judge_run_again_skips_what_is_judged(db_path: Path) -> None:
    assert run("judge", "run", "--db", str(db_path)).exit_code == 0
    before = judge_rewards(db_path)
    result = run("judge", "run", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"judge rules ({RULES_VERSION}): 0 judged, 3 skipped, 0 failed · mean score -"
    )
    assert result.stdout.count("already judged (--force judges it again)") == 3
    assert judge_rewards(db_path) == before


def test_judge_run_force_judges_again_in_place(db_path: Path) -> None:
    assert run("judge", "run", "--db", str(db_path)).exit_code == 0
    result = run("judge", "run", "--force", "--rollout", "r-error", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    assert "1 judged, 0 skipped" in result.stdout
    assert len(judge_rewards(db_path)) == 3  # replaced, not added


def test_judge_run_json_is_the_job_summary(db_path: Path) -> None:
    assert run("judge", "run", "--rollout", "r-clean", "--db", str(db_path)).exit_code == 0
    result = run("judge", "run", "--json", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["judge"], summary["version"]) == ("rules", RULES_VERSION)
    assert (summary["judged"], summary["skipped"], summary["failed"]) == (2, 1, 0)
    stored = judge_rewards(db_path)
    by_rollout = {r["rollout_id"]: r for r in summary["results"]}
    assert by_rollout["r-clean"]["status"] == "skipped"
    assert by_rollout["r-error"]["score"] == stored["r-error"]["value"]
    assert summary["mean_score"] == pytest.approx(
        (stored["r-error"]["value"] + stored["r-other"]["value"]) / 2
    )


@pytest.mark.parametrize(
    ("args", "judged"),
    [
        (["--status", "failed"], {"r-error"}),
        (["--agent", "coder"], {"r-other"}),
        (["--rollout", "r-clean", "--rollout", "r-other"], {"r-clean", "r-other"}),
        (["--since", "2026-11-22T08:00:01Z", "--agent", "planner"], {"r-error", "r-clean"}),
    ],
)
def test_judge_run_selects_rollouts(db_path: Path, args: list[str], judged: set[str]) -> None:
    result = run("judge", "run", *args, "--json", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    assert {r["rollout_id"] for r in json.loads(result.stdout)["results"]} == judged
    assert set(judge_rewards(db_path)) == judged


def test_judge_run_sample_is_stable_across_reruns(db_path: Path) -> None:
    first = json.loads(
        run("judge", "run", "--sample", "0.5", "--json", "--db", str(db_path)).stdout
    )
    again = json.loads(
        run("judge", "run", "--sample", "0.5", "--json", "--db", str(db_path)).stdout
    )
    picked = {r["rollout_id"] for r in first["results"]}
    assert {r["rollout_id"] for r in again["results"]} == picked
    assert again["skipped"] == len(picked) and again["judged"] == 0


def test_judge_run_unknown_judge_lists_the_known_ones(db_path: Path) -> None:
    result = run("judge", "run", "--judge", "vibes", "--db", str(db_path))
    assert result.exit_code == 1
    assert "unknown judge 'vibes'; known: rules, llm" in result.output
    assert judge_rewards(db_path) == {}


def test_judge_run_llm_without_a_model_says_what_to_set(db_path: Path) -> None:
    result = run("judge", "run", "--judge", "llm", "--db", str(db_path))
    assert result.exit_code == 1
    assert "set `judge.model` in the config" in result.output


def test_judge_run_unknown_rollout_fails_before_judging(db_path: Path) -> None:
    result = run(
        "judge", "run", "--rollout", "r-clean", "--rollout", "r-nope", "--db", str(db_path)
    )
    assert result.exit_code == 1
    assert "rollout not found: r-nope" in result.output
    assert judge_rewards(db_path) == {}


def test_judge_run_rejects_an_unknown_status(db_path: Path) -> None:
    result = run("judge", "run", "--status", "done", "--db", str(db_path))
    assert result.exit_code == 2
    assert "'done' is not one of running, succeeded" in result.output


def test_judge_run_without_a_database_is_a_clear_error(tmp_path: Path) -> None:
    result = run("judge", "run", "--db", str(tmp_path / "none.db"))
    assert result.exit_code == 1
    assert "no database at" in result.output


# -- the llm judge through an in-process gateway ------------------------------------------


def write_config(tmp_path: Path, provider_url: str | None = None) -> Path:
    """A judge model: the fake provider behind the gateway, or the built-in mock."""
    deployment = (
        {
            "provider": "openai",
            "model": "upstream-model",
            "api_base": provider_url,
            "api_key": "sk-up",
        }
        if provider_url
        else {"provider": "mock", "model": "mock"}
    )
    path = tmp_path / "spangate.yaml"
    path.write_text(
        json.dumps(
            {
                "models": [{"name": "judge-model", "deployments": [deployment]}],
                "judge": {"model": "judge-model"},
            }
        )
    )
    return path


def verdict(score: float, summary: str = "fine") -> str:
    return json.dumps(
        {
            "criteria": {name: {"score": score, "explanation": "why"} for name in CRITERIA},
            "summary": summary,
        }
    )


def plan_verdicts(fake: FakeProviderThread, count: int, *, delay: float = 0.0) -> None:
    fake.state.add_fault(
        body=orjson.dumps(answer(verdict(0.75))).decode(), delay=delay, times=count
    )


def test_judge_run_llm_calls_go_through_an_in_process_gateway_and_are_recorded(
    db_path: Path, tmp_path: Path, fake_provider: FakeProviderThread
) -> None:
    config = write_config(tmp_path, fake_provider.url)
    plan_verdicts(fake_provider, 2)
    result = run(
        "judge", "run", "--judge", "llm", "--rollout", "r-clean", "--rollout", "r-error",
        "--config", str(config), "--db", str(db_path), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["judged"], summary["failed"]) == (2, 0), summary
    assert {r["score"] for r in summary["results"]} == {0.75}
    assert set(judge_rewards(db_path, "judge:llm")) == {"r-clean", "r-error"}
    # The judge model's own calls went through the gateway, recorded under judge rollouts.
    calls = read_rows(
        db_path,
        "select rollout_id, model_group, status from spans where model_group = 'judge-model'",
    )
    assert sorted(c["rollout_id"] for c in calls) == ["judge-llm-r-clean", "judge-llm-r-error"]
    assert {(c["model_group"], c["status"]) for c in calls} == {("judge-model", "ok")}
    agents = read_rows(db_path, "select agent from rollouts where id = 'judge-llm-r-error'")
    assert agents == [{"agent": "judge-llm"}]
    assert len(fake_provider.state.requests) == 2


def test_judge_run_llm_reports_invalid_verdicts_as_failed(
    db_path: Path, tmp_path: Path, fake_provider: FakeProviderThread
) -> None:
    # The fake provider echoes, which is no verdict: asked again, then reported.
    config = write_config(tmp_path, fake_provider.url)
    result = run(
        "judge", "run", "--judge", "llm", "--rollout", "r-clean",
        "--config", str(config), "--db", str(db_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "0 judged, 0 skipped, 1 failed" in result.stdout
    assert "not valid JSON" in result.stdout
    assert judge_rewards(db_path, "judge:llm") == {}


def test_judge_run_interrupted_keeps_verdicts_and_a_rerun_continues(
    db_path: Path, tmp_path: Path, fake_provider: FakeProviderThread
) -> None:
    config = write_config(tmp_path, fake_provider.url)
    plan_verdicts(fake_provider, 1)
    plan_verdicts(fake_provider, 5, delay=5.0)  # the second verdict hangs until Ctrl-C
    argv = [
        *CLI_ARGV, "judge", "run", "--judge", "llm", "--concurrency", "1",
        "--config", str(config), "--db", str(db_path),
    ]  # fmt: skip
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            # The second call reaching the model means the first verdict is stored and counted.
            wait_until(lambda: len(fake_provider.state.requests) >= 2, timeout=30, what="2 calls")
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; 1 judged so far — rerun to continue" in err
    assert "Traceback" not in err
    assert len(judge_rewards(db_path, "judge:llm")) == 1

    fake_provider.state.reset()
    plan_verdicts(fake_provider, 5)
    again = run(
        "judge", "run", "--judge", "llm", "--config", str(config), "--db", str(db_path), "--json"
    )
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert (summary["judged"], summary["skipped"], summary["failed"]) == (2, 1, 0)
    assert set(judge_rewards(db_path, "judge:llm")) == {"r-clean", "r-error", "r-other"}


# -- judge calibrate ------------------------------------------------------------------


def store_verdicts(path: Path, verdicts: dict[str, tuple[float, dict[str, float]]]) -> None:
    """Verdicts of the rules judge, stored as the judge stores them."""
    db = connect(path)
    try:
        for rollout_id, (score, dimensions) in verdicts.items():
            add_reward(
                db,
                {
                    "id": reward_id("rules", RULES_VERSION, rollout_id),
                    "rollout_id": rollout_id,
                    "name": REWARD_NAME,
                    "value": score,
                    "dimensions": dimensions,
                    "source": "judge:rules",
                },
            )
    finally:
        db.close()


def write_labels(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def kappa(a: list[int], b: list[int]) -> float:
    """Cohen's kappa, written out for the check."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in set(a) | set(b)) / n**2
    return (observed - expected) / (1 - expected)


@pytest.fixture
def calibration(tmp_path: Path) -> tuple[Path, dict[str, float], dict[str, float]]:
    """Six rollouts: five with a rules verdict, one without."""
    path = tmp_path / "cal.db"
    seed(path, [span(f"r-{i}", "a1", 1) for i in range(1, 7)])
    judge_scores = {"r-1": 0.9, "r-2": 0.8, "r-3": 0.3, "r-4": 0.6, "r-5": 0.2}
    handling = {"r-1": 1.0, "r-2": 0.2, "r-3": 0.4, "r-4": 0.9, "r-5": 0.1}
    store_verdicts(
        path,
        {
            rid: (score, {"error_handling": handling[rid], "loops": 1.0})
            for rid, score in judge_scores.items()
        },
    )
    return path, judge_scores, handling


def test_calibrate_reports_spearman_kappa_accuracy_and_mae(
    calibration: tuple[Path, dict[str, float], dict[str, float]], tmp_path: Path
) -> None:
    path, judge_scores, handling = calibration
    human = {"r-1": 1.0, "r-2": 0.7, "r-3": 0.4, "r-4": 0.3, "r-5": 0.1}
    human_handling = {"r-1": "pass", "r-2": "fail", "r-3": "fail", "r-4": "pass", "r-5": "pass"}
    labels = write_labels(
        tmp_path / "labels.jsonl",
        [
            {
                "rollout_id": rid,
                "score": human[rid],
                "criteria": {"error_handling": human_handling[rid]},
            }
            for rid in human
        ]
        + [{"rollout_id": "r-6", "score": 0.5}, {"rollout_id": "r-ghost", "label": "pass"}, ""],
    )
    result = run("judge", "calibrate", "--labels", str(labels), "--db", str(path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    ids = list(human)
    expected_rho = spearmanr([human[r] for r in ids], [judge_scores[r] for r in ids]).statistic
    expected_kappa = kappa(
        [int(human[r] >= 0.5) for r in ids], [int(judge_scores[r] >= 0.5) for r in ids]
    )
    assert expected_kappa == pytest.approx(0.32 / 0.52)  # 4 of 5 agree; chance 0.48
    overall = report["overall"]
    assert overall["n"] == 5
    assert overall["spearman"] == pytest.approx(expected_rho)
    assert overall["kappa"] == pytest.approx(expected_kappa)
    assert overall["accuracy"] == pytest.approx(0.8)
    assert overall["mean_abs_error"] == pytest.approx(0.14)

    criterion = report["criteria"]["error_handling"]
    expected_criterion = kappa(
        [int(human_handling[r] == "pass") for r in ids], [int(handling[r] >= 0.5) for r in ids]
    )
    assert criterion["n"] == 5
    assert criterion["kappa"] == pytest.approx(expected_criterion)
    assert criterion["accuracy"] == pytest.approx(0.8)  # all but r-5
    assert criterion["spearman"] is None and criterion["mean_abs_error"] is None
    assert report["unknown_rollouts"] == ["r-ghost"]
    assert report["unjudged_rollouts"] == ["r-6"]
    assert report["reading"].startswith(f"kappa {expected_kappa:.2f}: substantial agreement")

    text = run("judge", "calibrate", "--labels", str(labels), "--db", str(path))
    assert text.exit_code == 0, text.output
    rows = {line.split()[0]: line.split()[1:] for line in text.stdout.splitlines() if line.strip()}
    assert rows["overall"] == ["5", f"{expected_rho:.2f}", f"{expected_kappa:.2f}", "0.80", "0.14"]
    assert rows["error_handling"] == ["5", "-", f"{expected_criterion:.2f}", "0.80", "-"]
    assert (
        f"kappa {expected_kappa:.2f}: substantial agreement; Spearman {expected_rho:.2f}"
        in text.stdout
    )
    assert "only 5 labelled rollouts" in text.stdout
    assert "1 unknown rollout (r-ghost)" in text.output
    assert "1 not judged by rules yet (--run judges them)" in text.output


def test_calibrate_with_labels_uses_kappa_bands(
    calibration: tuple[Path, dict[str, float], dict[str, float]], tmp_path: Path
) -> None:
    path, _, _ = calibration
    # Judge says pass for r-1, r-2, r-4; the human agrees on all but r-4.
    given = {"r-1": "pass", "r-2": True, "r-3": "fail", "r-4": "bad", "r-5": 0}
    labels = write_labels(
        tmp_path / "labels.jsonl", [{"rollout_id": r, "label": v} for r, v in given.items()]
    )
    result = run("judge", "calibrate", "--labels", str(labels), "--db", str(path), "--json")
    assert result.exit_code == 0, result.output
    overall = json.loads(result.stdout)["overall"]
    assert overall["kappa"] == pytest.approx(kappa([1, 1, 0, 0, 0], [1, 1, 0, 1, 0]))
    assert overall["spearman"] is None
    # A stricter threshold: the judge passes only r-1 and r-2, so it agrees on all five.
    strict = run(
        "judge", "calibrate", "--labels", str(labels), "--threshold", "0.7", "--db", str(path)
    )
    assert strict.exit_code == 0, strict.output
    assert "kappa 1.00: almost perfect agreement" in strict.stdout


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        ('["r-1", 0.5]', "line 2: expected a JSON object"),
        ('{"score": 0.5}', "line 2: `rollout_id` (a string) is missing"),
        ('{"rollout_id": "r-1"}', "line 2: give a `score` (0-1) or a `label` (pass/fail)"),
        ('{"rollout_id": "r-1", "score": 7}', "line 2: `score` must be between 0 and 1, got 7"),
        ('{"rollout_id": "r-1", "label": "meh"}', "line 2: `label` 'meh' is neither"),
        ('{"rollout_id": "r-1", "score": 1, "criteria": {"x": 3}}', "line 2: criteria.x must be"),
    ],
)
def test_calibrate_bad_line_names_its_number(
    calibration: tuple[Path, dict[str, float], dict[str, float]],
    tmp_path: Path,
    line: str,
    message: str,
) -> None:
    path, _, _ = calibration
    labels = write_labels(tmp_path / "labels.jsonl", [{"rollout_id": "r-1", "score": 1}, line])
    result = run("judge", "calibrate", "--labels", str(labels), "--db", str(path))
    assert result.exit_code == 1
    assert f"labels.jsonl {message}" in result.output


def test_calibrate_without_verdicts_says_how_to_get_them(tmp_path: Path) -> None:
    path = tmp_path / "bare.db"
    seed(path, [span("r-1", "a1", 1), span("r-2", "a1", 1)])
    labels = write_labels(
        tmp_path / "labels.jsonl",
        [{"rollout_id": "r-1", "score": 1}, {"rollout_id": "r-2", "score": 0}],
    )
    result = run("judge", "calibrate", "--labels", str(labels), "--db", str(path))
    assert result.exit_code == 1
    assert "none of the 2 labelled rollouts has a verdict from judge rules" in result.output
    assert "(pass --run to judge them)" in result.output


def test_calibrate_run_judges_the_missing_rollouts_first(
    calibration: tuple[Path, dict[str, float], dict[str, float]], tmp_path: Path
) -> None:
    path, _, _ = calibration
    labels = write_labels(
        tmp_path / "labels.jsonl",
        [{"rollout_id": "r-1", "score": 1}, {"rollout_id": "r-6", "score": 1}],
    )
    result = run(
        "judge", "calibrate", "--labels", str(labels), "--run", "--json", "--db", str(path)
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["overall"]["n"] == 2
    assert report["unjudged_rollouts"] == []
    assert "r-6" in judge_rewards(path)


# -- judge compare --------------------------------------------------------------------


def preference(choice: str, reason: str) -> httpx.Response:
    return httpx.Response(200, json=answer(json.dumps({"preferred": choice, "reason": reason})))


def compare(db_path: Path, config: Path, *args: str) -> Result:
    return run(
        "judge", "compare", *args,
        "--gateway-url", "http://gw.test", "--config", str(config), "--db", str(db_path),
    )  # fmt: skip


def test_compare_asks_both_orders_and_reports_a_consistent_preference(
    db_path: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    with respx.mock(base_url="http://gw.test") as mock:
        route = mock.post(path__regex=r"^/rollout/[^/]+/v1/chat/completions$").mock(
            side_effect=[preference("A", "cleaner run"), preference("B", "still cleaner")]
        )
        result = compare(db_path, config, "r-clean", "r-error")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "A = r-clean",
        "B = r-error",
        "preferred: A: r-clean",
        "  A first: A (r-clean) — cleaner run",
        "  B first: A (r-clean) — still cleaner",
        "position-consistent: yes",
    ]
    first, second = (call.request for call in route.calls)
    assert first.headers["X-Agent-Id"] == "judge-llm-pairwise"
    assert json.loads(first.content)["model"] == "judge-model"
    shown = [json.loads(r.content)["messages"][1]["content"] for r in (first, second)]
    assert shown[0].index("r-clean") < shown[0].index("r-error")
    assert shown[1].index("r-error") < shown[1].index("r-clean")


def pairwise_rollouts(path: Path) -> list[tuple[str, str]]:
    rows = read_rows(
        path,
        "select status, metadata from rollouts where agent = 'judge-llm-pairwise' order by id",
    )
    return sorted((row["status"], json.loads(row["metadata"])["judged"]) for row in rows)


def test_compare_ends_the_rollouts_its_calls_were_recorded_under(
    db_path: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    with respx.mock(base_url="http://gw.test") as mock:
        mock.post(path__regex=r"/v1/chat/completions$").mock(
            side_effect=[preference("A", "cleaner"), preference("B", "cleaner")]
        )
        assert compare(db_path, config, "r-clean", "r-error").exit_code == 0
    assert pairwise_rollouts(db_path) == [
        ("succeeded", "r-clean-vs-r-error"),
        ("succeeded", "r-error-vs-r-clean"),
    ]


def test_a_failed_compare_ends_only_the_rollout_it_asked_under_as_failed(
    db_path: Path, tmp_path: Path
) -> None:
    with respx.mock(base_url="http://gw.test") as mock:
        mock.post(path__regex=r"/v1/chat/completions$").mock(
            return_value=httpx.Response(503, json={"error": {"message": "overloaded"}})
        )
        assert compare(db_path, write_config(tmp_path), "r-clean", "r-error").exit_code == 1
    assert pairwise_rollouts(db_path) == [("failed", "r-clean-vs-r-error")]


def test_comparing_a_pair_again_records_under_judge_rollouts_of_its_own(
    db_path: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    with respx.mock(base_url="http://gw.test") as mock:
        mock.post(path__regex=r"/v1/chat/completions$").mock(
            return_value=httpx.Response(503, json={"error": {"message": "overloaded"}})
        )
        assert compare(db_path, config, "r-clean", "r-error").exit_code == 1
    with respx.mock(base_url="http://gw.test") as mock:
        route = mock.post(path__regex=r"/v1/chat/completions$").mock(
            side_effect=[preference("A", "cleaner"), preference("B", "cleaner")]
        )
        assert compare(db_path, config, "r-clean", "r-error").exit_code == 0

    # The failed comparison keeps its status; the second one's calls went elsewhere.
    asked = [call.request.url.path.split("/")[2] for call in route.calls]
    assert asked[0] != judge_rollout_id("llm-pairwise", "r-clean-vs-r-error")
    assert asked[1] == judge_rollout_id("llm-pairwise", "r-error-vs-r-clean")
    assert pairwise_rollouts(db_path) == [
        ("failed", "r-clean-vs-r-error"),
        ("succeeded", "r-clean-vs-r-error"),
        ("succeeded", "r-error-vs-r-clean"),
    ]


def test_compare_that_flips_with_the_order_is_a_tie(db_path: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with respx.mock(base_url="http://gw.test") as mock:
        mock.post(path__regex=r"/v1/chat/completions$").mock(
            side_effect=[preference("A", "first one"), preference("A", "first one")]
        )
        result = compare(db_path, config, "r-clean", "r-error", "--json")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert (outcome["preferred"], outcome["consistent"]) == ("tie", False)
    assert [o["preferred"] for o in outcome["orders"]] == ["a", "b"]


def test_compare_attempts_of_one_rollout(db_path: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with respx.mock(base_url="http://gw.test") as mock:
        route = mock.post(path__regex=r"/v1/chat/completions$").mock(
            side_effect=[preference("B", "second is better"), preference("A", "second is better")]
        )
        result = compare(db_path, config, "--attempts", "r-other", "a1", "a2")
    assert result.exit_code == 0, result.output
    assert "preferred: B: r-other#a2" in result.stdout
    assert "position-consistent: yes" in result.stdout
    prompt = json.loads(route.calls[0].request.content)["messages"][1]["content"]
    assert prompt.index("first try") < prompt.index("second try")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["r-clean"], "expected two rollout ids, A B, got 1 argument(s)"),
        (["--attempts", "r-other", "a1"], "expected ROLLOUT ATTEMPT_A ATTEMPT_B"),
        (["r-clean", "r-nope"], "rollout r-nope not found"),
        (["--attempts", "r-other", "a1", "a9"], "attempt a9 of rollout r-other not found"),
        (["r-clean", "r-error", "--judge", "rules"], "the rules judge does not compare"),
        (["r-clean", "r-error", "--judge", "vibes"], "unknown judge 'vibes'; known: llm"),
    ],
)
def test_compare_errors(db_path: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = compare(db_path, write_config(tmp_path), *args)
    assert result.exit_code in (1, 2)
    assert message in result.output


def test_compare_reports_a_failing_judge_model(db_path: Path, tmp_path: Path) -> None:
    with respx.mock(base_url="http://gw.test") as mock:
        mock.post(path__regex=r"/v1/chat/completions$").mock(
            return_value=httpx.Response(503, json={"error": {"message": "overloaded"}})
        )
        result = compare(db_path, write_config(tmp_path), "r-clean", "r-error")
    assert result.exit_code == 1
    assert "the judge model failed: judge model answered 503" in result.output
