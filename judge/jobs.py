"""Judge jobs: pick rollouts, judge each once per judge and rubric version, store verdicts.

Each verdict is written as soon as it is made, under an id derived from the judge,
rubric version and rollout, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from config.models import JudgeSettings, RecorderSettings
from judge.llm import JudgeClient, JudgeModelError, judge_llm, judge_rollout_id
from judge.rubric import DEFAULT_RUBRIC, Rubric, load_rubric
from judge.rules import RULES_VERSION, Peers, judge_rules
from judge.trajectory import Trajectory, load_trajectory
from judge.verdict import Verdict, as_reward, reward_id
from store.errors import Conflict, InvalidTransition, NotFound, StoreError
from store.reader import Reader
from store.writer import StoreWriter
from store.writes import add_reward, create_rollout, replace_reward, update_rollout

log = logging.getLogger("spangate.judge")

SELECT_ROLLOUTS_SQL = """
select id from rollouts
where id not like 'judge-%'
  and (agent is null or agent not like 'judge-%')
  and (:since_ns is null or created_ns >= :since_ns)
  and (:status is null or status = :status)
  and (:agent is null or agent = :agent)
order by created_ns, id
"""

PEERS_SQL = """
select
  coalesce(sum(s.input_tokens), 0) + coalesce(sum(s.output_tokens), 0) as tokens,
  coalesce(sum(s.duration_ms), 0) as duration_ms
from rollouts r join spans s on s.rollout_id = r.id
where r.agent is not distinct from :agent and r.id not like 'judge-%'
group by r.id
"""


@dataclass
class Selection:
    rollout_ids: list[str] | None = None
    since_ns: int | None = None
    status: str | None = None
    agent: str | None = None
    sample: float | None = None


def sampled(rollout_id: str, share: float | None) -> bool:
    """A stable choice per rollout, so a rerun with the same share picks the same rollouts."""
    if share is None or share >= 1:
        return True
    digest = hashlib.sha256(rollout_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def first_open_run(db: Any, judge: str, about: str) -> int:
    """The first run of `judge` about `about` whose rollout has not ended: an ended one keeps
    the status its judgement gave it, and a new judgement's calls get a rollout of their own."""
    run = 1
    while db.execute(
        "select 1 from rollouts where id = :id and ended_ns is not null",
        {"id": judge_rollout_id(judge, about, run)},
    ).fetchone():
        run += 1
    return run


def open_writer(db: str | Path) -> StoreWriter:
    """A store writer of its own, for a judge job run outside a gateway (the CLI)."""
    writer = StoreWriter.tuned(db, RecorderSettings())
    writer.start()
    return writer


