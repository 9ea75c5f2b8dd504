"""The dashboard's reads: rollouts sorted by any summary column with stable cursor paging,
the overview's time series and reward values, and a rollout without its bodies."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from sqlite_utils import Database

from store import dashboard
from store.queries import BadCursor, get_rollout
from store.schema import SPAN_COLUMNS, connect
from store.span_inserts import insert_spans
from store.writes import add_reward

pytestmark = pytest.mark.both_backends

T0 = 1_795_334_400_000_000_000  # 2026-11-22T08:00:00Z
MS = 1_000_000
_ids = itertools.count(1)


def span(rollout: str, seq: int, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(SPAN_COLUMNS)
    start = T0 + seq * 100 * MS
    record.update(
        span_id=f"{next(_ids):016x}",
        trace_id="ab" * 16,
        rollout_id=rollout,
        attempt_id="a1",
        seq=seq,
        name="chat m",
        operation="chat",
        model_group="m",
        request_model="m",
        status="ok",
        stream=0,
        start_ns=start,
        end_ns=start + 50 * MS,
        duration_ms=50.0,
        retries=0,
        input_tokens=10,
        output_tokens=5,
        cost_usd=0.001,
        request_body=b'{"messages": [{"role": "user", "content": "hi"}]}',
        response_body={"choices": [{"message": {"role": "assistant", "content": "yo"}}]},
        attributes={},
        tags=[],
        agent="bot",
        metadata={},
    )
    record.update(fields)
    return record


@pytest.fixture
def db(db_path: Any) -> Iterator[Database]:
    conn = connect(db_path)
    # 23 rollouts with 1..23 calls, created in order; every third one errors, some rewarded.
    records = []
    for i in range(1, 24):
        for seq in range(1, i + 1):
            records.append(
                span(
                    f"r{i:02d}",
                    seq,
                    start_ns=T0 + i * 1000 * MS + seq * MS,
                    end_ns=T0 + i * 1000 * MS + seq * MS + i * MS,
                    status="error" if i % 3 == 0 and seq == 1 else "ok",
                    model_group="big" if i % 2 else "small",
                )
            )
    insert_spans(conn, records)
    for i in range(1, 24, 2):
        add_reward(conn, {"rollout_id": f"r{i:02d}", "value": i / 10, "final": True})
    yield conn
    conn.close()


def _all_pages(db: Database, **kwargs: Any) -> list[str]:
    seen, cursor = [], None
    while True:
        page = dashboard.browse_rollouts(db, cursor=cursor, limit=5, **kwargs)
        seen += [row["id"] for row in page.data]
        if not page.next_cursor:
            return seen
        cursor = page.next_cursor


@pytest.mark.parametrize("sort", sorted(dashboard.BROWSE_SORTS))
@pytest.mark.parametrize("descending", [True, False])
def test_paging_through_any_sort_gives_every_rollout_once(
    db: Database, sort: str, descending: bool
) -> None:
    ids = _all_pages(db, sort=sort, descending=descending)
    assert sorted(ids) == [f"r{i:02d}" for i in range(1, 24)]


def test_sorting_by_calls_orders_by_the_count(db: Database) -> None:
    page = dashboard.browse_rollouts(db, sort="calls", limit=3)
    assert [(r["id"], r["calls"]) for r in page.data] == [("r23", 23), ("r22", 22), ("r21", 21)]
    ascending = dashboard.browse_rollouts(db, sort="calls", descending=False, limit=2)
    assert [r["id"] for r in ascending.data] == ["r01", "r02"]


def test_rollouts_without_a_reward_sort_below_every_reward(db: Database) -> None:
    ids = _all_pages(db, sort="reward")
    assert ids[:3] == ["r23", "r21", "r19"]
    assert set(ids[12:]) == {f"r{i:02d}" for i in range(2, 24, 2)}
    row = dashboard.browse_rollouts(db, sort="reward", limit=1).data[0]
    assert row["reward"] == pytest.approx(2.3)
    assert row["duration_ms"] == pytest.approx(22 + 23)


def test_filters_by_model_text_and_status(db: Database) -> None:
    small = _all_pages(db, model="small")
    assert small and all(int(rid[1:]) % 2 == 0 for rid in small)
    assert _all_pages(db, text="r1") == [f"r{i}" for i in range(19, 9, -1)]
    assert _all_pages(db, text="nothing") == []


def test_a_cursor_from_another_sort_is_refused(db: Database) -> None:
    cursor = dashboard.browse_rollouts(db, sort="calls", limit=2).next_cursor
    assert cursor
    with pytest.raises(BadCursor):
        dashboard.browse_rollouts(db, sort="cost", cursor=cursor)
    with pytest.raises(BadCursor):
        dashboard.browse_rollouts(db, cursor="not-a-cursor")


def test_timeseries_counts_calls_errors_and_percentiles_per_bucket(db: Database) -> None:
    series = dashboard.timeseries(db, since_ns=T0, until_ns=T0 + 24_000 * MS, buckets=24)
    assert len(series) == 24
    assert sum(b["calls"] for b in series) == sum(range(1, 24))
    assert sum(b["errors"] for b in series) == 7
    bucket = series[5]  # rollout r05: five calls of 5 ms each
    assert bucket["calls"] == 5 and bucket["p50_ms"] == 50.0 and bucket["p95_ms"] == 50.0
    assert series[0]["p50_ms"] is None


def test_reward_values_and_a_rollout_without_bodies(db: Database) -> None:
    assert sorted(dashboard.reward_values(db)) == pytest.approx([i / 10 for i in range(1, 24, 2)])
    outline = get_rollout(db, "r03", bodies=False)
    spans = outline["attempts"][0]["spans"]
    assert len(spans) == 3 and "request_body" not in spans[0]
    assert outline["summary"] == get_rollout(db, "r03")["summary"]
