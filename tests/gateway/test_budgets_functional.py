"""Per-rollout budgets through the real OpenAI SDK: refusals, cost stops, the clamp, exact
concurrency, header lowering, and two gateways sharing one budget through Redis or through
their one PostgreSQL store."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from conftest import closed_after_test, gateway_settings
from pg import PostgresServer, start_postgres
from redis_server import RedisServer, start_redis
from servers import GatewayThread, wait_until

from gateway.cli.main import cli

CHAT = "/v1/chat/completions"
# 1e-4 USD per token in and out: a short call costs about a tenth of a cent.
PER_TOKEN = 1e-4
PRICED = {"input_cost_per_token": PER_TOKEN, "output_cost_per_token": PER_TOKEN}
LONG_TEXT = " ".join(f"word{i}" for i in range(40))


def priced_models(provider_url: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "gpt-test",
            "deployments": [
                {
                    "provider": "openai",
                    "model": "upstream-model",
                    "api_base": provider_url,
                    "api_key": "sk-upstream-secret",
                    **PRICED,
                }
            ],
        }
    ]


def client(gateway: GatewayThread, rollout: str, **kwargs: Any) -> openai.OpenAI:
    # The SDK's default retries stay on: a refusal must not be retried.
    return closed_after_test(
        openai.OpenAI(base_url=gateway.url(rollout), api_key="sk-client", **kwargs)
    )


def ask(oai: openai.OpenAI, text: str = "hi", **kwargs: Any) -> Any:
    return oai.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": text}], **kwargs
    )


def spent(gateway: GatewayThread, rollout: str) -> float:
    return sum(s["cost_usd"] or 0.0 for s in gateway.spans(rollout_id=rollout))


@pytest.mark.both_backends
def test_calls_beyond_max_calls_are_refused_at_once_and_never_retried(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    gateway = make_gateway(budgets={"rollout": {"max_calls": 2}})
    oai = client(gateway, "calls-1")
    first, second = ask(oai), ask(oai)
    assert first.headers["x-budget-remaining-calls"] == "1"
    assert second.headers["x-budget-remaining-calls"] == "0"

    with pytest.raises(openai.APIStatusError) as refused:
        ask(oai)
    assert refused.value.status_code == 402
    error = refused.value.body
    assert error["code"] == "budget_exceeded"
    assert error["type"] == "insufficient_quota"
    assert "max_calls" in error["message"] and "2 calls" in error["message"]
    assert refused.value.response.headers["x-budget-remaining-calls"] == "0"
    # Two calls went upstream; the SDK raised on the first 402 without trying again.
    assert len(fake_provider.state.requests_to(CHAT)) == 2
    spans = gateway.spans(rollout_id="calls-1")
    assert [s["status"] for s in spans] == ["ok", "ok", "error"]
    assert spans[-1]["http_status"] == 402
    assert spans[-1]["error_type"] == "budget_exceeded"
    assert spans[-1]["attributes"]["spangate.budget"] == {"scope": "rollout", "limit": "max_calls"}

    metrics = httpx.get(f"{gateway.base}/metrics").text
    assert 'spangate_budget_refusals_total{limit="max_calls",scope="rollout"} 1.0' in metrics


def test_attempt_limits_apply_per_attempt(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    gateway = make_gateway(budgets={"attempt": {"max_calls": 1}})
    ask(openai.OpenAI(base_url=gateway.url("att-1", "a"), api_key="k"))
    with pytest.raises(openai.APIStatusError) as refused:
        ask(openai.OpenAI(base_url=gateway.url("att-1", "a"), api_key="k"))
    assert "attempt 'a' of rollout 'att-1'" in refused.value.body["message"]
    ask(openai.OpenAI(base_url=gateway.url("att-1", "b"), api_key="k"))
    assert len(fake_provider.state.requests_to(CHAT)) == 2


@pytest.mark.both_backends
def test_cost_budget_stops_the_rollout_after_the_call_that_crossed_it(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    gateway = make_gateway(models=priced_models(fake_provider.url))
    budget = 0.01
    created = httpx.post(
        f"{gateway.base}/api/rollouts", json={"id": "cost-1", "budget": {"max_cost_usd": budget}}
    )
    assert created.status_code == 201, created.text
    assert created.json()["budget"] == {"rollout": {"max_cost_usd": budget}}
    oai = client(gateway, "cost-1")
    answered = 0
    with pytest.raises(openai.APIStatusError) as refused:
        for _ in range(100):
            ask(oai, LONG_TEXT)
            answered += 1
    assert refused.value.body["code"] == "budget_exceeded"
    assert "max_cost_usd" in refused.value.body["message"]
    costs = [s["cost_usd"] for s in gateway.spans(rollout_id="cost-1") if s["status"] == "ok"]
    assert len(costs) == answered
    # Every call but the last started under budget; the last one crossed it.
    assert sum(costs[:-1]) < budget <= sum(costs)

    detail = httpx.get(f"{gateway.base}/api/rollouts/cost-1").json()
    usage = detail["budget_usage"]
    assert usage["limits"]["rollout"] == {"max_cost_usd": budget}
    assert usage["used"]["calls"] == answered
    assert usage["used"]["cost_usd"] == pytest.approx(sum(costs))
    assert usage["remaining"] == {"max_cost_usd": 0}


@pytest.mark.both_backends
def test_clamp_lowers_max_tokens_so_the_final_cost_stays_within_budget(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    gateway = make_gateway(
        models=priced_models(fake_provider.url),
        budgets={"rollout": {"max_cost_usd": 0.02}, "clamp_max_tokens": True},
    )
    oai = client(gateway, "clamp-1")
    with pytest.raises(openai.APIStatusError) as refused:
        for _ in range(100):
            ask(oai, LONG_TEXT, max_tokens=200)
    assert refused.value.status_code == 402
    spans = [s for s in gateway.spans(rollout_id="clamp-1") if s["status"] == "ok"]
    assert sum(s["cost_usd"] for s in spans) <= 0.02
    clamped = [s for s in spans if "spangate.budget" in s["attributes"]]
    assert clamped, "the last calls should have been clamped"
    clamp = clamped[-1]["attributes"]["spangate.budget"]["clamp"]["max_tokens"]
    assert clamp["from"] == 200 and 1 <= clamp["to"] < 200
    # The upstream saw the lowered cap, the stored request what the client sent.
    sent = [r.body.get("max_tokens") for r in fake_provider.state.requests_to(CHAT)]
    assert sent[-1] == clamp["to"]
    assert clamped[-1]["request_body"]["max_tokens"] == 200


def test_streamed_calls_are_budgeted_clamped_and_carry_the_headers(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    gateway = make_gateway(
        budgets={"rollout": {"max_calls": 2, "max_tokens": 100}, "clamp_max_tokens": True}
    )
    oai = client(gateway, "stream-1")
    with oai.chat.completions.with_streaming_response.create(
        model="gpt-test", messages=[{"role": "user", "content": LONG_TEXT}], stream=True
    ) as response:
        assert response.headers["x-budget-remaining-calls"] == "1"
        text = "".join(
            chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices
        )
    assert text
    sent = fake_provider.state.requests_to(CHAT)[-1].body
    # The prompt is about 100 characters: the reply may take what is left of 100 tokens.
    assert 1 <= sent["max_completion_tokens"] < 100
    span = gateway.spans(rollout_id="stream-1")[-1]
    assert span["input_tokens"] + span["output_tokens"] <= 100

    with pytest.raises(openai.APIStatusError) as refused:
        for _ in oai.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "again"}], stream=True
        ):
            pass
    assert refused.value.status_code == 402
    assert len(fake_provider.state.requests_to(CHAT)) == 1


@pytest.mark.both_backends
def test_twenty_concurrent_calls_with_max_calls_five_send_exactly_five_upstream(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    fake_provider.state.latency = 0.05
    gateway = make_gateway(budgets={"rollout": {"max_calls": 5}})

    async def run() -> list[Any]:
        oai = openai.AsyncOpenAI(base_url=gateway.url("conc-1"), api_key="k")
        async with oai:
            calls = [
                oai.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": str(i)}]
                )
                for i in range(20)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(refused) == 15 and all(r.status_code == 402 for r in refused)
    assert len(fake_provider.state.requests_to(CHAT)) == 5


def test_headers_lower_the_budget_but_never_raise_it(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    gateway = make_gateway(budgets={"rollout": {"max_calls": 3}})
    low = client(gateway, "hdr-1", default_headers={"X-Budget-Max-Calls": "1"})
    high = client(gateway, "hdr-1", default_headers={"X-Budget-Max-Calls": "10"})
    assert ask(low).headers["x-budget-remaining-calls"] == "0"
    with pytest.raises(openai.APIStatusError):
        ask(low)
    # 10 does not raise the configured 3: two more calls, then a refusal.
    assert ask(high).headers["x-budget-remaining-calls"] == "1"
    ask(high)
    with pytest.raises(openai.APIStatusError) as refused:
        ask(high)
    assert "max_calls is 3 calls" in refused.value.body["message"]
    assert len(fake_provider.state.requests_to(CHAT)) == 3

    bad = httpx.post(
        f"{gateway.url('hdr-1')}/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]},
        headers={"X-Budget-Max-Cost-Usd": "lots"},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "X-Budget-Max-Cost-Usd"


@pytest.mark.both_backends
def test_agent_limits_and_api_patch_reach_the_budget(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    gateway = make_gateway(
        budgets={
            "rollout": {"max_calls": 1},
            "agents": {"researcher": {"rollout": {"max_calls": 2}}},
        }
    )
    oai = client(gateway, "ag-1")
    ask(oai)
    # The agent is named after the rollout's first call: its limit applies from then on.
    httpx.post(f"{gateway.base}/api/rollouts", json={"id": "ag-1", "agent": "researcher"})
    ask(oai)
    with pytest.raises(openai.APIStatusError):
        ask(oai)
    patched = httpx.patch(
        f"{gateway.base}/api/rollouts/ag-1", json={"budget": {"max_calls": 3, "max_tokens": 10**6}}
    )
    assert patched.status_code == 200, patched.text
    assert ask(oai).headers["x-budget-remaining-calls"] == "0"
    detail = httpx.get(f"{gateway.base}/api/rollouts/ag-1").json()["budget_usage"]
    assert detail["limits"]["rollout"] == {"max_calls": 3, "max_tokens": 10**6}
    assert detail["used"]["calls"] == 3
    assert detail["remaining"]["max_calls"] == 0

    # `null` removes the rollout's own limit: the agent's 2 applies again.
    httpx.patch(f"{gateway.base}/api/rollouts/ag-1", json={"budget": {"max_calls": None}})
    detail = httpx.get(f"{gateway.base}/api/rollouts/ag-1").json()["budget_usage"]
    assert detail["limits"]["rollout"]["max_calls"] == 2

    invalid = httpx.patch(f"{gateway.base}/api/rollouts/ag-1", json={"budget": {"max_calls": -1}})
    assert invalid.status_code == 422


def test_calls_before_any_limit_count_at_their_true_use_when_a_budget_is_set(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    # No limit anywhere: calls are counted without a reservation, then settled at their use.
    gateway = make_gateway(models=priced_models(fake_provider.url))
    oai = client(gateway, "nb-1")
    for text in ("hi", LONG_TEXT, "again"):
        ask(oai, text)
    spans = gateway.spans(rollout_id="nb-1")
    tokens = sum(s["input_tokens"] + s["output_tokens"] for s in spans)
    patched = httpx.patch(
        f"{gateway.base}/api/rollouts/nb-1",
        json={"budget": {"max_calls": 4, "max_tokens": tokens + 10**4}},
    )
    assert patched.status_code == 200, patched.text
    detail = httpx.get(f"{gateway.base}/api/rollouts/nb-1").json()["budget_usage"]
    assert detail["used"]["calls"] == 3
    assert detail["used"]["tokens"] == tokens
    assert detail["used"]["cost_usd"] == pytest.approx(spent(gateway, "nb-1"))
    assert detail["attempts"]["1"]["used"]["calls"] == 3
    assert ask(oai).headers["x-budget-remaining-calls"] == "0"
    with pytest.raises(openai.APIStatusError) as refused:
        ask(oai)
    assert refused.value.status_code == 402


@pytest.mark.both_backends
def test_budget_survives_a_restart_and_spangate_show_prints_it(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any, db_path: Path
) -> None:
    gateway = make_gateway()
    httpx.post(f"{gateway.base}/api/rollouts", json={"id": "rs-1", "budget": {"max_calls": 2}})
    ask(client(gateway, "rs-1"))
    gateway.flush()
    gateway.stop()
    again = make_gateway()
    ask(client(again, "rs-1"))
    with pytest.raises(openai.APIStatusError):
        ask(client(again, "rs-1"))
    again.flush()

    shown = CliRunner().invoke(cli, ["show", "rs-1", "--db", str(db_path)])
    assert shown.exit_code == 0, shown.output
    assert "max_calls 2 (used 2, left 0)" in shown.output


# -- across replicas ----------------------------------------------------------------------


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's real redis-server, emptied for this test."""
    redis_server.flush()
    return redis_server.url


