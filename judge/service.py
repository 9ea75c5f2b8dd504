"""Judging inside a running gateway: runs started over the API, and online judging.

Both run as background tasks owned by the service; nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from config.models import JudgeSettings
from judge.jobs import (
    Judge,
    JudgeStore,
    Outcome,
    Selection,
    client_factory,
    judge_one,
    make_judge,
    run_job,
    sampled,
)
from store.schema import TERMINAL_STATUSES
from store.writes import get_judge_run, save_judge_run

log = logging.getLogger("spangate.judge")
PROGRESS_EVERY_SECONDS = 0.5


class JudgeService:
    def __init__(
        self, settings: JudgeSettings, db_path: str | Path, base_url: Callable[[], str]
    ) -> None:
        self.settings = settings
        self.store = JudgeStore(db_path)
        self.base_url = base_url
        self.http: httpx.AsyncClient | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        online = settings.online
        self.queue: asyncio.Queue[str] = asyncio.Queue(online.queue_size if online else 1)
        self.dropped = 0
        self.online_judged = 0

    def open(self) -> None:
        self.http = httpx.AsyncClient()

    def judge(self, name: str) -> Judge:
        assert self.http is not None, "JudgeService.open() first"
        return make_judge(
            name, self.settings, client_factory(self.settings, self.base_url, self.http)
        )

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- runs over the API ------------------------------------------------

    async def start_run(
        self, judge_name: str, selection: Selection, *, concurrency: int, force: bool
    ) -> dict[str, Any]:
        judge = self.judge(judge_name)  # unknown judge: ValueError before anything starts
        run = {
            "id": f"jr-{uuid.uuid4().hex[:16]}",
            "status": "running",
            "judge": judge.name,
            "params": {
                "rollout_ids": selection.rollout_ids,
                "since_ns": selection.since_ns,
                "status": selection.status,
                "agent": selection.agent,
                "sample": selection.sample,
                "concurrency": concurrency,
                "force": force,
                "version": judge.version,
            },
        }
        await self.store._run(save_judge_run, run)
        self._spawn(self._run(run, judge, selection, concurrency, force))
        return await self.get_run(run["id"])

    async def get_run(self, run_id: str) -> dict[str, Any]:
        return await self.store._run(get_judge_run, run_id)

    async def _run(
        self, run: dict[str, Any], judge: Judge, selection: Selection, concurrency: int, force: bool
    ) -> None:
        try:
            ids = await self.store.select(selection)
            run["total"] = len(ids)
            await self.store._run(save_judge_run, dict(run))
            counts = {"judged": 0, "skipped": 0, "failed": 0}
            results: list[dict[str, Any]] = []
            saved_at = time.monotonic()

            def record(outcome: Outcome) -> None:
                nonlocal saved_at
                counts[outcome.status] += 1
                results.append(outcome.__dict__)
                # Progress is saved every so often, so GET /api/judge/runs/{id} shows it.
                if time.monotonic() - saved_at >= PROGRESS_EVERY_SECONDS:
                    saved_at = time.monotonic()
                    snapshot = {**run, **counts, "results": list(results)}
                    self._spawn(self.store._run(save_judge_run, snapshot))

            summary = await run_job(
                judge, self.store, ids, concurrency=concurrency, force=force, on_result=record
            )
            run.update(counts, results=results, status="completed", mean_score=summary.mean_score)
        except Exception as exc:
            log.exception("judge run %s failed", run["id"])
            run.update(status="failed", error=str(exc))
        run["ended_ns"] = time.time_ns()
        await self.store._run(save_judge_run, run)

    # -- online judging ---------------------------------------------------

    def on_rollout(self, rollout: dict[str, Any]) -> None:
        """Recorder subscriber: queue a finished rollout; never waits."""
        online = self.settings.online
        if online is None or rollout.get("status") not in online.on:
            return
        if rollout.get("status") not in TERMINAL_STATUSES or not sampled(
            rollout["id"], online.sample
        ):
            return
        try:
            self.queue.put_nowait(rollout["id"])
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("online judge queue full; rollout %s not judged", rollout["id"])

    def start_online(self) -> None:
        online = self.settings.online
        if online is None:
            return
        judge = self.judge(online.judge)
        for _ in range(online.concurrency):
            self._spawn(self._online_worker(judge))

    async def _online_worker(self, judge: Judge) -> None:
        while True:
            rollout_id = await self.queue.get()
            try:
                outcome = await judge_one(judge, self.store, rollout_id)
                if outcome.status == "judged":
                    self.online_judged += 1
                elif outcome.status == "failed":
                    log.warning("online judge failed on %s: %s", rollout_id, outcome.error)
            except Exception:
                log.exception("online judge crashed on %s", rollout_id)
            finally:
                self.queue.task_done()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
        self.store.close()
