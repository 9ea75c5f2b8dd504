"""Keeps the proxy's experiments in step with the store: configuration saved at start,
assignments and rewards rebuilt, then promote/stop decisions and rewards written elsewhere
(the CLI, other replicas) picked up every `experiment_refresh` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from sqlite_utils import Database

from gateway.proxy.experiments import Experiments, VariantClaim
from gateway.web.state import GATEWAY, Gateway
from store import experiments as stored
from store.errors import NotFound

log = logging.getLogger("spangate.experiments")

GuidelineReader = Callable[[Database, str, int], dict[str, Any]]


def attach_experiments(
    app: web.Application,
    read_guideline: GuidelineReader,
    claim_variant: VariantClaim | None = None,
) -> None:
    """Give the gateway its experiments, and keep them in step while the app runs;
    `claim_variant` is where replicas agree on each rollout's drawn variant."""
    gw = app[GATEWAY]

    async def guideline(agent: str, version: int) -> str | None:
        try:
            row = await gw.reader.run(read_guideline, agent, version)
        except NotFound:
            return None
        return str(row["content"])

    async def assigned(experiment: str, rollout_id: str) -> str | None:
        return await gw.reader.run(stored.rollout_variant, experiment, rollout_id)

    gw.experiments = Experiments(
        gw.settings.experiments,
        guideline=guideline,
        assigned=assigned,
        claim_variant=claim_variant,
    )
    # Also with none configured: the stored ones are then marked removed.
    app.cleanup_ctx.append(_syncing)


def _reward_names(gw: Gateway) -> list[str]:
    return sorted({experiment.reward for experiment in gw.settings.experiments})


async def _syncing(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    configs = [e.model_dump(mode="json") for e in gw.settings.experiments]
    await gw.writer.execute(lambda db: stored.save_configs(db, configs))
    if not configs:
        yield
        return
    names = _reward_names(gw)
    # Taken first: a reward stored while the rest is read is counted by the loop, not lost.
    last = await gw.reader.run(stored.last_reward_rowid)
    assigned = await gw.reader.run(stored.assignments)
    rewards = await gw.reader.run(stored.rewards_after, 0, names)
    gw.experiments.rebuild(assigned, [r for r in rewards if r["rowid"] <= last])
    gw.experiments.set_decisions(await gw.reader.run(stored.decisions))
    unsubscribe = gw.recorder.subscribe_rewards(gw.experiments.on_reward)
    task = asyncio.create_task(_refresh(gw, last, names), name="experiment-sync")
    yield
    unsubscribe()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _refresh(gw: Gateway, last: int, names: list[str]) -> None:
    while True:
        await asyncio.sleep(gw.settings.experiment_refresh)
        try:
            gw.experiments.set_decisions(await gw.reader.run(stored.decisions))
            # Rewards the bus already brought count once: a unit's newest reward replaces
            # its earlier one.
            rewards = await gw.reader.run(stored.rewards_after, last, names)
            unknown = gw.experiments.unknown_units(rewards)
            if unknown:
                # Rollouts another replica assigned: their rewards count here too.
                gw.experiments.learn(await gw.reader.run(stored.unit_assignments, unknown))
            for reward in rewards:
                gw.experiments.on_reward(reward)
                last = max(last, reward["rowid"])
        except Exception:
            # A locked or busy store now is no reason to stop looking later.
            log.exception("could not refresh experiments from the store")