class JudgeStore:
    """The judge's reads, on the store's read threads, and its writes, through the store's
    single writer (so verdicts queue behind the spans they judge, on either backend).

    Inside a gateway it shares the gateway's reader and writer; given a path or URL (the
    CLI, tests) it opens and owns its own.
    """

    def __init__(
        self,
        db: str | Path | None = None,
        *,
        reader: Reader | None = None,
        writer: StoreWriter | None = None,
    ) -> None:
        self._owned = reader is None or writer is None
        if reader is None or writer is None:
            if db is None:
                raise ValueError("JudgeStore needs a database, or a reader and a writer")
            writer = open_writer(db)
            reader = Reader(db)
        self.reader = reader
        self.writer = writer
        # Told of each stored verdict (the gateway exports them as evaluation events).
        self.on_saved: Callable[[dict[str, Any]], None] | None = None

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(db, *args)` on a read connection."""
        return await self.reader.run(fn, *args)

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(db, *args)` on the writer thread, after everything queued before it."""
        return await self.writer.execute(lambda db: fn(db, *args))

    async def select(self, selection: Selection) -> list[str]:
        if selection.rollout_ids is not None:
            # A list names exactly these: an empty one is none, never every rollout.
            ids = list(dict.fromkeys(selection.rollout_ids))
        else:

            def query(db: Any) -> list[str]:
                params = {
                    "since_ns": selection.since_ns,
                    "status": selection.status,
                    "agent": selection.agent,
                }
                return [row[0] for row in db.execute(SELECT_ROLLOUTS_SQL, params).fetchall()]

            ids = await self.read(query)
        return [rid for rid in ids if sampled(rid, selection.sample)]

    async def load(self, rollout_id: str) -> Trajectory:
        return await self.read(load_trajectory, rollout_id)

    async def judged(self, reward: str) -> bool:
        def exists(db: Any) -> bool:
            return db.execute("select 1 from rewards where id = ?", [reward]).fetchone() is not None

        return await self.read(exists)

    async def peers(self, agent: str | None) -> Peers:
        def query(db: Any) -> Peers:
            rows = db.execute(PEERS_SQL, {"agent": agent}).fetchall()
            return Peers(tokens=[r[0] for r in rows], durations_ms=[r[1] for r in rows])

        return await self.read(query)

    async def save(self, verdict: Verdict, *, force: bool) -> dict[str, Any]:
        reward = as_reward(verdict)

        def write(db: Any) -> dict[str, Any]:
            if force:
                return replace_reward(db, reward)
            return add_reward(db, reward)[0]

        stored = await self.write(write)
        if self.on_saved is not None:
            self.on_saved(stored)
        return stored

    async def judge_run(self, judge: str, about: str) -> int:
        return int(await self.read(first_open_run, judge, about))

    async def end_judge_rollout(
        self, rollout_id: str, status: str, *, agent: str, judged: str
    ) -> None:
        """End the rollout the judge's calls were recorded under (made here when its calls
        are not stored yet: they then join it, and it stays ended)."""

        def end(db: Any) -> None:
            # As the judge's calls label it (judge.llm.JudgeClient's headers).
            create_rollout(
                db,
                rollout_id=rollout_id,
                agent=agent,
                tags=["judge"],
                metadata={"judged": judged[:200]},
            )
            with contextlib.suppress(InvalidTransition):
                # Ended already: two judgements raced for one run; the first one's status stands.
                update_rollout(db, rollout_id, status=status)

        try:
            await self.write(end)
        except (StoreError, sqlite3.OperationalError) as exc:
            # Only housekeeping: the judgement itself stands.
            log.warning("judge rollout %s not ended: %s", rollout_id, exc)

    def close(self) -> None:
        """Close the reader and writer it opened itself (a gateway closes its own)."""
        if self._owned:
            self.writer.close()
            self.reader.close()


@dataclass
class Judge:
    name: str
    version: str
    needs_model: bool
    run: Callable[[Trajectory, JudgeStore], Awaitable[Verdict]]


def make_judge(
    name: str, settings: JudgeSettings, client_factory: Callable[[], JudgeClient] | None = None
) -> Judge:
    """`rules`, `llm` (the default rubric), or a rubric named in `judge.rubrics`."""
    if name == "rules":

        async def rules(t: Trajectory, store: JudgeStore) -> Verdict:
            return judge_rules(t, await store.peers(t.agent))

        return Judge("rules", RULES_VERSION, False, rules)
    if name == "llm":
        rubric: Rubric = DEFAULT_RUBRIC
    elif name in settings.rubrics:
        rubric = load_rubric(settings.rubrics[name], name=name)
    else:
        known = ", ".join(["rules", "llm", *settings.rubrics])
        raise ValueError(f"unknown judge {name!r}; known: {known}")
    if client_factory is None:
        raise ValueError(f"judge {name!r} needs a judge model: set `judge.model` in the config")

    async def llm(t: Trajectory, store: JudgeStore) -> Verdict:
        # The judge's own calls are recorded under a rollout of their own, which ends with
        # the judgement so retention ages it out like any other.
        run = await store.judge_run(rubric.name, t.rollout_id)
        own, agent = judge_rollout_id(rubric.name, t.rollout_id, run), f"judge-{rubric.name}"

        async def end(status: str) -> None:
            await store.end_judge_rollout(own, status, agent=agent, judged=t.rollout_id)

        client = client_factory()
        # The client's calls resolve the same run: nothing ends it before `end` below.
        client.run_of = store.judge_run
        try:
            verdict = await judge_llm(
                t,
                rubric,
                client,
                budget_tokens=settings.budget_tokens,
                max_invalid_retries=settings.max_invalid_retries,
            )
        except asyncio.CancelledError:
            # A cancelled judgement leaves no judge rollout running for ever; shielded, as
            # the task that ends it is being cancelled.
            await asyncio.shield(end("cancelled"))
            raise
        except Exception:
            await end("failed")
            raise
        await end("succeeded")
        return verdict

    return Judge(rubric.name, rubric.fingerprint(), True, llm)


def client_factory(
    settings: JudgeSettings, base_url: str | Callable[[], str], http: httpx.AsyncClient
) -> Callable[[], JudgeClient] | None:
    """Clients for the judge model; `judge.gateway_url` wins over the given address.

    The address may be a callable: a gateway judging online knows its own address only
    once it listens, after the judge is set up.
    """
    if not settings.model:
        return None
    model, key = settings.model, settings.api_key

    def make() -> JudgeClient:
        url = settings.gateway_url or (base_url() if callable(base_url) else base_url)
        return JudgeClient(url, model, http, key)

    return make


@dataclass
class Outcome:
    rollout_id: str
    status: str  # judged | skipped | failed
    score: float | None = None
    error: str | None = None
    summary: str | None = None


@dataclass
class JobSummary:
    judge: str
    version: str
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def mean_score(self) -> float | None:
        scores = [o.score for o in self.outcomes if o.score is not None and o.status == "judged"]
        return sum(scores) / len(scores) if scores else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "judge": self.judge,
            "version": self.version,
            "judged": self.count("judged"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "mean_score": self.mean_score,
            "seconds": round(time.monotonic() - self.started, 3),
            "results": [o.__dict__ for o in self.outcomes],
        }


async def judge_one(
    judge: Judge, store: JudgeStore, rollout_id: str, *, force: bool = False
) -> Outcome:
    if not force and await store.judged(reward_id(judge.name, judge.version, rollout_id)):
        return Outcome(rollout_id, "skipped")
    try:
        trajectory = await store.load(rollout_id)
        verdict = await judge.run(trajectory, store)
        await store.save(verdict, force=force)
    except Conflict:
        # Judged meanwhile by someone else (online judging racing a job): nothing to redo.
        return Outcome(rollout_id, "skipped")
    except (NotFound, JudgeModelError) as exc:
        return Outcome(rollout_id, "failed", error=str(exc))
    except Exception as exc:
        # One broken rollout must not sink the others in the job.
        log.exception("judging %s failed", rollout_id)
        return Outcome(rollout_id, "failed", error=f"{type(exc).__name__}: {exc}")
    return Outcome(rollout_id, "judged", score=verdict.score, summary=verdict.summary)


async def run_job(
    judge: Judge,
    store: JudgeStore,
    rollout_ids: list[str],
    *,
    concurrency: int = 4,
    force: bool = False,
    on_result: Callable[[Outcome], None] | None = None,
) -> JobSummary:
    summary = JobSummary(judge.name, judge.version)
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(rollout_id: str) -> None:
        async with gate:
            outcome = await judge_one(judge, store, rollout_id, force=force)
        summary.outcomes.append(outcome)
        if on_result is not None:
            on_result(outcome)

    await asyncio.gather(*(one(rid) for rid in rollout_ids))
    return summary
