"""Prices per token from litellm's bundled cost map, read as a file so litellm is never imported.

The map ships inside the pinned litellm wheel; reading it directly takes milliseconds
and never reaches the network.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import orjson

from config.models import Deployment

log = logging.getLogger("spangate.cost")
COST_MAP_FILE = "model_prices_and_context_window_backup.json"

# USD per token: (input, output, cached input; None when cached input costs the same).
Price = tuple[float, float, float | None]
Prices = dict[str, Price]


def load_cost_map() -> Prices:
    """`model -> (input, output, cached input)` USD per token; empty if litellm is missing."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        log.warning("litellm is not installed: costs are only known from config")
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / COST_MAP_FILE
    try:
        raw: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("cannot read litellm's cost map %s: %s", path, exc)
        return {}
    prices: Prices = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            continue
        given = entry.get("input_cost_per_token")
        taken = entry.get("output_cost_per_token")
        if given is None and taken is None:
            continue
        prices[name] = (
            float(given or 0.0),
            float(taken or 0.0),
            entry.get("cache_read_input_token_cost"),
        )
    return prices


def deployment_prices(deployment: Deployment, cost_map: Prices) -> Price | None:
    """Config overrides first, then the map by `provider/model`, then by bare model name."""
    if deployment.input_cost_per_token is not None or deployment.output_cost_per_token is not None:
        return (
            deployment.input_cost_per_token or 0.0,
            deployment.output_cost_per_token or 0.0,
            None,
        )
    return cost_map.get(f"{deployment.provider}/{deployment.model}") or cost_map.get(
        deployment.model
    )


def cost_usd(
    prices: Price | None,
    input_tokens: int | None,
    output_tokens: int | None,
    cached_tokens: int | None,
) -> float | None:
    if prices is None or (input_tokens is None and output_tokens is None):
        return None
    given, taken, cached_rate = prices
    cached = cached_tokens or 0
    fresh = max((input_tokens or 0) - cached, 0)
    return (
        fresh * given
        + cached * (given if cached_rate is None else cached_rate)
        + (output_tokens or 0) * taken
    )
