"""How each experiment's variants compare: reward with a confidence interval, cost, latency,
a test against control, the chance each is best, and a verdict a person can act on."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from sqlite_utils import Database

from store import experiments as stored

CONFIDENCE = 0.95
POWER = 0.8
BEST_DRAWS = 20_000
# The effect a "keep running" estimate plans for when the data show none yet (Cohen's medium).
PLANNING_EFFECT = 0.5
# Below this (Cohen's "small") an effect is not worth the rollouts it takes to see.
SMALLEST_EFFECT = 0.2
MIN_REWARDS_PER_VARIANT = 2
STATUS = {"promote": "promoted", "stop": "stopped"}


@dataclass
class UnitResult:
    """One rollout (or lone call) of the experiment: its variant, reward, cost and latencies."""

    variant: str
    reward: float | None = None
    cost_usd: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)


def load_units(db: Database, config: dict[str, Any]) -> list[UnitResult]:
    """The experiment's units from its spans, each with the reward that decides it."""
    units: dict[str, UnitResult] = {}
    order: dict[str, int] = {}
    for span in stored.experiment_spans(db, config["name"]):
        key = span["rollout_id"] or span["span_id"]
        seq = span["seq"] if span["seq"] is not None else 0
        unit = units.get(key)
        if unit is None or seq < order[key]:
            # A rollout belongs to the variant of its first call (a promote mid-way moves
            # the rest of its calls, not its history).
            previous = unit
            unit = units[key] = UnitResult(variant=span["variant"])
            order[key] = seq
            if previous is not None:
                unit.cost_usd, unit.latencies_ms = previous.cost_usd, previous.latencies_ms
        unit.cost_usd += span["cost_usd"] or 0.0
        if span["duration_ms"] is not None:
            unit.latencies_ms.append(span["duration_ms"])
    rewards = stored.unit_rewards(db, config.get("reward", "reward"))
    for key, unit in units.items():
        unit.reward = rewards.get(key)
    return list(units.values())


def analyse_experiment(db: Database, name: str) -> dict[str, Any]:
    """The analysis of one stored experiment (NotFound when there is none)."""
    config = stored.get_config(db, name)
    decision = stored.decisions(db).get(name)
    return analyse(config, load_units(db, config), decision)


def analyse_all(db: Database) -> dict[str, Any]:
    decisions = stored.decisions(db)
    return {
        "data": [
            analyse(config, load_units(db, config), decisions.get(name))
            for name, config in stored.list_configs(db).items()
        ]
    }


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _mean_ci(values: np.ndarray) -> tuple[float | None, float | None]:
    if len(values) < 2:
        return None, None
    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    if sem == 0:
        mean = float(values.mean())
        return mean, mean
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=values.mean(), scale=sem)
    return float(low), float(high)


def compare(treatment: np.ndarray, control: np.ndarray) -> dict[str, float | None]:
    """Welch's t-test and Hedges' g of treatment against control."""
    if len(treatment) < MIN_REWARDS_PER_VARIANT or len(control) < MIN_REWARDS_PER_VARIANT:
        return {"difference": None, "effect_size": None, "p_value": None}
    difference = float(treatment.mean() - control.mean())
    var_t, var_c = float(np.var(treatment, ddof=1)), float(np.var(control, ddof=1))
    n_t, n_c = len(treatment), len(control)
    if var_t == 0 and var_c == 0:
        # Every reward the same within each arm: the difference is certain, or there is none.
        p_value = 0.0 if difference != 0 else 1.0
        return {"difference": difference, "effect_size": None, "p_value": p_value}
    with warnings.catch_warnings():
        # Near-constant samples make scipy warn about precision; the p-value is still right.
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(stats.ttest_ind(treatment, control, equal_var=False).pvalue)
    pooled = math.sqrt(((n_t - 1) * var_t + (n_c - 1) * var_c) / (n_t + n_c - 2))
    correction = 1 - 3 / (4 * (n_t + n_c) - 9)
    return {
        "difference": difference,
        "effect_size": difference / pooled * correction,
        "p_value": p_value,
    }


def probability_best(
    rewards: dict[str, np.ndarray], bounded: bool, seed: int = 0
) -> dict[str, float]:
    """The share of posterior draws in which each variant has the highest mean reward."""
    rng = np.random.default_rng(seed)
    everything = np.concatenate([r for r in rewards.values()]) if rewards else np.array([])
    pooled_sd = float(np.std(everything, ddof=1)) if len(everything) > 1 else 1.0
    columns = []
    for values in rewards.values():
        n = len(values)
        if bounded:
            # As the proxy's draw: a reward outside [0, 1] (legal with `posterior: beta`) counts
            # as a whole success or failure, never as a shape numpy refuses.
            successes = min(max(float(values.sum()), 0.0), float(n))
            columns.append(rng.beta(1 + successes, 1 + n - successes, BEST_DRAWS))
        elif n == 0:
            columns.append(rng.normal(0.0, (pooled_sd or 1.0) * 10, BEST_DRAWS))
        else:
            sd = float(np.std(values, ddof=1)) if n > 1 else pooled_sd
            columns.append(rng.normal(values.mean(), max(sd, 1e-9) / math.sqrt(n), BEST_DRAWS))
    winners = np.argmax(np.column_stack(columns), axis=1)
    counts = np.bincount(winners, minlength=len(columns))
    return {name: float(c) / BEST_DRAWS for name, c in zip(rewards, counts, strict=True)}


