"""`GET /openapi.json`: the `/api` routes described from the same models that validate them."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from config.version import package_version
from gateway.web import api_models as m
from gateway.web.routes_api import REGISTERED, ApiRoute

_PATH_PARAM = re.compile(r"{([^}]+)}")
REF_TEMPLATE = "#/components/schemas/{model}"


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": prop}
        for name, prop in schema.get("properties", {}).items()
    ]


def _operation(route: ApiRoute, components: dict[str, Any]) -> dict[str, Any]:
    error = {"$ref": REF_TEMPLATE.format(model="Error")}
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(route.path)
    ]
    if route.query is not None:
        parameters += _query_parameters(route.query)
    if route.response is not None:
        content = {"application/json": {"schema": _schema(route.response, components)}}
    else:
        media = {"/stream": "text/event-stream", "/report": "text/html"}.get(
            route.path[route.path.rfind("/") :], "application/x-ndjson"
        )
        content = {media: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(route.status): {"description": "OK", "content": content}}
    if route.status == 201:
        # Creating what already exists (same id) answers 200 with the stored object.
        responses["200"] = {"description": "Already existed", "content": content}
    for status in (*route.errors, 400, 401, 403):
        responses[str(status)] = {
            "description": "Error",
            "content": {"application/json": {"schema": error}},
        }
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.handler.__name__,
        "parameters": parameters,
        "responses": responses,
        "x-scope": route.scope,
    }
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema(route.body, components)}},
        }
    return operation


def build_spec(routes: tuple[ApiRoute, ...]) -> dict[str, Any]:
    components: dict[str, Any] = {}
    _schema(m.Error, components)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "spangate API",
            "version": package_version(),
            "description": "Rollouts, attempts, recorded calls (spans), rewards and stats.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


async def openapi_view(request: web.Request) -> web.Response:
    """The routes this app registered, described: nothing documented that is not served."""
    return web.json_response(build_spec(tuple(request.app[REGISTERED])))
