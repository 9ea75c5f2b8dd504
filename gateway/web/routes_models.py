"""`/api/models`: the live model registry. Deployments added, replaced or removed here serve
new calls at once (calls in flight finish where they are) and are kept in the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from config.models import Deployment
from gateway.errors import NotFoundError
from gateway.web import api_models as m
from gateway.web.routes_api import ApiRoute, body_of, json, query_of, read, write
from gateway.web.state import GATEWAY, Gateway
from store import registry

log = logging.getLogger("spangate.registry")


def _deployment(entry: dict[str, Any], api_key: str | None = None) -> Deployment:
    return Deployment(
        provider=entry["provider"],
        model=entry["upstream_model"],
        api_base=entry["api_base"],
        api_key=api_key,
        weight=entry["weight"],
        version=entry["version"],
        # Two servers of one model differ only by where they are: the name says which.
        name=f"{entry['provider']}/{entry['upstream_model']}@{entry['api_base']}",
    )


def _apply(gw: Gateway, entry: dict[str, Any], api_key: str | None = None) -> None:
    if api_key:
        gw.redactor = gw.redactor.adding(api_key)
    gw.router.put_deployment(entry["model"], _deployment(entry, api_key))


async def add_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.ModelRegistration)
    # The key serves calls from memory only: it is never stored.
    stored = body.model_dump(exclude={"api_key"})
    entry = await write(gw, lambda db: registry.put_deployment(db, **stored))
    _apply(gw, entry, body.api_key)
    return json({**entry, "registered": True}, status=201)


async def remove_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = query_of(request, m.ModelRemoval)
    stored = await write(
        gw, lambda db: registry.delete_deployment(db, model=q.model, api_base=q.api_base)
    )
    removed = gw.router.remove_deployment(q.model, q.api_base)
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


async def restore_registry(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: serve what was registered before this process started (keys are not
    kept), then follow the store every `shared.sync_seconds`, so a registration sent to any
    replica reaches every one."""
    gw = app[GATEWAY]
    known: set[tuple[str, str]] = set()
    sync_registry(gw, await gw.reader.run(registry.list_deployments), known)

    async def follow() -> None:
        while True:
            await asyncio.sleep(gw.settings.shared.sync_seconds)
            try:
                sync_registry(gw, await gw.reader.run(registry.list_deployments), known)
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
