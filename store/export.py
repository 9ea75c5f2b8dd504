"""Export recorded rollouts for training and analysis: whole rollouts (attempts, calls,
rewards) as JSON objects, or one prompt/completion/reward triplet per call."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any, Unpack

import orjson
from sqlite_utils import Database

from store.backend import dialect_of, json_table
from store.errors import NotFound
from store.packed import unpack_floats, unpack_ints
from store.queries import RolloutFilters, decode_row, given, is_model_call

ROLLOUT_BATCH = 200
DEFAULT_REWARD_NAME = "reward"
# Operations whose request/answer pair is a prompt and a completion; embeddings are not.
TRIPLET_OPERATIONS = frozenset({"chat", "responses", "text_completion"})

TRIPLET_REWARD_RULE = """\
A call's reward is the first found of the following, counting only rewards with the
chosen name (default "reward") and taking the latest (by created_ns, then insertion
order) where several qualify:
  1. span:          a reward on the call itself (span_id = the call);
  2. attempt_final: the final reward of the call's attempt (final = 1, no span_id);
  3. attempt:       any reward of the call's attempt (no span_id);
  4. rollout_final: the final reward of the rollout (final = 1, no attempt_id, no span_id);
  5. none:          reward and reward_source are null.
A reward on one call never counts for another call of the same attempt.

How a reward found at 2-4 (an attempt's or the rollout's) is spread over the turns of the
attempt (its chat/responses/completion calls in seq order; calls without an attempt form
one group), chosen with reward_rule:
  every:      every turn gets it (the default);
  last:       only the last turn gets it, earlier turns get null;
  discounted: a turn with k later turns gets reward * gamma**k.
A reward on the call itself (1) is always the call's, whatever the rule."""

REWARD_RULES = ("every", "last", "discounted")
DEFAULT_GAMMA = 1.0

# Keyset paging on (created_ns, rowid): the rowid breaks ties in time, so no rollout is
# skipped or repeated between pages, and the rollouts_created index (which holds the rowid)
# serves it.
ROLLOUTS_PAGE_SQL = """
select rowid as _rowid, *
from rollouts
where (created_ns, rowid) > (:after_created_ns, :after_rowid)
  and (:rollout_ids is null or id in (select value from {ids}))
  and (:since_ns is null or created_ns >= :since_ns)
  and (:until_ns is null or created_ns < :until_ns)
  and (:status is null or status = :status)
  and (:agent is null or agent = :agent)
order by created_ns, rowid
limit :limit
"""

# Spans of one page, grouped by the page's order (json_each's key) and in seq order within
# a rollout, so the cursor can be consumed one rollout at a time.
BATCH_SPANS_SQL = """
select s.*
from {batch}
join spans s on s.rollout_id = batch.value
order by batch.key, s.seq, s.start_ns, s.span_id
"""

BATCH_ATTEMPTS_SQL = """
select *
from attempts
where rollout_id in (select value from {ids})
order by rollout_id, number
"""

BATCH_REWARDS_SQL = """
select rowid as _rowid, *
from rewards
where rollout_id in (select value from {ids})
order by created_ns, rowid
"""

EXISTING_ROLLOUTS_SQL = """
select id from rollouts
where id in (select value from {ids})
"""

Row = dict[str, Any]


class ExportFilters(RolloutFilters, total=False):
    """What selects the rollouts of an export: the common filters, and any of some ids."""

    rollout_ids: Sequence[str] | None


# -- rollouts --------------------------------------------------------------------------


@dataclass
class _Part:
    """One rollout as read: its row, attempts, calls in seq order and rewards (all decoded)."""

    rollout: Row
    attempts: list[Row]
    calls: list[Row]
    rewards: list[Row]


@lru_cache(maxsize=32)
def _sql(sql: str, dialect: str) -> str:
    return sql.replace("{ids}", json_table(dialect, ":rollout_ids", "ids")).replace(
        "{batch}", json_table(dialect, ":rollout_ids", "batch")
    )


def _rows(db: Database, sql: str, params: dict[str, Any]) -> Iterator[Row]:
    """Rows streamed from the cursor (an export can be larger than memory)."""
    cursor = db.execute(_sql(sql, dialect_of(db)), params)
    names = [d[0] for d in cursor.description]
    for row in cursor:
        yield dict(zip(names, row, strict=True))


