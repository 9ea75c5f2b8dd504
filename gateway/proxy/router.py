"""Which deployment serves a call: model group lookup, fallbacks, and choice among healthy ones.

Groups and deployments can change at runtime (`/api/models`): each change builds new lists,
so a call already routed finishes on the deployment it holds.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable

import pybreaker

from config.models import Deployment, ModelGroup, Settings
from gateway.errors import ModelNotFound
from gateway.proxy.resilience import Guard, SharedRate


class Router:
    def __init__(
        self,
        settings: Settings,
        *,
        shared_rate: SharedRate | None = None,
        breaker_storage: Callable[[str], pybreaker.CircuitBreakerStorage] | None = None,
    ) -> None:
        self.settings = settings
        # Kept for deployments added later, so they share limits and breakers as configured ones.
        self.shared_rate = shared_rate
        self.breaker_storage = breaker_storage
        self.groups: dict[str, ModelGroup] = {group.name: group for group in settings.models}
        self.guards: dict[str, list[Guard]] = {
            group.name: [self._guard(deployment, group) for deployment in group.deployments]
            for group in settings.models
        }

    def _guard(self, deployment: Deployment, group: ModelGroup) -> Guard:
        storage = self.breaker_storage
        return Guard(
            deployment,
            self.settings.breaker_policy(group),
            shared_rate=self.shared_rate,
            breaker_storage=storage(deployment.label) if storage else None,
        )

    def group(self, model: str) -> ModelGroup:
        found = self.groups.get(model)
        if found is None:
            raise ModelNotFound(
                f"The model `{model}` does not exist on this gateway; "
                f"configured models: {', '.join(sorted(self.groups)) or 'none'}",
                param="model",
            )
        return found

    def chain(self, group: ModelGroup) -> list[ModelGroup]:
        """The group, then its fallbacks in order (each once).

        A fallback that is gone (its last deployment removed through `/api/models`) is
        skipped: the group it backed up still serves.
        """
        groups = self.groups
        seen = {group.name}
        chain = [group]
        for name in group.fallbacks:
            fallback = groups.get(name)
            if fallback is not None and name not in seen:
                seen.add(name)
                chain.append(fallback)
        return chain

    def pick(self, group: ModelGroup, rollout_id: str | None = None) -> Guard | None:
        """A deployment whose breaker lets a call through, by the group's routing; None if none."""
        guards = self.guards.get(group.name, ())
        if len(guards) == 1:
            # The common case, kept cheap: one deployment, no choice to make.
            return guards[0] if guards[0].available() else None
        candidates = [g for g in guards if g.available()]
        if not candidates:
            return None
        if group.routing == "rollout-affinity" and rollout_id is not None:
            # Before the rate-limit preference: a rollout waits for its own server's budget
            # rather than lose its prefix cache.
            return max(candidates, key=lambda g: affinity_score(rollout_id, g.deployment))
        # A sibling with rate-limit budget left beats waiting on one without.
        with_budget = [g for g in candidates if g.has_budget()]
        candidates = with_budget or candidates
        if len(candidates) == 1:
            return candidates[0]
        if group.routing == "least-busy":
            fewest = min(g.in_flight for g in candidates)
            candidates = [g for g in candidates if g.in_flight == fewest]
            if len(candidates) == 1:
                return candidates[0]
        return random.choices(candidates, weights=[g.deployment.weight for g in candidates])[0]

    def reopens_in(self, groups: list[ModelGroup]) -> float:
        """Seconds until any deployment of these groups may take a call again."""
        waits = [g.reopens_in() for group in groups for g in self.guards.get(group.name, ())]
        return min(waits) if waits else 0.0

    def usable(self, group: ModelGroup) -> bool:
        return any(g.available() for g in self.guards.get(group.name, ()))

    def put_deployment(self, group_name: str, deployment: Deployment) -> None:
        """Add `deployment` to the group (created if new), replacing one with its `api_base`."""
        group = self.groups.get(group_name)
        if group is None:
            group = ModelGroup(name=group_name, deployments=[deployment])
            guards = [self._guard(deployment, group)]
        else:
            kept = [
                g for g in self.guards[group_name] if g.deployment.api_base != deployment.api_base
            ]
            deployments = [g.deployment for g in kept] + [deployment]
            group = group.model_copy(update={"deployments": deployments})
            guards = [*kept, self._guard(deployment, group)]
        self._swap(group, guards)

    def remove_deployment(self, group_name: str, api_base: str) -> bool:
        """Take the deployment at `api_base` out of the group; False if there was none.

        The group goes with its last deployment: a group with none would answer every call 503.
        """
        group = self.groups.get(group_name)
        if group is None:
            return False
        kept = [g for g in self.guards[group_name] if g.deployment.api_base != api_base]
        if len(kept) == len(self.guards[group_name]):
            return False
        if not kept:
            # New dicts, as in _swap: a reader iterating the old ones never sees a change.
            self.groups = {name: g for name, g in self.groups.items() if name != group_name}
            self.guards = {name: g for name, g in self.guards.items() if name != group_name}
            return True
        group = group.model_copy(update={"deployments": [g.deployment for g in kept]})
        self._swap(group, kept)
        return True

    def _swap(self, group: ModelGroup, guards: list[Guard]) -> None:
        # New dicts, so readers iterating the old ones (metrics, readiness) never see a change.
        self.groups = {**self.groups, group.name: group}
        self.guards = {**self.guards, group.name: guards}


def affinity_score(rollout_id: str, deployment: Deployment) -> float:
    """Weighted rendezvous hashing: the highest score wins, so adding a deployment moves
    only the rollouts it now wins (about weight / total weight of them). Hashed on where the
    server is (a group's one deployment per `api_base`), which a new checkpoint there
    (`/api/models`) does not change, whatever it is named or serves."""
    key = f"{rollout_id}\0{deployment.api_base or deployment.label}".encode()
    digest = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    unit = (digest + 1) / (2**64 + 1)  # in (0, 1)
    return -deployment.weight / math.log(unit)
