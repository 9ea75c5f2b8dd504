"""Pattern mining: what successful and failed attempts do differently, with the statistics.

Every finding carries its support, an effect size, a p-value (and a q-value after
Benjamini-Hochberg across all tests run), and the rollouts and spans that show it.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict, Unpack

import numpy as np
import orjson
from scipy.special import gammaln
from scipy.stats import false_discovery_control, mannwhitneyu
from scipy.stats import t as student_t
from sqlite_utils import Database

from config.models import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_SUPPORT,
    DEFAULT_REWARD_NAME,
    DEFAULT_SUCCESS_THRESHOLD,
)

MAX_NGRAM = 3
EVIDENCE_LIMIT = 5
OUTLIER_RATIO = 3.0
# Relative slack when comparing table probabilities in log space (R's fisher.test uses 1e-7).
FISHER_TIE_SLACK = 1e-7

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
       s.duration_ms, s.cost_usd, s.start_ns, s.end_ns, s.model_version
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
    # Model versions that served the attempt's calls (deployments with a `version`).
    versions: Counter[str] = field(default_factory=Counter)
    executions: list[tuple[str, str, float, str]] = field(default_factory=list)
    # Tool call ids already counted: an agent's own `execute_tool` span (ingested over OTLP)
    # and the one the gateway derives for the same call are one execution.
    executed_calls: set[str] = field(default_factory=set)
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


def _tool_call_id(tool_calls: Any) -> str | None:
    """The call id an `execute_tool` span records (in its one-entry `tool_calls`)."""
    calls = _json_list(tool_calls)
    first = calls[0] if calls else None
    call_id = first.get("id") if isinstance(first, dict) else None
    return call_id if isinstance(call_id, str) and call_id else None


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
    reward_name: str = DEFAULT_REWARD_NAME,
    success_threshold: float = DEFAULT_SUCCESS_THRESHOLD,
) -> list[AttemptData]:
    """Every attempt with its tool sequence, features, costs and outcome."""
    params = {"since_ns": since_ns, "agent": agent}
    attempts: dict[tuple[str, str], AttemptData] = {}
    for rollout_id, attempt_id, agent_name, status, _ in db.execute(ATTEMPTS_SQL, params):
        attempts[(rollout_id, attempt_id)] = AttemptData(rollout_id, attempt_id, agent_name, status)
    for row in db.execute(SPANS_SQL, params):
        (rid, aid, span_id, _seq, operation, name, status, error_type, finish, tool_calls,
         group, response_model, duration, cost, start_ns, end_ns, version) = row  # fmt: skip
        attempt = attempts.get((rid, aid))
        if attempt is None:
            continue
        attempt.first_ns = start_ns if attempt.first_ns is None else min(attempt.first_ns, start_ns)
        attempt.last_ns = end_ns if attempt.last_ns is None else max(attempt.last_ns, end_ns)
        if operation == "execute_tool":
            call_id = _tool_call_id(tool_calls)
            if call_id is not None:
                if call_id in attempt.executed_calls:
                    continue
                attempt.executed_calls.add(call_id)
            tool = name.removeprefix("execute_tool ")
            attempt.executions.append((tool, status, duration or 0.0, span_id))
            if status == "error":
                attempt.features.setdefault(f"tool_error:{tool}", span_id)
            continue
        attempt.duration_ms += duration or 0.0
        attempt.cost_usd += cost or 0.0
        attempt.models[group or response_model or "?"] += 1
        if version is not None:
            attempt.versions[version] += 1
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


def fisher_two_sided(
    with_wins: Sequence[int], supports: Sequence[int], wins: int, total: int
) -> list[float]:
    """Two-sided Fisher's exact p-values of many 2x2 tables that share their column totals.

    Table i: `with_wins[i]` successes among the `supports[i]` attempts showing a feature, out
    of `wins` successes among `total` attempts. The rule is scipy's `fisher_exact`: the
    probability of every table no more likely than the observed one. Computing it with one
    hypergeometric pmf per distinct support (sorted, cumulated, then searched) instead of a
    search per table is what keeps thousands of features fast: one `fisher_exact` call
    costs about a millisecond.
    """
    losses = total - wins
    log_fact = gammaln(np.arange(total + 1, dtype=np.float64) + 1.0)
    p_values = np.ones(len(supports))
    by_support: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(supports):
        by_support[n].append(i)
    for n, members in by_support.items():
        low, high = max(0, n - losses), min(n, wins)
        x = np.arange(low, high + 1)
        log_pmf = (
            log_fact[wins] - log_fact[x] - log_fact[wins - x]
            + log_fact[losses] - log_fact[n - x] - log_fact[losses - n + x]
            - (log_fact[total] - log_fact[n] - log_fact[total - n])
        )  # fmt: skip
        order = np.sort(log_pmf)
        tail = np.cumsum(np.exp(order))
        observed = log_pmf[np.asarray([with_wins[i] for i in members]) - low]
        # Tables as likely as the observed one count too; the slack absorbs rounding in log space.
        reach = np.searchsorted(order, observed + FISHER_TIE_SLACK, side="right")
        p_values[members] = tail[reach - 1]
    return np.minimum(p_values, 1.0).tolist()


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
    support: Counter[str] = Counter()
    won: Counter[str] = Counter()
    for attempt in judged:
        support.update(attempt.features.keys())
        if attempt.success:
            won.update(attempt.features.keys())
    # A feature every attempt shows says nothing; one shown by few cannot be told from chance.
    tested = [f for f, n in support.items() if min_support <= n < len(judged)]
    if not tested:
        return []
    p_values = fisher_two_sided(
        [won[f] for f in tested], [support[f] for f in tested], wins, len(judged)
    )
    q_values = false_discovery_control(p_values)
    findings = []
    for feature, p, q in zip(tested, p_values, q_values, strict=True):
        if q > alpha:
            continue
        having = support[feature]
        a, b = won[feature], having - won[feature]
        c, d = wins - a, losses - b
        odds = a * d / (b * c) if b and c else None  # as fisher_exact's, None for infinite
        n_without = len(judged) - having
        diff, low, high = _rate_ci(a, having, c, n_without)
        helps = diff > 0
        findings.append(
            Finding(
                kind="success_pattern" if helps else "failure_pattern",
                feature=feature,
                description=_describe(feature, helps),
                support=having,
                effect=round(diff, 4),
                odds_ratio=None if odds is None else round(odds, 4),
                ci_low=round(low, 4),
                ci_high=round(high, 4),
                p_value=p,
                q_value=float(q),
                rate_with=round(a / having, 4),
                rate_without=round(c / n_without, 4) if n_without else 0.0,
                evidence=[],
            )
        )
    _attach_evidence(judged, findings)
    findings.sort(key=lambda f: (f.q_value, -abs(f.effect)))
    return findings


def _attach_evidence(judged: list[AttemptData], findings: list[Finding]) -> None:
    """The first few attempts that show each finding with its outcome (one pass, early exit)."""
    wanted = {f.feature: f for f in findings}
    for attempt in judged:
        if not wanted:
            return
        for feature in wanted.keys() & attempt.features.keys():
            finding = wanted[feature]
            if bool(attempt.success) == (finding.kind == "success_pattern"):
                finding.evidence.append(
                    {
                        "rollout_id": attempt.rollout_id,
                        "attempt_id": attempt.attempt_id,
                        "span_id": attempt.features[feature],
                    }
                )
                if len(finding.evidence) >= EVIDENCE_LIMIT:
                    del wanted[feature]


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
    using: Counter[str] = Counter()
    executions: dict[str, list[tuple[str, float]]] = defaultdict(list)
    # One pass builds, per tool, the positions of the rewarded attempts that use it; the
    # "without" sample is then a mask over one array rather than a scan per tool.
    rewards: list[float] = []
    rewarded_users: dict[str, list[int]] = defaultdict(list)
    for attempt in attempts:
        calls.update(attempt.tools)
        distinct = set(attempt.tools)
        using.update(distinct)
        if attempt.reward is not None:
            for tool in distinct:
                rewarded_users[tool].append(len(rewards))
            rewards.append(attempt.reward)
        for tool, status, duration, _ in attempt.executions:
            executions[tool].append((status, duration))
    values = np.asarray(rewards, dtype=np.float64)
    rows = []
    for tool, count in calls.most_common():
        if rewards and count < min_support:
            continue
        mask = np.zeros(len(values), dtype=bool)
        mask[rewarded_users.get(tool, [])] = True
        users, others = values[mask], values[~mask]
        runs = executions.get(tool, [])
        p_value = None
        if len(users) >= 2 and len(others) >= 2 and np.ptp(values) > 0:
            p_value = float(mannwhitneyu(users, others).pvalue)
        rows.append(
            {
                "tool": tool,
                "calls": count,
                "attempts": using[tool],
                "executions": len(runs),
                "error_rate": round(sum(s == "error" for s, _ in runs) / len(runs), 4)
                if runs
                else None,
                "median_duration_ms": statistics.median(d for _, d in runs) if runs else None,
                "reward_with": round(float(users.mean()), 4) if len(users) else None,
                "reward_without": round(float(others.mean()), 4) if len(others) else None,
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
    # Best mean reward first; no reward at all last (a mean of 0 is a reward, not a missing one).
    rows.sort(key=lambda r: (r["mean_reward"] is None, -(r["mean_reward"] or 0.0), r[by]))
    return rows


def leaderboards(attempts: list[AttemptData]) -> dict[str, list[dict[str, Any]]]:
    by_model: dict[str, list[AttemptData]] = defaultdict(list)
    by_agent: dict[str, list[AttemptData]] = defaultdict(list)
    by_version: dict[str, list[AttemptData]] = defaultdict(list)
    for attempt in attempts:
        if attempt.models:
            by_model[attempt.models.most_common(1)[0][0]].append(attempt)
        if attempt.versions:
            by_version[attempt.versions.most_common(1)[0][0]].append(attempt)
        by_agent[attempt.agent or "(none)"].append(attempt)
    return {
        "models": _board(by_model, "model"),
        "agents": _board(by_agent, "agent"),
        "model_versions": _board(by_version, "model_version"),
    }


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


class Selection(TypedDict, total=False):
    """The keywords of `load`: which attempts are read and what counts as a success."""

    since_ns: int | None
    agent: str | None
    reward_name: str
    success_threshold: float


def analyse(
    db: Database,
    *,
    min_support: int = DEFAULT_MIN_SUPPORT,
    alpha: float = DEFAULT_ALPHA,
    **selection: Unpack[Selection],
) -> dict[str, Any]:
    """All findings at once, as plain JSON-ready data; `selection` goes to `load`."""
    attempts = load(db, **selection)
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
    """How many features `differences` tested: the same rules, so the count matches its BH."""
    counts: Counter[str] = Counter()
    judged = wins = 0
    for attempt in attempts:
        if attempt.success is not None:
            judged += 1
            wins += attempt.success
            # The keys: `update(mapping)` would add the mapping's values (span ids).
            counts.update(attempt.features.keys())
    if not wins or wins == judged:
        return 0
    return sum(1 for c in counts.values() if min_support <= c < judged)
