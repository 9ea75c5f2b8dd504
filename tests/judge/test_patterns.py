"""Pattern mining on rollouts with planted patterns: each is found, with the right direction.

Attempts are written as the gateway records them: chat spans whose answers ask for tools, and
the `execute_tool` spans `gateway.proxy.tool_spans.tool_span` derives when the results come back,
inserted with the store's own `insert_spans`. Rewards are rows in `rewards`.
"""

from __future__ import annotations

import itertools
import random
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from click.testing import CliRunner
from pg import PostgresServer
from scipy.stats import fisher_exact
from servers import read_rows, wait_until
from shapes import CLI_ARGV, span_record
from sqlite_utils import Database

import gateway.cli.main  # noqa: F401  (load it before cli_patterns, which imports from it)
from gateway.cli.patterns import patterns as patterns_command
from gateway.proxy.attribution import new_span_id
from gateway.proxy.tool_spans import PendingTool, tool_span
from judge import patterns
from judge.guidelines import (
    diff_guidelines,
    get_guideline,
    list_guidelines,
    render_guideline,
    rollback_guideline,
    write_guideline,
)
from store.schema import connect
from store.span_inserts import insert_spans

REPO = Path(__file__).resolve().parents[2]
T0 = 1_795_334_400_000_000_000  # 2026-11-22T08:00:00Z, in ns
MS = 1_000_000
OK_RESULT = '{"temperature": 21}'
ERROR_RESULT = '{"error": "upstream timed out"}'
_calls = itertools.count(1)


