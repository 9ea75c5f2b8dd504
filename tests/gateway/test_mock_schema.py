"""The mock's schema samples validate against the schemas SDKs send (pydantic's included)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from gateway.providers.mock_schema import sample_arguments, sample_value


class Unit(StrEnum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Place(BaseModel):
    city: str
    country: str | None = None


class Forecast(BaseModel):
    place: Place
    unit: Unit
    days: list[int] = Field(min_length=2)
    summary: str = Field(min_length=20)
    kind: Literal["daily", "hourly"]
    stops: list[Place]
    note: Place | None
    confidence: float = Field(gt=0.5, le=0.9)


class Node(BaseModel):
    name: str
    children: list[Node]


SCHEMAS: dict[str, dict[str, Any]] = {
    "pydantic model with $defs, enum, nested, anyOf": Forecast.model_json_schema(),
    "recursive $ref": Node.model_json_schema(),
    "plain object, nothing required": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
    },
    "array of objects": {
        "type": "array",
        "items": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
    },
    "type list with null": {"type": ["string", "null"], "format": "date-time"},
    "allOf with a ref": {
        "$defs": {"A": {"type": "object", "properties": {"a": {"type": "boolean"}}}},
        "allOf": [{"$ref": "#/$defs/A"}],
    },
    "const": {"const": 7},
    "oneOf": {"oneOf": [{"type": "null"}, {"type": "integer", "minimum": 3}]},
}


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_sample_validates_against_its_schema(schema: dict[str, Any]) -> None:
    jsonschema.validate(sample_value(schema), schema)


def test_pydantic_parses_the_sample_of_its_own_schema() -> None:
    forecast = Forecast.model_validate(sample_value(Forecast.model_json_schema()))
    assert forecast.unit is Unit.CELSIUS
    assert len(forecast.days) == 2
    assert forecast.note is not None and forecast.note.city == "example"


def test_tool_arguments_fill_every_property_when_none_is_required() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    assert sample_arguments(schema) == {"city": "example"}


def test_a_malformed_schema_gives_a_value_not_an_error() -> None:
    assert sample_value("not a schema") == "example"
    assert sample_value({"$ref": "#/$defs/Missing"}) == "example"
    assert sample_arguments({"properties": ["x"], "required": "x"}) == {}
