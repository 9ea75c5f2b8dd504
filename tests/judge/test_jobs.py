"""Judge jobs over a real database: selection, idempotence, resuming after an interruption,
sampling, and the service that runs judges inside a gateway.

A verdict is stored as soon as it is made under an id derived from (judge, rubric version,
rollout), so a rerun skips what is done and an interrupted job picks up where it stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio
import respx
from judge_builders import (
    DEFAULT_CRITERIA,
    AgentRun,
    completion_body,
    load,
    seed,
    set_status,
    verdict_json,
)
from servers import read_rows

from config.models import JudgeSettings
from judge.jobs import (
    Judge,
    JudgeStore,
    Selection,
    client_factory,
    judge_one,
    make_judge,
    run_job,
    sampled,
)
from judge.llm import judge_rollout_id
from judge.rules import RULES_VERSION
from judge.service import HOST, JudgeService, RunLimitReached
from judge.trajectory import Trajectory
from judge.verdict import reward_id
from store.errors import Conflict, InvalidTransition, NotFound
from store.schema import connect
from store.writes import add_reward, get_judge_run, replace_reward, save_judge_run

IDS = [f"r{n}" for n in range(1, 6)]
T = TypeVar("T")


def five_rollouts(db_path: Path) -> list[str]:
    """Five rollouts of one agent, one of them with an upstream error it never recovered from."""
    runs = []
    for index, rid in enumerate(IDS):
        run = AgentRun(rid)
        run.ok("Working on it.", input_tokens=10 * (index + 1))
        if index == 4:
            run.error()
        else:
            run.ok("Done.")
        runs.append(run)
    seed(db_path, *runs)
    return IDS


def judge_rewards(db_path: Path, source: str = "judge:rules") -> list[dict[str, Any]]:
    return read_rows(db_path, "select * from rewards where source = ? order by rollout_id", source)


@pytest_asyncio.fixture
async def store(db_path: Path) -> AsyncIterator[JudgeStore]:
    judge_store = JudgeStore(db_path)
    yield judge_store
    judge_store.close()


@pytest.fixture
def rules() -> Judge:
    return make_judge("rules", JudgeSettings())


@pytest.mark.asyncio
async def test_a_job_judges_every_rollout_once_and_a_rerun_skips_them(
    db_path: Path, store: JudgeStore, rules: Judge
) -> None:
    ids = five_rollouts(db_path)
    seen: list[str] = []

    first = await run_job(rules, store, ids, on_result=lambda o: seen.append(o.rollout_id))
    second = await run_job(rules, store, ids)

    assert (first.count("judged"), first.count("skipped"), first.count("failed")) == (5, 0, 0)
    assert sorted(seen) == ids
    assert (second.count("judged"), second.count("skipped")) == (0, 5)
    rewards = judge_rewards(db_path)
    assert [r["rollout_id"] for r in rewards] == ids
    assert {r["id"] for r in rewards} == {reward_id("rules", RULES_VERSION, rid) for rid in ids}
    by_rollout = {r["rollout_id"]: r for r in rewards}
    assert by_rollout["r5"]["value"] < by_rollout["r1"]["value"]
    summary = first.as_dict()
    assert summary["judged"] == 5 and summary["judge"] == "rules"
    assert summary["mean_score"] == pytest.approx(sum(r["value"] for r in rewards) / 5, abs=1e-4)


@pytest.mark.asyncio
async def test_force_judges_again_and_replaces_the_stored_verdict(
    db_path: Path, store: JudgeStore, rules: Judge
) -> None:
    five_rollouts(db_path)
    await run_job(rules, store, ["r1"])
    before = judge_rewards(db_path)[0]["value"]
    later = AgentRun("r1", first_seq=10)
    later.error()  # the rollout gets worse after it was judged
    seed(db_path, later)

    unforced = await run_job(rules, store, ["r1"])
    forced = await run_job(rules, store, ["r1"], force=True)

    assert unforced.count("skipped") == 1
    assert forced.count("judged") == 1
    (after,) = judge_rewards(db_path)
    assert after["value"] < before


def test_verdict_ids_keep_short_ids_as_they_were_and_keep_long_ones_apart() -> None:
    # Stored verdicts of ordinary rollouts keep their ids, so reruns still skip them.
    assert reward_id("rules", "rules-1", "task-42") == "judge-rules-rules-1-task-42"
    long_a, long_b = "x" * 250 + "-aaaa", "x" * 250 + "-bbbb"

    ids = {reward_id("rules", "rules-1", rid) for rid in (long_a, long_b)}
    own = {judge_rollout_id("llm", rid) for rid in (long_a, long_b)}

    assert len(ids) == 2 and len(own) == 2
    assert all(len(i) <= 256 and i.startswith("judge-rules-rules-1-xxx") for i in ids)
    assert all(len(i) <= 256 and i.startswith("judge-llm-xxx") for i in own)
    # A replaced character does not make two ids one either.
    assert reward_id("my rubric", "1", "r1") != reward_id("my_rubric", "1", "r1")


@pytest.mark.asyncio
async def test_replacing_a_verdict_never_removes_another_rollouts_reward(
    db_path: Path, store: JudgeStore
) -> None:
    five_rollouts(db_path)
    await store.write(
        lambda db: add_reward(db, {"id": "shared-id", "rollout_id": "r1", "value": 1.0})
    )

    with pytest.raises(Conflict):
        await store.write(
            lambda db: replace_reward(db, {"id": "shared-id", "rollout_id": "r2", "value": 0.0})
        )

    assert [(r["rollout_id"], r["value"]) for r in judge_rewards(db_path, "user")] == [("r1", 1.0)]


@pytest.mark.asyncio
async def test_a_job_over_some_rollouts_then_all_judges_only_the_rest(
    db_path: Path, store: JudgeStore, rules: Judge
) -> None:
    ids = five_rollouts(db_path)

    await run_job(rules, store, ids[:3])
    resumed = await run_job(rules, store, ids)

    assert (resumed.count("skipped"), resumed.count("judged")) == (3, 2)
    assert {o.rollout_id for o in resumed.outcomes if o.status == "judged"} == {"r4", "r5"}
    assert len(judge_rewards(db_path)) == 5


@pytest.mark.asyncio
async def test_an_interrupted_job_resumes_where_it_stopped(
    db_path: Path, store: JudgeStore, rules: Judge
) -> None:
    ids = five_rollouts(db_path)
    stalled = asyncio.Event()

    async def stalls_on_the_third(t: Trajectory, judge_store: JudgeStore) -> Any:
        if t.rollout_id == ids[2]:
            stalled.set()
            await asyncio.Event().wait()  # never answers: the job is killed here
        return await rules.run(t, judge_store)

    stalling = Judge(rules.name, rules.version, rules.needs_model, stalls_on_the_third)
    job = asyncio.create_task(run_job(stalling, store, ids, concurrency=1))
    await asyncio.wait_for(stalled.wait(), timeout=10)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert [r["rollout_id"] for r in judge_rewards(db_path)] == ids[:2]

    resumed = await run_job(rules, store, ids)

    assert (resumed.count("skipped"), resumed.count("judged")) == (2, 3)
    assert [r["rollout_id"] for r in judge_rewards(db_path)] == ids


@pytest.mark.asyncio
async def test_an_unknown_rollout_is_a_failed_outcome_not_a_crash(
    db_path: Path, store: JudgeStore, rules: Judge
) -> None:
    five_rollouts(db_path)

    summary = await run_job(rules, store, ["r1", "no-such-rollout"])

    outcome = {o.rollout_id: o for o in summary.outcomes}
    assert outcome["r1"].status == "judged"
    assert outcome["no-such-rollout"].status == "failed"
    assert "not found" in (outcome["no-such-rollout"].error or "")


_ROLLOUTS = [
    ("mine-1", "agent-a"),
    ("mine-2", "agent-a"),
    ("theirs", "agent-b"),
    ("anonymous", None),
    ("judge-llm-mine-1", "judge-llm"),
    ("odd-name", "judge-rules"),
]


def _one_call(rollout_id: str, agent: str | None) -> AgentRun:
    run = AgentRun(rollout_id, agent=agent)
    run.ok("Done.")
    return run


@pytest.mark.asyncio
async def test_selection_filters_and_never_picks_the_judges_own_rollouts(
    db_path: Path, store: JudgeStore
) -> None:
    seed(db_path, *(_one_call(rid, agent) for rid, agent in _ROLLOUTS))
    set_status(db_path, "mine-2", "failed")

    everything = await store.select(Selection())
    failed = await store.select(Selection(status="failed"))
    agent_a = await store.select(Selection(agent="agent-a"))
    explicit = await store.select(Selection(rollout_ids=["theirs", "mine-1", "theirs"]))

    assert sorted(everything) == ["anonymous", "mine-1", "mine-2", "theirs"]
    assert failed == ["mine-2"]
    assert sorted(agent_a) == ["mine-1", "mine-2"]
    assert explicit == ["theirs", "mine-1"]


def test_sampling_is_stable_nested_and_roughly_proportional() -> None:
    ids = [f"rollout-{n}" for n in range(4000)]

    third = [rid for rid in ids if sampled(rid, 0.3)]
    again = [rid for rid in ids if sampled(rid, 0.3)]
    two_thirds = {rid for rid in ids if sampled(rid, 0.6)}

    assert third == again
    assert 0.27 < len(third) / len(ids) < 0.33
    assert set(third) <= two_thirds
    assert all(sampled(rid, None) and sampled(rid, 1.0) for rid in ids[:50])
    assert not any(sampled(rid, 0.0) for rid in ids)
    # The choice depends on the id alone (no process-seeded hash), so another run agrees.
    digest = hashlib.sha256(b"rollout-7").digest()
    assert sampled("rollout-7", 0.3) == (int.from_bytes(digest[:8], "big") / 2**64 < 0.3)


@pytest.mark.asyncio
async def test_selection_applies_the_sample_share(db_path: Path, store: JudgeStore) -> None:
    seed(db_path, *(_one_call(f"s{n}", "agent-a") for n in range(40)))

    picked = await store.select(Selection(sample=0.5))

    assert sorted(picked) == sorted(f"s{n}" for n in range(40) if sampled(f"s{n}", 0.5))
    assert 0 < len(picked) < 40


@pytest.mark.asyncio
async def test_rules_efficiency_compares_with_the_same_agents_rollouts_only(
    db_path: Path, store: JudgeStore, rules: Judge
) -> None:
    runs = []
    for rid, agent, tokens in [
        ("lean", "agent-a", 20),
        ("mid-1", "agent-a", 200),
        ("mid-2", "agent-a", 300),
        ("heavy", "agent-a", 4000),
        ("other-agent-huge", "agent-b", 100_000),
    ]:
        run = AgentRun(rid, agent=agent)
        run.ok("Done.", input_tokens=tokens, output_tokens=0)
        runs.append(run)
    seed(db_path, *runs)

    await run_job(rules, store, ["lean", "heavy", "other-agent-huge"])

    efficiency = {
        r["rollout_id"]: json.loads(r["dimensions"])["token_efficiency"]
        for r in judge_rewards(db_path)
    }
    # Ranked among agent-a's four rollouts (itself included): the leanest scores 1, the
    # heaviest uses more than three quarters of them.
    assert efficiency["lean"] == 1.0
    assert efficiency["heavy"] == 0.25
    # agent-b has too few rollouts of its own; agent-a's small ones do not make it look wasteful.
    assert efficiency["other-agent-huge"] == 1.0


@pytest.mark.asyncio
async def test_judges_see_user_rewards_but_not_other_judges_verdicts(
    db_path: Path, store: JudgeStore, rules: Judge
) -> None:
    five_rollouts(db_path)
    await run_job(rules, store, ["r1"])
    db = connect(db_path)
    try:
        add_reward(db, {"rollout_id": "r1", "value": 1.0, "source": "user"})
    finally:
        db.close()

    t = load(db_path, "r1")

    assert [(r["source"], r["value"]) for r in t.rewards] == [("user", 1.0)]
    assert len(read_rows(db_path, "select id from rewards")) == 2


def test_an_unknown_judge_or_an_llm_judge_without_model_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown judge 'vibes'; known: rules, llm"):
        make_judge("vibes", JudgeSettings())
    with pytest.raises(ValueError, match=r"set `judge.model`"):
        make_judge("llm", JudgeSettings())


# -- the llm judge in jobs ------------------------------------------------------------------

JUDGE_ROUTE = re.compile(
    r"^/rollout/judge-(?P<judge>[^/]+?)-(?P<rollout>r\d)(?P<run>_run_\d+~[0-9a-f]+)?"
    r"/v1/chat/completions$"
)


def judge_model(request: httpx.Request) -> httpx.Response:
    """Answers a valid verdict, except about rollout r3, where it never produces valid JSON."""
    match = JUDGE_ROUTE.match(request.url.path)
    assert match is not None, request.url.path
    if match["rollout"] == "r3":
        return httpx.Response(200, json=completion_body("I think it went fine."))
    return httpx.Response(
        200, json=completion_body(verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 0.9)))
    )


@pytest.fixture
def gateway() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.mark.asyncio
async def test_an_llm_job_stores_valid_verdicts_and_reports_invalid_ones(
    db_path: Path, store: JudgeStore, gateway: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    route = gateway.post(url__startswith="http://gw.test/rollout/judge-llm-").mock(
        side_effect=judge_model
    )
    ids = five_rollouts(db_path)
    settings = JudgeSettings(model="judge-model", max_invalid_retries=1)
    llm = make_judge("llm", settings, client_factory(settings, "http://gw.test", http))

    summary = await run_job(llm, store, ids)

    outcome = {o.rollout_id: o for o in summary.outcomes}
    assert outcome["r3"].status == "failed"
    assert "not valid JSON" in (outcome["r3"].error or "")
    assert [o.status for rid, o in sorted(outcome.items()) if rid != "r3"] == ["judged"] * 4
    assert route.call_count == 4 + 2  # r3 asked twice (one retry), the others once
    rewards = judge_rewards(db_path, "judge:llm")
    assert [r["rollout_id"] for r in rewards] == ["r1", "r2", "r4", "r5"]
    assert all(r["value"] == pytest.approx(0.9) for r in rewards)
    details = json.loads(rewards[0]["details"])
    assert details["criteria"]["task_completion"]["explanation"] == "task_completion explained"

    rerun = await run_job(llm, store, ids)

    assert (rerun.count("skipped"), rerun.count("failed")) == (4, 1)


def judge_rollouts(db_path: Path) -> dict[str, str]:
    rows = read_rows(db_path, "select id, status from rollouts where id like 'judge-%'")
    return {r["id"]: r["status"] for r in rows}


@pytest.mark.asyncio
async def test_each_judgement_keeps_its_own_judge_rollout_and_the_status_it_ended_with(
    db_path: Path, store: JudgeStore, gateway: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    # r3's first judgement fails; once the model answers, the retry and a forced rerun are
    # each judgements of their own: the failed one's trace does not turn `succeeded`.
    route = gateway.post(url__startswith="http://gw.test/rollout/judge-llm-").mock(
        side_effect=judge_model
    )
    five_rollouts(db_path)
    settings = JudgeSettings(model="judge-model", max_invalid_retries=0)
    llm = make_judge("llm", settings, client_factory(settings, "http://gw.test", http))
    first, second, third = (judge_rollout_id("llm", "r3", run) for run in (1, 2, 3))

    assert (await run_job(llm, store, ["r3"])).count("failed") == 1
    route.side_effect = lambda request: httpx.Response(
        200, json=completion_body(verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 0.7)))
    )
    assert (await run_job(llm, store, ["r3"])).count("judged") == 1
    assert (await run_job(llm, store, ["r3"], force=True)).count("judged") == 1

    assert judge_rollouts(db_path) == {first: "failed", second: "succeeded", third: "succeeded"}
    asked = [call.request.url.path.split("/")[2] for call in route.calls]
    assert asked == [first, second, third]
    assert second.startswith("judge-llm-r3") and len({first, second, third}) == 3


@pytest.mark.asyncio
async def test_a_rubric_named_in_the_config_is_a_judge_of_its_own(
    db_path: Path,
    store: JudgeStore,
    gateway: respx.MockRouter,
    http: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    rubric = tmp_path / "brevity.yaml"
    rubric.write_text(
        "version: b-1\ncriteria:\n  - name: brevity\n    description: Was it short?\n",
        encoding="utf-8",
    )
    route = gateway.post(url__startswith="http://gw.test/rollout/judge-brevity-").mock(
        return_value=httpx.Response(200, json=completion_body(verdict_json({"brevity": 0.4})))
    )
    five_rollouts(db_path)
    settings = JudgeSettings(model="judge-model", rubrics={"brevity": str(rubric)})
    brevity = make_judge("brevity", settings, client_factory(settings, "http://gw.test", http))

    summary = await run_job(brevity, store, ["r1"])

    assert (brevity.name, brevity.version) == ("brevity", "b-1")
    assert summary.count("judged") == 1 and route.called
    (reward,) = judge_rewards(db_path, "judge:brevity")
    assert reward["id"] == reward_id("brevity", "b-1", "r1")
    assert reward["value"] == pytest.approx(0.4)


# -- the service inside a gateway -----------------------------------------------------------


@pytest.mark.asyncio
async def test_online_judging_queues_only_sampled_terminal_rollouts_and_never_blocks(
    db_path: Path,
) -> None:
    settings = JudgeSettings(online={"judge": "rules", "on": ["succeeded"], "queue_size": 2})
    service = JudgeService(settings, db_path, lambda: "http://gw.test")
    try:
        service.on_rollout({"id": "a", "status": "succeeded"})
        service.on_rollout({"id": "b", "status": "failed"})  # not in `on`
        service.on_rollout({"id": "c", "status": "running"})
        service.on_rollout({"id": "d", "status": "succeeded"})
        service.on_rollout({"id": "e", "status": "succeeded"})  # the queue is full

        assert service.queue.qsize() == 2
        assert [service.queue.get_nowait(), service.queue.get_nowait()] == ["a", "d"]
        assert service.dropped == 1
    finally:
        await service.close()


@pytest.mark.asyncio
async def test_online_sample_zero_judges_nothing(db_path: Path) -> None:
    service = JudgeService(
        JudgeSettings(online={"judge": "rules", "sample": 0.0}), db_path, lambda: ""
    )
    try:
        service.on_rollout({"id": "a", "status": "succeeded"})
        assert service.queue.empty()
    finally:
        await service.close()


@pytest.mark.asyncio
async def test_the_online_llm_judge_calls_the_gateway_at_its_address_once_known(
    db_path: Path, gateway: respx.MockRouter
) -> None:
    # The gateway starts its judging before it listens, and learns its own address after.
    gateway.post(url__startswith="http://gw.test/rollout/judge-llm-").mock(side_effect=judge_model)
    five_rollouts(db_path)
    address = {"base_url": ""}
    settings = JudgeSettings(model="judge-model", online={"judge": "llm"})
    service = JudgeService(settings, db_path, lambda: address["base_url"])
    service.open()
    try:
        service.start_online()
        address["base_url"] = "http://gw.test"

        service.on_rollout({"id": "r1", "status": "succeeded"})
        await asyncio.wait_for(service.queue.join(), timeout=10)

        assert [r["rollout_id"] for r in judge_rewards(db_path, "judge:llm")] == ["r1"]
        assert service.online_judged == 1
    finally:
        await service.close()


@pytest.mark.asyncio
async def test_the_judge_calls_go_to_the_configured_gateway_url(
    db_path: Path, gateway: respx.MockRouter
) -> None:
    configured = gateway.post(url__startswith="http://judging-gw.test/rollout/judge-llm-").mock(
        return_value=httpx.Response(
            200, json=completion_body(verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 1.0)))
        )
    )
    this_one = gateway.post(url__startswith="http://gw.test/").mock(
        return_value=httpx.Response(500)
    )
    five_rollouts(db_path)
    settings = JudgeSettings(model="judge-model", gateway_url="http://judging-gw.test")
    service = JudgeService(settings, db_path, lambda: "http://gw.test")
    service.open()
    try:
        outcome = await judge_one(service.judge("llm"), service.store, "r1")
    finally:
        await service.close()

    assert (configured.call_count, this_one.call_count) == (1, 0)
    assert outcome.status == "judged"


# -- judge runs always end ------------------------------------------------------------------

RUN_TIMEOUT = 10.0


async def eventually(predicate: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Poll the async `predicate` until it returns something truthy; fail after RUN_TIMEOUT."""
    deadline = asyncio.get_running_loop().time() + RUN_TIMEOUT
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {RUN_TIMEOUT}s waiting for {what}")
        await asyncio.sleep(0.01)  # poll


