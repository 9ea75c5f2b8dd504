"""Pause and drain: model calls held or refused while a trainer syncs weights, and the count
of calls in flight it waits on to reach zero. One process's state (replicas pause one by one)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.errors import ProxyPaused

PauseMode = Literal["hold", "reject"]


@dataclass
class Gate:
    """Whether model calls may start, and how many are under way."""

    max_hold_seconds: float
    default_retry_after: float
    paused: bool = False
    reason: str | None = None
    mode: PauseMode = "hold"
    retry_after: float = 0.0
    paused_at: float | None = None
    in_flight: int = 0
    held: int = 0
    # Set while calls may go; held calls wait on it.
    _open: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._open.set()

    def pause(self, *, reason: str | None, mode: PauseMode, retry_after: float | None) -> None:
        self.paused, self.reason, self.mode = True, reason, mode
        self.retry_after = self.default_retry_after if retry_after is None else retry_after
        self.paused_at = time.time()
        self._open.clear()

    def resume(self) -> None:
        self.paused, self.reason, self.paused_at = False, None, None
        self._open.set()

    async def enter(self) -> float:
        """Let a call start: at once, after a hold (returns the seconds held), or ProxyPaused."""
        self.in_flight += 1
        if not self.paused:
            return 0.0
        if self.mode == "reject":
            self.in_flight -= 1
            why = f": {self.reason}" if self.reason else ""
            raise ProxyPaused(
                f"model calls are paused{why}; retry after {self.retry_after:g}s",
                retry_after=self.retry_after,
            )
        # A held call is not in flight: the trainer waits for in-flight calls to drain.
        self.in_flight -= 1
        self.held += 1
        started = time.perf_counter()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._open.wait(), self.max_hold_seconds)
        finally:
            self.held -= 1
        self.in_flight += 1
        return time.perf_counter() - started

    def leave(self) -> None:
        self.in_flight -= 1

    def state(self) -> dict[str, Any]:
        return {
            "paused": self.paused,
            "reason": self.reason,
            "mode": self.mode if self.paused else None,
            "retry_after_seconds": self.retry_after if self.paused else None,
            "paused_at": self.paused_at,
            "in_flight": self.in_flight,
            "held": self.held,
            "max_hold_seconds": self.max_hold_seconds,
        }
