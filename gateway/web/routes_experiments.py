"""`/api/experiments`: each experiment's variants compared, over HTTP.

The analysis itself lives in judge (scipy); compose.py hands it in under `ANALYSIS`, so this
layer never imports judge. It runs on the read threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field
from sqlite_utils import Database

from gateway.errors import ServiceUnavailable
from gateway.web.routes_api import ApiRoute, json, read
from gateway.web.state import GATEWAY


@dataclass(frozen=True)
class Analysis:
    """The analysis functions: every experiment, and one by name (NotFound when unknown)."""

    every: Callable[[Database], dict[str, Any]]
    one: Callable[[Database, str], dict[str, Any]]


ANALYSIS = web.AppKey("experiment_analysis", Analysis)


class VsControl(BaseModel):
    difference: float | None = Field(None, description="Mean reward minus control's.")
    effect_size: float | None = Field(None, description="Hedges' g against control.")
    p_value: float | None = Field(None, description="Welch's t-test against control.")
    p_adjusted: float | None = Field(None, description="Bonferroni over the variants.")


class VariantResult(BaseModel):
    name: str
    control: bool
    rollouts: int = Field(description="Rollouts (or lone calls) that ran this variant.")
    rewarded: int = Field(description="Those with a reward of the experiment's name.")
    mean_reward: float | None
    ci_low: float | None = Field(description="95% confidence interval of the mean reward.")
    ci_high: float | None
    success_rate: float | None = Field(description="Share rewarded at least success_threshold.")
    cost_usd: float
    cost_per_reward_point: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    prob_best: float | None = Field(description="Posterior probability of the best mean.")
    vs_control: VsControl | None


class Decision(BaseModel):
    id: int
    experiment: str
    action: str
    variant: str | None
    created_ns: int


class ExperimentResult(BaseModel):
    name: str
    model: str | None
    reward: str
    policy: str
    control: str
    alpha: float
    status: str = Field(
        description="running, promoted, stopped, or removed (no longer in the config)."
    )
    decision: Decision | None
    variants: list[VariantResult]
    verdict: str


class ExperimentList(BaseModel):
    data: list[ExperimentResult]


def _analysis(request: web.Request) -> Analysis:
    analysis = request.app.get(ANALYSIS)
    if analysis is None:
        raise ServiceUnavailable("experiment analysis is not available in this gateway")
    return analysis


async def list_experiments(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return json(await read(gw, _analysis(request).every))


async def get_experiment(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return json(await read(gw, _analysis(request).one, request.match_info["name"]))


ROUTES = (
    ApiRoute("GET", "/api/experiments", list_experiments, "Every experiment's variants compared, with a verdict", "read", None, None, ExperimentList, 200, ()),
    ApiRoute("GET", "/api/experiments/{name}", get_experiment, "One experiment: reward, cost and latency per variant, tests against control, a verdict", "read", None, None, ExperimentResult, 200, (404,)),
)  # fmt: skip
