"""`/api/judge/runs`: start a judge job in the gateway, follow its progress, cancel it."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import TooManyJudgeRuns, ValidationFailed
from gateway.web import api_models as m
from gateway.web.responses import error_response
from gateway.web.routes_api import ApiRoute, body_of, json, time_param
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


ROUTES = (
    ApiRoute("POST", "/api/judge/runs", start_judge_run, "Start judging rollouts in the background", "write", m.JudgeRunCreate, None, m.JudgeRun, 202, (422, 429)),
    ApiRoute("GET", "/api/judge/runs/{run_id}", get_judge_run, "A judge run's progress and results", "read", None, None, m.JudgeRun, 200, (404,)),
    ApiRoute("POST", "/api/judge/runs/{run_id}/cancel", cancel_judge_run, "Cancel a running judge run; the verdicts made so far are kept", "write", None, None, m.JudgeRun, 200, (404, 409)),
)  # fmt: skip