class GatedJudgeModel:
    """The judge model behind respx: answers a verdict once `gate` is open, except for the
    first `free` calls, which answer at once."""

    def __init__(self, free: int = 0) -> None:
        self.gate = asyncio.Event()
        self.free = free
        self.asked: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        match = JUDGE_ROUTE.match(request.url.path)
        assert match is not None, request.url.path
        self.asked.append(match["rollout"])
        if len(self.asked) > self.free:
            await self.gate.wait()
        return httpx.Response(
            200, json=completion_body(verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 0.9)))
        )


@pytest_asyncio.fixture
async def llm_service(
    db_path: Path, gateway: respx.MockRouter
) -> AsyncIterator[Callable[..., JudgeService]]:
    services: list[JudgeService] = []

    def make(model: GatedJudgeModel, **settings: Any) -> JudgeService:
        gateway.post(url__startswith="http://gw.test/rollout/judge-llm-").mock(side_effect=model)
        service = JudgeService(
            JudgeSettings(model="judge-model", **settings), db_path, lambda: "http://gw.test"
        )
        service.open()
        services.append(service)
        return service

    yield make
    for service in services:
        await service.close()


async def ended(service: JudgeService, run_id: str) -> dict[str, Any]:
    async def run_if_ended() -> dict[str, Any] | None:
        run = await service.get_run(run_id)
        return run if run["status"] != "running" else None

    return await eventually(run_if_ended, f"judge run {run_id} to end")