class Recorder:
    """Builds attempts span by span, the way the gateway records them, then writes them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.spans: list[dict[str, Any]] = []
        self.rewards: list[tuple[Any, ...]] = []
        self.clock = T0

    def _chat(
        self,
        rollout_id: str,
        attempt_id: str,
        seq: int,
        *,
        agent: str,
        model: str,
        ms: float,
        cost: float,
        tool: str | None = None,
        finish: str = "stop",
        error_type: str | None = None,
    ) -> dict[str, Any]:
        start = self.clock
        self.clock += int(ms * MS)
        calls = [{"id": f"call_{next(_calls)}", "name": tool, "arguments": "{}"}] if tool else []
        span = {
            "span_id": new_span_id(),
            "trace_id": f"{random.getrandbits(128):032x}",
            "rollout_id": rollout_id,
            "attempt_id": attempt_id,
            "agent": agent,
            "seq": seq,
            "name": f"chat {model}",
            "operation": "chat",
            "provider": "openai",
            "model_group": model,
            "request_model": model,
            "response_model": f"{model}-2026",
            "status": "error" if error_type else "ok",
            "http_status": 500 if error_type else 200,
            "error_type": error_type,
            "stream": 0,
            "start_ns": start,
            "end_ns": self.clock,
            "duration_ms": ms,
            "retries": 0,
            "input_tokens": 100,
            "output_tokens": 20,
            "cost_usd": cost,
            "finish_reasons": None if error_type else ["tool_calls" if tool else finish],
            "tool_calls": calls or None,
            "attributes": {},
            "tags": [],
        }
        self.spans.append(span)
        return span

    def attempt(
        self,
        rollout_id: str,
        *,
        attempt_id: str = "1",
        agent: str = "agent-a",
        model: str = "gpt-a",
        tools: Sequence[str] = (),
        results: Sequence[str] | None = None,
        reward: float | None = None,
        call_ms: float = 100.0,
        tool_ms: float = 40.0,
        cost: float = 0.001,
        finish: str = "stop",
        error_type: str | None = None,
    ) -> None:
        """Each tool: a chat call that asks for it, then its execution; then a final answer."""
        seq = 0
        for i, tool in enumerate(tools):
            seq += 1
            asked = self._chat(
                rollout_id,
                attempt_id,
                seq,
                agent=agent,
                model=model,
                ms=call_ms,
                cost=cost,
                tool=tool,
            )
            call = asked["tool_calls"][0]
            pending = PendingTool(
                call["id"], tool, "{}", asked["span_id"], asked["trace_id"], asked["end_ns"]
            )
            self.clock += int(tool_ms * MS)
            seq += 1
            execution = tool_span(
                pending,
                results[i] if results else OK_RESULT,
                rollout_id=rollout_id,
                attempt_id=attempt_id,
                seq=seq,
                now_ns=self.clock,
            )
            self.spans.append(execution)
        seq += 1
        self._chat(
            rollout_id, attempt_id, seq, agent=agent, model=model, ms=call_ms, cost=cost,
            finish=finish, error_type=error_type,
        )  # fmt: skip
        if reward is not None:
            self.rewards.append((f"w-{rollout_id}-{attempt_id}", rollout_id, attempt_id, reward))
        self.clock += 1_000 * MS

    def write(self) -> None:
        insert_spans(self.db.conn, self.spans)
        self.db.conn.executemany(
            "insert into rewards (id, rollout_id, attempt_id, name, value, final, source, "
            "created_ns) values (?, ?, ?, 'reward', ?, 1, 'user', 0)",
            self.rewards,
        )
        self.spans, self.rewards = [], []


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = connect(tmp_path / "spangate.db")
    yield database
    database.close()


@pytest.fixture
def rec(db: Database) -> Recorder:
    return Recorder(db)


def _feature(found: Sequence[dict[str, Any]], feature: str) -> dict[str, Any] | None:
    return next((f for f in found if f["feature"] == feature), None)


def plant_search_then_verify(rec: Recorder, rng: random.Random, count: int = 200) -> None:
    """Half the attempts call search → verify and always succeed; the rest succeed 30% of the time."""
    others = ["lookup", "calculate", "summarise", "browse", "search", "verify"]
    for i in range(count):
        if i % 2 == 0:
            tools = ["search", "verify", *rng.sample(others[:4], rng.randint(0, 2))]
            reward = 1.0
        else:
            tools = rng.sample(others, rng.randint(1, 3))
            while "search" in tools and "verify" in tools[tools.index("search") + 1 :][:1]:
                tools = rng.sample(others, rng.randint(1, 3))
            reward = 1.0 if rng.random() < 0.3 else 0.0
        rec.attempt(f"sv-{i:03d}", tools=tools, reward=reward)
    rec.write()


# -- (a) a tool sequence that always precedes success ------------------------------------


def test_a_tool_sequence_that_always_precedes_success_is_a_success_pattern(
    db: Database, rec: Recorder
) -> None:
    plant_search_then_verify(rec, random.Random(1))
    result = patterns.analyse(db)
    found = _feature(result["success_patterns"], "tools:search → verify")
    assert found is not None, [f["feature"] for f in result["success_patterns"]]
    assert found["kind"] == "success_pattern"
    assert found["support"] == 100
    assert found["rate_with"] == 1.0
    assert found["rate_without"] < 0.4
    assert found["effect"] > 0.5 and found["ci_low"] > 0
    assert found["q_value"] < 0.05 and found["p_value"] <= found["q_value"]
    assert found["odds_ratio"] is None  # no failure has it: an infinite odds ratio
    assert "succeed more often" in found["description"]
    assert len(found["evidence"]) == patterns.EVIDENCE_LIMIT
    by_rollout = {s["span_id"]: s for s in rec_spans(db)}
    for example in found["evidence"]:
        span = by_rollout[example["span_id"]]  # the call that asked for `search`
        assert span["rollout_id"] == example["rollout_id"]
        assert orjson.loads(span["tool_calls"])[0]["name"] == "search"
    assert _feature(result["failure_patterns"], "tools:search → verify") is None


def rec_spans(db: Database) -> list[dict[str, Any]]:
    return list(db.query("select span_id, rollout_id, tool_calls from spans"))


def test_findings_are_sorted_by_q_and_every_tested_feature_is_counted(
    db: Database, rec: Recorder
) -> None:
    plant_search_then_verify(rec, random.Random(2))
    result = patterns.analyse(db)
    findings = result["success_patterns"] + result["failure_patterns"]
    assert result["tests_run"] >= len(findings) > 0
    for group in (result["success_patterns"], result["failure_patterns"]):
        assert [f["q_value"] for f in group] == sorted(f["q_value"] for f in group)
    assert result["attempts"] == result["with_outcome"] == 200
    orjson.dumps(result)  # JSON-ready as it is


# -- (b) a tool that fails 40% of the time -----------------------------------------------


def plant_flaky_tool(rec: Recorder, rng: random.Random, count: int = 300) -> int:
    """Every attempt calls flaky_api; 40% of its results are errors, and those sink the attempt."""
    errors = 0
    for i in range(count):
        failed = rng.random() < 0.4
        errors += failed
        success = rng.random() < (0.1 if failed else 0.7)
        rec.attempt(
            f"fl-{i:03d}",
            tools=["lookup", "flaky_api"],
            results=[OK_RESULT, ERROR_RESULT if failed else OK_RESULT],
            reward=1.0 if success else 0.0,
            tool_ms=80.0 if failed else 40.0,
        )
    rec.write()
    return errors


def test_a_tool_failing_40_percent_shows_its_error_rate_and_a_failure_pattern(
    db: Database, rec: Recorder
) -> None:
    errors = plant_flaky_tool(rec, random.Random(3))
    assert 0.33 < errors / 300 < 0.47
    result = patterns.analyse(db)
    tools = {t["tool"]: t for t in result["tools"]}
    flaky = tools["flaky_api"]
    assert flaky["executions"] == flaky["calls"] == flaky["attempts"] == 300
    assert flaky["error_rate"] == round(errors / 300, 4)
    assert flaky["median_duration_ms"] == pytest.approx(40.0)
    assert tools["lookup"]["error_rate"] == 0.0
    found = _feature(result["failure_patterns"], "tool_error:flaky_api")
    assert found is not None, [f["feature"] for f in result["failure_patterns"]]
    assert found["support"] == errors
    assert found["effect"] < -0.4 and found["ci_high"] < 0
    assert found["q_value"] < 0.05
    assert found["odds_ratio"] is not None and found["odds_ratio"] < 1
    assert "returns an error" in found["description"]
    # Evidence points at the failing execution, in a failed attempt.
    failed_ids = {
        row["span_id"]
        for row in db.query(
            "select span_id from spans where operation = 'execute_tool' and status = 'error'"
        )
    }
    assert {e["span_id"] for e in found["evidence"]} <= failed_ids
    assert _feature(result["success_patterns"], "tool_error:flaky_api") is None


# -- (c) a model that is cheaper at equal reward -----------------------------------------


def test_a_cheaper_model_at_equal_reward_costs_less_per_reward_point(
    db: Database, rec: Recorder
) -> None:
    rng = random.Random(4)
    for i in range(200):
        model, cost = ("gpt-big", 0.01) if i % 2 else ("gpt-mini", 0.001)
        rec.attempt(
            f"m-{i:03d}", model=model, cost=cost, tools=["lookup"], reward=rng.uniform(0.2, 1.0)
        )
    rec.write()
    boards = patterns.analyse(db)["leaderboards"]
    models = {row["model"]: row for row in boards["models"]}
    big, mini = models["gpt-big"], models["gpt-mini"]
    assert big["rollouts"] == mini["rollouts"] == 100
    assert mini["mean_cost_usd"] == pytest.approx(0.002)  # two calls per attempt
    assert big["mean_cost_usd"] == pytest.approx(0.02)
    assert mini["cost_per_reward_point"] < big["cost_per_reward_point"] / 5
    assert abs(mini["mean_reward"] - big["mean_reward"]) < 0.1
    for row in (big, mini):
        assert row["reward_ci_low"] < row["mean_reward"] < row["reward_ci_high"]
        assert row["p50_latency_ms"] == pytest.approx(200.0)
    # Equal reward: their intervals overlap.
    assert (
        mini["reward_ci_low"] < big["reward_ci_high"]
        and big["reward_ci_low"] < mini["reward_ci_high"]
    )
    assert [row["agent"] for row in boards["agents"]] == ["agent-a"]
    assert boards["agents"][0]["rollouts"] == 200


def test_a_board_with_mean_reward_zero_ranks_above_a_negative_one() -> None:
    def attempt(rid: str, agent: str, reward: float) -> patterns.AttemptData:
        return patterns.AttemptData(rid, "1", agent, "running", reward=reward, success=reward > 0)

    rows = patterns.leaderboards(
        [attempt("a", "zero", 0.0), attempt("b", "negative", -0.5), attempt("c", "none", 0.0)]
    )["agents"]
    rows_none = patterns.leaderboards([patterns.AttemptData("d", "1", "unrewarded", "running")])
    assert [r["agent"] for r in rows] == ["none", "zero", "negative"]
    assert rows_none["agents"][0]["mean_reward"] is None


# -- (d) pure noise ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
def test_pure_noise_reports_no_more_than_the_false_positive_rate(
    db: Database, rec: Recorder, seed: int
) -> None:
    rng = random.Random(seed)
    tools = [f"tool_{i:02d}" for i in range(30)]
    for i in range(200):
        rec.attempt(
            f"n-{i:03d}",
            tools=rng.sample(tools, rng.randint(2, 6)),
            reward=float(rng.random() < 0.5),
        )
    rec.write()
    result = patterns.analyse(db)
    findings = result["success_patterns"] + result["failure_patterns"]
    assert result["tests_run"] >= 30  # every tool was tested
    # Benjamini-Hochberg at 0.05 under the global null: a finding in at most 5% of runs.
    assert len(findings) <= 1, [(f["feature"], f["q_value"]) for f in findings]


# -- (e) outliers ------------------------------------------------------------------------


def test_a_rollout_ten_times_slower_than_its_agents_median_is_an_outlier(
    db: Database, rec: Recorder
) -> None:
    for i in range(20):
        rec.attempt(f"o-{i:02d}", agent="agent-o", tools=["lookup"], call_ms=100.0, reward=1.0)
    rec.attempt("o-slow", agent="agent-o", tools=["lookup"], call_ms=1000.0, reward=1.0)
    rec.attempt("o-dear", agent="agent-o", tools=["lookup"], cost=0.01, reward=1.0)
    for i in range(3):  # too few rollouts to have a median worth comparing to
        rec.attempt(f"p-{i}", agent="agent-p", call_ms=100.0 * 10**i, reward=1.0)
    rec.write()
    found = patterns.analyse(db)["outliers"]
    slow = [o for o in found if o["measure"] == "slowest"]
    dear = [o for o in found if o["measure"] == "most_expensive"]
    assert [o["rollout_id"] for o in slow] == ["o-slow"]
    assert slow[0]["agent"] == "agent-o"
    assert slow[0]["value"] == pytest.approx(2000.0)
    assert slow[0]["agent_median"] == pytest.approx(200.0)
    assert slow[0]["ratio"] == pytest.approx(10.0)
    assert [o["rollout_id"] for o in dear] == ["o-dear"]
    assert dear[0]["ratio"] == pytest.approx(10.0)
    assert not [o for o in found if o["agent"] == "agent-p"]


# -- (g) execute_tool spans as the gateway derives them ----------------------------------


def test_execute_tool_spans_feed_tool_stats_without_double_counting_calls(
    db: Database, rec: Recorder
) -> None:
    rec.attempt("x-1", tools=["lookup", "lookup"], results=[OK_RESULT, ERROR_RESULT], reward=1.0)
    rec.attempt("x-2", tools=["calculate"], tool_ms=25.0, reward=0.0)
    rec.write()
    executions = list(
        db.query(
            "select name, operation, status, parent_span_id from spans where operation = 'execute_tool'"
        )
    )
    assert {e["name"] for e in executions} == {"execute_tool lookup", "execute_tool calculate"}
    assert all(e["parent_span_id"] for e in executions)
    attempts = {a.rollout_id: a for a in patterns.load(db)}
    assert attempts["x-1"].tools == ["lookup", "lookup"]
    assert [(t, s) for t, s, _, _ in attempts["x-1"].executions] == [
        ("lookup", "ok"),
        ("lookup", "error"),
    ]
    assert "tool_error:lookup" in attempts["x-1"].features
    assert {"tools:lookup", "tools:lookup → lookup"} <= attempts["x-1"].features.keys()
    # Tool executions are not model calls: they add to neither cost nor model latency.
    assert attempts["x-1"].duration_ms == pytest.approx(300.0)
    tools = {t["tool"]: t for t in patterns.tool_effectiveness(list(attempts.values()))}
    assert tools["lookup"]["calls"] == 2 and tools["lookup"]["executions"] == 2
    assert tools["lookup"]["error_rate"] == 0.5
    assert tools["calculate"]["median_duration_ms"] == pytest.approx(25.0)
    assert tools["calculate"]["reward_with"] == 0.0 and tools["calculate"]["reward_without"] == 1.0


def test_since_and_agent_narrow_what_is_analysed(db: Database, rec: Recorder) -> None:
    rec.attempt("early", agent="agent-a", reward=1.0)
    cutoff = rec.clock
    rec.attempt("late-a", agent="agent-a", reward=1.0)
    rec.attempt("late-b", agent="agent-b", reward=0.0)
    rec.write()
    assert patterns.analyse(db)["attempts"] == 3
    assert patterns.analyse(db, since_ns=cutoff)["attempts"] == 2
    assert patterns.analyse(db, since_ns=cutoff, agent="agent-b")["attempts"] == 1


def test_fisher_p_values_match_scipy_including_ties() -> None:
    rng = random.Random(5)
    cases = [(20, 10, 10), (100, 50, 50), (7, 3, 4), (1000, 137, 402), (50_000, 20_000, 900)]
    for total, wins, support in cases:
        losses = total - wins
        observed = sorted(
            {rng.randint(max(0, support - losses), min(support, wins)) for _ in range(15)}
        )
        mine = patterns.fisher_two_sided(observed, [support] * len(observed), wins, total)
        for a, p in zip(observed, mine, strict=True):
            b, c = support - a, wins - a
            expected = fisher_exact([[a, b], [c, losses - b]]).pvalue
            assert p == pytest.approx(expected, rel=1e-8, abs=1e-300), (total, wins, support, a)


# -- (f) guidelines ----------------------------------------------------------------------


def test_guidelines_write_list_diff_and_rollback_round_trip(db: Database, rec: Recorder) -> None:
    plant_search_then_verify(rec, random.Random(6))
    first = patterns.analyse(db, agent="agent-a")
    v1 = write_guideline(
        db, "agent-a", render_guideline("agent-a", first, 1), first["success_patterns"]
    )
    assert v1["version"] == 1
    assert "## Keep doing" in v1["content"] and "search → verify" in v1["content"]
    assert "## Avoid" in v1["content"]

    plant_flaky_tool(rec, random.Random(7))
    second = patterns.analyse(db, agent="agent-a")
    v2 = write_guideline(db, "agent-a", render_guideline("agent-a", second, 2), [])
    assert v2["version"] == 2 and v2["content"] != v1["content"]
    assert "flaky_api" in v2["content"]

    assert [v["version"] for v in list_guidelines(db, "agent-a")] == [1, 2]
    assert list_guidelines(db, "agent-b") == []
    diff = diff_guidelines(db, "agent-a", 1, 2)
    assert diff.startswith("--- agent-a v1\n+++ agent-a v2\n")
    assert any(line.startswith("+") and "flaky_api" in line for line in diff.splitlines())

    v3 = rollback_guideline(db, "agent-a", 1)
    assert v3["version"] == 3 and v3["note"] == "rollback to v1"
    assert v3["content"] == v1["content"]
    assert get_guideline(db, "agent-a")["version"] == 3
    assert diff_guidelines(db, "agent-a", 1, 3) == ""
    assert get_guideline(db, "agent-a", 2)["content"] == v2["content"]  # history is kept


# -- the command -------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(patterns_command, list(args), catch_exceptions=False)


@pytest.fixture
def planted(db: Database, rec: Recorder) -> str:
    plant_search_then_verify(rec, random.Random(8))
    plant_flaky_tool(rec, random.Random(9), count=150)
    return db.conn.execute("pragma database_list").fetchone()[2]


def test_patterns_command_prints_every_section(planted: str) -> None:
    result = invoke("--db", planted)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for title in ("Success patterns", "Failure patterns", "Tool effectiveness",
                  "Leaderboard by model", "Leaderboard by agent", "Outliers"):  # fmt: skip
        assert title in out
    assert "tools:search → verify" in out
    assert "tool_error:flaky_api" in out
    assert "EFFECT [95% CI]" in out and "COST/REWARD" in out
    flaky_row = next(line for line in out.splitlines() if line.startswith("flaky_api "))
    assert "%" in flaky_row


def test_patterns_json_is_the_analysis_as_one_object(planted: str) -> None:
    result = invoke("--db", planted, "--json", "--min-support", "10", "--alpha", "0.01")
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    data = orjson.loads(line)
    assert data["min_support"] == 10 and data["alpha"] == 0.01
    assert all(f["support"] >= 10 and f["q_value"] <= 0.01 for f in data["failure_patterns"])
    assert {
        "success_patterns",
        "failure_patterns",
        "tools",
        "leaderboards",
        "outliers",
    } <= data.keys()


def test_patterns_command_filters_by_agent_and_since(planted: str) -> None:
    result = invoke("--db", planted, "--agent", "nobody")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no attempts recorded for agent nobody" in result.stderr
    future = invoke("--db", planted, "--since", "2200-01-01", "--json")
    assert orjson.loads(future.stdout)["attempts"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--alpha", "0"],
        ["--alpha", "1.5"],
        ["--min-support", "0"],
        ["--since", "yesterday-ish"],
        ["--since", "2999-01-01"],
    ],
)
def test_patterns_command_rejects_bad_options(planted: str, args: list[str]) -> None:
    result = invoke("--db", planted, *args)
    assert result.exit_code == 2
    assert "Invalid value" in result.stderr


def test_patterns_command_on_a_missing_database_says_so(tmp_path: Path) -> None:
    result = invoke("--db", str(tmp_path / "nope.db"))
    assert result.exit_code == 1
    assert "no database at" in result.stderr


def test_guidelines_command_round_trip(planted: str) -> None:
    written = invoke("guidelines", "--agent", "agent-a", "--db", planted)
    assert written.exit_code == 0, written.output
    assert written.stdout.startswith("# Guideline for `agent-a` (version 1)")
    assert "Nothing is applied to any prompt" in written.stderr
    again = invoke(
        "guidelines", "--agent", "agent-a", "--write", "--min-support", "50", "--db", planted
    )
    assert again.stdout.startswith("# Guideline for `agent-a` (version 2)")

    listed = invoke("guidelines", "--agent", "agent-a", "--list", "--db", planted)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["VERSION", "v1", "v2"]
    as_json = invoke("guidelines", "--agent", "agent-a", "--list", "--json", "--db", planted)
    assert [orjson.loads(line)["version"] for line in as_json.stdout.splitlines()] == [1, 2]

    shown = invoke("guidelines", "--agent", "agent-a", "--show", "1", "--db", planted)
    assert shown.stdout == written.stdout
    diff = invoke("guidelines", "--agent", "agent-a", "--diff", "1", "2", "--db", planted)
    assert diff.stdout.startswith("--- agent-a v1\n+++ agent-a v2\n")

    rolled = invoke("guidelines", "--agent", "agent-a", "--rollback", "1", "--db", planted)
    assert rolled.exit_code == 0
    assert "v3: the text of v1" in rolled.stderr and "Nothing is applied" in rolled.stderr
    same = invoke("guidelines", "--agent", "agent-a", "--diff", "1", "3", "--db", planted)
    assert same.stdout == "" and "same text" in same.stderr


def _hold_version(url: str, agent: str, version: int) -> psycopg.Connection:
    """Another writer's guideline version, inserted but not committed yet."""
    conn = psycopg.connect(url)
    conn.execute(
        "insert into guidelines (agent, version, content, findings, note, created_ns) "
        "values (%s, %s, 'other writer', '[]', null, 1)",
        [agent, version],
    )
    return conn


