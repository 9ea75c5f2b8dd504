"""Per-rollout sequence numbers and current attempt, so the order of calls never depends on
clocks; numbers keep rising across restarts and evictions (the lookup says where to resume)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.proxy.shared_guard import SHARED_RETRY_SECONDS, SHARED_TIMEOUT, SharedGuard

DEFAULT_ATTEMPT_ID = "1"
# A shared counter slower than SHARED_TIMEOUT, or failing, makes calls number locally for
# this long.
SHARED_COUNTER_RETRY_SECONDS = SHARED_RETRY_SECONDS

log = logging.getLogger("spangate.sequencer")


# Compared by identity: two asks of one count are still two calls.
@dataclass(slots=True, eq=False)
class _Ask:
    count: int
    first: int | None = None


@dataclass(slots=True)
class _RolloutCursor:
    seq: int
    attempt_id: str | None
    # Calls of this rollout waiting for numbers from the shared counter; one holder of the
    # lock asks for all of them at once, so this process never has two requests in flight
    # for one rollout (a local fallback could otherwise hand out a number still coming).
    asks: list[_Ask] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Whether the shared counter has numbered this rollout for this process: if it has, a
    # counter that no longer knows the rollout lost it, and must not restart at `seq`.
    shared: bool = False
    # The number of the attempt last opened through the API, as far as this process heard:
    # news of an older one arriving late changes nothing.
    opened: int = 0


CursorLookup = Callable[[str], Awaitable[tuple[int, str | None]]]


class SeqAllocator(Protocol):
    """`allocate(rollout_id, count, floor)`: the last of `count` numbers reserved for the
    rollout in a counter every replica shares (Redis, or a PostgreSQL counter row), never at
    or below `floor` (what this process has already handed out). With `create=False`, None
    when the counter has lost the rollout (Redis restarted empty) instead of starting it
    again at `floor`, which another replica's numbers may be above."""

    def __call__(
        self, rollout_id: str, count: int, floor: int, *, create: bool = True
    ) -> Awaitable[int | None]: ...