def test_two_gateways_on_one_redis_hold_one_budget(
    fake_provider: Any, db_path: Path, redis_url: str
) -> None:
    settings = gateway_settings(
        fake_provider.url,
        budgets={"rollout": {"max_calls": 6}, "attempt": {"max_calls": 100}},
        shared={"redis_url": redis_url},
    )
    first = GatewayThread(settings, db_path).start()
    second = GatewayThread(settings, db_path).start()
    try:
        clients = [client(first, "two-1"), client(second, "two-1")]
        outcomes = []
        for i in range(10):
            try:
                ask(clients[i % 2])
                outcomes.append("ok")
            except openai.APIStatusError as exc:
                assert exc.status_code == 402
                outcomes.append("refused")
        assert outcomes == ["ok"] * 6 + ["refused"] * 4
        # A budget set through one replica holds on the other.
        httpx.patch(f"{first.base}/api/rollouts/two-1", json={"budget": {"max_calls": 7}})
        ask(clients[1])
        with pytest.raises(openai.APIStatusError):
            ask(clients[1])

        # Concurrent calls split over both replicas: exactly max_calls go upstream.
        fake_provider.state.reset()
        fake_provider.state.latency = 0.05
        sent_settings = {"budget": {"max_calls": 5}}
        httpx.post(f"{first.base}/api/rollouts", json={"id": "two-2", **sent_settings})

        async def run(gateway: GatewayThread) -> list[Any]:
            oai = openai.AsyncOpenAI(base_url=gateway.url("two-2"), api_key="k")
            async with oai:
                calls = [
                    oai.chat.completions.create(
                        model="gpt-test", messages=[{"role": "user", "content": str(i)}]
                    )
                    for i in range(10)
                ]
                return await asyncio.gather(*calls, return_exceptions=True)

        async def both() -> list[Any]:
            return [*(await asyncio.gather(run(first), run(second)))]

        results = [r for part in asyncio.run(both()) for r in part]
        assert sum(1 for r in results if isinstance(r, openai.APIStatusError)) == 15
        assert len(fake_provider.state.requests_to(CHAT)) == 5
        usage = httpx.get(f"{second.base}/api/rollouts/two-2").json()["budget_usage"]
        assert usage["shared"] is True and usage["used"]["calls"] == 5
    finally:
        second.stop()
        first.stop()


