"""Builds the aiohttp application: the route table, shared state and its setup/teardown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlite_utils import Database

from config.models import RecorderSettings, Settings
from gateway.exporters import ExportCollector, OtlpExporter
from gateway.judge_routes import JUDGE, JUDGE_ROUTES, PATTERN_ROUTES, ui_analyses
from gateway.providers import mock as mock_provider
from gateway.providers.base import Provider
from gateway.providers.http1 import ConnectionPool
from gateway.providers.litellm import LiteLLMProvider, is_litellm_provider, load_litellm
from gateway.providers.openai import OpenAICompatible
from gateway.proxy.budgets import Budgets, BudgetState
from gateway.proxy.cost import load_cost_map
from gateway.proxy.gate import Gate
from gateway.proxy.recorder import Recorder
from gateway.proxy.redact import Redactor
from gateway.proxy.router import Router
from gateway.proxy.sequencer import Sequencer
from gateway.proxy.training import RolloutModes, stored_mode
from gateway.retention import retention
from gateway.scaling import SharedCounters
from gateway.web.auth import auth_middleware
from gateway.web.budget_metrics import BudgetCollector
from gateway.web.experiment_sync import attach_experiments
from gateway.web.front import attach_fronts
from gateway.web.ingest_otlp import TRACE_INDEX, IngestCollector
from gateway.web.ingest_otlp import add_routes as add_ingest_routes
from gateway.web.judge_metrics import JudgeCollector
from gateway.web.metrics import METRICS, Metrics
from gateway.web.middleware import error_middleware
from gateway.web.openapi import openapi_view
from gateway.web.routes_api import ROUTES as API_ROUTES
from gateway.web.routes_api import add_routes as add_api_routes
from gateway.web.routes_experiments import ANALYSIS as EXPERIMENT_ANALYSIS
from gateway.web.routes_experiments import ROUTES as EXPERIMENT_ROUTES
from gateway.web.routes_experiments import Analysis
from gateway.web.routes_models import ROUTES as MODEL_ROUTES
from gateway.web.routes_models import restore_registry
from gateway.web.routes_openai import add_routes as add_openai_routes
from gateway.web.routes_ops import add_routes as add_ops_routes
from gateway.web.routes_pause import ROUTES as PAUSE_ROUTES
from gateway.web.routes_pause import pause_sync
from gateway.web.routes_report import ROUTES as REPORT_ROUTES
from gateway.web.state import GATEWAY, Gateway
from gateway.web.ui.routes import ANALYSES, add_ui_routes
from judge.guidelines import get_guideline
from judge.jobs import JudgeStore
from judge.service import JudgeService
from store.backend import is_postgres
from store.budget_state import MemoryBudgetState, RedisBudgetState
from store.budget_state_pg import PostgresBudgetState
from store.errors import NotFound
from store.queries import rollout_budget_usage, rollout_cursor
from store.reader import Reader
from store.writer import StoreWriter
from store.writes import get_rollout_row

log = logging.getLogger("spangate")

BUILTIN_PROVIDERS = frozenset({"openai", "mock"})
WRITER_CLOSE_TIMEOUT = 60.0
# Rollouts whose next seq is kept in memory (~230 B each); older ones are looked up again.
SEQUENCER_CAPACITY = 10_000
OTLP_EXPORTER = web.AppKey("otlp_exporter", OtlpExporter)


def check_providers(settings: Settings) -> None:
    """Cheap checks before start; litellm provider names are checked once litellm is loaded."""
    for group in settings.models:
        for deployment in group.deployments:
            name = deployment.provider
            if (
                name not in BUILTIN_PROVIDERS
                and not name.replace("_", "").replace("-", "").isalnum()
            ):
                raise ValueError(f"model group {group.name!r}: {name!r} is not a provider name")


def litellm_providers(settings: Settings) -> set[str]:
    return {d.provider for g in settings.models for d in g.deployments} - BUILTIN_PROVIDERS


def writer_for(
    db_path: str | Path, recorder: RecorderSettings | None = None, **overrides: Any
) -> StoreWriter:
    """The store writer tuned by `recorder` settings (config holds every default)."""
    recorder = (recorder or RecorderSettings()).model_copy(update=overrides)
    return StoreWriter.tuned(db_path, recorder)


def budget_state_for(settings: Settings, db_path: str | Path) -> BudgetState:
    """Redis when `shared.redis_url` is set, else the PostgreSQL store when there is one (both
    shared by every replica), else this process."""
    if settings.shared.redis_url:
        return RedisBudgetState(settings.shared.redis_url, ttl=settings.budgets.state_ttl)
    if is_postgres(db_path):
        return PostgresBudgetState(str(db_path))
    return MemoryBudgetState()


def budgets_for(settings: Settings, reader: Reader, gw: Gateway, db_path: str | Path) -> Budgets:
    """The gateway's budgets; counters start from what the store has recorded."""
    state = budget_state_for(settings, db_path)

    async def lookup(rollout_id: str) -> dict[str, Any]:
        return await reader.run(rollout_budget_usage, rollout_id)

    shared = not isinstance(state, MemoryBudgetState)
    return Budgets(settings.budgets, state, lookup, gw.group_prices, shared=shared)


