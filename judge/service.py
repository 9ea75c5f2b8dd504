"""Judging inside a running gateway: runs started over the API, and online judging.

Both run as background tasks owned by the service; nothing here is on the request path.
Every run ends `succeeded`, `failed` or `cancelled`: its final state is written again until
the store takes it. Each run names its owner (host, pid, start) and the owner beats for it;
a run whose owner has exited or gone quiet is marked failed by the next gateway to start or
to beat, and a run another live replica is judging is left alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

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
from store.errors import InvalidTransition, StoreBusy, StoreError
from store.schema import TERMINAL_STATUSES
from store.writes import (
    beat_judge_runs,
    fail_abandoned_judge_runs,
    get_judge_run,
    save_judge_run,
)

log = logging.getLogger("spangate.judge")
PROGRESS_EVERY_SECONDS = 0.5
# A locked or busy store: the final state is written again, waiting up to this long between
# tries (each try itself waits out SQLite's busy timeout first).
FINAL_WRITE_BACKOFF_INITIAL = 0.1
FINAL_WRITE_BACKOFF_MAX = 5.0
# How long a cancel request waits for the run to stop and write its final state before it
# answers with the state the run ended in (the row follows once the store takes it).
CANCEL_WAIT_SECONDS = 5.0
# At shutdown, runs get this long to write their final state; a run that cannot is marked
# failed by the next start.
CLOSE_GRACE_SECONDS = 5.0
CANCELLED = "cancelled over the API"
SHUT_DOWN = "the gateway shut down before the run ended"
RESTARTED = "gateway restarted: the process running it ended before the run did"
ABANDONED = "abandoned: the gateway running it stopped saying it still does"
# Each process says this often that its running runs still run (each save says so too); a
# run not heard of for STALE_AFTER_BEATS beats has no process left, and any gateway sharing
# the store marks it failed.
HEARTBEAT_SECONDS = 15.0
STALE_AFTER_BEATS = 4
HOST = socket.gethostname()
# Owners of the judge services open in this process (a test runs several at once).
_LIVE_OWNERS: set[str] = set()


def owner_gone(owner: str) -> bool:
    """True when `owner` (`host:pid:started_ns`) was a process on this host that has exited,
    or a service of this very process that is closed; another host's cannot be known."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, pid_text, _started = parts
    if host != HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in _LIVE_OWNERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, run by another user
        return False
    # Alive, or its pid taken by another process since: the heartbeat tells.
    return False


class RunLimitReached(RuntimeError):
    """As many judge runs as `judge.max_runs` allows are running already."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"{limit} judge run{'s' * (limit != 1)} already running (judge.max_runs); "
            "try again when one has ended, or cancel one"
        )
        self.limit = limit


@dataclass
class ActiveRun:
    """A run this process owns: its row as it will be written, and the task judging."""

    run: dict[str, Any]
    task: asyncio.Task[None] | None = None
    judging: bool = True
    stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        """Cancel the judging (never the final write: that must land)."""
        if self.judging and self.stop_reason is None and self.task is not None:
            self.stop_reason = reason
            self.task.cancel()


def _until_stored(what: str) -> AsyncRetrying:
    """Retries while the store is locked or busy (sqlite3.OperationalError), for as long as
    it takes; the caller's task being cancelled is the only other way out."""

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("%s: the store did not take it (%s); trying again", what, error)

    return AsyncRetrying(
        retry=retry_if_exception_type((sqlite3.OperationalError, StoreBusy)),
        wait=wait_exponential(multiplier=FINAL_WRITE_BACKOFF_INITIAL, max=FINAL_WRITE_BACKOFF_MAX),
        before_sleep=before_sleep,
        reraise=True,
    )


