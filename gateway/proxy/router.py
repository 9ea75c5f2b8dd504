"""Which deployment serves a call: model group lookup, fallbacks, and choice among healthy ones."""

from __future__ import annotations

import random
from collections.abc import Callable

import pybreaker

from config.models import ModelGroup, Settings
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
        self.groups: dict[str, ModelGroup] = {group.name: group for group in settings.models}
        self.guards: dict[str, list[Guard]] = {
            group.name: [
                Guard(
                    deployment,
                    settings.breaker_policy(group),
                    shared_rate=shared_rate,
                    breaker_storage=breaker_storage(deployment.label) if breaker_storage else None,
                )
                for deployment in group.deployments
            ]
            for group in settings.models
        }

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
        """The group, then its fallbacks in order (each once)."""
        seen = {group.name}
        chain = [group]
        for name in group.fallbacks:
            if name not in seen:
                seen.add(name)
                chain.append(self.groups[name])
        return chain

    def pick(self, group: ModelGroup) -> Guard | None:
        """A deployment whose breaker lets a call through, by the group's routing; None if none."""
        guards = self.guards[group.name]
        if len(guards) == 1:
            # The common case, kept cheap: one deployment, no choice to make.
            return guards[0] if guards[0].available() else None
        candidates = [g for g in guards if g.available()]
        if not candidates:
            return None
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
        waits = [g.reopens_in() for group in groups for g in self.guards[group.name]]
        return min(waits) if waits else 0.0

    def usable(self, group: ModelGroup) -> bool:
        return any(g.available() for g in self.guards[group.name])
