"""Pattern mining: what successful and failed attempts do differently, with the statistics.

Every finding carries its support, an effect size, a p-value (and a q-value after
Benjamini-Hochberg across all tests run), and the rollouts and spans that show it.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from scipy.stats import false_discovery_control, fisher_exact, mannwhitneyu
from scipy.stats import t as student_t
from sqlite_utils import Database

DEFAULT_MIN_SUPPORT = 5
DEFAULT_ALPHA = 0.05
DEFAULT_SUCCESS_THRESHOLD = 0.5
MAX_NGRAM = 3
EVIDENCE_LIMIT = 5
OUTLIER_RATIO = 3.0

ATTEMPTS_SQL = """
select a.rollout_id, a.id as attempt_id, r.agent, r.status, r.created_ns
from attempts a join rollouts r on r.id = a.rollout_id
where r.id not like 'judge-%'
  and (r.agent is null or r.agent not like 'judge-%')
  and (:since_ns is null or r.created_ns >= :since_ns)
  and (:agent is null or r.agent = :agent)
"""

SPANS_SQL = """
select s.rollout_id, s.attempt_id, s.span_id, s.seq, s.operation, s.name, s.status,
       s.error_type, s.finish_reasons, s.tool_calls, s.model_group, s.response_model,
       s.duration_ms, s.cost_usd, s.start_ns, s.end_ns
from spans s join rollouts r on r.id = s.rollout_id
where r.id not like 'judge-%'
  and (r.agent is null or r.agent not like 'judge-%')
  and (:since_ns is null or r.created_ns >= :since_ns)
  and (:agent is null or r.agent = :agent)
order by s.rollout_id, s.attempt_id, s.seq
"""

REWARDS_SQL = """
select w.rollout_id, w.attempt_id, w.value, w.final, w.created_ns
from rewards w join rollouts r on r.id = w.rollout_id
where w.name = :reward_name
  and w.span_id is null
  and w.source not like 'judge:%'
  and (:since_ns is null or r.created_ns >= :since_ns)
  and (:agent is null or r.agent = :agent)