# redis-py leaves the socket of a server that went away to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_an_unreachable_budget_state_refuses_calls_with_503(
    make_gateway: Callable[..., GatewayThread], fake_provider: Any
) -> None:
    # Its own redis-server, stopped once the gateway is up: Redis going away under it.
    own = start_redis()
    gateway = make_gateway(shared={"redis_url": own.url}, budgets={"rollout": {"max_calls": 9}})
    own.stop()
    # Closed at the end: a refusal kept by pytest.raises would hold the client's socket open
    # until some later test collects it.
    with (
        client(gateway, "down-1", max_retries=0) as limited,
        openai.OpenAI(base_url=gateway.url(), api_key="k") as plain,
    ):
        with pytest.raises(openai.APIStatusError) as refused:
            ask(limited)
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "budget_unavailable"
        assert fake_provider.state.requests_to(CHAT) == []
        # A call outside any rollout has no budget to check.
        assert ask(plain).http_response.status_code == 200
    del refused
    gc.collect()


# -- across replicas on one PostgreSQL, no Redis ------------------------------------------


def concurrently(gateways: list[GatewayThread], rollout: str, calls: int) -> list[Any]:
    """`calls` chat calls at once through the async SDK, dealt round-robin over `gateways`."""

    async def run() -> list[Any]:
        clients = [openai.AsyncOpenAI(base_url=g.url(rollout), api_key="k") for g in gateways]
        try:
            return await asyncio.gather(
                *(
                    clients[i % len(clients)].chat.completions.create(
                        model="gpt-test", messages=[{"role": "user", "content": str(i)}]
                    )
                    for i in range(calls)
                ),
                return_exceptions=True,
            )
        finally:
            for oai in clients:
                await oai.close()

    return asyncio.run(run())