def _waiting_on_a_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select count(*) from pg_locks where not granted").fetchone()
    return bool(row and row[0])


def _guidelines_command(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI_ARGV, "patterns", "guidelines", "--agent", "writer-bot", *args, "--db", url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("how", [["--min-support", "1"], ["--rollback", "1"]], ids=str)
def test_a_guideline_written_while_another_writer_writes_one_gets_the_next_version(
    postgres: PostgresServer, how: list[str]
) -> None:
    """Two writers at once on one PostgreSQL store: the one that loses the race writes the
    version after the other's, instead of failing on the key."""
    url = postgres.new_database()
    db = connect(url)
    try:
        insert_spans(db, [span_record(f"g-{n}", 1, agent="writer-bot") for n in range(3)])
        write_guideline(db, "writer-bot", "version one", [])
    finally:
        db.close()
    other = _hold_version(url, "writer-bot", 2)
    try:
        command = _guidelines_command(url, *how)
        wait_until(lambda: _waiting_on_a_lock(url), timeout=60, what="the command to wait")
        other.commit()
        _out, err = command.communicate(timeout=60)
    finally:
        other.close()

    assert command.returncode == 0, err[-800:]
    versions = read_rows(url, "select version, content from guidelines order by version")
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert versions[1]["content"] == "other writer"
    if how[0] == "--rollback":
        assert versions[2]["content"] == "version one"
    else:
        assert versions[2]["content"].startswith("# Guideline for `writer-bot` (version 3)")


def test_guidelines_command_errors_are_messages(planted: str) -> None:
    missing = invoke("guidelines", "--agent", "agent-a", "--show", "9", "--db", planted)
    assert missing.exit_code == 1
    assert "no guideline version 9" in missing.stderr
    both = invoke("guidelines", "--agent", "agent-a", "--list", "--show", "1", "--db", planted)
    assert both.exit_code == 2 and "choose one of --list, --show" in both.stderr
    nobody = invoke("guidelines", "--agent", "nobody", "--db", planted)
    assert nobody.exit_code == 1 and "no attempts recorded for agent nobody" in nobody.stderr
    empty = invoke("guidelines", "--agent", "nobody", "--list", "--db", planted)
    assert empty.exit_code == 0 and "no guidelines for agent nobody yet" in empty.stderr


def test_an_agents_own_tool_span_and_the_derived_one_count_once(tmp_path: Path) -> None:
    """An `execute_tool` span the agent sent over OTLP and the one the gateway derived for the
    same tool call (same `gen_ai.tool.call.id`) are one execution, not two."""
    from shapes import span_record

    db = connect(tmp_path / "dedup.db")
    calls = [{"id": "call_7", "name": "lookup", "arguments": None}]
    both = [
        span_record(
            "dedup", seq, operation="execute_tool", name="execute_tool lookup", tool_calls=calls
        )
        for seq in (1, 2)
    ]
    other = span_record(
        "dedup",
        3,
        operation="execute_tool",
        name="execute_tool lookup",
        tool_calls=[{"id": "call_8", "name": "lookup", "arguments": None}],
    )
    insert_spans(db.conn, [*both, other])
    (attempt,) = patterns.load(db)
    assert [tool for tool, *_ in attempt.executions] == ["lookup", "lookup"]
    db.close()