def rollouts_needed(effect: float, alpha: float) -> int:
    """Rewarded rollouts per variant for a two-sided test to see `effect` (Cohen's d)."""
    z_alpha = stats.norm.ppf(1 - alpha / 2)
    z_power = stats.norm.ppf(POWER)
    return math.ceil(2 * ((z_alpha + z_power) / effect) ** 2)


def _fmt_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def analyse(
    config: dict[str, Any], units: list[UnitResult], decision: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Per variant figures, each against control, and a verdict."""
    names = [variant["name"] for variant in config["variants"]]
    control = config.get("control") or names[0]
    alpha = config.get("alpha", 0.01)
    threshold = config.get("success_threshold", 0.5)
    by_variant: dict[str, list[UnitResult]] = {name: [] for name in names}
    for unit in units:
        if unit.variant in by_variant:
            by_variant[unit.variant].append(unit)
    rewards = {
        name: np.array([u.reward for u in found if u.reward is not None], dtype=float)
        for name, found in by_variant.items()
    }
    everything = np.concatenate(list(rewards.values()))
    bounded = config.get("posterior", "auto") == "beta" or (
        config.get("posterior", "auto") == "auto"
        and bool(np.all((everything >= 0) & (everything <= 1)))
    )
    best = probability_best(rewards, bounded) if len(everything) else {}
    comparisons = len(names) - 1
    variants = []
    for name in names:
        found, values = by_variant[name], rewards[name]
        low, high = _mean_ci(values)
        rewarded_cost = sum(u.cost_usd for u in found if u.reward is not None)
        total_reward = float(values.sum())
        latencies = [ms for u in found for ms in u.latencies_ms]
        row: dict[str, Any] = {
            "name": name,
            "control": name == control,
            "rollouts": len(found),
            "rewarded": len(values),
            "mean_reward": float(values.mean()) if len(values) else None,
            "ci_low": low,
            "ci_high": high,
            "success_rate": float((values >= threshold).mean()) if len(values) else None,
            "cost_usd": sum(u.cost_usd for u in found),
            "cost_per_reward_point": rewarded_cost / total_reward if total_reward > 0 else None,
            "latency_p50_ms": _percentile(latencies, 50),
            "latency_p95_ms": _percentile(latencies, 95),
            "prob_best": best.get(name),
            "vs_control": None,
        }
        if name != control:
            result = compare(values, rewards[control])
            p = result["p_value"]
            # Bonferroni: each variant is one more chance of a false discovery.
            result["p_adjusted"] = min(p * comparisons, 1.0) if p is not None else None
            row["vs_control"] = result
        variants.append(row)
    if stored.REMOVED in config:
        # Taken out of the config, it runs nowhere: whatever was decided no longer applies.
        status = "removed"
        evidence = verdict(variants, control, alpha, None)
        said = f"removed from the config: no call takes part any more ({evidence})"
    else:
        status = STATUS[decision["action"]] if decision else "running"
        said = verdict(variants, control, alpha, decision)
    return {
        "name": config["name"],
        "model": config.get("model"),
        "reward": config.get("reward", "reward"),
        "policy": config.get("policy", "fixed"),
        "control": control,
        "alpha": alpha,
        "status": status,
        "decision": decision,
        "variants": variants,
        "verdict": said,
    }


def verdict(
    variants: list[dict[str, Any]], control: str, alpha: float, decision: dict[str, Any] | None
) -> str:
    if decision is not None:
        # What the data said stays worth reading after a decision (to undo a wrong one).
        evidence = verdict(variants, control, alpha, None)
        if decision["action"] == "promote":
            return f"promoted {decision['variant']}: all traffic goes to it ({evidence})"
        return f"stopped: calls go to the plain model group ({evidence})"
    if not any(v["rewarded"] for v in variants):
        return "keep running: no rewards yet"
    tested = [v for v in variants if v["vs_control"] and v["vs_control"]["p_adjusted"] is not None]
    significant = [v for v in tested if v["vs_control"]["p_adjusted"] < alpha]
    better = [v for v in significant if v["vs_control"]["difference"] > 0]
    if better:
        top = max(better, key=lambda v: v["mean_reward"])
        return f"{top['name']} is better than {control}, {_fmt_p(top['vs_control']['p_value'])}"
    if significant and len(significant) == len(variants) - 1:
        worst = min(significant, key=lambda v: v["mean_reward"])
        p = _fmt_p(worst["vs_control"]["p_value"])
        return f"{control} is better than every variant (e.g. {worst['name']}, {p}); keep it"
    effect, more = _more_needed(variants, alpha)
    if more == 0:
        least = min(v["rewarded"] for v in variants)
        return (
            f"no difference found: with {least}+ rewarded rollouts per variant an effect of "
            f"d={effect:.1f} would have shown; keep {control}, or stop"
        )
    return f"keep running: need about {more} more rollouts"


def _more_needed(variants: list[dict[str, Any]], alpha: float) -> tuple[float, int]:
    """The effect planned for, and the rewarded rollouts still missing to see it."""
    effects = [
        abs(v["vs_control"]["effect_size"])
        for v in variants
        if v["vs_control"] and v["vs_control"]["effect_size"]
    ]
    # Plan for the largest effect seen so far, but never for less than a small one (d=0.2),
    # which would ask for thousands of rollouts on noise.
    effect = max(max(effects, default=PLANNING_EFFECT), SMALLEST_EFFECT)
    per_variant = rollouts_needed(effect, alpha / max(len(variants) - 1, 1))
    return effect, sum(max(per_variant - v["rewarded"], 0) for v in variants)
