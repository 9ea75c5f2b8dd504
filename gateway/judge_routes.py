"""The judge attached to the web app: `/api/judge/runs` (start, follow, cancel a judge job),
`/api/patterns`, `/api/leaderboard` and `/api/guidelines/{agent}`. Part of the composition
root, so that `gateway/web` never imports `judge`."""

from __future__ import annotations

import itertools
from typing import Any

from aiohttp import web
from sqlite_utils import Database

from gateway.errors import TooManyJudgeRuns, ValidationFailed
from gateway.web import api_models as m
from gateway.web.responses import error_response
from gateway.web.routes_api import ApiRoute, body_of, json, query_of, read, time_param
from gateway.web.state import GATEWAY
from gateway.web.ui.routes import Analyses
from judge.jobs import Selection
from judge.service import JudgeService, RunLimitReached

JUDGE = web.AppKey("judge", JudgeService)
# A hint only: how long runs take depends on the rollouts and the judge.
RETRY_AFTER_SECONDS = 10


async def start_judge_run(request: web.Request) -> web.Response:
    service = request.app[JUDGE]
    body = await body_of(request, m.JudgeRunCreate)
    selection = Selection(
        rollout_ids=body.rollout_ids,
        since_ns=time_param(body.since, "since"),
        status=body.status,
        agent=body.agent,
        sample=body.sample,
    )
    try:
        run = await service.start_run(
            body.judge, selection, concurrency=body.concurrency, force=body.force
        )
    except ValueError as exc:
        raise ValidationFailed(str(exc), param="judge") from exc
    except RunLimitReached as exc:
        return error_response(
            TooManyJudgeRuns(str(exc)), headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
        )
    return json(run, status=202)


async def get_judge_run(request: web.Request) -> web.Response:
    service = request.app[JUDGE]
    return json(await service.get_run(request.match_info["run_id"]))


async def cancel_judge_run(request: web.Request) -> web.Response:
    service = request.app[JUDGE]
    return json(await service.cancel_run(request.match_info["run_id"]))


JUDGE_ROUTES = (
    ApiRoute("POST", "/api/judge/runs", start_judge_run, "Start judging rollouts in the background", "write", m.JudgeRunCreate, None, m.JudgeRun, 202, (422, 429)),
    ApiRoute("GET", "/api/judge/runs/{run_id}", get_judge_run, "A judge run's progress and results", "read", None, None, m.JudgeRun, 200, (404,)),
    ApiRoute("POST", "/api/judge/runs/{run_id}/cancel", cancel_judge_run, "Cancel a running judge run; the verdicts made so far are kept", "write", None, None, m.JudgeRun, 200, (404, 409)),
)  # fmt: skip


def _analyse(db: Database, **params: Any) -> dict[str, Any]:
    from judge.patterns import analyse

    return analyse(db, **params)


def _leaderboards(db: Database, **params: Any) -> dict[str, Any]:
    from judge.patterns import leaderboards, load

    return leaderboards(load(db, **params))


def _guidelines(db: Database, agent: str) -> dict[str, Any]:
    from judge.guidelines import get_guideline, list_guidelines

    versions = list_guidelines(db, agent)
    latest = get_guideline(db, agent, versions[-1]["version"]) if versions else None
    return {"agent": agent, "versions": versions, "latest": latest}


def _analysis_params(q: m.LeaderboardQuery) -> dict[str, Any]:
    """The query as the analysis takes it: every field, `since` as nanoseconds."""
    params = q.model_dump(exclude={"since"})
    params["since_ns"] = time_param(q.since, "since")
    return params


async def get_patterns(request: web.Request) -> web.Response:
    q = query_of(request, m.PatternsQuery)
    return json(await read(request.app[GATEWAY], _analyse, **_analysis_params(q)))


async def get_leaderboard(request: web.Request) -> web.Response:
    q = query_of(request, m.LeaderboardQuery)
    return json(await read(request.app[GATEWAY], _leaderboards, **_analysis_params(q)))


async def get_guidelines(request: web.Request) -> web.Response:
    """Every stored version of an agent's guideline, and the newest one's text (none: empty)."""
    gw = request.app[GATEWAY]
    return json(await read(gw, _guidelines, request.match_info["agent"]))


PATTERN_ROUTES = (
    ApiRoute("GET", "/api/patterns", get_patterns, "What successful and failed rollouts do differently", "read", None, m.PatternsQuery, m.Patterns, 200, (422,)),
    ApiRoute("GET", "/api/leaderboard", get_leaderboard, "Rollouts, success, reward, cost and latency by model and by agent", "read", None, m.LeaderboardQuery, m.Leaderboards, 200, (422,)),
    ApiRoute("GET", "/api/guidelines/{agent}", get_guidelines, "An agent's guideline versions and the latest text", "read", None, None, m.Guidelines, 200, ()),
)  # fmt: skip


def _guideline_history(db: Database, agent: str) -> dict[str, Any]:
    """An agent's guideline versions, the latest text, and the diff between each pair."""
    from judge.guidelines import diff_guidelines

    found = _guidelines(db, agent)
    numbers = [v["version"] for v in found["versions"]]
    found["diffs"] = [
        {"old": old, "new": new, "diff": diff_guidelines(db, agent, old, new)}
        for old, new in itertools.pairwise(numbers)
    ]
    return found


def ui_analyses() -> Analyses:
    """The judge's analyses for the dashboard's leaderboard and patterns pages."""
    return Analyses(patterns=_analyse, leaderboards=_leaderboards, guidelines=_guideline_history)
