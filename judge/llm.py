"""The `llm` judge (agent-as-a-judge): a judge model reads the whole trajectory against a rubric.

Its calls go through the gateway like any agent's, so they are recorded under a judge
rollout; an answer that is not a valid verdict is asked for again, then reported.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson
from pydantic import BaseModel, Field, ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from judge.render import render
from judge.rubric import Rubric
from judge.trajectory import AttemptTrace, Trajectory
from judge.verdict import CriterionScore, Verdict, derived_id, weighted_score

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)
JUDGE_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def judge_rollout_id(judge: str, about: str, run: int = 1) -> str:
    """The rollout the judge's own calls about `about` are recorded under; a judgement
    after the first ended (a forced rerun, a retry of a failed one) is a run of its own."""
    return derived_id(f"judge-{judge}-{about}" if run == 1 else f"judge-{judge}-{about} run {run}")


class JudgeModelError(Exception):
    """The judge model could not be reached or gave no usable answer."""


class InvalidVerdict(JudgeModelError):
    """The judge model answered, but not with a verdict that fits the rubric."""


@dataclass
class JudgeClient:
    """Asks the judge model through the gateway's OpenAI route, under a judge rollout."""

    base_url: str
    model: str
    http: httpx.AsyncClient
    api_key: str | None = None
    # When set, each judge rollout asked under: `rollout id -> (judge, about)`, so a caller
    # that makes several calls (a pairwise comparison) can end the rollouts it opened.
    asked: dict[str, tuple[str, str]] | None = None
    # When set, which run of `(judge, about)` a call is (`judge.jobs.first_open_run`), so a
    # judgement after an ended one records under a judge rollout of its own; else run 1.
    run_of: Callable[[str, str], Awaitable[int]] | None = None

    async def complete(self, messages: list[dict[str, str]], *, judge: str, about: str) -> str:
        run = 1 if self.run_of is None else await self.run_of(judge, about)
        rollout = judge_rollout_id(judge, about, run)
        if self.asked is not None:
            self.asked[rollout] = (judge, about)
        headers = {"X-Agent-Id": f"judge-{judge}", "X-Tags": "judge", "X-Meta-Judged": about[:200]}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "response_format": {"type": "json_object"},
        }
        url = f"{self.base_url.rstrip('/')}/rollout/{rollout}/v1/chat/completions"
        try:
            response = await self.http.post(url, json=body, headers=headers, timeout=JUDGE_TIMEOUT)
        except httpx.HTTPError as exc:
            raise JudgeModelError(f"judge model unreachable at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise JudgeModelError(
                f"judge model answered {response.status_code}: {response.text[:300]}"
            )
        try:
            return str(response.json()["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeModelError("judge model answer is not a chat completion") from exc


class _Reply(BaseModel):
    criteria: dict[str, CriterionScore]
    evidence: list[str] = Field(default_factory=list)
    summary: str = ""


def _json(content: str) -> Any:
    try:
        return orjson.loads(_FENCE.sub("", content.strip()))
    except orjson.JSONDecodeError as exc:
        raise InvalidVerdict(f"not valid JSON: {exc}") from exc


def parse_verdict(content: str, rubric: Rubric, t: Trajectory) -> Verdict:
    data = _json(content)
    try:
        reply = _Reply.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidVerdict(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc
    wanted = [c.name for c in rubric.criteria]
    missing = [name for name in wanted if name not in reply.criteria]
    if missing:
        raise InvalidVerdict(f"missing criteria: {', '.join(missing)}")
    known = {step.span_id for step in t.steps}
    criteria = {name: reply.criteria[name] for name in wanted}
    for criterion in criteria.values():
        criterion.evidence = [s for s in criterion.evidence if s in known]
    return Verdict(
        judge=rubric.name,
        rubric_version=rubric.fingerprint(),
        rollout_id=t.rollout_id,
        score=round(weighted_score(criteria, rubric.weights()), 4),
        criteria=criteria,
        evidence=[s for s in reply.evidence if s in known],
        summary=reply.summary,
    )


def system_prompt(rubric: Rubric) -> str:
    criteria = "\n".join(f"- {c.name}: {c.description}" for c in rubric.criteria)
    example = {
        "criteria": {
            c.name: {"score": 0.0, "explanation": "...", "evidence": ["<span id>"]}
            for c in rubric.criteria
        },
        "evidence": ["<span id>"],
        "summary": "one or two sentences",
    }
    return (
        f"{rubric.instructions}\n\nScore each criterion from 0 (bad) to 1 (good):\n{criteria}\n\n"
        "Cite steps by their span id. Answer with only a JSON object of this shape:\n"
        f"{orjson.dumps(example).decode()}"
    )


async def judge_llm(
    t: Trajectory,
    rubric: Rubric,
    client: JudgeClient,
    *,
    budget_tokens: int = 6000,
    max_invalid_retries: int = 2,
) -> Verdict:
    messages = [
        {"role": "system", "content": system_prompt(rubric)},
        {"role": "user", "content": render(t, budget_tokens)},
    ]
    retrying = AsyncRetrying(
        stop=stop_after_attempt(max_invalid_retries + 1),
        retry=retry_if_exception_type(InvalidVerdict),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            content = await client.complete(messages, judge=rubric.name, about=t.rollout_id)
            try:
                return parse_verdict(content, rubric, t)
            except InvalidVerdict as exc:
                messages += [
                    {"role": "assistant", "content": content},
                    {
                        "role": "user",
                        "content": f"That is not a valid verdict ({exc}). "
                        "Answer again with only the JSON object.",
                    },
                ]
                raise
    raise AssertionError("unreachable")  # pragma: no cover


# -- pairwise -------------------------------------------------------------

Preference = Literal["a", "b", "tie"]


class PairwiseResult(BaseModel):
    a: str
    b: str
    preferred: Preference
    consistent: bool
    orders: list[dict[str, Any]]


PAIRWISE_PROMPT = (
    "You compare two attempts at the same task by an AI agent, from their full records. "
    "Decide which one did the task better, weighing: {criteria}. Answer with only a JSON "
    'object: {{"preferred": "A" or "B" or "tie", "reason": "one or two sentences"}}'
)


class _Preference(BaseModel):
    preferred: Literal["A", "B", "tie", "a", "b", "TIE"]
    reason: str = ""


async def _prefer(
    first: Trajectory, second: Trajectory, rubric: Rubric, client: JudgeClient, budget: int
) -> tuple[str, str]:
    half = budget // 2
    messages = [
        {
            "role": "system",
            "content": PAIRWISE_PROMPT.format(
                criteria=", ".join(f"{c.name} ({c.description})" for c in rubric.criteria)
            ),
        },
        {
            "role": "user",
            "content": f"=== ATTEMPT A ===\n{render(first, half)}\n\n"
            f"=== ATTEMPT B ===\n{render(second, half)}",
        },
    ]
    content = await client.complete(
        messages,
        judge=f"{rubric.name}-pairwise",
        about=f"{first.rollout_id}-vs-{second.rollout_id}",
    )
    try:
        reply = _Preference.model_validate(_json(content))
    except ValidationError as exc:
        raise InvalidVerdict(f"not a preference: {exc.errors()[0]['msg']}") from exc
    return reply.preferred.lower(), reply.reason


async def compare(
    a: Trajectory, b: Trajectory, rubric: Rubric, client: JudgeClient, *, budget_tokens: int = 6000
) -> PairwiseResult:
    """Ask in both orders; a preference that flips with the order is reported as a tie."""
    first, first_reason = await _prefer(a, b, rubric, client, budget_tokens)
    second, second_reason = await _prefer(b, a, rubric, client, budget_tokens)
    as_a_b = {"a": "a", "b": "b", "tie": "tie"}
    swapped = {"a": "b", "b": "a", "tie": "tie"}
    one, two = as_a_b[first], swapped[second]
    consistent = one == two
    return PairwiseResult(
        a=a.rollout_id,
        b=b.rollout_id,
        preferred=one if consistent else "tie",  # type: ignore[arg-type]
        consistent=consistent,
        orders=[
            {"order": "a,b", "preferred": one, "reason": first_reason},
            {"order": "b,a", "preferred": two, "reason": second_reason},
        ],
    )


def attempt_view(t: Trajectory, attempt: AttemptTrace) -> Trajectory:
    """One attempt of a rollout as its own trajectory, for comparing attempts."""
    return Trajectory(
        rollout_id=f"{t.rollout_id}#{attempt.id}",
        agent=t.agent,
        status=attempt.status,
        input=t.input,
        attempts=[attempt],
        rewards=[],
    )
