"""One span shape: the record the proxy builds (`gateway.proxy.record.SpanRecord`, which mypy
holds `Call.publish()` and the tool spans to) is what the store's columns, the list columns
and the API's `Span` model are made of."""

from __future__ import annotations

from gateway.proxy.record import ROLLOUT_FIELDS, SPAN_FIELDS, SpanRecord
from gateway.web.api_models import Span
from store.schema import SPAN_COLUMNS


def test_the_store_has_a_column_for_every_field_of_the_record_and_no_other() -> None:
    assert SPAN_FIELDS == SPAN_COLUMNS


def test_the_record_adds_only_what_creates_its_rollout() -> None:
    assert set(SpanRecord.__annotations__) - set(SPAN_COLUMNS) == set(ROLLOUT_FIELDS)


def test_the_api_span_model_exposes_record_fields_only() -> None:
    assert set(Span.model_fields) <= set(SPAN_FIELDS)