order by w.created_ns
"""


@dataclass
class AttemptData:
    rollout_id: str
    attempt_id: str
    agent: str | None
    status: str
    tools: list[str] = field(default_factory=list)
    tool_spans: list[str] = field(default_factory=list)
    features: dict[str, str] = field(default_factory=dict)  # feature -> a span showing it
    models: Counter[str] = field(default_factory=Counter)
    executions: list[tuple[str, str, float, str]] = field(default_factory=list)
    duration_ms: float = 0.0
    cost_usd: float = 0.0
    first_ns: int | None = None
    last_ns: int | None = None
    reward: float | None = None
    success: bool | None = None


@dataclass
class Finding:
    kind: str
    feature: str
    description: str
    support: int
    effect: float
    odds_ratio: float | None
    ci_low: float
    ci_high: float
    p_value: float
    q_value: float
    rate_with: float
    rate_without: float
    evidence: list[dict[str, str]]


def _json_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return []
    return value if isinstance(value, list) else []


def load(
    db: Database,
    *,
    since_ns: int | None = None,
    agent: str | None = None,
    reward_name: str = "reward",
    success_threshold: float = DEFAULT_SUCCESS_THRESHOLD,
) -> list[AttemptData]:
    """Every attempt with its tool sequence, features, costs and outcome."""
    params = {"since_ns": since_ns, "agent": agent}
    attempts: dict[tuple[str, str], AttemptData] = {}
    for rollout_id, attempt_id, agent_name, status, _ in db.execute(ATTEMPTS_SQL, params):
        attempts[(rollout_id, attempt_id)] = AttemptData(rollout_id, attempt_id, agent_name, status)
    for row in db.execute(SPANS_SQL, params):
        (rid, aid, span_id, _seq, operation, name, status, error_type, finish, tool_calls,
         group, response_model, duration, cost, start_ns, end_ns) = row  # fmt: skip
        attempt = attempts.get((rid, aid))
        if attempt is None:
            continue
        attempt.first_ns = start_ns if attempt.first_ns is None else min(attempt.first_ns, start_ns)
        attempt.last_ns = end_ns if attempt.last_ns is None else max(attempt.last_ns, end_ns)
        if operation == "execute_tool":
            tool = name.removeprefix("execute_tool ")
            attempt.executions.append((tool, status, duration or 0.0, span_id))
            if status == "error":
                attempt.features.setdefault(f"tool_error:{tool}", span_id)
            continue
        attempt.duration_ms += duration or 0.0
        attempt.cost_usd += cost or 0.0
        attempt.models[group or response_model or "?"] += 1
        if status == "error":
            attempt.features.setdefault(f"error:{error_type or 'unknown'}", span_id)
        for reason in _json_list(finish):
            if reason not in ("stop", "tool_calls", "completed"):
                attempt.features.setdefault(f"finish:{reason}", span_id)
        for call in _json_list(tool_calls):
            if isinstance(call, dict) and call.get("name"):
                attempt.tools.append(str(call["name"]))
                attempt.tool_spans.append(span_id)
    _attach_rewards(db, attempts, params, reward_name)
    for attempt in attempts.values():
        for n in range(1, MAX_NGRAM + 1):
            for i in range(len(attempt.tools) - n + 1):
                gram = " → ".join(attempt.tools[i : i + n])
                attempt.features.setdefault(f"tools:{gram}", attempt.tool_spans[i])
        if attempt.reward is not None:
            attempt.success = attempt.reward >= success_threshold
        elif attempt.status in ("succeeded", "failed"):
            attempt.success = attempt.status == "succeeded"
    return list(attempts.values())


def _attach_rewards(
    db: Database,
    attempts: dict[tuple[str, str], AttemptData],
    params: dict[str, Any],
    reward_name: str,
) -> None:
    """An attempt's outcome: its final reward, else its latest, else its rollout's."""
    per_attempt: dict[tuple[str, str], tuple[int, float]] = {}
    per_rollout: dict[str, tuple[int, float]] = {}
    for rid, aid, value, final, _ in db.execute(
        REWARDS_SQL, {**params, "reward_name": reward_name}
    ):
        rank = 1 if final else 0
        if aid:
            key = (rid, aid)
            if rank >= per_attempt.get(key, (0, 0.0))[0]:
                per_attempt[key] = (rank, value)
        elif rank >= per_rollout.get(rid, (0, 0.0))[0]:
            per_rollout[rid] = (rank, value)
    for key, attempt in attempts.items():
        if key in per_attempt:
            attempt.reward = per_attempt[key][1]
        elif attempt.rollout_id in per_rollout:
            attempt.reward = per_rollout[attempt.rollout_id][1]


def _describe(feature: str, helps: bool) -> str:
    kind, _, what = feature.partition(":")
    verb = "succeed more often" if helps else "fail more often"
    if kind == "tools":
        return f"attempts that call {what} {verb}"
    if kind == "tool_error":
        return f"attempts where tool {what} returns an error {verb}"
    if kind == "error":
        return f"attempts with upstream error {what} {verb}"
    if kind == "finish":
        return f"attempts with a reply stopped by {what} {verb}"
    return f"attempts with {feature} {verb}"


def _rate_ci(a: int, n1: int, c: int, n2: int) -> tuple[float, float, float]:
    """Difference of success rates (with minus without) and its 95% Wald interval."""
    p1, p2 = a / n1, c / n2
    diff = p1 - p2
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return diff, diff - 1.96 * se, diff + 1.96 * se


def differences(
    attempts: list[AttemptData],
    *,
    min_support: int = DEFAULT_MIN_SUPPORT,
    alpha: float = DEFAULT_ALPHA,
) -> list[Finding]:
    """Features over-represented among successes or failures (Fisher's exact test, BH-corrected)."""
    judged = [a for a in attempts if a.success is not None]
    wins = sum(1 for a in judged if a.success)
    losses = len(judged) - wins
    if not wins or not losses:
        return []
    holders: dict[str, list[AttemptData]] = defaultdict(list)
    for attempt in judged:
        for feature in attempt.features:
            holders[feature].append(attempt)
    tested: list[tuple[str, list[AttemptData], int, int, float, float | None]] = []
    for feature, having in holders.items():
        if len(having) < min_support or len(having) == len(judged):
            continue
        a = sum(1 for h in having if h.success)
        b = len(having) - a
        c, d = wins - a, losses - b
        odds, p = fisher_exact([[a, b], [c, d]])
        tested.append((feature, having, a, b, float(p), None if math.isinf(odds) else float(odds)))
    if not tested:
        return []
    q_values = false_discovery_control([t[4] for t in tested])
    findings = []
    for (feature, having, a, b, p, odds), q in zip(tested, q_values, strict=True):
        if q > alpha:
            continue
        n_without = len(judged) - len(having)
        diff, low, high = _rate_ci(a, a + b, wins - a, n_without)
        helps = diff > 0
        kind = "success_pattern" if helps else "failure_pattern"
        evidence = [
            {"rollout_id": h.rollout_id, "attempt_id": h.attempt_id, "span_id": h.features[feature]}
            for h in having
            if bool(h.success) == helps
        ][:EVIDENCE_LIMIT]
        findings.append(
            Finding(
                kind=kind,
                feature=feature,
                description=_describe(feature, helps),
                support=len(having),
                effect=round(diff, 4),
                odds_ratio=None if odds is None else round(odds, 4),
                ci_low=round(low, 4),
                ci_high=round(high, 4),
                p_value=p,
                q_value=float(q),
                rate_with=round(a / (a + b), 4),
                rate_without=round((wins - a) / n_without, 4) if n_without else 0.0,
                evidence=evidence,
            )
        )
    findings.sort(key=lambda f: (f.q_value, -abs(f.effect)))
    return findings


def _mean_ci(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = (
        float(student_t.ppf(0.975, len(values) - 1))
        * statistics.stdev(values)
        / math.sqrt(len(values))
    )
    return mean, mean - half, mean + half


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def tool_effectiveness(
    attempts: list[AttemptData], *, min_support: int = 1
) -> list[dict[str, Any]]:
    """Per tool: calls, error rate, median duration, and reward with it versus without."""
    calls: Counter[str] = Counter()
    executions: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for attempt in attempts:
        calls.update(attempt.tools)
        for tool, status, duration, _ in attempt.executions:
            executions[tool].append((status, duration))
    rows = []
    rewarded = [a for a in attempts if a.reward is not None]
    for tool, count in calls.most_common():
        users = [a.reward for a in rewarded if tool in a.tools]
        others = [a.reward for a in rewarded if tool not in a.tools]
        if len(users) + len(others) and count < min_support:
            continue
        runs = executions.get(tool, [])
        p_value = None
        if len(users) >= 2 and len(others) >= 2 and len(set(users) | set(others)) > 1:
            p_value = float(mannwhitneyu(users, others).pvalue)  # type: ignore[arg-type]
        rows.append(
            {
                "tool": tool,
                "calls": count,
                "attempts": sum(1 for a in attempts if tool in a.tools),
                "executions": len(runs),
                "error_rate": round(sum(s == "error" for s, _ in runs) / len(runs), 4)
                if runs
                else None,
                "median_duration_ms": statistics.median(d for _, d in runs) if runs else None,
                "reward_with": round(statistics.fmean(users), 4) if users else None,  # type: ignore[arg-type]
                "reward_without": round(statistics.fmean(others), 4) if others else None,  # type: ignore[arg-type]
                "p_value": p_value,
            }
        )
    return rows


def _board(groups: dict[str, list[AttemptData]], by: str) -> list[dict[str, Any]]:
    rows = []
    for key, members in groups.items():
        rollouts = {a.rollout_id for a in members}
        outcomes = [a.success for a in members if a.success is not None]
        rewards = [a.reward for a in members if a.reward is not None]
        mean, low, high = _mean_ci(rewards)  # type: ignore[arg-type]
        costs = [a.cost_usd for a in members]
        latencies = [a.duration_ms for a in members]
        total_reward = sum(rewards)  # type: ignore[arg-type]
        rows.append(
            {
                by: key,
                "rollouts": len(rollouts),
                "attempts": len(members),
                "success_rate": round(sum(outcomes) / len(outcomes), 4) if outcomes else None,
                "mean_reward": None if mean is None else round(mean, 4),
                "reward_ci_low": None if low is None else round(low, 4),
                "reward_ci_high": None if high is None else round(high, 4),
                "mean_cost_usd": statistics.fmean(costs) if costs else None,
                "p50_latency_ms": _percentile(latencies, 0.5),
                "p95_latency_ms": _percentile(latencies, 0.95),
                "cost_per_reward_point": (sum(costs) / total_reward) if total_reward > 0 else None,
            }
        )
    rows.sort(key=lambda r: (-(r["mean_reward"] or -1e9), r[by]))
    return rows


def leaderboards(attempts: list[AttemptData]) -> dict[str, list[dict[str, Any]]]:
    by_model: dict[str, list[AttemptData]] = defaultdict(list)
    by_agent: dict[str, list[AttemptData]] = defaultdict(list)
    for attempt in attempts:
        if attempt.models:
            by_model[attempt.models.most_common(1)[0][0]].append(attempt)
        by_agent[attempt.agent or "(none)"].append(attempt)
    return {"models": _board(by_model, "model"), "agents": _board(by_agent, "agent")}


def outliers(attempts: list[AttemptData], *, top: int = 10) -> list[dict[str, Any]]:
    """Rollouts much slower or costlier than their agent's median."""
    per_rollout: dict[str, dict[str, Any]] = {}
    for attempt in attempts:
        entry = per_rollout.setdefault(
            attempt.rollout_id,
            {"agent": attempt.agent or "(none)", "duration_ms": 0.0, "cost_usd": 0.0},
        )
        entry["duration_ms"] += attempt.duration_ms
        entry["cost_usd"] += attempt.cost_usd
    by_agent: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for rid, entry in per_rollout.items():
        by_agent[entry["agent"]].append((rid, entry))
    found = []
    for agent, members in by_agent.items():
        if len(members) < 5:
            continue
        for measure in ("duration_ms", "cost_usd"):
            median = statistics.median(e[measure] for _, e in members)
            if median <= 0:
                continue
            for rid, entry in members:
                ratio = entry[measure] / median
                if ratio >= OUTLIER_RATIO:
                    found.append(
                        {
                            "rollout_id": rid,
                            "agent": agent,
                            "measure": "slowest" if measure == "duration_ms" else "most_expensive",
                            "value": entry[measure],
                            "agent_median": median,
                            "ratio": round(ratio, 2),
                        }
                    )
    found.sort(key=lambda o: -o["ratio"])
    return found[:top]


def analyse(
    db: Database,
    *,
    since_ns: int | None = None,
    agent: str | None = None,
    min_support: int = DEFAULT_MIN_SUPPORT,
    alpha: float = DEFAULT_ALPHA,
    reward_name: str = "reward",
    success_threshold: float = DEFAULT_SUCCESS_THRESHOLD,
) -> dict[str, Any]:
    """All findings at once, as plain JSON-ready data."""
    attempts = load(
        db, since_ns=since_ns, agent=agent, reward_name=reward_name,
        success_threshold=success_threshold,
    )  # fmt: skip
    findings = differences(attempts, min_support=min_support, alpha=alpha)
    return {
        "attempts": len(attempts),
        "with_outcome": sum(1 for a in attempts if a.success is not None),
        "success_patterns": [asdict(f) for f in findings if f.kind == "success_pattern"],
        "failure_patterns": [asdict(f) for f in findings if f.kind == "failure_pattern"],
        "tools": tool_effectiveness(attempts),
        "leaderboards": leaderboards(attempts),
        "outliers": outliers(attempts),
        "tests_run": _tests_run(attempts, min_support),
        "alpha": alpha,
        "min_support": min_support,
    }


def _tests_run(attempts: Iterable[AttemptData], min_support: int) -> int:
    counts: Counter[str] = Counter()
    for attempt in attempts:
        if attempt.success is not None:
            counts.update(attempt.features)
    return sum(1 for c in counts.values() if c >= min_support)
