"""Planted experiments: the assignment policies (gateway.proxy.experiments) and the analysis
(judge.experiments) driven directly with known rewards, many rollouts at a time."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from config.models import Experiment
from gateway.proxy.experiments import Experiments
from judge.experiments import UnitResult, analyse, rollouts_needed

ROLLOUTS = 2000


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
