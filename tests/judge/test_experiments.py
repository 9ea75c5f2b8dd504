"""Planted experiments: the assignment policies (gateway.proxy.experiments) and the analysis
(judge.experiments) driven directly with known rewards, many rollouts at a time."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import numpy as np
import pytest

from config.models import Experiment
from gateway.errors import InvalidRequest
from gateway.proxy.experiments import Experiments, with_guideline
from judge.experiments import UnitResult, analyse, probability_best, rollouts_needed

ROLLOUTS = 2000
PAYLOAD = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}


def experiment(policy: str = "fixed", **fields: object) -> Experiment:
    data: dict[str, object] = {
        "name": "concise-v2",
        "model": "gpt-test",
        "policy": policy,
        "variants": [{"name": "control"}, {"name": "guideline-v3"}],
    }
    data.update(fields)
    return Experiment.model_validate(data)


def assign(experiments: Experiments, unit: str) -> str | None:
    state = experiments.by_name["concise-v2"]
    chosen = experiments.choose(state, unit)
    if chosen is not None and unit not in state.units:
        state.remember(unit, chosen)
    return chosen


def test_fixed_split_is_within_binomial_bounds_and_sticky() -> None:
    experiments = Experiments([experiment()])
    first = {f"r{i}": assign(experiments, f"r{i}") for i in range(ROLLOUTS)}
    counts = Counter(first.values())
    # Four standard deviations of Binomial(2000, 0.5): fails by chance once in ~16,000 runs,
    # and the hash is deterministic, so it either always passes or never does.
    bound = 4 * (ROLLOUTS * 0.25) ** 0.5
    assert abs(counts["control"] - ROLLOUTS / 2) < bound, counts
    assert set(counts) == {"control", "guideline-v3"}
    # Sticky within a process, and the same on another replica (a fresh instance).
    again = {unit: assign(experiments, unit) for unit in first}
    elsewhere = Experiments([experiment()])
    assert again == first
    assert {unit: assign(elsewhere, unit) for unit in first} == first


def test_fixed_weights_are_honoured() -> None:
    weighted = experiment(variants=[{"name": "control", "weight": 3}, {"name": "b", "weight": 1}])
    experiments = Experiments([weighted])
    counts = Counter(assign(experiments, f"r{i}") for i in range(ROLLOUTS))
    bound = 4 * (ROLLOUTS * 0.25 * 0.75) ** 0.5
    assert abs(counts["b"] - ROLLOUTS / 4) < bound, counts


def test_calls_without_a_rollout_are_assigned_one_by_one() -> None:
    experiments = Experiments([experiment()], rng=random.Random(7))
    state = experiments.by_name["concise-v2"]
    picks = Counter(experiments.choose(state, None) for _ in range(400))
    assert picks["control"] > 100 and picks["guideline-v3"] > 100


def run_thompson(
    seed: int, rewards: dict[str, float | tuple[float, float]], rollouts: int = 400
) -> list[str]:
    """Assign `rollouts` rollouts one after another, each rewarded before the next starts."""
    experiments = Experiments([experiment("thompson")], rng=random.Random(seed))
    noise = random.Random(seed + 1000)
    chosen = []
    for i in range(rollouts):
        variant = assign(experiments, f"r{i}")
        assert variant is not None
        chosen.append(variant)
        planted = rewards[variant]
        value = planted if isinstance(planted, float) else noise.gauss(*planted)
        experiments.on_reward({"rollout_id": f"r{i}", "name": "reward", "value": value})
    return chosen


@pytest.mark.parametrize("seed", range(5))
def test_thompson_sends_most_late_rollouts_to_the_better_variant(seed: int) -> None:
    chosen = run_thompson(seed, {"control": 0.3, "guideline-v3": 1.0})
    late = Counter(chosen[-100:])
    assert late["guideline-v3"] > 80, late


def test_thompson_floor_keeps_every_variant_in_play() -> None:
    chosen = run_thompson(3, {"control": 0.3, "guideline-v3": 1.0}, rollouts=2000)
    # floor 0.05 per variant: about 100 of the 2000 go to control whatever the rewards say.
    assert Counter(chosen[1000:])["control"] >= 25


def test_thompson_uses_a_normal_posterior_for_rewards_outside_0_1() -> None:
    chosen = run_thompson(1, {"control": (10.0, 3.0), "guideline-v3": (13.0, 3.0)})
    assert Counter(chosen[-100:])["guideline-v3"] > 80


def test_a_rollout_keeps_its_variant_and_its_reward_counts_once() -> None:
    experiments = Experiments([experiment("thompson")], rng=random.Random(0))
    state = experiments.by_name["concise-v2"]
    variant = assign(experiments, "r1")
    assert variant is not None
    assert all(assign(experiments, "r1") == variant for _ in range(50))
    for value in (0.2, 0.9, 0.9):
        experiments.on_reward({"rollout_id": "r1", "name": "reward", "value": value})
    experiments.on_reward({"rollout_id": "r1", "name": "other", "value": 5.0})
    assert (state.arms[variant].n, state.arms[variant].total) == (1, 0.9)


def test_promote_and_stop_override_assignment() -> None:
    experiments = Experiments([experiment()])
    state = experiments.by_name["concise-v2"]
    experiments.set_decisions({"concise-v2": {"action": "promote", "variant": "guideline-v3"}})
    assert {assign(experiments, f"r{i}") for i in range(50)} == {"guideline-v3"}
    experiments.set_decisions({"concise-v2": {"action": "stop", "variant": None}})
    assert experiments.choose(state, "r1") is None
    experiments.set_decisions({})
    assert experiments.choose(state, "r1") in {"control", "guideline-v3"}


def test_a_thompson_rollout_takes_the_variant_another_replica_drew() -> None:
    looked_up: list[tuple[str, str]] = []

    async def stored(experiment_name: str, rollout_id: str) -> str | None:
        looked_up.append((experiment_name, rollout_id))
        return "guideline-v3" if rollout_id == "elsewhere" else None

    experiments = Experiments([experiment("thompson")], assigned=stored, rng=random.Random(0))
    state = experiments.by_name["concise-v2"]

    async def variant_of(unit: str, *, rollout: bool = True) -> str:
        applied = await experiments.apply(state, unit, PAYLOAD, "chat", rollout=rollout)
        assert applied is not None
        return str(applied[1]["variant"])

    async def calls() -> None:
        assert {await variant_of("elsewhere") for _ in range(20)} == {"guideline-v3"}
        first = await variant_of("new-here")
        assert {await variant_of("new-here") for _ in range(20)} == {first}
        await variant_of("lone-call", rollout=False)

    asyncio.run(calls())
    # One read per rollout, on its first call here; none for a call without a rollout.
    assert looked_up == [("concise-v2", "elsewhere"), ("concise-v2", "new-here")]


def test_a_claimed_variant_stands_and_a_failing_claim_costs_only_the_agreement() -> None:
    """The first replica's claim wins over this one's draw; while the shared state fails,
    a rollout keeps its own draw, and the state is left alone for a while (no call waits
    on it again)."""
    claims: list[tuple[str, str, str]] = []
    failing = False

    async def claim_variant(experiment_name: str, rollout_id: str, drawn: str) -> str:
        claims.append((experiment_name, rollout_id, drawn))
        if failing:
            raise ConnectionError("redis is away")
        return "guideline-v3" if rollout_id == "claimed-elsewhere" else drawn

    experiments = Experiments(
        [experiment("thompson")], claim_variant=claim_variant, rng=random.Random(1)
    )
    state = experiments.by_name["concise-v2"]

    async def variant_of(unit: str) -> str:
        applied = await experiments.apply(state, unit, PAYLOAD, "chat", rollout=True)
        assert applied is not None
        return str(applied[1]["variant"])

    async def calls() -> None:
        nonlocal failing
        assert {await variant_of("claimed-elsewhere") for _ in range(10)} == {"guideline-v3"}
        first = await variant_of("first-here")
        assert claims[-1] == ("concise-v2", "first-here", first)
        failing = True
        own = await variant_of("while-away")
        assert {await variant_of("while-away") for _ in range(5)} == {own}
        await variant_of("also-while-away")

    asyncio.run(calls())
    # One claim per rollout on its first call; the failed one opened the breaker, so the
    # next new rollout did not ask.
    assert [rollout for _, rollout, _ in claims] == [
        "claimed-elsewhere",
        "first-here",
        "while-away",
    ]


def test_a_reward_for_a_rollout_assigned_elsewhere_counts_once_its_variant_is_learnt() -> None:
    experiments = Experiments([experiment("thompson")])
    state = experiments.by_name["concise-v2"]
    reward = {"rollout_id": "far", "name": "reward", "value": 1.0, "final": True}
    other = {"rollout_id": "far", "name": "other", "value": 1.0}
    assert experiments.unknown_units([reward, other, reward]) == ["far"]
    experiments.learn([{"unit": "far", "experiment": "concise-v2", "variant": "control"}])
    experiments.on_reward(reward)
    assert (state.arms["control"].n, state.arms["control"].total) == (1, 1.0)
    assert experiments.unknown_units([reward]) == []
    # What is known here is not replaced by what the store says.
    experiments.learn([{"unit": "far", "experiment": "concise-v2", "variant": "guideline-v3"}])
    assert state.units["far"].variant == "control"


def test_a_guideline_goes_before_each_text_prompt_and_refuses_token_ids() -> None:
    guided = with_guideline({"prompt": ["a", "b"]}, "text_completion", "G")
    assert guided == {"prompt": ["G\n\na", "G\n\nb"]}
    assert with_guideline({"prompt": "a"}, "text_completion", "G") == {"prompt": "G\n\na"}
    for ids in ([1, 2, 3], [[1, 2], [3]]):
        with pytest.raises(InvalidRequest):
            with_guideline({"prompt": ids}, "text_completion", "G")
    assert with_guideline({"input": "a"}, "embeddings", "G") is None


# -- analysis -------------------------------------------------------------------------

CONFIG = experiment().model_dump(mode="json")


def planted_units(seed: int, means: dict[str, float], n: int) -> list[UnitResult]:
    """`n` rollouts per variant with Bernoulli(mean) rewards, cost and latency."""
    rng = np.random.default_rng(seed)
    return [
        UnitResult(
            variant=name,
            reward=float(rng.random() < mean),
            cost_usd=0.001,
            latencies_ms=[float(rng.gamma(4, 50))],
        )
        for name, mean in means.items()
        for _ in range(n)
    ]


def test_analysis_finds_a_planted_difference() -> None:
    result = analyse(CONFIG, planted_units(0, {"control": 0.3, "guideline-v3": 0.6}, 150))
    control, variant = result["variants"]
    assert variant["vs_control"]["p_value"] < 0.01
    assert variant["vs_control"]["effect_size"] > 0.3
    assert variant["prob_best"] > 0.99
    assert control["ci_low"] < control["mean_reward"] < control["ci_high"]
    assert variant["latency_p50_ms"] <= variant["latency_p95_ms"]
    assert variant["cost_per_reward_point"] == pytest.approx(
        0.001 * 150 / (variant["mean_reward"] * 150)
    )
    assert result["verdict"].startswith("guideline-v3 is better than control, p")


def test_analysis_of_constant_rewards_reports_the_certain_difference() -> None:
    units = [UnitResult("control", 0.3) for _ in range(30)]
    units += [UnitResult("guideline-v3", 1.0) for _ in range(30)]
    result = analyse(CONFIG, units)
    assert result["variants"][1]["vs_control"]["p_value"] < 0.01
    assert result["variants"][1]["success_rate"] == 1.0
    assert result["verdict"].startswith("guideline-v3 is better")


def test_analysis_rarely_finds_a_difference_between_identical_variants() -> None:
    claims = 0
    for seed in range(20):
        result = analyse(CONFIG, planted_units(seed, {"control": 0.5, "guideline-v3": 0.5}, 100))
        if " is better " in result["verdict"]:
            claims += 1
    assert claims <= 1, f"{claims} false positives in 20 seeds"


def test_verdict_says_how_many_more_rollouts_are_needed() -> None:
    result = analyse(CONFIG, planted_units(1, {"control": 0.5, "guideline-v3": 0.55}, 20))
    assert result["verdict"].startswith("keep running: need about ")
    more = int(result["verdict"].split("about ")[1].split()[0])
    assert 0 < more <= 2 * rollouts_needed(0.2, 0.01)


def test_verdict_says_when_enough_rollouts_showed_no_difference() -> None:
    result = analyse(CONFIG, planted_units(2, {"control": 0.5, "guideline-v3": 0.5}, 1500))
    assert result["verdict"].startswith("no difference found: with 1500+ rewarded rollouts")


def test_verdict_before_any_reward_and_after_decisions() -> None:
    assert analyse(CONFIG, [UnitResult("control")])["verdict"] == "keep running: no rewards yet"
    promoted = {"id": 1, "experiment": "concise-v2", "action": "promote", "variant": "guideline-v3",
                "created_ns": 1}  # fmt: skip
    result = analyse(CONFIG, [], promoted)
    assert result["status"] == "promoted"
    assert "guideline-v3" in result["verdict"]


def test_a_beta_posterior_counts_rewards_outside_0_1_as_whole_successes_or_failures() -> None:
    """`posterior: beta` allows any reward: 2 counts as 1, -1 as 0, as the proxy's draw."""
    best = probability_best({"a": np.array([2.0, 2.0]), "b": np.array([-1.0, 0.0])}, bounded=True)
    assert best["a"] > 0.9
    config = {**CONFIG, "posterior": "beta"}
    result = analyse(config, [UnitResult("control", 2.0), UnitResult("guideline-v3", -1.0)])
    assert result["variants"][0]["prob_best"] > 0.5


def test_an_experiment_taken_out_of_the_config_is_removed_whatever_was_decided() -> None:
    removed = {**CONFIG, "removed_ns": 1}
    stopped = {"id": 1, "experiment": "concise-v2", "action": "stop", "variant": None,
               "created_ns": 1}  # fmt: skip
    result = analyse(removed, [UnitResult("control", 0.5)], stopped)
    assert result["status"] == "removed"
    assert result["verdict"].startswith("removed from the config: no call takes part any more")
