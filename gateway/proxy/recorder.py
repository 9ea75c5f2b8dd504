"""The recorder's event bus: finished spans go to every subscriber without blocking the caller."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gateway.proxy.record import SpanRecord

log = logging.getLogger("spangate.recorder")

# Takes a span record (or, on the rollout and reward channels, a row); must return at once.
Subscriber = Callable[[Any], None]


class Recorder:
    """Hands each finished span to its subscribers; each must return at once (queue, count)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._rollout_subscribers: list[Subscriber] = []
        self._reward_subscribers: list[Subscriber] = []
        self.published = 0
        self.subscriber_errors = 0

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        return _join(self._subscribers, subscriber)

    def publish(self, span: SpanRecord | dict[str, Any]) -> None:
        self.published += 1
        self._deliver(self._subscribers, span, "span")

    def subscribe_rollouts(self, subscriber: Subscriber) -> Callable[[], None]:
        """Rollout status changes (the online judge listens for terminal ones)."""
        return _join(self._rollout_subscribers, subscriber)

    def publish_rollout(self, rollout: dict[str, Any]) -> None:
        self._deliver(self._rollout_subscribers, rollout, "rollout")

    def subscribe_rewards(self, subscriber: Subscriber) -> Callable[[], None]:
        """New rewards and judge verdicts, as stored (exporters attach them to spans)."""
        return _join(self._reward_subscribers, subscriber)

    def publish_reward(self, reward: dict[str, Any]) -> None:
        self._deliver(self._reward_subscribers, reward, "reward")

    def _deliver(self, subscribers: list[Subscriber], item: Any, channel: str) -> None:
        for subscriber in subscribers:
            try:
                subscriber(item)
            except Exception:
                # One broken subscriber must not cost the others (or the store) the item.
                self.subscriber_errors += 1
                log.exception("%s subscriber %r failed", channel, subscriber)


def _join(subscribers: list[Subscriber], subscriber: Subscriber) -> Callable[[], None]:
    """Add a subscriber; the returned function removes it again."""
    subscribers.append(subscriber)
    return lambda: subscribers.remove(subscriber)
