"""Two replicas on one PostgreSQL store, as behind a load balancer: an attempt opened on one
is joined by calls on the other, and a reward that reaches the other replica before the
call's span is stored still finds the call, and a Thompson experiment's rollout runs one
variant on both."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from pg import PostgresServer
from servers import GatewayThread, read_rows, wait_until

from store.backend import libpq_url


@pytest.fixture
def two_replicas(
    postgres: PostgresServer, make_gateway: Callable[..., GatewayThread], tmp_path: Path
) -> tuple[str, GatewayThread, GatewayThread]:
    """Replicas A and B on one fresh database. B commits once a second (0.2 s by default), so
    a span B served stays in its queue for the whole of a test step."""
    url = postgres.new_database()
    a, b = (
        make_gateway(
            db=url,
            recorder={"journal_dir": str(tmp_path / f"journal-{index}"), "flush_interval": flush},
        )
        for index, flush in enumerate((0.2, 1.0))
    )
    return url, a, b


def _chat(gateway: GatewayThread, rollout: str) -> httpx.Response:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{gateway.url(rollout)}/chat/completions", json=body, timeout=10)


def test_a_call_after_an_attempt_opened_on_another_replica_joins_that_attempt(
    two_replicas: tuple[str, GatewayThread, GatewayThread],
) -> None:
    """README: a call to `/rollout/{id}/v1/...` joins the attempt last opened with `POST
    /api/rollouts/{id}/attempts`. Each replica kept its own idea of that, so B went on
    putting such calls on attempt 1 for as long as it remembered the rollout."""
    url, a, b = two_replicas
    first = _chat(b, "r-att")
    assert first.status_code == 200 and first.headers["x-attempt-id"] == "1"
    b.flush()
    # News no replica sent (anyone with the database can NOTIFY) must not stop B listening.
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("select pg_notify('spangate_attempts', 'not news')")
    opened = httpx.post(f"{a.base}/api/rollouts/r-att/attempts", json={}, timeout=10)
    assert opened.status_code == 201, opened.text
    assert opened.json()["id"] == "2"
    # B hears of it at A's commit (PostgreSQL NOTIFY), a moment after A answered.
    wait_until(lambda: b.gw.sequencer.current_attempt("r-att") == "2", timeout=5)
    on_a, on_b = _chat(a, "r-att"), _chat(b, "r-att")
    assert on_a.headers["x-attempt-id"] == on_b.headers["x-attempt-id"] == "2"
    a.flush()
    b.flush()
    query = "select seq, attempt_id from spans where rollout_id = 'r-att' order by seq"
    rows: list[dict[str, Any]] = wait_until(
        lambda: (found := read_rows(url, query)) and len(found) == 3 and found, timeout=10
    )
    assert [r["attempt_id"] for r in rows] == ["1", "2", "2"]


def test_a_reward_posted_to_another_replica_right_after_its_call_is_taken(
    two_replicas: tuple[str, GatewayThread, GatewayThread],
) -> None:
    """README: a reward posted right after a call always finds that call. Behind a load
    balancer the reward may reach a replica before the one that served the call has stored
    its span; it got a 404, which a client takes as final, and the reward was dropped."""
    _url, a, b = two_replicas
    called = _chat(b, "r-rw")
    assert called.status_code == 200
    posted = httpx.post(
        f"{a.base}/api/rewards",
        json={"response_id": called.json()["id"], "value": 1.0, "id": "rw-right-after"},
        timeout=10,
    )
    assert posted.status_code == 201, posted.text
    assert posted.json()["span_id"] == called.headers["x-span-id"]


def test_a_reward_for_a_call_no_replica_made_is_still_404(
    two_replicas: tuple[str, GatewayThread, GatewayThread],
) -> None:
    _url, a, _b = two_replicas
    posted = httpx.post(
        f"{a.base}/api/rewards", json={"response_id": "chatcmpl-nobody", "value": 1.0}, timeout=10
    )
    assert posted.status_code == 404, posted.text
    assert posted.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("shared_state", ["postgresql", "redis"])
def test_a_thompson_rollout_whose_first_calls_reach_two_replicas_at_once_runs_one_variant(
    postgres: PostgresServer,
    make_gateway: Callable[..., GatewayThread],
    request: pytest.FixtureRequest,
    shared_state: str,
) -> None:
    """Both replicas take a rollout's first call at the same moment, before either is stored:
    each draws its own variant, and the first claim (in PostgreSQL, or Redis) stands for both."""
    config = {
        "name": "split",
        "model": "gpt-test",
        "policy": "thompson",
        "variants": [{"name": "control"}, {"name": "bigger-model", "model": "mock"}],
    }
    url = postgres.new_database()
    overrides: dict[str, Any] = {}
    if shared_state == "redis":
        redis = request.getfixturevalue("redis_server")
        redis.flush()
        overrides["shared"] = {"redis_url": redis.url}
    replicas = [make_gateway(db=url, experiments=[config], **overrides) for _ in range(2)]
    rollouts = [f"r-both-{n}" for n in range(16)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for rollout in rollouts:
            answers = list(pool.map(lambda gateway, r=rollout: _chat(gateway, r), replicas))
            assert [answer.status_code for answer in answers] == [200, 200]
    for gateway in replicas:
        gateway.flush()
    variants = {}
    for rollout in rollouts:
        spans = read_rows(
            url, "select span_id, attributes from spans where rollout_id = ?", rollout
        )
        assert len(spans) == 2
        ran = {orjson.loads(span["attributes"])["variant"] for span in spans}
        assert len(ran) == 1, (rollout, ran)
        variants[rollout] = ran.pop()
    # Both variants were drawn: the replicas agree because of the claim, not by chance.
    assert set(variants.values()) == {"control", "bigger-model"}