def test_two_gateways_on_one_postgresql_hold_one_budget_without_redis(
    fake_provider: Any, postgres: PostgresServer
) -> None:
    url = postgres.new_database()
    fake_provider.state.latency = 0.05
    settings = gateway_settings(fake_provider.url, budgets={"rollout": {"max_calls": 5}})
    replicas = [GatewayThread(settings, url).start(), GatewayThread(settings, url).start()]
    try:
        results = concurrently(replicas, "pg-conc", 20)
        refused = [r for r in results if isinstance(r, openai.APIStatusError)]
        assert len(refused) == 15
        assert all(r.status_code == 402 and r.body["code"] == "budget_exceeded" for r in refused)
        assert len(fake_provider.state.requests_to(CHAT)) == 5
        for replica in replicas:
            replica.flush()
        for replica in replicas:
            usage = httpx.get(f"{replica.base}/api/rollouts/pg-conc").json()["budget_usage"]
            assert usage["shared"] is True
            assert usage["used"]["calls"] == 5 and usage["remaining"] == {"max_calls": 0}

        # A budget raised through one replica holds on the other at once.
        httpx.patch(f"{replicas[0].base}/api/rollouts/pg-conc", json={"budget": {"max_calls": 6}})
        assert ask(client(replicas[1], "pg-conc")).headers["x-budget-remaining-calls"] == "0"
        with pytest.raises(openai.APIStatusError):
            ask(client(replicas[0], "pg-conc"))
    finally:
        for replica in replicas:
            replica.stop()


