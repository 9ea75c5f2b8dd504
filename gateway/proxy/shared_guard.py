"""A breaker in front of state that replicas share (Redis, PostgreSQL): once a call to it
fails, calls skip it for a while and fall back to this process's own answer."""

from __future__ import annotations

import contextlib

import pybreaker

# A shared state slower than this, or failing, is left alone for SHARED_RETRY_SECONDS, so
# an unreachable PostgreSQL or Redis never holds a call up for long.
SHARED_TIMEOUT = 1.0
SHARED_RETRY_SECONDS = 2.0


class SharedGuard:
    """Whether to ask the shared state now; told how each ask went."""

    def __init__(self, name: str, retry_seconds: float = SHARED_RETRY_SECONDS) -> None:
        self._breaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=retry_seconds, name=name)

    def may_answer(self) -> bool:
        """False while the breaker is open; once its timeout has run, the next ask tries the
        shared state again (the breaker only leaves `open` when it is asked)."""
        if self._breaker.current_state == pybreaker.STATE_CLOSED:
            return True
        try:
            self._breaker.call(_nothing)
        except pybreaker.CircuitBreakerError:
            return False
        return True

    def failed(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._breaker.call(_reraise, exc)

    def answered(self) -> None:
        if self._breaker.current_state != pybreaker.STATE_CLOSED:
            self._breaker.close()


def _reraise(exc: BaseException) -> None:
    raise exc


def _nothing() -> None:
    pass