def _decode(row: Row) -> Row:
    out = decode_row(row)
    out.pop("_rowid", None)
    return out


def _ids_json(rollout_ids: Sequence[str]) -> str:
    # A bare string is a Sequence[str] too; taken as a list of characters it would match nothing.
    if isinstance(rollout_ids, str):
        raise TypeError("rollout_ids must be a list of ids, not a string")
    return orjson.dumps(list(rollout_ids)).decode()


def _iter_parts(db: Database, filters: ExportFilters, batch_size: int) -> Iterator[_Part]:
    params = given(filters, ExportFilters.__optional_keys__)
    rollout_ids = params["rollout_ids"]
    params.update(
        rollout_ids=_ids_json(rollout_ids) if rollout_ids is not None else None,
        limit=batch_size,
        after_created_ns=-1,
        after_rowid=0,
    )
    while True:
        page = list(_rows(db, ROLLOUTS_PAGE_SQL, params))
        if not page:
            return
        yield from _iter_page(db, page)
        if len(page) < batch_size:
            return
        params["after_created_ns"] = page[-1]["created_ns"]
        params["after_rowid"] = page[-1]["_rowid"]


def _iter_page(db: Database, page: list[Row]) -> Iterator[_Part]:
    ids = orjson.dumps([r["id"] for r in page]).decode()
    spans = _rows(db, BATCH_SPANS_SQL, {"rollout_ids": ids})
    # Spans are read first: attempts and rewards are committed with or before the spans that
    # name them, so reading those second never misses an attempt a span points to.
    pending = next(spans, None)
    attempts: dict[str, list[Row]] = {}
    for row in _rows(db, BATCH_ATTEMPTS_SQL, {"rollout_ids": ids}):
        attempts.setdefault(row["rollout_id"], []).append(_decode(row))
    rewards: dict[str, list[Row]] = {}
    for row in _rows(db, BATCH_REWARDS_SQL, {"rollout_ids": ids}):
        rewards.setdefault(row["rollout_id"], []).append(_decode(row))
    for rollout in page:
        rid = rollout["id"]
        calls: list[Row] = []
        while pending is not None and pending["rollout_id"] == rid:
            calls.append(decode_row(pending))
            pending = next(spans, None)
        yield _Part(_decode(rollout), attempts.get(rid, []), calls, rewards.get(rid, []))


def _nest(part: _Part) -> Row:
    rollout = dict(part.rollout)
    attempts = {a["id"]: {**a, "calls": [], "rewards": []} for a in part.attempts}
    unattributed: list[Row] = []
    for call in part.calls:
        owner = attempts.get(call["attempt_id"])
        (owner["calls"] if owner else unattributed).append(call)
    rollout_rewards: list[Row] = []
    for reward in part.rewards:
        owner = attempts.get(reward["attempt_id"])
        # Rewards on calls outside any attempt stay at the rollout level (they keep span_id).
        (owner["rewards"] if owner else rollout_rewards).append(reward)
    rollout["attempts"] = list(attempts.values())
    rollout["rewards"] = rollout_rewards
    rollout["unattributed_calls"] = unattributed
    return rollout


def iter_rollouts(
    db: Database, *, batch_size: int = ROLLOUT_BATCH, **filters: Unpack[ExportFilters]
) -> Iterator[Row]:
    """Each matching rollout as one JSON-ready object, oldest first, read page by page.

    Filters combine with AND: `rollout_ids` (any of), `since_ns` <= created_ns < `until_ns`,
    `status`, `agent`. An object holds the rollout's columns (JSON ones decoded) and
    `attempts` (by number, each with `calls` in seq order, bodies decoded, and `rewards` on
    the attempt or its calls), `rewards` (those not tied to an attempt) and
    `unattributed_calls` (calls without an attempt). Rewards are oldest first. Calls that
    belong to no rollout are not exported.
    """
    for part in _iter_parts(db, filters, batch_size):
        yield _nest(part)


def export_rollout(db: Database, rollout_id: str) -> Row:
    """One rollout shaped as `iter_rollouts` shapes it; NotFound if there is none."""
    for rollout in iter_rollouts(db, rollout_ids=[rollout_id]):
        return rollout
    raise NotFound(f"rollout {rollout_id!r} not found")


