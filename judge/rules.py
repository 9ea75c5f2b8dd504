"""The `rules` judge: deterministic checks on a trajectory, free and instant.

Each criterion scores 0-1 and names the spans that cost it points.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from judge.trajectory import Trajectory
from judge.verdict import CriterionScore, Verdict, weighted_score

RULES_VERSION = "rules-1"
# A call repeated this many times in a row (same tool and arguments, or same request) is a loop.
LOOP_REPEATS = 3
WEIGHTS = {
    "error_handling": 2.0,
    "retries": 0.5,
    "truncation": 1.0,
    "tool_validity": 2.0,
    "loops": 2.0,
    "token_efficiency": 1.0,
    "latency_efficiency": 0.5,
}


@dataclass
class Peers:
    """Totals of other rollouts of the same agent, sorted, for efficiency percentiles."""

    tokens: list[int] = field(default_factory=list)
    durations_ms: list[float] = field(default_factory=list)


def _percentile_score(value: float, sorted_peers: list[float]) -> tuple[float, str]:
    if len(sorted_peers) < 3:
        return 1.0, "too few rollouts of this agent to compare"
    rank = bisect.bisect_left(sorted_peers, value) / len(sorted_peers)
    return round(1.0 - rank, 4), f"uses more than {rank:.0%} of this agent's rollouts"


def _error_handling(t: Trajectory) -> CriterionScore:
    unhandled, handled = [], []
    for attempt in t.attempts:
        steps = attempt.steps
        for index, step in enumerate(steps):
            if step.status != "error":
                continue
            recovered = any(later.status == "ok" for later in steps[index + 1 :])
            (handled if recovered else unhandled).append(step.span_id)
    errors = len(unhandled) + len(handled)
    if not errors:
        return CriterionScore(score=1.0, explanation="no upstream errors")
    score = 1.0 - len(unhandled) / errors * 0.8 - len(handled) / errors * 0.2
    return CriterionScore(
        score=round(max(score, 0.0), 4),
        explanation=f"{errors} upstream errors, {len(handled)} recovered from, "
        f"{len(unhandled)} left unhandled",
        evidence=unhandled + handled,
    )


def _retries(t: Trajectory) -> CriterionScore:
    retried = [s for s in t.steps if s.retries]
    total = sum(s.retries for s in retried)
    if not total:
        return CriterionScore(score=1.0, explanation="no upstream retries")
    return CriterionScore(
        score=round(max(0.0, 1.0 - 0.1 * total), 4),
        explanation=f"{total} upstream retries over {len(retried)} calls",
        evidence=[s.span_id for s in retried],
    )


def _truncation(t: Trajectory) -> CriterionScore:
    steps = t.steps
    cut = [s.span_id for s in steps if s.finish_reason == "length"]
    if not cut:
        return CriterionScore(score=1.0, explanation="no reply was cut off")
    return CriterionScore(
        score=round(1.0 - len(cut) / max(len(steps), 1), 4),
        explanation=f"{len(cut)} of {len(steps)} replies stopped at the token limit",
        evidence=cut,
    )


def _tool_validity(t: Trajectory) -> CriterionScore:
    uses = [(s, u) for s in t.steps for u in s.tool_uses]
    if not uses:
        return CriterionScore(score=1.0, explanation="no tool calls")
    bad_json = [s.span_id for s, u in uses if not u.arguments_valid]
    not_offered = [s.span_id for s, u in uses if not u.offered]
    bad = len(bad_json) + len(not_offered)
    parts = []
    if bad_json:
        parts.append(f"{len(bad_json)} with arguments that are not a JSON object")
    if not_offered:
        parts.append(f"{len(not_offered)} to tools that were not offered")
    return CriterionScore(
        score=round(max(0.0, 1.0 - bad / len(uses)), 4),
        explanation=f"{len(uses)} tool calls"
        + (": " + "; ".join(parts) if parts else ", all valid"),
        evidence=bad_json + not_offered,
    )


def _loops(t: Trajectory) -> CriterionScore:
    looping: list[str] = []
    for attempt in t.attempts:
        previous, run = None, 0
        for step in attempt.steps:
            key = tuple((u.name, u.arguments) for u in step.tool_uses) or step.reply
            if key and key == previous:
                run += 1
                if run >= LOOP_REPEATS - 1:
                    looping.append(step.span_id)
            else:
                previous, run = key, 0
    if not looping:
        return CriterionScore(score=1.0, explanation="no repeated identical calls")
    return CriterionScore(
        score=round(max(0.0, 1.0 - len(looping) / max(len(t.steps), 1) * 2), 4),
        explanation=f"{len(looping)} calls repeat the same action {LOOP_REPEATS}+ times in a row",
        evidence=looping,
    )


def judge_rules(t: Trajectory, peers: Peers | None = None) -> Verdict:
    peers = peers or Peers()
    token_score, token_note = _percentile_score(t.total_tokens, sorted(peers.tokens))
    time_score, time_note = _percentile_score(t.duration_ms, sorted(peers.durations_ms))
    criteria = {
        "error_handling": _error_handling(t),
        "retries": _retries(t),
        "truncation": _truncation(t),
        "tool_validity": _tool_validity(t),
        "loops": _loops(t),
        "token_efficiency": CriterionScore(
            score=token_score, explanation=f"{t.total_tokens} tokens; {token_note}"
        ),
        "latency_efficiency": CriterionScore(
            score=time_score, explanation=f"{t.duration_ms:.0f} ms in model calls; {time_note}"
        ),
    }
    evidence = sorted({span for c in criteria.values() for span in c.evidence})
    flagged = [name for name, c in criteria.items() if c.score < 1.0]
    return Verdict(
        judge="rules",
        rubric_version=RULES_VERSION,
        rollout_id=t.rollout_id,
        score=round(weighted_score(criteria, WEIGHTS), 4),
        criteria=criteria,
        evidence=evidence,
        summary="clean run" if not flagged else "points lost on " + ", ".join(flagged),
    )
