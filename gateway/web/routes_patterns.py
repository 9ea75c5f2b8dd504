"""`/api/patterns`, `/api/leaderboard`, `/api/guidelines/{agent}`: the findings over HTTP.

Analyses run on the read threads, and import judge.patterns (scipy) there on first use.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlite_utils import Database

from gateway.web import api_models as m
from gateway.web.routes_api import ApiRoute, json, query_of, read, time_param
from gateway.web.state import GATEWAY


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


async def get_patterns(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = query_of(request, m.PatternsQuery)
    result = await read(
        gw,
        _analyse,
        since_ns=time_param(q.since, "since"),
        agent=q.agent,
        min_support=q.min_support,
        alpha=q.alpha,
        reward_name=q.reward_name,
        success_threshold=q.success_threshold,
    )
    return json(result)


async def get_leaderboard(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = query_of(request, m.LeaderboardQuery)
    boards = await read(
        gw,
        _leaderboards,
        since_ns=time_param(q.since, "since"),
        agent=q.agent,
        reward_name=q.reward_name,
        success_threshold=q.success_threshold,
    )
    return json(boards)


async def get_guidelines(request: web.Request) -> web.Response:
    """Every stored version of an agent's guideline, and the newest one's text (none: empty)."""
    gw = request.app[GATEWAY]
    return json(await read(gw, _guidelines, request.match_info["agent"]))


ROUTES = (
    ApiRoute("GET", "/api/patterns", get_patterns, "What successful and failed rollouts do differently", "read", None, m.PatternsQuery, m.Patterns, 200, (422,)),
    ApiRoute("GET", "/api/leaderboard", get_leaderboard, "Rollouts, success, reward, cost and latency by model and by agent", "read", None, m.LeaderboardQuery, m.Leaderboards, 200, (422,)),
    ApiRoute("GET", "/api/guidelines/{agent}", get_guidelines, "An agent's guideline versions and the latest text", "read", None, None, m.Guidelines, 200, ()),
)  # fmt: skip