def _stored_mode(db: Any, rollout_id: str) -> str | None:
    """The mode a rollout was created with, from the store; None for an unknown rollout."""
    try:
        return stored_mode(get_rollout_row(db, rollout_id)["metadata"])
    except NotFound:
        return None


def create_app(settings: Settings, db_path: str | Path) -> web.Application:
    """The whole gateway as an aiohttp app; nothing starts until the app does."""
    check_providers(settings)
    middlewares = [error_middleware]
    if settings.auth.keys:
        middlewares.append(auth_middleware(settings.auth.keys))
    app = web.Application(middlewares=middlewares, client_max_size=settings.server.max_body_bytes)
    writer = writer_for(db_path, settings.recorder)
    reader = Reader(db_path)

    async def lookup(rollout_id: str) -> tuple[int, str | None]:
        seq, attempt = await reader.run(rollout_cursor, rollout_id)
        # Spans still queued or journaled are not in the store yet but hold numbers.
        return max(seq, writer.unsaved_seq(rollout_id)), attempt

    counters = SharedCounters(settings, db_path)

    gw = Gateway(
        settings=settings,
        router=Router(settings, **counters.router_options()),
        recorder=Recorder(),
        writer=writer,
        reader=reader,
        sequencer=Sequencer(lookup, capacity=SEQUENCER_CAPACITY, allocate=counters.allocate),
        redactor=Redactor.for_settings(settings),
        gate=Gate(settings.pause.max_hold_seconds, settings.pause.retry_after_seconds),
    )
    gw.budgets = budgets_for(settings, reader, gw, db_path)
    gw.modes = RolloutModes(lookup=lambda rollout_id: reader.run(_stored_mode, rollout_id))
    app[GATEWAY] = gw
    app[METRICS] = Metrics(gw)
    app[METRICS].registry.register(BudgetCollector(gw.budgets))
    app[JUDGE] = JudgeService(
        settings.judge, JudgeStore(reader=reader, writer=writer), lambda: gw.base_url
    )
    app[METRICS].registry.register(JudgeCollector(app[JUDGE]))
    # Teardown runs in reverse: the upstream pool closes first, the writer drains last.
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(counters.lifecycle)
    app.cleanup_ctx.append(_recording)
    app.cleanup_ctx.append(_upstreams)
    app.cleanup_ctx.append(_judging)
    app.cleanup_ctx.append(_budgeting)
    app.cleanup_ctx.append(retention)
    app.cleanup_ctx.append(pause_sync)
    exporter = OtlpExporter.from_settings(settings, read=reader.run)
    if exporter is not None:
        app[OTLP_EXPORTER] = exporter
        app.cleanup_ctx.append(_exporting)
    app[METRICS].registry.register(ExportCollector(exporter))
    add_openai_routes(app)
    attach_fronts(app)
    add_ingest_routes(app)
    app[METRICS].registry.register(IngestCollector(app[TRACE_INDEX]))
    add_ops_routes(app)
    attach_experiments(app, get_guideline, counters.claim_variant)
    app[EXPERIMENT_ANALYSIS] = Analysis(every=_analyse_experiments, one=_analyse_experiment)
    add_api_routes(
        app,
        API_ROUTES
        + JUDGE_ROUTES
        + PATTERN_ROUTES
        + REPORT_ROUTES
        + EXPERIMENT_ROUTES
        + MODEL_ROUTES
        + PAUSE_ROUTES,
    )
    app.cleanup_ctx.append(restore_registry)
    app[ANALYSES] = ui_analyses()
    add_ui_routes(app)
    app.router.add_get("/openapi.json", openapi_view)
    return app


