"""A value that validates against a JSON schema, for the mock's tool arguments and structured
outputs: what an SDK's parser (pydantic's schemas for the OpenAI Agents SDK included) accepts.
"""

from __future__ import annotations

import math
from typing import Any

# A schema that refers to itself (a tree of nodes) stops here with the smallest value.
MAX_DEPTH = 8
SAMPLE_STRING = "example"
_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def sample_value(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A value `schema` accepts; `root` holds the `$defs` a `$ref` points into."""
    # Schemas come from clients: anything malformed is treated as an empty schema.
    schema = schema if isinstance(schema, dict) else {}
    root = root if isinstance(root, dict) else schema
    if depth > MAX_DEPTH:
        return None
    if isinstance(schema.get("$ref"), str):
        return sample_value(_resolve(root, schema["$ref"]), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf"):
        choices = schema.get(key)
        if isinstance(choices, list) and choices:
            return sample_value(_first_not_null(choices), root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(_resolve(root, part["$ref"]) if _is_ref(part) else part or {})
        return sample_value(merged, root, depth + 1)
    if "default" in schema:
        return schema["default"]
    return _sample_of_type(schema, root, depth)


def sample_arguments(schema: Any, root: Any = None, depth: int = 0) -> dict[str, Any]:
    """An object with every required property (all of them when none is named required)."""
    schema = schema if isinstance(schema, dict) else {}
    root = root if isinstance(root, dict) else schema
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required")
    names = required if isinstance(required, list) else list(properties)
    return {
        name: sample_value(properties.get(name), root, depth + 1)
        for name in names
        if isinstance(name, str)
    }


def _sample_of_type(schema: dict[str, Any], root: dict[str, Any], depth: int) -> Any:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and "properties" in schema:
        kind = "object"
    if kind == "null":
        return None
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return True
    if kind == "array":
        least = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
        # One item shows the shape; past half the depth, a recursive schema must bottom out.
        count = max(least, 1 if depth < MAX_DEPTH // 2 else 0)
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        return [sample_value(schema.get("items") or {}, root, depth + 1) for _ in range(count)]
    if kind == "object":
        return sample_arguments(schema, root, depth)
    return _string(schema)


def _number(schema: dict[str, Any], *, integer: bool) -> int | float:
    """1, or the middle of the bounds the schema sets (exclusive ones included)."""
    lows = [schema[k] for k in ("minimum", "exclusiveMinimum") if _is_number(schema.get(k))]
    highs = [schema[k] for k in ("maximum", "exclusiveMaximum") if _is_number(schema.get(k))]
    low, high = (max(lows) if lows else None), (min(highs) if highs else None)
    if low is not None and high is not None:
        value = (low + high) / 2
    elif low is not None:
        value = low + 1
    elif high is not None:
        value = high - 1
    else:
        value = 1
    if not integer:
        return float(value)
    whole = math.floor(value)
    return (
        whole if low is None or whole > low or (whole == low and "minimum" in schema) else whole + 1
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string(schema: dict[str, Any]) -> str:
    text = _FORMATS.get(str(schema.get("format")), SAMPLE_STRING)
    least = schema.get("minLength")
    if isinstance(least, int) and len(text) < least:
        text = text + "x" * (least - len(text))
    most = schema.get("maxLength")
    return text[:most] if isinstance(most, int) else text


def _first_not_null(choices: list[Any]) -> Any:
    # Optional fields are `anyOf: [X, {type: null}]`: X makes the more telling sample.
    return next(
        (c for c in choices if not (isinstance(c, dict) and c.get("type") == "null")), choices[0]
    )


def _is_ref(part: Any) -> bool:
    return isinstance(part, dict) and isinstance(part.get("$ref"), str)


def _resolve(root: dict[str, Any], ref: str) -> Any:
    """`#/$defs/Name` (or any local JSON pointer) inside `root`; anything else is empty."""
    if not ref.startswith("#"):
        return {}
    node: Any = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}