class JudgeService:
    def __init__(
        self,
        settings: JudgeSettings,
        store: JudgeStore | str | Path,
        base_url: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.store = store if isinstance(store, JudgeStore) else JudgeStore(store)
        self.base_url = base_url
        self.http: httpx.AsyncClient | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.active: dict[str, ActiveRun] = {}
        self.started_ns = time.time_ns()
        self.owner = ""
        self._beating: asyncio.Task[None] | None = None
        online = settings.online
        self.queue: asyncio.Queue[str] = asyncio.Queue(online.queue_size if online else 1)
        # Rollouts queued or being judged online.
        self.pending: set[str] = set()
        self.dropped = 0
        self.online_judged = 0

    def open(self) -> None:
        self.http = httpx.AsyncClient()
        self.started_ns = time.time_ns()
        self.owner = f"{HOST}:{os.getpid()}:{self.started_ns}"
        _LIVE_OWNERS.add(self.owner)
        self._spawn(self._end_abandoned_runs())
        # Not among `tasks`: it lasts as long as the service, not as one piece of work.
        self._beating = asyncio.get_running_loop().create_task(self._heartbeat())

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
        if len(self.active) >= self.settings.max_runs:
            raise RunLimitReached(self.settings.max_runs)
        run: dict[str, Any] = {
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
            "total": 0,
            "judged": 0,
            "skipped": 0,
            "failed": 0,
            "results": [],
            "error": None,
            "created_ns": time.time_ns(),
            "ended_ns": None,
            "owner": self.owner,
        }
        run_id = run["id"]
        # The slot is taken before the first await, so concurrent starts cannot all pass
        # the limit check.
        active = self.active[run_id] = ActiveRun(run)
        try:
            await self.store.write(save_judge_run, dict(run))
        except BaseException:
            del self.active[run_id]
            raise
        active.task = self._spawn(self._run(active, judge, selection, concurrency, force))
        active.task.add_done_callback(lambda _: self.active.pop(run_id, None))
        return await self.get_run(run_id)

    async def get_run(self, run_id: str) -> dict[str, Any]:
        return await self.store.read(get_judge_run, run_id)

    async def cancel_run(self, run_id: str) -> dict[str, Any]:
        """Stop a running run; it ends `cancelled`, keeping the verdicts made so far."""
        active = self.active.get(run_id)
        if active is None or not (active.judging or active.stop_reason == CANCELLED):
            run = dict(active.run) if active else await self.get_run(run_id)
            if run["status"] == "running" and active is None:
                raise InvalidTransition(f"judge run {run_id} is not running in this gateway")
            raise InvalidTransition(f"judge run {run_id} has already ended ({run['status']})")
        active.stop(CANCELLED)
        assert active.task is not None
        await asyncio.wait({active.task}, timeout=CANCEL_WAIT_SECONDS)
        if active.task.done():
            return await self.get_run(run_id)
        # Stopped, but the store has not taken the final state yet: answer with what it
        # will hold.
        return {**active.run, "updated_ns": time.time_ns()}

    async def _run(
        self,
        active: ActiveRun,
        judge: Judge,
        selection: Selection,
        concurrency: int,
        force: bool,
    ) -> None:
        run = active.run
        saved_at = time.monotonic()
        progress: asyncio.Task[None] | None = None

        def record(outcome: Outcome) -> None:
            nonlocal saved_at, progress
            run[outcome.status] += 1
            run["results"].append(outcome.__dict__)
            # Progress is saved every so often, so GET /api/judge/runs/{id} shows it; one
            # save at a time, so a locked store does not pile them up.
            due = time.monotonic() - saved_at >= PROGRESS_EVERY_SECONDS
            if due and (progress is None or progress.done()):
                saved_at = time.monotonic()
                progress = self._spawn(self._save_progress(run))

        try:
            ids = await self.store.select(selection)
            run["total"] = len(ids)
            await self._save_progress(run)
            summary = await run_job(
                judge, self.store, ids, concurrency=concurrency, force=force, on_result=record
            )
            run.update(status="succeeded", mean_score=summary.mean_score)
        except asyncio.CancelledError:
            # Cancelled by cancel_run or close (the only ones holding the task): the run
            # still ends with a state, and what was judged so far stays in its results.
            reason = active.stop_reason or SHUT_DOWN
            run.update(status="cancelled" if reason == CANCELLED else "failed", error=reason)
        except Exception as exc:
            log.exception("judge run %s failed", run["id"])
            run.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        active.judging = False
        run["ended_ns"] = time.time_ns()
        await self._save_final(run)
        # Freed as soon as the final state is stored, before anyone can read it there.
        self.active.pop(run["id"], None)

    async def _save_progress(self, run: dict[str, Any]) -> None:
        try:
            await self.store.write(save_judge_run, {**run, "results": list(run["results"])})
        except (sqlite3.OperationalError, StoreBusy) as exc:
            # Progress is a courtesy; the final write, retried, is the one that must land.
            log.info("judge run %s: progress not saved (%s)", run["id"], exc)

    async def _save_final(self, run: dict[str, Any]) -> None:
        retrying = _until_stored(f"judge run {run['id']} ended {run['status']}")
        snapshot = {**run, "results": list(run["results"])}
        try:
            await retrying(self.store.write, save_judge_run, snapshot)
        except Exception:
            # Not a busy store but a broken one: the next start marks the run failed.
            log.exception(
                "judge run %s: its final state %s was not written", run["id"], run["status"]
            )

    async def _end_abandoned_runs(self) -> None:
        """At start: runs no process runs any more (killed, crashed; their heartbeat went
        quiet) are marked failed; a run another live replica is judging is left alone."""
        retrying = _until_stored("marking abandoned judge runs failed")
        ended: int = await retrying(self._fail_abandoned, RESTARTED)
        if ended:
            log.warning("%d judge run(s) left running by a gone process marked failed", ended)

    async def _fail_abandoned(self, reason: str) -> int:
        stale_ns = int(HEARTBEAT_SECONDS * STALE_AFTER_BEATS * 1e9)
        ended: int = await self.store.write(
            lambda db: fail_abandoned_judge_runs(
                db, stale_before_ns=time.time_ns() - stale_ns, gone=owner_gone, reason=reason
            )
        )
        return ended

    async def _heartbeat(self) -> None:
        """Say every HEARTBEAT_SECONDS that this process's runs still run, and end the runs
        whose process stopped saying so (no replica needs to restart for that)."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                if self.active:
                    await self.store.write(beat_judge_runs, self.owner)
                ended = await self._fail_abandoned(ABANDONED)
            except (sqlite3.OperationalError, StoreError) as exc:
                # The next beat tries again, well within the time a run is deemed gone.
                log.info("judge runs' heartbeat not saved (%s)", exc)
                continue
            if ended:
                log.warning("%d judge run(s) whose gateway went quiet marked failed", ended)

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
        rollout_id = rollout["id"]
        # Any later update of a finished rollout (its metadata, tags) is published too: one
        # already waiting or being judged is not queued again (once judged, its verdict
        # makes a later queueing a skip).
        if rollout_id in self.pending:
            return
        try:
            self.queue.put_nowait(rollout_id)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("online judge queue full; rollout %s not judged", rollout_id)
            return
        self.pending.add(rollout_id)

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
                self.pending.discard(rollout_id)
                self.queue.task_done()

    async def close(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            await asyncio.gather(self._beating, return_exceptions=True)
        for active in list(self.active.values()):
            active.stop(SHUT_DOWN)
        runs = [active.task for active in self.active.values() if active.task is not None]
        if runs:
            # Each run writes its final state as it stops; past the grace the next start
            # marks the ones that could not failed.
            await asyncio.wait(runs, timeout=CLOSE_GRACE_SECONDS)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
        # Only now: a run that could not write its final state is this closed owner's,
        # which a later start in this process may mark failed.
        _LIVE_OWNERS.discard(self.owner)
        await asyncio.to_thread(self.store.close)