@pytest.mark.asyncio
async def test_runs_past_max_runs_are_refused_until_one_ends(
    db_path: Path, llm_service: Callable[..., JudgeService]
) -> None:
    five_rollouts(db_path)
    model = GatedJudgeModel()
    service = llm_service(model, max_runs=2)

    def start(rid: str) -> Awaitable[dict[str, Any]]:
        return service.start_run("llm", Selection([rid]), concurrency=1, force=False)

    # Started together: each checks the limit before its first await, so two get in.
    started = await asyncio.gather(start("r1"), start("r2"), start("r3"), return_exceptions=True)

    refused = [r for r in started if isinstance(r, RunLimitReached)]
    running = [r for r in started if isinstance(r, dict)]
    assert len(refused) == 1 and len(running) == 2, started
    assert "judge.max_runs" in str(refused[0])
    model.gate.set()
    for run in running:
        assert (await ended(service, run["id"]))["status"] == "succeeded"
    later = await start("r3")
    assert (await ended(service, later["id"]))["judged"] == 1


@pytest.mark.asyncio
async def test_a_cancelled_run_ends_cancelled_and_keeps_what_it_judged(
    db_path: Path, llm_service: Callable[..., JudgeService]
) -> None:
    five_rollouts(db_path)
    model = GatedJudgeModel(free=1)  # r1 is judged, then the model hangs on r2
    service = llm_service(model)
    run = await service.start_run("llm", Selection(IDS), concurrency=1, force=False)

    async def second_asked() -> bool:
        return len(model.asked) >= 2

    await eventually(second_asked, "the judge model to be asked about r2")
    cancelled = await service.cancel_run(run["id"])

    assert cancelled["status"] == "cancelled"
    assert cancelled["error"] == "cancelled over the API"
    assert cancelled["ended_ns"] is not None
    assert (cancelled["judged"], cancelled["total"]) == (1, 5)
    assert [r["rollout_id"] for r in cancelled["results"]] == ["r1"]
    assert [r["rollout_id"] for r in judge_rewards(db_path, "judge:llm")] == ["r1"]
    # The judgement cut short ends its judge rollout too: none is left running.
    assert judge_rollouts(db_path) == {
        judge_rollout_id("llm", "r1"): "succeeded",
        judge_rollout_id("llm", "r2"): "cancelled",
    }
    assert await service.get_run(run["id"]) == cancelled
    with pytest.raises(InvalidTransition, match="already ended"):
        await service.cancel_run(run["id"])
    with pytest.raises(NotFound):
        await service.cancel_run("jr-nope")