def missing_rollouts(db: Database, rollout_ids: Sequence[str]) -> list[str]:
    """The ids among `rollout_ids` that name no rollout, in the order given."""
    ids = _ids_json(rollout_ids)
    found = {row["id"] for row in _rows(db, EXISTING_ROLLOUTS_SQL, {"rollout_ids": ids})}
    return [rid for rid in dict.fromkeys(rollout_ids) if rid not in found]


# -- triplets --------------------------------------------------------------------------


def _prompt(operation: str, request: Any) -> Any:
    if not isinstance(request, dict):
        return None
    key = {"chat": "messages", "responses": "input", "text_completion": "prompt"}[operation]
    return request.get(key)


def _completion(operation: str, response: Any) -> Any:
    if not isinstance(response, dict):
        return None
    if operation == "responses":
        if "output" in response:
            return response["output"]
        if response.get("output_text"):
            # A stream that ended before `response.completed` keeps only the text deltas.
            return [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": response["output_text"]}],
                }
            ]
        return None
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    if operation == "chat":
        return choices[0].get("message")
    return choices[0].get("text")


class _RewardIndex:
    """A rollout's rewards of one name, sorted by level as the triplet rule needs them."""

    def __init__(self, rewards: Iterable[Row], name: str) -> None:
        self.by_span: dict[str, Row] = {}
        self.by_attempt: dict[str, Row] = {}
        self.final_by_attempt: dict[str, Row] = {}
        self.rollout_final: Row | None = None
        # Rewards arrive oldest first, so a later one simply overwrites an earlier one.
        for reward in rewards:
            if reward["name"] != name:
                continue
            if reward["span_id"] is not None:
                self.by_span[reward["span_id"]] = reward
            elif reward["attempt_id"] is not None:
                self.by_attempt[reward["attempt_id"]] = reward
                if reward["final"]:
                    self.final_by_attempt[reward["attempt_id"]] = reward
            elif reward["final"]:
                self.rollout_final = reward

    def pick(self, span_id: str, attempt_id: str | None) -> tuple[Row | None, str | None]:
        if span_id in self.by_span:
            return self.by_span[span_id], "span"
        if attempt_id is not None:
            if attempt_id in self.final_by_attempt:
                return self.final_by_attempt[attempt_id], "attempt_final"
            if attempt_id in self.by_attempt:
                return self.by_attempt[attempt_id], "attempt"
        if self.rollout_final is not None:
            return self.rollout_final, "rollout_final"
        return None, None


def _assigned(value: float, source: str | None, later_turns: int, rule: str, gamma: float) -> Any:
    """The share of a reward a turn gets under `rule` (TRIPLET_REWARD_RULE)."""
    if source == "span" or rule == "every":
        return value
    if rule == "last":
        return value if later_turns == 0 else None
    return value * gamma**later_turns


def _triplet(
    call: Row,
    rewards: _RewardIndex,
    later_turns: int = 0,
    rule: str = "every",
    gamma: float = DEFAULT_GAMMA,
) -> Row:
    operation = call["operation"]
    request = call["request_body"]
    reward, source = rewards.pick(call["span_id"], call["attempt_id"])
    reasons = call["finish_reasons"]
    value = _assigned(float(reward["value"]), source, later_turns, rule, gamma) if reward else None
    return {
        "rollout_id": call["rollout_id"],
        "attempt_id": call["attempt_id"],
        "span_id": call["span_id"],
        "seq": call["seq"],
        "operation": operation,
        "model": call["response_model"] or call["request_model"],
        "instructions": request.get("instructions") if isinstance(request, dict) else None,
        "prompt": _prompt(operation, request),
        "tools": (request.get("tools") or None) if isinstance(request, dict) else None,
        "completion": _completion(operation, call["response_body"]),
        "reward": value,
        "reward_source": source,
        "reward_name": reward["name"] if reward else None,
        "reward_id": reward["id"] if reward else None,
        "finish_reason": reasons[0] if isinstance(reasons, list) and reasons else None,
        "usage": {"input_tokens": call["input_tokens"], "output_tokens": call["output_tokens"]},
        "status": call["status"],
        "model_version": call.get("model_version"),
        "mode": call.get("mode"),
        "prompt_token_ids": unpack_ints(call.get("prompt_token_ids")),
        "response_token_ids": unpack_ints(call.get("completion_token_ids")),
        "logprobs": unpack_floats(call.get("logprobs")),
    }


