"""Judging through a real gateway: `POST /api/judge/runs`, `GET /api/judge/runs/{id}`, and
online judging when a rollout reaches a terminal status.

Agents' calls go through the gateway to the fake provider (openai SDK). The `llm` judge's
model is a model group served by a tiny canned judge model started here (the fake provider
only echoes), so the judge's own calls cross the gateway and are recorded under
`judge-...` rollouts, as in production.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from click.testing import CliRunner
from conftest import closed_after_test, gateway_settings
from fake_provider import FakeProviderThread
from judge_builders import DEFAULT_CRITERIA, completion_body, verdict_json
from servers import GatewayThread, read_rows, wait_until

from gateway.cli.main import cli
from gateway.judge_routes import JUDGE
from judge.llm import judge_rollout_id
from judge.rules import WEIGHTS

pytestmark = pytest.mark.both_backends

JUDGE_UPSTREAM_MODEL = "verdict-upstream"
BOGUS_SPAN = "deadbeefdeadbeef"
SPAN_IN_RENDER = re.compile(r"span=([0-9a-f]{16})\]")
RUN_TIMEOUT = 10.0
# How long a judge model call may take to arrive; seconds over the usual few milliseconds.
ASK_TIMEOUT = 5.0


def cite_first_step(body: dict[str, Any]) -> str:
    """A verdict citing the first step shown to the judge, plus a span id that does not exist."""
    shown = SPAN_IN_RENDER.findall(body["messages"][1]["content"])
    return verdict_json(
        dict.fromkeys(DEFAULT_CRITERIA, 0.75), evidence=[*shown[:1], BOGUS_SPAN], summary="fine"
    )


class JudgeModel:
    """A judge model on a loopback port in its own thread: OpenAI chat completions whose
    content is `reply(request body)`. While `gate` is clear, answers wait for it."""

    def __init__(self) -> None:
        self.reply: Callable[[dict[str, Any]], str] = cite_first_step
        self.gate = threading.Event()
        self.gate.set()
        self.port = 0
        self._requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
        self.reply = cite_first_step
        self.gate.set()

    def start(self) -> JudgeModel:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self._requests.append(body)
        while not self.gate.is_set():
            await asyncio.sleep(0.01)  # poll: held back by the test
        return web.json_response(completion_body(self.reply(body), model=body["model"]))

    def stop(self) -> None:
        self.gate.set()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture(scope="module")
def judge_model_server() -> Iterator[JudgeModel]:
    server = JudgeModel().start()
    yield server
    server.stop()


@pytest.fixture
def judge_model(judge_model_server: JudgeModel) -> Iterator[JudgeModel]:
    judge_model_server.reset()
    yield judge_model_server
    judge_model_server.gate.set()


@pytest.fixture
def start_gateway(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    judge_model: JudgeModel,
) -> Callable[..., GatewayThread]:
    """A gateway whose `judge-model` group is the canned judge model; `judge` settings given."""

    def start(**judge: Any) -> GatewayThread:
        models = [
            {
                "name": "gpt-test",
                "deployments": [
                    {"provider": "openai", "model": "upstream-model", "api_base": fake_provider.url}
                ],
            },
            {
                "name": "judge-model",
                "deployments": [
                    {
                        "provider": "openai",
                        "model": JUDGE_UPSTREAM_MODEL,
                        "api_base": judge_model.api_base,
                        "api_key": "sk-judge-upstream",
                    }
                ],
            },
        ]
        settings = gateway_settings(
            fake_provider.url, models=models, judge={"model": "judge-model", **judge}
        )
        return make_gateway(settings=settings)

    return start


@pytest.fixture
def api_for() -> Callable[[GatewayThread], httpx.Client]:
    def make(gateway: GatewayThread) -> httpx.Client:
        return closed_after_test(httpx.Client(base_url=gateway.base, timeout=10.0))

    return make


def agent_calls(gateway: GatewayThread, rollout_id: str, *questions: str) -> None:
    """An agent's calls in one rollout, through the gateway with the openai SDK."""
    with openai.OpenAI(
        base_url=gateway.url(rollout_id),
        api_key="x",
        max_retries=0,
        default_headers={"X-Agent-Id": "agent-a"},
    ) as client:
        for question in questions or ("What is 2 + 2?", "And times 3?"):
            client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": question}]
            )