def _analyse_experiments(db: Database) -> dict[str, Any]:
    # Imported on first use, on a read thread: scipy costs a start half a second.
    from judge.experiments import analyse_all

    return analyse_all(db)


def _analyse_experiment(db: Database, name: str) -> dict[str, Any]:
    from judge.experiments import analyse_experiment

    return analyse_experiment(db, name)


async def _store(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    loop = asyncio.get_running_loop()
    # Opening runs migrations and replays the journal: file I/O, so off the loop.
    await loop.run_in_executor(None, gw.writer.start)
    cost_map = await loop.run_in_executor(None, load_cost_map)
    gw.price_all(cost_map)
    yield
    await loop.run_in_executor(None, gw.writer.close, WRITER_CLOSE_TIMEOUT)
    await loop.run_in_executor(None, gw.reader.close)


async def _recording(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    unsubscribe_writer = gw.recorder.subscribe(gw.writer.put)
    unsubscribe_metrics = gw.recorder.subscribe(app[METRICS].observe)
    unsubscribe_traces = gw.recorder.subscribe(app[TRACE_INDEX].on_span)
    yield
    unsubscribe_traces()
    unsubscribe_metrics()
    unsubscribe_writer()


async def _budgeting(app: web.Application) -> AsyncIterator[None]:
    budgets = app[GATEWAY].budgets
    if budgets is not None and isinstance(budgets.state, PostgresBudgetState):
        await budgets.state.open()
    yield
    if budgets is not None:
        await budgets.close()


async def _judging(app: web.Application) -> AsyncIterator[None]:
    service = app[JUDGE]
    service.open()
    unsubscribe = app[GATEWAY].recorder.subscribe_rollouts(service.on_rollout)
    # Verdicts are rewards too: reward subscribers (exporters) hear of them.
    service.store.on_saved = app[GATEWAY].recorder.publish_reward
    service.start_online()
    yield
    unsubscribe()
    await service.close()


async def _exporting(app: web.Application) -> AsyncIterator[None]:
    """Closed first at teardown: what it cannot send in time is counted, and the writer,
    closed last, stores every span either way."""
    gw, exporter = app[GATEWAY], app[OTLP_EXPORTER]
    await exporter.start()
    unsubscribers = [
        gw.recorder.subscribe(exporter.on_span),
        gw.recorder.subscribe_rollouts(exporter.on_rollout),
        gw.recorder.subscribe_rewards(exporter.on_reward),
    ]
    yield
    for unsubscribe in unsubscribers:
        unsubscribe()
    await exporter.close()


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    # Connections are kept per origin and carry no cookies: one pool serves every client, so
    # a cookie an upstream sets for one (OpenAI's edge sets `__cf_bm`) never rides along.
    pool = ConnectionPool(keepalive=60)
    providers: dict[str, Provider] = {
        "openai": OpenAICompatible(pool, max_body_bytes=gw.settings.limits.max_upstream_body_bytes),
        "mock": mock_provider.send,
    }
    translated = None
    wanted = litellm_providers(gw.settings)
    if wanted:
        # Imported at start, on a thread: seconds of import never land on a request.
        await asyncio.to_thread(load_litellm)
        unknown = sorted(name for name in wanted if not is_litellm_provider(name))
        if unknown:
            await pool.close()
            raise ValueError(
                f"unknown providers {unknown}: not `openai`, `mock` or a litellm provider"
            )
        translated = LiteLLMProvider(max_body_bytes=gw.settings.limits.max_upstream_body_bytes)
        providers.update(dict.fromkeys(wanted, translated))
    gw.providers.update(providers)
    yield
    if translated is not None:
        await translated.aclose()
    await pool.close()