def iter_triplets(
    db: Database,
    *,
    reward_name: str = DEFAULT_REWARD_NAME,
    reward_rule: str = "every",
    gamma: float = DEFAULT_GAMMA,
    model_version: str | None = None,
    with_reward: bool = False,
    batch_size: int = ROLLOUT_BATCH,
    **filters: Unpack[ExportFilters],
) -> Iterator[Row]:
    """One object per chat, responses or text-completion call of the matching rollouts.

    Besides prompt and completion, each carries `prompt_token_ids`, `response_token_ids`
    and `logprobs` (null unless the deployment recorded them), `model_version` and `mode`.
    `model_version` keeps only calls served by that version; `with_reward` only calls
    that got a reward. `reward_rule` and `gamma` spread an attempt's or rollout's reward
    over its turns (TRIPLET_REWARD_RULE).

    Filters are those of `iter_rollouts` (they select rollouts). Calls come rollout by
    rollout, in seq order; embeddings are skipped, failed calls are kept (`status`
    "error", `completion` null). `prompt` is the request's `messages` (chat), `input`
    (responses; `instructions` beside it) or `prompt` (completions); `completion` is
    `choices[0].message`, the response's `output` items, or `choices[0].text`.

    The reward (TRIPLET_REWARD_RULE) counts only rewards named `reward_name` and takes, the
    latest first: the call's own reward ("span"); else its attempt's final reward
    ("attempt_final"); else its attempt's latest reward ("attempt"); else the rollout's
    final reward ("rollout_final"); else null. A reward on one call never counts for
    another call of the same attempt.
    """
    for part in _iter_parts(db, filters, batch_size):
        if reward_rule not in REWARD_RULES:
            raise ValueError(f"reward_rule must be one of {', '.join(REWARD_RULES)}")
        rewards = _RewardIndex(part.rewards, reward_name)
        # An agent's own spans (OTLP ingest) may name a chat operation, but hold no turn.
        turns = [
            call
            for call in part.calls
            if call["operation"] in TRIPLET_OPERATIONS and is_model_call(call)
        ]
        remaining: dict[Any, int] = {}
        for call in turns:
            remaining[call["attempt_id"]] = remaining.get(call["attempt_id"], 0) + 1
        for call in turns:
            remaining[call["attempt_id"]] -= 1
            if model_version is not None and call.get("model_version") != model_version:
                continue
            triplet = _triplet(call, rewards, remaining[call["attempt_id"]], reward_rule, gamma)
            if with_reward and triplet["reward"] is None:
                continue
            yield triplet


def write_jsonl(items: Iterable[Any], fp: IO[bytes]) -> int:
    """Write each item as one JSON line to a binary file; returns how many were written."""
    count = 0
    for item in items:
        fp.write(orjson.dumps(item, option=orjson.OPT_APPEND_NEWLINE))
        count += 1
    return count


# Column types of the Parquet export: token ids and logprobs as typed lists, the nested
# JSON parts (prompt, completion, tools, usage) as JSON text.
_PARQUET_JSON = ("instructions", "prompt", "tools", "completion", "usage")


def write_parquet(triplets: Iterable[Row], path: str, *, batch_rows: int = 10_000) -> int:
    """Write triplets to a Parquet file in row groups of `batch_rows`; returns how many.

    Needs pyarrow (`pip install 'spangate[parquet]'`); ImportError otherwise.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("rollout_id", pa.string()),
            ("attempt_id", pa.string()),
            ("span_id", pa.string()),
            ("seq", pa.int64()),
            ("operation", pa.string()),
            ("model", pa.string()),
            ("model_version", pa.string()),
            ("mode", pa.string()),
            *((name, pa.string()) for name in _PARQUET_JSON),
            ("prompt_token_ids", pa.list_(pa.int32())),
            ("response_token_ids", pa.list_(pa.int32())),
            ("logprobs", pa.list_(pa.float32())),
            ("reward", pa.float64()),
            ("reward_source", pa.string()),
            ("reward_name", pa.string()),
            ("reward_id", pa.string()),
            ("finish_reason", pa.string()),
            ("status", pa.string()),
        ]
    )
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[Row] = []
        for triplet in triplets:
            row = dict(triplet)
            for name in _PARQUET_JSON:
                value = row.get(name)
                row[name] = None if value is None else orjson.dumps(value).decode()
            batch.append(row)
            if len(batch) >= batch_rows:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
