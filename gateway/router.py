"""Which deployment serves a call: model group lookup and weighted choice."""

from __future__ import annotations

import random

from config.models import Deployment, ModelGroup, Settings
from gateway.errors import ModelNotFound


class Router:
    def __init__(self, settings: Settings) -> None:
        self.groups: dict[str, ModelGroup] = {group.name: group for group in settings.models}

    def group(self, model: str) -> ModelGroup:
        found = self.groups.get(model)
        if found is None:
            raise ModelNotFound(
                f"The model `{model}` does not exist on this gateway; "
                f"configured models: {', '.join(sorted(self.groups)) or 'none'}",
                param="model",
            )
        return found

    def pick(self, group: ModelGroup) -> Deployment:
        deployments = group.deployments
        if len(deployments) == 1:
            return deployments[0]
        return random.choices(deployments, weights=[d.weight for d in deployments])[0]