def seed_rollouts(gateway: GatewayThread, *rollout_ids: str) -> list[str]:
    for rid in rollout_ids:
        agent_calls(gateway, rid, f"Task {rid}: what is 2 + 2?", "And times 3?")
    gateway.flush()
    return list(rollout_ids)


def start_run(api: httpx.Client, **body: Any) -> dict[str, Any]:
    response = api.post("/api/judge/runs", json=body)
    assert response.status_code == 202, response.text
    run = response.json()
    # A small run may be done before the answer is sent; it is never failed at the start.
    assert run["status"] in ("running", "succeeded"), run
    assert run["id"].startswith("jr-")
    return run


def finished_run(api: httpx.Client, run_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        response = api.get(f"/api/judge/runs/{run_id}")
        assert response.status_code == 200, response.text
        run = response.json()
        return run if run["status"] != "running" else None

    return wait_until(done, timeout=RUN_TIMEOUT, what=f"judge run {run_id} to finish")


def rewards(api: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    response = api.get("/api/rewards", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def spans_of(db_path: Path, rollout_id: str) -> list[str]:
    rows = read_rows(db_path, "select span_id from spans where rollout_id = ?", rollout_id)
    return [row["span_id"] for row in rows]


# -- judge runs over the API ----------------------------------------------------------------


def test_an_llm_run_stores_verdicts_with_criteria_and_records_the_judges_calls(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
    db_path: Path,
) -> None:
    gateway = start_gateway()
    api = api_for(gateway)
    ids = seed_rollouts(gateway, "task-1", "task-2", "task-3")

    run = finished_run(api, start_run(api, judge="llm")["id"])

    assert run["status"] == "succeeded", run
    assert (run["total"], run["judged"], run["skipped"], run["failed"]) == (3, 3, 0, 0)
    assert sorted(r["rollout_id"] for r in run["results"]) == ids
    stored = {r["rollout_id"]: r for r in rewards(api, source="judge:llm")}
    assert sorted(stored) == ids
    for rid, reward in stored.items():
        assert reward["name"] == "judge"
        assert reward["value"] == pytest.approx(0.75)
        assert reward["dimensions"] == dict.fromkeys(DEFAULT_CRITERIA, 0.75)
        criteria = reward["details"]["criteria"]
        assert list(criteria) == list(DEFAULT_CRITERIA)
        assert all(c["explanation"] == f"{name} explained" for name, c in criteria.items())
        # The judge cited the rollout's first step and a made-up span: only the real one stays.
        assert reward["details"]["evidence"] == spans_of(db_path, rid)[:1]
    # The judge model was asked through the gateway (model name rewritten for the upstream).
    asked = judge_model.requests
    assert len(asked) == 3
    assert {body["model"] for body in asked} == {JUDGE_UPSTREAM_MODEL}
    prompts = sorted(body["messages"][1]["content"] for body in asked)
    for rid, prompt in zip(ids, prompts, strict=True):
        assert prompt.startswith(f"TASK: Task {rid}: what is 2 + 2?")
    # ... and its calls were recorded, each under a judge rollout of its own.
    gateway.flush()
    judge_spans = read_rows(
        db_path,
        "select rollout_id, status, model_group from spans where rollout_id like 'judge-%'",
    )
    assert sorted(s["rollout_id"] for s in judge_spans) == [f"judge-llm-{rid}" for rid in ids]
    assert {(s["status"], s["model_group"]) for s in judge_spans} == {("ok", "judge-model")}
    judge_rollouts = read_rows(db_path, "select agent from rollouts where id like 'judge-%'")
    assert {r["agent"] for r in judge_rollouts} == {"judge-llm"}


def test_a_second_run_skips_judged_rollouts_and_force_judges_them_again(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
    db_path: Path,
) -> None:
    gateway = start_gateway()
    api = api_for(gateway)
    ids = seed_rollouts(gateway, "again-1", "again-2")
    finished_run(api, start_run(api, judge="llm", rollout_ids=ids)["id"])

    rerun = finished_run(api, start_run(api, judge="llm", rollout_ids=ids)["id"])

    assert (rerun["judged"], rerun["skipped"], rerun["failed"]) == (0, 2, 0)
    assert len(judge_model.requests) == 2

    judge_model.reply = lambda body: verdict_json(dict.fromkeys(DEFAULT_CRITERIA, 0.25))
    forced = finished_run(api, start_run(api, judge="llm", rollout_ids=ids, force=True)["id"])

    assert (forced["judged"], forced["skipped"]) == (2, 0)
    assert len(judge_model.requests) == 4
    stored = rewards(api, source="judge:llm")
    assert sorted(r["rollout_id"] for r in stored) == ids
    assert {r["value"] for r in stored} == {0.25}
    # Each judgement's calls are a trace of their own: the forced ones did not join the
    # first judgements' ended rollouts.
    gateway.flush()
    for rid in ids:
        runs = [judge_rollout_id("llm", rid, run) for run in (1, 2)]
        traced = read_rows(
            db_path, "select rollout_id from spans where rollout_id in (?, ?)", *runs
        )
        assert sorted(s["rollout_id"] for s in traced) == sorted(runs)
        ended = api.get(f"/api/rollouts/{runs[1]}").json()
        assert (ended["status"], ended["agent"]) == ("succeeded", "judge-llm")


def test_a_rules_run_judges_agent_rollouts_but_never_the_judges_own(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
) -> None:
    gateway = start_gateway()
    api = api_for(gateway)
    ids = seed_rollouts(gateway, "rules-1", "rules-2")
    finished_run(api, start_run(api, judge="llm")["id"])  # leaves judge-llm-* rollouts behind
    gateway.flush()

    run = finished_run(api, start_run(api, judge="rules")["id"])

    assert (run["total"], run["judged"], run["failed"]) == (2, 2, 0)
    stored = rewards(api, source="judge:rules")
    assert sorted(r["rollout_id"] for r in stored) == ids
    for reward in stored:
        assert set(reward["details"]["criteria"]) == set(WEIGHTS)
        assert all(c["explanation"] for c in reward["details"]["criteria"].values())


def test_a_run_selects_rollouts_by_status_and_by_id(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
) -> None:
    gateway = start_gateway()
    api = api_for(gateway)
    seed_rollouts(gateway, "sel-1", "sel-2", "sel-3")
    assert api.patch("/api/rollouts/sel-2", json={"status": "succeeded"}).status_code == 200

    by_status = finished_run(api, start_run(api, judge="rules", status="succeeded")["id"])
    by_id = finished_run(api, start_run(api, judge="rules", rollout_ids=["sel-3"])["id"])

    assert [r["rollout_id"] for r in by_status["results"]] == ["sel-2"]
    assert [r["rollout_id"] for r in by_id["results"]] == ["sel-3"]
    assert by_status["params"]["status"] == "succeeded"


def test_an_empty_list_of_rollout_ids_is_refused_not_read_as_every_rollout(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
) -> None:
    gateway = start_gateway()
    api = api_for(gateway)
    seed_rollouts(gateway, "empty-1", "empty-2")

    response = api.post("/api/judge/runs", json={"judge": "rules", "rollout_ids": []})

    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "rollout_ids"
    assert rewards(api, source="judge:rules") == []


# Two valid rollout ids (255 of the 256 characters an id may have) that differ only at the end.
LONG_A = "x" * 250 + "-aaaa"
LONG_B = "x" * 250 + "-bbbb"


def test_two_long_rollout_ids_that_differ_only_at_the_end_get_a_verdict_each(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
) -> None:
    gateway = start_gateway()
    api = api_for(gateway)
    seed_rollouts(gateway, LONG_A, LONG_B)

    run = finished_run(api, start_run(api, judge="rules")["id"])

    assert {r["rollout_id"]: r["status"] for r in run["results"]} == {
        LONG_A: "judged",
        LONG_B: "judged",
    }
    assert sorted(r["rollout_id"] for r in rewards(api, source="judge:rules")) == [LONG_A, LONG_B]


def test_judging_a_long_rollout_id_again_keeps_the_verdict_of_its_near_twin(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
) -> None:
    gateway = start_gateway()
    api = api_for(gateway)
    seed_rollouts(gateway, LONG_A, LONG_B)
    first = finished_run(api, start_run(api, judge="rules", rollout_ids=[LONG_A])["id"])
    assert first["judged"] == 1, first

    forced = start_run(api, judge="rules", rollout_ids=[LONG_B], force=True)
    assert finished_run(api, forced["id"])["judged"] == 1

    assert len(rewards(api, rollout_id=LONG_A, source="judge:rules")) == 1
    assert len(rewards(api, rollout_id=LONG_B, source="judge:rules")) == 1


def test_a_judge_model_that_never_answers_a_verdict_fails_the_rollouts_not_the_run(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
    db_path: Path,
) -> None:
    judge_model.reply = lambda body: "The agent did great, 10/10!"
    gateway = start_gateway(max_invalid_retries=1)
    api = api_for(gateway)
    seed_rollouts(gateway, "hard-1", "hard-2")

    run = finished_run(api, start_run(api, judge="llm")["id"])

    assert run["status"] == "succeeded"
    assert (run["judged"], run["failed"]) == (0, 2)
    assert all("not valid JSON" in r["error"] for r in run["results"])
    assert rewards(api, source="judge:llm") == []
    assert len(judge_model.requests) == 4  # each rollout asked twice
    gateway.flush()
    recorded = read_rows(db_path, "select count(*) as n from spans where rollout_id like 'judge-%'")
    assert recorded[0]["n"] == 4


def test_a_run_shows_its_progress_while_it_runs(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
) -> None:
    gateway = start_gateway()
    api = api_for(gateway)
    seed_rollouts(gateway, "slow-1", "slow-2", "slow-3")
    judge_model.gate.clear()

    run = start_run(api, judge="llm", concurrency=1)
    wait_until(lambda: judge_model.requests, timeout=ASK_TIMEOUT, what="the judge model call")
    running = api.get(f"/api/judge/runs/{run['id']}").json()
    judge_model.gate.set()

    assert running["status"] == "running"
    assert running["total"] == 3
    assert finished_run(api, run["id"])["judged"] == 3


def test_a_run_cancelled_over_the_api_ends_cancelled(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
) -> None:
    gateway = start_gateway()
    api = api_for(gateway)
    seed_rollouts(gateway, "stop-1", "stop-2")
    judge_model.gate.clear()
    run = start_run(api, judge="llm", concurrency=1)
    wait_until(lambda: judge_model.requests, timeout=ASK_TIMEOUT, what="the judge model call")

    cancelled = api.post(f"/api/judge/runs/{run['id']}/cancel")
    again = api.post(f"/api/judge/runs/{run['id']}/cancel")
    missing = api.post("/api/judge/runs/jr-nope/cancel")

    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert api.get(f"/api/judge/runs/{run['id']}").json()["status"] == "cancelled"
    assert again.status_code == 409, again.text
    assert "already ended (cancelled)" in again.json()["error"]["message"]
    assert missing.status_code == 404
    assert rewards(api, source="judge:llm") == []


def test_runs_past_judge_max_runs_are_refused_with_429(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
) -> None:
    gateway = start_gateway(max_runs=1)
    api = api_for(gateway)
    seed_rollouts(gateway, "busy-1")
    judge_model.gate.clear()
    first = start_run(api, judge="llm")

    refused = api.post("/api/judge/runs", json={"judge": "rules"})

    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_judge_runs"
    assert "judge.max_runs" in refused.json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) > 0
    judge_model.gate.set()
    assert finished_run(api, first["id"])["status"] == "succeeded"
    assert finished_run(api, start_run(api, judge="rules")["id"])["judged"] == 1


def test_the_judges_own_rollouts_end_with_the_judgement_and_age_out(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
    db_path: Path,
) -> None:
    judge_model.reply = lambda body: (
        "no verdict here" if "Task bad" in str(body) else (cite_first_step(body))
    )
    gateway = start_gateway(max_invalid_retries=0)
    api = api_for(gateway)
    seed_rollouts(gateway, "good", "bad")
    for rid in ("good", "bad"):
        assert api.patch(f"/api/rollouts/{rid}", json={"status": "succeeded"}).status_code == 200

    run = finished_run(api, start_run(api, judge="llm")["id"])
    gateway.flush()

    assert (run["judged"], run["failed"]) == (1, 1), run
    ended = read_rows(
        db_path, "select id, status from rollouts where id like 'judge-%' order by id"
    )
    assert ended == [
        {"id": "judge-llm-bad", "status": "failed"},
        {"id": "judge-llm-good", "status": "succeeded"},
    ]
    pruned = CliRunner().invoke(cli, ["prune", "--older-than", "0s", "--db", str(db_path)])
    assert pruned.exit_code == 0, pruned.output
    assert read_rows(db_path, "select id from rollouts") == []
    assert read_rows(db_path, "select span_id from spans") == []


def test_a_replica_starting_leaves_another_replicas_running_run_alone(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
) -> None:
    """Replicas share judge runs through the store (README, Scaling out): one starting (or
    restarting) marks failed only runs no process runs any more."""
    a = start_gateway()
    api_a = api_for(a)
    seed_rollouts(a, "rep-1")
    judge_model.gate.clear()
    run = start_run(api_a, judge="llm", rollout_ids=["rep-1"])
    wait_until(lambda: judge_model.requests, timeout=ASK_TIMEOUT, what="the judge model call")

    b = start_gateway()  # on the same store
    api_b = api_for(b)
    wait_until(
        lambda: not b.app[JUDGE].tasks,  # type: ignore[index]
        timeout=RUN_TIMEOUT,
        what="replica B's start-up check of abandoned runs",
    )
    after_b_started = api_b.get(f"/api/judge/runs/{run['id']}").json()
    judge_model.gate.set()
    ended = finished_run(api_b, run["id"])

    assert after_b_started["status"] == "running"
    assert (ended["status"], ended["error"], ended["judged"]) == ("succeeded", None, 1)
    assert len(rewards(api_b, source="judge:llm")) == 1


def test_unknown_judges_and_runs_are_refused(
    start_gateway: Callable[..., GatewayThread],
    gateway: GatewayThread,
    api_for: Callable[[GatewayThread], httpx.Client],
) -> None:
    with_model = api_for(start_gateway())
    without_model = api_for(gateway)

    unknown = with_model.post("/api/judge/runs", json={"judge": "vibes"})
    no_model = without_model.post("/api/judge/runs", json={"judge": "llm"})
    bad_sample = with_model.post("/api/judge/runs", json={"judge": "rules", "sample": 0})
    missing = with_model.get("/api/judge/runs/jr-nope")

    assert unknown.status_code == 422, unknown.text
    assert unknown.json()["error"]["param"] == "judge"
    assert "unknown judge 'vibes'" in unknown.json()["error"]["message"]
    assert no_model.status_code == 422, no_model.text
    assert "judge.model" in no_model.json()["error"]["message"]
    assert bad_sample.status_code == 422
    assert missing.status_code == 404
    assert list(missing.json()) == ["error"]


# -- online judging -------------------------------------------------------------------------


def test_online_judging_scores_rollouts_that_finish_and_ignores_the_rest(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
) -> None:
    gateway = start_gateway(
        online={"judge": "rules", "sample": 1.0, "on": ["succeeded", "failed"], "concurrency": 1}
    )
    api = api_for(gateway)
    seed_rollouts(gateway, "on-cancelled", "on-succeeded", "on-failed", "on-running")

    for rid, status in [
        ("on-cancelled", "cancelled"),
        ("on-succeeded", "succeeded"),
        ("on-failed", "failed"),
    ]:
        response = api.patch(f"/api/rollouts/{rid}", json={"status": status})
        assert response.status_code == 200, response.text

    def both_judged() -> list[dict[str, Any]] | None:
        got = rewards(api, source="judge:rules")
        done = {r["rollout_id"] for r in got} >= {"on-succeeded", "on-failed"}
        return got if done else None

    judged = wait_until(both_judged, timeout=RUN_TIMEOUT, what="online verdicts")
    # One worker takes rollouts in order, and the cancelled one was patched first: had it
    # been queued, it would have been judged before these two.
    assert sorted(r["rollout_id"] for r in judged) == ["on-failed", "on-succeeded"]
    assert all(r["details"]["criteria"] for r in judged)


def test_a_status_change_does_not_wait_for_the_online_judge(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
) -> None:
    gateway = start_gateway(online={"judge": "llm", "on": ["succeeded"]})
    api = api_for(gateway)
    seed_rollouts(gateway, "quick")
    judge_model.gate.clear()  # the judge model will not answer until released

    started = time.monotonic()
    response = api.patch("/api/rollouts/quick", json={"status": "succeeded"})
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert elapsed < 2.0
    wait_until(lambda: judge_model.requests, timeout=ASK_TIMEOUT, what="the online judge to ask")
    assert rewards(api, source="judge:llm") == []  # answered before the verdict existed

    judge_model.gate.set()

    (verdict,) = wait_until(
        lambda: rewards(api, source="judge:llm"), timeout=RUN_TIMEOUT, what="the verdict"
    )
    assert verdict["rollout_id"] == "quick"


def test_the_online_judge_asks_once_for_a_rollout_updated_after_it_finished(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
) -> None:
    """A status change, then a metadata update of the finished rollout (a common pair)."""
    gateway = start_gateway(online={"judge": "llm", "on": ["succeeded"], "concurrency": 2})
    api = api_for(gateway)
    seed_rollouts(gateway, "twice")
    service = gateway.app[JUDGE]  # type: ignore[index]
    judge_model.gate.clear()

    assert api.patch("/api/rollouts/twice", json={"status": "succeeded"}).status_code == 200
    wait_until(lambda: judge_model.requests, timeout=ASK_TIMEOUT, what="the judge model call")
    assert api.patch("/api/rollouts/twice", json={"metadata": {"k": "v"}}).status_code == 200
    # Queued again, the second worker would ask the model while the first answer is held.
    wait_until(
        lambda: len(judge_model.requests) >= 2 or service.queue._unfinished_tasks <= 1,
        timeout=RUN_TIMEOUT,
        what="a second queueing to reach the model, if there was one",
    )
    judge_model.gate.set()
    wait_until(lambda: service.queue._unfinished_tasks == 0, timeout=RUN_TIMEOUT, what="a drain")

    assert len(rewards(api, source="judge:llm")) == 1
    assert len(judge_model.requests) == 1


def test_online_rollouts_skipped_on_a_full_queue_are_counted_in_metrics(
    start_gateway: Callable[..., GatewayThread],
    api_for: Callable[[GatewayThread], httpx.Client],
    judge_model: JudgeModel,
) -> None:
    gateway = start_gateway(
        online={"judge": "llm", "on": ["succeeded"], "queue_size": 1, "concurrency": 1}
    )
    api = api_for(gateway)
    seed_rollouts(gateway, "q-1", "q-2", "q-3")
    judge_model.gate.clear()
    assert api.patch("/api/rollouts/q-1", json={"status": "succeeded"}).status_code == 200
    wait_until(lambda: judge_model.requests, timeout=ASK_TIMEOUT, what="the held judge call")
    for rid in ("q-2", "q-3"):  # q-2 waits in the queue, q-3 finds it full
        assert api.patch(f"/api/rollouts/{rid}", json={"status": "succeeded"}).status_code == 200

    waiting = metric_samples(api)
    judge_model.gate.set()
    wait_until(
        lambda: metric_samples(api)["spangate_judge_online_judged_total"] == 2,
        timeout=RUN_TIMEOUT,
        what="the two queued rollouts to be judged",
    )

    assert waiting["spangate_judge_online_skipped_total"] == 1
    assert waiting["spangate_judge_online_queue_depth"] == 1
    assert metric_samples(api)["spangate_judge_online_queue_depth"] == 0


def metric_samples(api: httpx.Client) -> dict[str, float]:
    """The online judge's samples on /metrics, by name."""
    text = api.get("/metrics").text
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines())
        if name.startswith("spangate_judge_online_")
    }
