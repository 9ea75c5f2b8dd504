"""`/api/models`: the live model registry. Deployments added, replaced or removed here serve
new calls at once (calls in flight finish where they are) and are kept in the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from config.models import Deployment
from gateway.errors import NotFoundError
from gateway.proxy.cost import deployment_prices
from gateway.web import api_models as m
from gateway.web.routes_api import ApiRoute, body_of, json, query_of, read, write
from gateway.web.state import GATEWAY, Gateway
from store import registry

log = logging.getLogger("spangate.registry")


@dataclass
class Followed:
    """What this replica took from the stored registry, and how often it changed its own
    router: a read of the store begun before a local change may predate it, so is not applied."""

    known: set[tuple[str, str]] = field(default_factory=set)
    changes: int = 0


FOLLOWED = web.AppKey("model_registry_followed", Followed)


def _deployment(
    entry: dict[str, Any], api_key: str | None, replaced: Deployment | None
) -> Deployment:
    """The deployment a registry entry asks for. A new checkpoint at a configured address
    keeps what the registration cannot say (`training`, timeouts, limits, headers, prices),
    its name (spans, metrics and shared limits go on under it), and the key it had when the
    registration gives none."""
    registered: dict[str, Any] = {
        "provider": entry["provider"],
        "model": entry["upstream_model"],
        "api_base": entry["api_base"],
        "version": entry["version"],
        "weight": entry["weight"],
    }
    if replaced is None or replaced.name == _registered_name(replaced):
        # Two servers of one model differ only by where they are: the name says which.
        registered["name"] = _registered_name(registered)
    if api_key:
        registered["api_key"] = api_key
    if replaced is None:
        return Deployment.model_validate(registered)
    return Deployment.model_validate({**replaced.model_dump(), **registered})


def _registered_name(d: Deployment | dict[str, Any]) -> str:
    """The name a registration gives a deployment that had none of its own."""
    fields = d if isinstance(d, dict) else d.model_dump()
    return f"{fields['provider']}/{fields['model']}@{fields['api_base']}"


def _kept(replaced: Deployment | None) -> dict[str, Any]:
    """What a registration leaves out keeps the replaced deployment's value (its upstream
    model above all: the group's name is rarely what the server calls it)."""
    if replaced is None:
        return {}
    return {
        "provider": replaced.provider,
        "upstream_model": replaced.model,
        "weight": replaced.weight,
    }


def _replaced(gw: Gateway, model: str, api_base: str) -> Deployment | None:
    """The deployment served at `api_base` in the group, else the configured one there (a
    replica restarting, or re-adding one that was removed, keeps the config's settings)."""
    for guard in gw.router.guards.get(model, ()):
        if guard.deployment.api_base == api_base:
            return guard.deployment
    for group in gw.settings.models:
        if group.name == model:
            return next((d for d in group.deployments if d.api_base == api_base), None)
    return None


def _apply(gw: Gateway, entry: dict[str, Any], api_key: str | None = None) -> None:
    replaced = _replaced(gw, entry["model"], entry["api_base"])
    deployment = _deployment(entry, api_key, replaced)
    if deployment.api_key:
        gw.redactor = gw.redactor.adding(deployment.api_key)
    price = deployment_prices(deployment, {})
    if price is None and replaced is not None and replaced.model == deployment.model:
        # The cost map is not kept after start: the same upstream model costs what it did.
        price = gw.prices_for(replaced)
    gw.prices[id(deployment)] = price
    gw.router.put_deployment(entry["model"], deployment)


async def add_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.ModelRegistration)
    # The key serves calls from memory only: it is never stored.
    given = body.model_dump(exclude={"api_key"}, exclude_unset=True, exclude_none=True)
    # Stored resolved, so every replica (and a restart) serves what this one does.
    stored = {**_kept(_replaced(gw, body.model, body.api_base)), **given}
    entry = await write(gw, lambda db: registry.put_deployment(db, **stored))
    _apply(gw, entry, body.api_key)
    followed = request.app[FOLLOWED]
    followed.changes += 1
    followed.known.add((entry["model"], entry["api_base"]))
    return json({**entry, "registered": True}, status=201)


async def remove_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = query_of(request, m.ModelRemoval)
    stored = await write(
        gw, lambda db: registry.delete_deployment(db, model=q.model, api_base=q.api_base)
    )
    removed = gw.router.remove_deployment(q.model, q.api_base)
    followed = request.app[FOLLOWED]
    followed.changes += 1
    followed.known.discard((q.model, q.api_base))
    if not (stored or removed):
        raise NotFoundError(f"model {q.model!r} has no deployment at {q.api_base!r}")
    return json({"model": q.model, "api_base": q.api_base, "deleted": True})


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    stored = {(e["model"], e["api_base"]) for e in await read(gw, registry.list_deployments)}
    data = [
        {
            "model": name,
            "api_base": d.api_base,
            "provider": d.provider,
            "upstream_model": d.model,
            "version": d.version,
            "weight": d.weight,
            "registered": (name, d.api_base) in stored,
            "label": d.label,
            "in_flight": guard.in_flight,
            "breaker": guard.state,
        }
        for name, guards in gw.router.guards.items()
        for guard in guards
        for d in (guard.deployment,)
    ]
    return json({"data": data})


def _serving(gw: Gateway, entry: dict[str, Any]) -> bool:
    """Whether the router already serves `entry` as stored (version, weight, model)."""
    for guard in gw.router.guards.get(entry["model"], ()):
        d = guard.deployment
        if d.api_base == entry["api_base"]:
            return (d.version, d.weight, d.model) == (
                entry["version"],
                entry["weight"],
                entry["upstream_model"],
            )
    return False


def sync_registry(gw: Gateway, entries: list[dict[str, Any]], known: set[tuple[str, str]]) -> None:
    """Make the router serve what the store's registry says: new and changed entries added,
    entries another replica deleted removed. `known` holds what came from the registry, so a
    deployment from the config file is never removed."""
    current = {(e["model"], e["api_base"]): e for e in entries}
    for entry in current.values():
        if not _serving(gw, entry):
            _apply(gw, entry)
    for model, api_base in known - current.keys():
        gw.router.remove_deployment(model, api_base)
    known.clear()
    known.update(current)


async def follow_registry(gw: Gateway, followed: Followed) -> None:
    """One read of the stored registry, applied unless this replica changed its own router
    while it ran: the read may predate that change, and the next one will not."""
    before = followed.changes
    entries = await gw.reader.run(registry.list_deployments)
    if followed.changes == before:
        sync_registry(gw, entries, followed.known)


async def restore_registry(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: serve what was registered before this process started (keys are not
    kept), then follow the store every `shared.sync_seconds`, so a registration sent to any
    replica reaches every one."""
    gw = app[GATEWAY]
    app[FOLLOWED] = followed = Followed()
    await follow_registry(gw, followed)

    async def follow() -> None:
        while True:
            await asyncio.sleep(gw.settings.shared.sync_seconds)
            try:
                await follow_registry(gw, followed)
            except Exception:
                log.exception("reading the model registry failed; trying again")

    task = asyncio.get_running_loop().create_task(follow())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("POST", "/api/models", add_model, "Add or replace a deployment of a model group", "admin", m.ModelRegistration, None, m.ModelDeployment, 201, (403, 422)),
    ApiRoute("DELETE", "/api/models", remove_model, "Remove a deployment from a model group", "admin", None, m.ModelRemoval, None, 200, (403, 404, 422)),
    ApiRoute("GET", "/api/models", list_models, "Deployments serving each model group, with versions", "read", None, None, m.ModelList, 200, ()),
)  # fmt: skip