def test_a_cost_budget_holds_across_postgresql_replicas_and_a_restart(
    fake_provider: Any, postgres: PostgresServer
) -> None:
    url = postgres.new_database()
    settings = gateway_settings(fake_provider.url, models=priced_models(fake_provider.url))
    replicas = [GatewayThread(settings, url).start(), GatewayThread(settings, url).start()]
    budget = 0.01
    httpx.post(
        f"{replicas[0].base}/api/rollouts",
        json={"id": "pg-cost", "budget": {"max_cost_usd": budget}},
    )
    costs: list[float] = []

    def settled(replica: GatewayThread) -> bool:
        # The answer is sent before its real cost replaces the estimate; the next call may go
        # to the other replica, so the test waits for that (a user's call would merely see
        # the estimate, which is higher).
        detail = httpx.get(f"{replica.base}/api/rollouts/pg-cost").json()["budget_usage"]
        return bool(detail["used"]["cost_usd"] == pytest.approx(sum(costs)))

    try:
        with pytest.raises(openai.APIStatusError) as refused:
            for i in range(100):
                usage = ask(client(replicas[i % 2], "pg-cost"), LONG_TEXT).parse().usage
                costs.append((usage.prompt_tokens + usage.completion_tokens) * PER_TOKEN)
                other = replicas[(i + 1) % 2]
                wait_until(lambda other=other: settled(other), timeout=5, what="the settle")
        assert refused.value.status_code == 402
        assert "max_cost_usd" in refused.value.body["message"]
        assert len(costs) >= 2, "the calls should have alternated between the replicas"
        replicas[0].flush()
        replicas[1].flush()
        recorded = [s["cost_usd"] for s in replicas[0].spans(rollout_id="pg-cost")]
        assert [c for c in recorded if c] == pytest.approx(costs)
        # Every call but the last started under budget; the last one crossed it.
        assert sum(costs[:-1]) < budget <= sum(costs)
    finally:
        for replica in replicas:
            replica.stop()

    # The counters are in the store: a replica started afresh refuses the spent rollout.
    again = GatewayThread(settings, url).start()
    try:
        with pytest.raises(openai.APIStatusError) as after_restart:
            ask(client(again, "pg-cost"), LONG_TEXT)
        assert after_restart.value.status_code == 402
        detail = httpx.get(f"{again.base}/api/rollouts/pg-cost").json()["budget_usage"]
        assert detail["used"]["calls"] == len(costs)
        assert detail["used"]["cost_usd"] == pytest.approx(sum(costs))
    finally:
        again.stop()
    assert len(fake_provider.state.requests_to(CHAT)) == len(costs)


@pytest.fixture
def own_postgres() -> Any:
    """A server of this test's own, since the test stops it."""
    server = start_postgres()
    yield server
    server.stop()


def test_with_postgresql_away_only_calls_with_a_limit_are_refused(
    fake_provider: Any, own_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = own_postgres.new_database()
    settings = gateway_settings(
        fake_provider.url,
        budgets={"agents": {"capped": {"rollout": {"max_calls": 50}}}},
        recorder={"journal_dir": str(tmp_path / "journal")},
    )
    gateway = GatewayThread(settings, url).start()
    capped = client(gateway, "pg-away-1", max_retries=0, default_headers={"X-Agent-Id": "capped"})
    free = client(gateway, "pg-away-2", max_retries=0)
    try:
        ask(capped)
        ask(free)
        own_postgres.pause()
        with pytest.raises(openai.APIStatusError) as unavailable:
            ask(capped)
        assert unavailable.value.status_code == 503
        assert unavailable.value.body["code"] == "budget_unavailable"
        # No limit to enforce: the call goes on while the store is away (spans spill).
        assert ask(free).http_response.status_code == 200
        own_postgres.resume()
        wait_until(lambda: _answered(capped), timeout=15, what="budgets to come back")
    finally:
        gateway.stop()


def _answered(oai: openai.OpenAI) -> bool:
    try:
        ask(oai)
    except openai.APIStatusError as exc:
        assert exc.status_code == 503
        return False
    return True
