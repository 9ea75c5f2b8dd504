"""Experiments through a real gateway: the `openai` SDK calls a model group that an experiment
covers, the fake provider shows what went upstream, and the store, the API and the CLI show
which variant each rollout ran, how they compare, and promote/stop taking hold."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from fake_provider import FakeProviderThread
from servers import GatewayThread, wait_until

from gateway.cli.main import cli
from judge.guidelines import write_guideline
from store.schema import connect

pytestmark = pytest.mark.both_backends

GUIDELINE = "# Guideline for `researcher` (version 1)\n\nCite a source for every claim.\n"
REFRESH = 0.05


def experiment(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "concise-v2",
        "model": "gpt-test",
        "variants": [
            {"name": "control"},
            {"name": "guideline-v1", "guideline": {"agent": "researcher", "version": 1}},
            {"name": "bigger-model", "model": "mock", "params": {"temperature": 0.2}},
        ],
    }
    data.update(fields)
    return data


@pytest.fixture
def with_guideline(db_path: Path) -> Path:
    """The database holds guideline version 1 for `researcher` before the gateway starts."""
    db = connect(db_path)
    write_guideline(db, "researcher", GUIDELINE, [])
    db.close()
    return db_path


def start(make_gateway: Callable[..., GatewayThread], **fields: Any) -> GatewayThread:
    return make_gateway(experiments=[experiment(**fields)], experiment_refresh=REFRESH)


def ask(gateway: GatewayThread, rollout: str | None, text: str = "hello") -> Any:
    client = openai.OpenAI(base_url=gateway.url(rollout), api_key="sk-test", max_retries=0)
    with client:
        return client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": text}]
        )


def span_of(gateway: GatewayThread, response: Any) -> dict[str, Any]:
    return gateway.spans(span_id=response.headers["x-span-id"])[0]


def test_guideline_variant_sends_the_guideline_as_a_system_message(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    with_guideline: Path,
) -> None:
    gateway = start(
        make_gateway,
        variants=[
            {"name": "control", "weight": 0},
            {"name": "guideline-v1", "guideline": {"agent": "researcher", "version": 1}},
        ],
    )
    response = ask(gateway, "r-guide", "what is the capital of France?")
    assert response.status_code == 200
    upstream = fake_provider.state.last_request.body
    assert upstream["messages"] == [
        {"role": "system", "content": GUIDELINE},
        {"role": "user", "content": "what is the capital of France?"},
    ]
    span = span_of(gateway, response)
    assert span["request_body"]["messages"] == upstream["messages"]
    assert span["attributes"]["experiment"] == "concise-v2"
    assert span["attributes"]["variant"] == "guideline-v1"
    assert span["attributes"]["guideline.version"] == 1


def test_a_missing_guideline_is_a_clear_error(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = start(
        make_gateway,
        variants=[
            {"name": "control", "weight": 0},
            {"name": "guideline-v9", "guideline": {"agent": "researcher", "version": 9}},
        ],
    )
    with pytest.raises(openai.InternalServerError) as caught:
        ask(gateway, "r-missing")
    assert caught.value.code == "guideline_not_found"
    assert "spangate patterns guidelines" in caught.value.message
    assert fake_provider.state.snapshot() == []


def test_model_and_params_variant_goes_to_another_group(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = start(
        make_gateway,
        variants=[
            {"name": "control", "weight": 0},
            {"name": "bigger-model", "model": "mock", "params": {"temperature": 0.2}},
        ],
    )
    span = span_of(gateway, ask(gateway, "r-model"))
    assert span["model_group"] == "mock"
    assert span["request_body"]["temperature"] == 0.2
    assert span["request_body"]["model"] == "mock"
    assert fake_provider.state.snapshot() == []


def test_fixed_split_is_sticky_per_rollout_and_per_call_without_one(
    make_gateway: Callable[..., GatewayThread], with_guideline: Path
) -> None:
    gateway = start(make_gateway)
    for rollout in range(12):
        for _ in range(3):
            ask(gateway, f"r{rollout}")
    for _ in range(6):
        ask(gateway, None)
    spans = gateway.spans()
    by_rollout: dict[str, set[str]] = {}
    for span in spans:
        if span["rollout_id"]:
            by_rollout.setdefault(span["rollout_id"], set()).add(span["attributes"]["variant"])
    assert len(by_rollout) == 12
    assert all(len(variants) == 1 for variants in by_rollout.values()), by_rollout
    assert len(Counter(next(iter(v)) for v in by_rollout.values())) > 1
    assert all(s["attributes"]["experiment"] == "concise-v2" for s in spans)


def test_promote_and_stop_take_hold_at_once_and_survive_a_restart(
    fake_provider: FakeProviderThread, db_path: Path, with_guideline: Path
) -> None:
    from conftest import gateway_settings

    settings = gateway_settings(
        fake_provider.url, experiments=[experiment()], experiment_refresh=REFRESH
    )
    gateway = GatewayThread(settings, db_path).start()
    runner = CliRunner()
    try:
        ask(gateway, "r-before")
        result = runner.invoke(
            cli, ["experiments", "promote", "concise-v2", "bigger-model", "--db", str(db_path)]
        )
        assert result.exit_code == 0, result.output
        assert "promoted bigger-model" in result.output
        counter = iter(range(1000))

        def variant_now() -> str | None:
            span = span_of(gateway, ask(gateway, f"r-promoted-{next(counter)}"))
            return span["attributes"].get("variant")

        wait_until(lambda: variant_now() == "bigger-model", timeout=5, what="the promote")
        assert {variant_now() for _ in range(5)} == {"bigger-model"}
        result = runner.invoke(cli, ["experiments", "stop", "concise-v2", "--db", str(db_path)])
        assert result.exit_code == 0, result.output
        wait_until(lambda: variant_now() is None, timeout=5, what="the stop")
        span = span_of(gateway, ask(gateway, "r-stopped"))
        assert span["model_group"] == "gpt-test"
        assert "experiment" not in span["attributes"]
    finally:
        gateway.stop()
    restarted = GatewayThread(settings, db_path).start()
    try:
        span = span_of(restarted, ask(restarted, "r-after-restart"))
        assert "experiment" not in span["attributes"]
        shown = runner.invoke(cli, ["experiments", "concise-v2", "--db", str(db_path)])
        assert "stopped" in shown.output
    finally:
        restarted.stop()


def test_rewards_feed_the_posterior_and_a_restart_rebuilds_it(
    fake_provider: FakeProviderThread, db_path: Path
) -> None:
    from conftest import gateway_settings

    settings = gateway_settings(
        fake_provider.url,
        experiments=[
            experiment(
                policy="thompson",
                variants=[{"name": "control"}, {"name": "bigger-model", "model": "mock"}],
            )
        ],
        experiment_refresh=REFRESH,
    )
    gateway = GatewayThread(settings, db_path).start()
    try:
        for i in range(6):
            ask(gateway, f"t{i}")
            gateway.flush()
            response = httpx.post(
                f"{gateway.base}/api/rollouts/t{i}/rewards", json={"value": 1.0, "final": True}
            )
            assert response.status_code == 201
        arms = gateway.gw.experiments.by_name["concise-v2"].arms
        assert sum(arm.n for arm in arms.values()) == 6
        before = {name: (arm.n, arm.total) for name, arm in arms.items()}
    finally:
        gateway.stop()
    restarted = GatewayThread(settings, db_path).start()
    try:
        arms = restarted.gw.experiments.by_name["concise-v2"].arms
        assert {name: (arm.n, arm.total) for name, arm in arms.items()} == before
        # A reward written by the CLI (not through this gateway) is picked up too.
        result = CliRunner().invoke(
            cli, ["reward", "t0", "--value", "0", "--final", "--db", str(db_path)]
        )
        assert result.exit_code == 0, result.output
        wait_until(
            lambda: sum(arm.total for arm in arms.values()) == 5.0,
            timeout=5,
            what="the CLI's reward to be counted",
        )
    finally:
        restarted.stop()


def test_api_and_cli_compare_the_variants(
    make_gateway: Callable[..., GatewayThread], with_guideline: Path, db_path: Path
) -> None:
    gateway = start(make_gateway)
    for i in range(9):
        response = ask(gateway, f"a{i}")
        assert response.status_code == 200
    gateway.flush()
    for i in range(9):
        value = 0.5 + (i % 3) * 0.1
        httpx.post(f"{gateway.base}/api/rollouts/a{i}/rewards", json={"value": value})
    listed = httpx.get(f"{gateway.base}/api/experiments").json()["data"]
    assert [e["name"] for e in listed] == ["concise-v2"]
    one = httpx.get(f"{gateway.base}/api/experiments/concise-v2").json()
    assert one == listed[0]
    assert sum(v["rollouts"] for v in one["variants"]) == 9
    assert sum(v["rewarded"] for v in one["variants"]) == 9
    assert one["status"] == "running"
    assert one["verdict"].startswith("keep running")
    control = one["variants"][0]
    assert control["control"] and control["vs_control"] is None
    assert control["latency_p50_ms"] is not None
    missing = httpx.get(f"{gateway.base}/api/experiments/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    shown = CliRunner().invoke(cli, ["experiments", "--db", str(db_path)])
    assert shown.exit_code == 0, shown.output
    assert "concise-v2" in shown.output and "verdict: keep running" in shown.output
    assert "guideline-v1" in shown.output
    as_json = CliRunner().invoke(cli, ["experiments", "concise-v2", "--json", "--db", str(db_path)])
    assert as_json.exit_code == 0, as_json.output
    bad = CliRunner().invoke(
        cli, ["experiments", "promote", "concise-v2", "nope", "--db", str(db_path)]
    )
    assert bad.exit_code == 1 and "has no variant 'nope'" in bad.output
    unknown = CliRunner().invoke(cli, ["experiments", "stop", "nope", "--db", str(db_path)])
    assert unknown.exit_code == 1 and "no experiment named 'nope'" in unknown.output


def test_experiments_name_known_model_groups() -> None:
    from config.loader import ConfigError, parse_settings

    with pytest.raises(ConfigError, match="unknown groups"):
        parse_settings(
            {
                "models": [{"name": "m", "deployments": [{"provider": "mock", "model": "m"}]}],
                "experiments": [experiment(model="m")],
            },
            env={},
        )


def test_a_guideline_variant_prepends_the_guideline_to_each_prompt_of_a_completion(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    with_guideline: Path,
) -> None:
    gateway = start(
        make_gateway,
        variants=[
            {"name": "control", "weight": 0},
            {"name": "guideline-v1", "guideline": {"agent": "researcher", "version": 1}},
        ],
    )
    prompts = ["Summarise paper one.", "Summarise paper two."]
    answer = httpx.post(
        f"{gateway.url('r-batch')}/completions",
        json={"model": "gpt-test", "prompt": prompts, "max_tokens": 5},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    sent = fake_provider.state.last_request.body["prompt"]
    assert sent == [f"{GUIDELINE}\n\n{prompt}" for prompt in prompts]
    [span] = gateway.spans(rollout_id="r-batch")
    assert span["attributes"]["guideline.version"] == 1


def test_a_guideline_variant_refuses_a_prompt_of_token_ids(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    with_guideline: Path,
) -> None:
    """The guideline's tokens depend on the upstream's tokenizer: rather than send the plain
    prompt under the guideline variant's name, the call is refused."""
    gateway = start(
        make_gateway,
        variants=[
            {"name": "control", "weight": 0},
            {"name": "guideline-v1", "guideline": {"agent": "researcher", "version": 1}},
        ],
    )
    refused = httpx.post(
        f"{gateway.url('r-ids')}/completions",
        json={"model": "gpt-test", "prompt": [101, 2023, 102], "max_tokens": 5},
        timeout=10,
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "prompt"
    assert fake_provider.state.snapshot() == []
    [span] = gateway.spans(rollout_id="r-ids")
    assert "guideline.version" not in span["attributes"]


def test_a_thompson_rollout_keeps_its_variant_on_every_replica(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    """Each rollout's first call goes to one replica, its second to another: the second
    replica takes the variant the first drew (from the store), not a draw of its own."""
    config = experiment(
        policy="thompson", variants=[{"name": "control"}, {"name": "bigger-model", "model": "mock"}]
    )
    first = make_gateway(experiments=[config], experiment_refresh=REFRESH)
    second = make_gateway(experiments=[config], experiment_refresh=REFRESH)
    for n in range(16):
        rollout = f"r-two-{n}"
        assert ask(first, rollout).status_code == 200
        first.flush()
        assert ask(second, rollout).status_code == 200
        second.flush()
        variants = {s["attributes"]["variant"] for s in first.spans(rollout_id=rollout)}
        assert len(variants) == 1, (rollout, variants)


def test_a_reward_posted_to_another_replica_reaches_every_replicas_posterior(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    config = experiment(
        policy="thompson", variants=[{"name": "control"}, {"name": "bigger-model", "model": "mock"}]
    )
    first = make_gateway(experiments=[config], experiment_refresh=REFRESH)
    second = make_gateway(experiments=[config], experiment_refresh=REFRESH)
    for n in range(4):
        assert ask(first, f"r-far-{n}").status_code == 200
    first.flush()
    for n in range(4):
        posted = httpx.post(
            f"{second.base}/api/rollouts/r-far-{n}/rewards", json={"value": 1.0, "final": True}
        )
        assert posted.status_code == 201
    for gateway in (first, second):
        arms = gateway.gw.experiments.by_name["concise-v2"].arms
        wait_until(
            lambda arms=arms: sum(arm.n for arm in arms.values()) == 4,
            timeout=10,
            what="both replicas to count the four rewards",
        )


def test_analysis_of_a_beta_posterior_takes_rewards_outside_0_1(
    make_gateway: Callable[..., GatewayThread], db_path: Path
) -> None:
    """`posterior: beta` with a reward of 2 (a legal reward): the analysis counts it as a
    whole success, as the assignment's draw does, instead of answering 500."""
    gateway = start(
        make_gateway,
        posterior="beta",
        variants=[{"name": "control"}, {"name": "bigger-model", "model": "mock"}],
    )
    for rollout in ("r-beta-1", "r-beta-2"):
        assert ask(gateway, rollout).status_code == 200
        gateway.flush()
        posted = httpx.post(
            f"{gateway.base}/api/rollouts/{rollout}/rewards", json={"value": 2.0, "final": True}
        )
        assert posted.status_code == 201, posted.text
    one = httpx.get(f"{gateway.base}/api/experiments/concise-v2", timeout=30)
    assert one.status_code == 200, one.text
    assert sum(v["prob_best"] for v in one.json()["variants"]) == pytest.approx(1.0)
    assert httpx.get(f"{gateway.base}/api/experiments", timeout=30).status_code == 200
    shown = CliRunner().invoke(cli, ["experiments", "--db", str(db_path)])
    assert shown.exit_code == 0, shown.output


def test_an_experiment_taken_out_of_the_config_is_reported_removed(
    make_gateway: Callable[..., GatewayThread], db_path: Path
) -> None:
    first = start(make_gateway)
    assert ask(first, "r-gone-1").status_code == 200
    first.stop()
    second = make_gateway()
    span = span_of(second, ask(second, "r-gone-2"))
    assert "experiment" not in span["attributes"]
    [listed] = httpx.get(f"{second.base}/api/experiments", timeout=30).json()["data"]
    assert listed["status"] == "removed"
    assert listed["verdict"].startswith("removed from the config")
    shown = CliRunner().invoke(cli, ["experiments", "--db", str(db_path)])
    assert "removed" in shown.output, shown.output
    # Put back, it runs again.
    again = start(make_gateway)
    one = httpx.get(f"{again.base}/api/experiments/concise-v2", timeout=30).json()
    assert one["status"] == "running"


def test_experiments_cli_on_an_empty_store(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    connect(db).close()
    shown = CliRunner().invoke(cli, ["experiments", "--db", str(db)])
    assert shown.exit_code == 0 and "no experiments yet" in shown.output, shown.output
    as_json = CliRunner().invoke(cli, ["experiments", "--json", "--db", str(db)])
    assert as_json.exit_code == 0 and as_json.output == "", as_json.output
    promote = CliRunner().invoke(cli, ["experiments", "promote", "nope", "v", "--db", str(db)])
    assert promote.exit_code == 1 and "Traceback" not in promote.output, promote.output
    assert "no experiment named 'nope'" in promote.output
