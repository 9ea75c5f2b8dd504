"""Which spans say what variant a unit ran: the gateway's calls, never an agent's own span."""

from __future__ import annotations

from typing import Any

import pytest

from store.experiments import assignments, experiment_spans
from store.schema import SPAN_COLUMNS, connect
from store.span_inserts import insert_spans

pytestmark = pytest.mark.both_backends

T0 = 1_764_000_000_000_000_000


def _span(span_id: str, seq: int, variant: str, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(SPAN_COLUMNS)
    record.update(
        {
            "span_id": span_id,
            "trace_id": "cd" * 16,
            "rollout_id": "r-1",
            "attempt_id": "1",
            "seq": seq,
            "name": "chat gpt-4o-mini",
            "operation": "chat",
            "status": "ok",
            "http_status": 200,
            "start_ns": T0 + seq,
            "end_ns": T0 + seq + 1,
            "attributes": {"experiment": "exp", "variant": variant},
            **fields,
        }
    )
    return record


def test_an_agents_span_naming_an_experiment_is_no_assignment(db_path: Any) -> None:
    # The agent's own span comes first in the rollout and names another variant.
    agent = _span(
        "s-agent",
        1,
        "treatment",
        http_status=None,
        attributes={"experiment": "exp", "variant": "treatment", "spangate.source": "otlp"},
    )
    call = _span("s-call", 2, "control")
    db = connect(db_path)
    try:
        insert_spans(db, [agent, call])
        assert [(a["unit"], a["variant"]) for a in assignments(db)] == [("r-1", "control")]
        assert [s["span_id"] for s in experiment_spans(db, "exp")] == ["s-call"]
    finally:
        db.close()