@pytest.mark.asyncio
async def test_a_final_write_that_meets_a_locked_store_lands_once_it_is_free(
    db_path: Path,
    llm_service: Callable[..., JudgeService],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Writes go through the store writer, whose busy timeout (recorder.busy_timeout) is short.
    five_rollouts(db_path)
    model = GatedJudgeModel()
    service = llm_service(model)
    run = await service.start_run("llm", Selection(["r1"]), concurrency=1, force=False)

    async def asked() -> bool:
        return bool(model.asked)

    await eventually(asked, "the judge model to be asked")
    locker = sqlite3.connect(db_path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        model.gate.set()

        async def final_write_refused() -> bool:
            return "did not take it" in caplog.text

        await eventually(final_write_refused, "the final write to meet the lock")
        assert (await service.get_run(run["id"]))["status"] == "running"  # reads still work
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    done = await ended(service, run["id"])
    assert done["status"] == "succeeded"
    assert done["ended_ns"] is not None
    # The verdict met the lock too: that rollout failed, the run still ended.
    (result,) = done["results"]
    assert result["status"] == "failed" and "locked" in result["error"]


def exited_process_owner() -> str:
    """The owner a judge run of a gateway process on this host that has exited would have."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{HOST}:{process.pid}:1"


@pytest.mark.asyncio
async def test_runs_left_running_by_a_gone_process_are_marked_failed_at_start(
    db_path: Path,
) -> None:
    five_rollouts(db_path)
    db = connect(db_path)
    try:
        exited = {"status": "running", "judge": "rules", "owner": exited_process_owner()}
        save_judge_run(db, {"id": "jr-orphan", **exited})
        # Another host's run, not heard of for many heartbeats.
        quiet = {"status": "running", "judge": "rules", "owner": "elsewhere:7:1"}
        save_judge_run(db, {"id": "jr-quiet", **quiet})
        db.execute("update judge_runs set heartbeat_ns = 1 where id = 'jr-quiet'")
        # Another replica's run, which it is still judging.
        live = {"status": "running", "judge": "rules", "owner": "elsewhere:8:1"}
        save_judge_run(db, {"id": "jr-live", **live})
    finally:
        db.close()
    service = JudgeService(JudgeSettings(), db_path, lambda: "http://gw.test")
    service.open()
    try:
        orphan = await ended(service, "jr-orphan")
        quiet_run = await ended(service, "jr-quiet")
        fresh = await service.start_run("rules", Selection(["r1"]), concurrency=1, force=False)
        fresh = await ended(service, fresh["id"])
        live_run = await service.get_run("jr-live")
    finally:
        await service.close()

    assert orphan["status"] == "failed"
    assert orphan["error"].startswith("gateway restarted")
    assert orphan["ended_ns"] is not None
    assert quiet_run["status"] == "failed"
    assert fresh["status"] == "succeeded"
    assert live_run["status"] == "running"


@pytest.mark.asyncio
async def test_a_run_stopped_by_shutdown_ends_failed_with_the_reason(
    db_path: Path, llm_service: Callable[..., JudgeService]
) -> None:
    five_rollouts(db_path)
    model = GatedJudgeModel()
    service = llm_service(model)
    run = await service.start_run("llm", Selection(["r1"]), concurrency=1, force=False)

    async def asked() -> bool:
        return bool(model.asked)

    await eventually(asked, "the judge model to be asked")
    await service.close()

    reader = JudgeStore(db_path)
    try:
        stopped = await reader.read(get_judge_run, run["id"])
    finally:
        reader.close()
    assert stopped["status"] == "failed"
    assert stopped["error"] == "the gateway shut down before the run ended"
