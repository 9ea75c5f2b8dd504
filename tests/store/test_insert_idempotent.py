"""A batch written twice (a journal replayed after a write that did land) stores each span
once, and the spans in it that were new still go in; on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from servers import read_rows
from shapes import span_record

from store.schema import connect
from store.span_inserts import insert_spans

pytestmark = pytest.mark.both_backends


def test_a_batch_written_again_stores_each_span_once(db_path: Any) -> None:
    first = [span_record("r1", i + 1, span_id=f"s{i}") for i in range(5)]
    again = first[2:] + [span_record("r1", i + 1, span_id=f"s{i}") for i in (5, 6)]
    db = connect(db_path)
    try:
        insert_spans(db, first)
        insert_spans(db, again)
        insert_spans(db, again)
    finally:
        db.close()
    rows = read_rows(db_path, "select span_id, seq from spans order by seq")
    assert [r["span_id"] for r in rows] == [f"s{i}" for i in range(7)]
    assert read_rows(db_path, "select count(*) as n from rollouts")[0]["n"] == 1
