"""The recorder's event bus: finished spans go to every subscriber without blocking the caller."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("spangate.recorder")

Subscriber = Callable[[dict[str, Any]], None]


class Recorder:
    """Hands each finished span to its subscribers; each must return at once (queue, count)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._rollout_subscribers: list[Subscriber] = []
        self._reward_subscribers: list[Subscriber] = []
        self.published = 0
        self.subscriber_errors = 0

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, span: dict[str, Any]) -> None:
        self.published += 1
        for subscriber in self._subscribers:
            try:
                subscriber(span)
            except Exception:
                # One broken subscriber must not cost the others (or the store) the span.
                self.subscriber_errors += 1
                log.exception("span subscriber %r failed", subscriber)

    def subscribe_rollouts(self, subscriber: Subscriber) -> Callable[[], None]:
        """Rollout status changes (the online judge listens for terminal ones)."""
        self._rollout_subscribers.append(subscriber)
        return lambda: self._rollout_subscribers.remove(subscriber)

    def publish_rollout(self, rollout: dict[str, Any]) -> None:
        for subscriber in self._rollout_subscribers:
            try:
                subscriber(rollout)
            except Exception:
                self.subscriber_errors += 1
                log.exception("rollout subscriber %r failed", subscriber)

    def subscribe_rewards(self, subscriber: Subscriber) -> Callable[[], None]:
        """New rewards and judge verdicts, as stored (exporters attach them to spans)."""
        self._reward_subscribers.append(subscriber)
        return lambda: self._reward_subscribers.remove(subscriber)

    def publish_reward(self, reward: dict[str, Any]) -> None:
        for subscriber in self._reward_subscribers:
            try:
                subscriber(reward)
            except Exception:
                self.subscriber_errors += 1
                log.exception("reward subscriber %r failed", subscriber)