class Sequencer:
    """Next sequence number and current attempt per rollout, kept in memory.

    The first time this process sees a rollout it asks the store where the rollout
    left off (off the loop), so numbers keep rising across restarts.
    """

    def __init__(
        self,
        lookup: CursorLookup,
        *,
        capacity: int,
        allocate: SeqAllocator | None = None,
    ) -> None:
        self._lookup = lookup
        self._allocate = allocate
        self._shared = SharedGuard("shared-seq", SHARED_COUNTER_RETRY_SECONDS)
        self._capacity = capacity
        self._cursors: OrderedDict[str, _RolloutCursor] = OrderedDict()
        self._loading: dict[str, asyncio.Future[_RolloutCursor]] = {}
        # Names this gateway in what it tells other replicas, so it ignores its own news.
        self.origin = secrets.token_hex(8)

    async def _cursor(self, rollout_id: str) -> _RolloutCursor:
        cursor = self._cursors.get(rollout_id)
        if cursor is not None:
            self._cursors.move_to_end(rollout_id)
            return cursor
        pending = self._loading.get(rollout_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_RolloutCursor] = asyncio.get_running_loop().create_future()
        self._loading[rollout_id] = future
        try:
            seq, attempt = await self._lookup(rollout_id)
            cursor = _RolloutCursor(seq, attempt)
            self._cursors[rollout_id] = cursor
            if len(self._cursors) > self._capacity:
                self._cursors.popitem(last=False)
            future.set_result(cursor)
        except BaseException as exc:
            future.set_exception(exc)
            # Mark it retrieved: a lookup failure is re-raised to this caller, not lost.
            future.exception()
            raise
        finally:
            del self._loading[rollout_id]
        return cursor

    async def attempt_of(self, rollout_id: str, attempt_id: str | None) -> str:
        """The call's attempt: the one named, else the rollout's latest (or the first)."""
        cursor = await self._cursor(rollout_id)
        if attempt_id is not None:
            cursor.attempt_id = attempt_id
        elif cursor.attempt_id is None:
            cursor.attempt_id = DEFAULT_ATTEMPT_ID
        return cursor.attempt_id

    def take(self, rollout_id: str, count: int = 1) -> int:
        """The first of `count` consecutive sequence numbers (after `attempt_of`)."""
        return _take(self._cursors[rollout_id], count)

    async def reserve(self, rollout_id: str, count: int = 1) -> int:
        """Like `take`, but from the shared counter when replicas share the store, so the
        numbers have no gaps or duplicates whichever replica a call lands on."""
        allocate = self._allocate
        if allocate is None:
            return self.take(rollout_id, count)
        cursor = self._cursors[rollout_id]
        ask = _Ask(count)
        cursor.asks.append(ask)
        try:
            async with cursor.lock:
                if ask.first is None:
                    # Serve every call that queued meanwhile with this one request.
                    batch, cursor.asks = cursor.asks, []
                    try:
                        wanted = sum(queued.count for queued in batch)
                        first = await self._numbers(allocate, rollout_id, cursor, wanted)
                    except BaseException:
                        cursor.asks[:0] = [a for a in batch if a is not ask]
                        raise
                    for queued in batch:
                        queued.first = first
                        first += queued.count
        finally:
            if ask.first is None and ask in cursor.asks:
                cursor.asks.remove(ask)
        assert ask.first is not None
        return ask.first

    async def _numbers(
        self, allocate: SeqAllocator, rollout_id: str, cursor: _RolloutCursor, count: int
    ) -> int:
        """The first of `count` numbers: from the shared counter, or locally while it fails."""
        if not self._shared.may_answer():
            return _take(cursor, count)
        try:
            async with asyncio.timeout(SHARED_TIMEOUT):
                last = await allocate(rollout_id, count, cursor.seq, create=not cursor.shared)
            if last is None:
                # The counter lost the rollout: resume above what the store holds (the numbers
                # every replica's stored spans have), not above what this process handed out.
                # The store read is outside the counter's bound: after Redis came back empty
                # every active rollout asks at once.
                stored, _ = await self._lookup(rollout_id)
                cursor.seq = max(cursor.seq, stored)
                async with asyncio.timeout(SHARED_TIMEOUT):
                    last = await allocate(rollout_id, count, cursor.seq, create=True)
                assert last is not None
        except Exception as exc:
            # Degraded, not down: numbers stay increasing on this replica meanwhile, and the
            # shared counter resumes above them (the floor) once it answers again.
            log.warning("shared sequence counter failed (%s); numbering locally for now", exc)
            self._shared.failed(exc)
            return _take(cursor, count)
        self._shared.answered()
        cursor.shared = True
        cursor.seq = max(cursor.seq, last)
        return last - count + 1

    async def next(self, rollout_id: str, attempt_id: str | None) -> tuple[int, str]:
        """The call's sequence number and attempt."""
        attempt = await self.attempt_of(rollout_id, attempt_id)
        return await self.reserve(rollout_id), attempt

    def set_attempt(self, rollout_id: str, attempt_id: str, number: int = 0) -> None:
        """A new attempt (the rollout's `number`th) was opened through the API: later unnamed
        calls join it, unless a later one was opened meanwhile."""
        cursor = self._cursors.get(rollout_id)
        if cursor is not None and (not number or number > cursor.opened):
            cursor.attempt_id = attempt_id
            cursor.opened = max(cursor.opened, number)

    def current_attempt(self, rollout_id: str) -> str | None:
        """The attempt a call naming none joins now, as far as this process knows (None: it
        has not seen the rollout lately; the store will say)."""
        cursor = self._cursors.get(rollout_id)
        return cursor.attempt_id if cursor is not None else None

    def attempt_opened(self, origin: str, rollout_id: str, attempt_id: str, number: int) -> None:
        """Another replica opened an attempt (`store.writes.announce_attempt`)."""
        if origin != self.origin:
            self.set_attempt(rollout_id, attempt_id, number)


def _take(cursor: _RolloutCursor, count: int) -> int:
    first = cursor.seq + 1
    cursor.seq += count
    return first
