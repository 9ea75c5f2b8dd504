"""Deployments registered at runtime (`/api/models`), kept so a restart serves them again.

API keys are never stored: a registered deployment that needs one gets it again after a
restart, or forwards the client's own key.
"""

from __future__ import annotations

import time
from typing import Any

from sqlite_utils import Database

PUT_SQL = """
insert into model_registry (model, api_base, provider, upstream_model, version, weight, created_ns)
values (:model, :api_base, :provider, :upstream_model, :version, :weight, :now)
on conflict (model, api_base) do update set
    provider = excluded.provider,
    upstream_model = excluded.upstream_model,
    version = excluded.version,
    weight = excluded.weight,
    created_ns = excluded.created_ns
"""

DELETE_SQL = """
delete from model_registry
where model = :model
  and api_base = :api_base
"""

LIST_SQL = """
select model, api_base, provider, upstream_model, version, weight, created_ns
from model_registry
order by created_ns, model, api_base
"""


def put_deployment(
    db: Database,
    *,
    model: str,
    api_base: str,
    version: str,
    weight: float = 1.0,
    upstream_model: str | None = None,
    provider: str = "openai",
) -> dict[str, Any]:
    params = {
        "model": model,
        "api_base": api_base,
        "provider": provider,
        "upstream_model": upstream_model or model,
        "version": version,
        "weight": weight,
        "now": time.time_ns(),
    }
    db.execute(PUT_SQL, params)
    return {k: v for k, v in params.items() if k != "now"}


def delete_deployment(db: Database, *, model: str, api_base: str) -> bool:
    return db.execute(DELETE_SQL, {"model": model, "api_base": api_base}).rowcount > 0


def list_deployments(db: Database) -> list[dict[str, Any]]:
    cursor = db.execute(LIST_SQL)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
