"""The training loop through the real gateway and the openai SDK: token ids and logprobs
recorded (and hidden), triplet export, the live model registry, pause and drain, rollout
affinity, and per-mode parameters."""

from __future__ import annotations

import concurrent.futures
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from conftest import closed_after_test
from fake_provider import (
    FakeProviderThread,
    prompt_token_ids,
    split_words,
    token_id,
    token_logprob,
)
from raw_upstream import RawUpstream, response, stream_head
from servers import GatewayThread, read_rows, wait_until

from gateway.cli import cli
from store.packed import unpack_floats, unpack_ints
from store.schema import connect

MESSAGES = [{"role": "user", "content": "say a few words for training"}]
REPLY = "echo: say a few words for training"
ADMIN_KEY = "sk-admin-key-123"
USER_KEY = "sk-user-key-1234"
TRAINING = {"return_token_ids": True, "logprobs": True}
EXPORT = ("export", "--db")


@pytest.fixture
def vllm(fake_provider: FakeProviderThread) -> Iterator[FakeProviderThread]:
    """The fake provider answering like vLLM (token ids on request)."""
    fake_provider.state.vllm = True
    yield fake_provider
    fake_provider.state.vllm = False


@pytest.fixture(scope="module")
def second_provider() -> Iterator[FakeProviderThread]:
    server = FakeProviderThread().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def third_provider() -> Iterator[FakeProviderThread]:
    server = FakeProviderThread().start()
    yield server
    server.stop()


def _client(gateway: GatewayThread, rollout: str | None = None, **options: Any) -> openai.OpenAI:
    return closed_after_test(
        openai.OpenAI(
            base_url=gateway.url(rollout), api_key=options.pop("api_key", "sk-client"), **options
        )
    )


def _training_gateway(make_gateway: Any, fake_url: str, **group: Any) -> GatewayThread:
    deployment = {"provider": "openai", "model": "upstream-model", "api_base": fake_url}
    return make_gateway(
        models=[{"name": "policy", "deployments": [deployment], "training": TRAINING, **group}]
    )


def _expected_completion() -> tuple[list[int], list[float]]:
    pieces = split_words(REPLY)
    return [token_id(p) for p in pieces], [token_logprob(p) for p in pieces]


# -- token ids and logprobs ------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_token_ids_and_logprobs_are_recorded_and_hidden_from_a_client_that_did_not_ask(
    make_gateway: Any, vllm: FakeProviderThread, stream: bool
) -> None:
    gateway = _training_gateway(make_gateway, vllm.url)
    client = _client(gateway, "tok-1")
    if stream:
        chunks = list(
            client.chat.completions.create(model="policy", messages=MESSAGES, stream=True)
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
        seen = [c.model_extra for c in chunks] + [
            ch.model_extra for c in chunks for ch in c.choices
        ]
    else:
        answer = client.chat.completions.create(model="policy", messages=MESSAGES)
        text = answer.choices[0].message.content or ""
        assert answer.choices[0].logprobs is None
        seen = [answer.model_extra, answer.choices[0].model_extra]
    assert text == REPLY
    assert not any("token_ids" in key for extra in seen for key in (extra or {}))

    sent = vllm.state.last_request.body
    assert sent["return_token_ids"] is True and sent["logprobs"] is True
    [span] = gateway.spans(rollout_id="tok-1")
    ids, logprobs = _expected_completion()
    assert unpack_ints(span["prompt_token_ids"]) == prompt_token_ids(MESSAGES)
    assert unpack_ints(span["completion_token_ids"]) == ids
    assert unpack_floats(span["logprobs"]) == logprobs
    # The stored answer is the one the client got: no token ids, no logprobs.
    assert "prompt_token_ids" not in json.dumps(span["response_body"])


def test_a_client_that_asks_for_logprobs_and_token_ids_gets_them_untouched(
    make_gateway: Any, vllm: FakeProviderThread
) -> None:
    gateway = _training_gateway(make_gateway, vllm.url)
    answer = _client(gateway, "tok-2").chat.completions.create(
        model="policy", messages=MESSAGES, logprobs=True, extra_body={"return_token_ids": True}
    )
    ids, logprobs = _expected_completion()
    assert answer.choices[0].logprobs is not None
    assert [t.logprob for t in answer.choices[0].logprobs.content or []] == logprobs
    assert (answer.model_extra or {})["prompt_token_ids"] == prompt_token_ids(MESSAGES)
    assert (answer.choices[0].model_extra or {})["token_ids"] == ids
    [span] = gateway.spans(rollout_id="tok-2")
    assert unpack_ints(span["completion_token_ids"]) == ids


@pytest.fixture
def raw() -> Iterator[RawUpstream]:
    """An upstream answering exactly the bytes a test scripts (vLLM's less common shapes)."""
    upstream = RawUpstream(pause=0.005)
    yield upstream
    upstream.close()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chat_choice(index: int, ids: list[int], logprobs: list[float]) -> dict[str, Any]:
    content = [{"token": "t", "logprob": lp, "bytes": None, "top_logprobs": []} for lp in logprobs]
    return {
        "index": index,
        "message": {"role": "assistant", "content": "x"},
        "logprobs": {"content": content},
        "finish_reason": "stop",
        "token_ids": ids,
    }


def test_with_n_2_the_span_records_choice_zero_even_when_it_comes_second(
    make_gateway: Any, raw: RawUpstream
) -> None:
    body = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "up",
        "prompt_token_ids": [1, 2, 3],
        "choices": [
            _chat_choice(1, [9, 9], [-9.0, -9.0]),
            _chat_choice(0, [5, 6, 7], [-0.5, -0.25, -1.0]),
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }
    raw.add(response(200, json.dumps(body).encode()))
    gateway = _training_gateway(make_gateway, raw.url)
    answer = httpx.post(
        f"{gateway.url('n2')}/chat/completions",
        json={"model": "policy", "messages": MESSAGES, "n": 2},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert "prompt_token_ids" not in got
    assert all(c["logprobs"] is None and "token_ids" not in c for c in got["choices"])
    [span] = gateway.spans(rollout_id="n2")
    assert unpack_ints(span["prompt_token_ids"]) == [1, 2, 3]
    assert unpack_ints(span["completion_token_ids"]) == [5, 6, 7]
    assert unpack_floats(span["logprobs"]) == [-0.5, -0.25, -1.0]


def test_streamed_completions_with_n_2_record_choice_zero_and_export_it(
    make_gateway: Any, raw: RawUpstream, db_path: Path
) -> None:
    def chunk(index: int, text: str, ids: list[int], lps: list[float], **extra: Any) -> bytes:
        logprobs = {"tokens": [text], "token_logprobs": lps, "top_logprobs": None}
        choice = {"index": index, "text": text, "finish_reason": None, "token_ids": ids}
        choice.update(logprobs={**logprobs, "text_offset": [0]}, **extra)
        return _sse(
            {"id": "cmpl-1", "object": "text_completion", "model": "up", "choices": [choice]}
        )

    usage = {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    raw.add(
        stream_head(),
        chunk(0, "a", [11], [-0.5], prompt_token_ids=[1, 2]),
        chunk(1, "z", [99], [-9.0], prompt_token_ids=[1, 2]),
        chunk(0, "b", [12], [-0.25]),
        chunk(1, "y", [98], [-8.0]),
        _sse({"id": "cmpl-1", "object": "text_completion", "choices": [], "usage": usage}),
        b"data: [DONE]\n\n",
    )
    gateway = _training_gateway(make_gateway, raw.url)
    with httpx.stream(
        "POST",
        f"{gateway.url('cmp2')}/completions",
        json={"model": "policy", "prompt": "hi", "n": 2, "stream": True},
        timeout=10,
    ) as streamed:
        text = b"".join(streamed.iter_bytes()).decode()
    assert "token_ids" not in text and "token_logprobs" not in text
    sent = json.loads(raw.requests[-1].split(b"\r\n\r\n", 1)[1])
    assert sent["return_token_ids"] is True and sent["logprobs"] == 0
    [span] = gateway.spans(rollout_id="cmp2")
    assert unpack_ints(span["prompt_token_ids"]) == [1, 2]
    assert unpack_ints(span["completion_token_ids"]) == [11, 12]
    assert unpack_floats(span["logprobs"]) == [-0.5, -0.25]
    gateway.flush()
    out = CliRunner().invoke(cli, [*EXPORT, str(db_path), "--format", "triplets"])
    assert out.exit_code == 0, out.output
    [triplet] = [json.loads(line) for line in out.stdout.splitlines()]
    assert triplet["response_token_ids"] == [11, 12] and triplet["completion"] == "ab"


def test_an_upstream_without_logprobs_or_ids_leaves_the_columns_null(
    make_gateway: Any, raw: RawUpstream
) -> None:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "x"},
        "logprobs": None,
        "finish_reason": "stop",
    }
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    body = {"id": "c2", "object": "chat.completion", "model": "up", "choices": [choice]}
    raw.add(response(200, json.dumps({**body, "usage": usage}).encode()))
    gateway = _training_gateway(make_gateway, raw.url)
    answer = httpx.post(
        f"{gateway.url('nolp')}/chat/completions",
        json={"model": "policy", "messages": MESSAGES},
        timeout=10,
    )
    assert answer.status_code == 200
    [span] = gateway.spans(rollout_id="nolp")
    columns = (span["prompt_token_ids"], span["completion_token_ids"], span["logprobs"])
    assert columns == (None, None, None)


# -- export ----------------------------------------------------------------------------


def test_triplet_export_carries_token_ids_and_spreads_the_reward_by_rule(
    make_gateway: Any, vllm: FakeProviderThread, db_path: Path, tmp_path: Path
) -> None:
    gateway = _training_gateway(make_gateway, vllm.url)
    client = _client(gateway, "exp-1")
    for _ in range(3):
        client.chat.completions.create(model="policy", messages=MESSAGES)
    response = httpx.post(
        f"{gateway.base}/api/rollouts/exp-1/rewards", json={"value": 1.0, "final": True}
    )
    assert response.status_code == 201
    gateway.flush()

    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            *EXPORT,
            str(db_path),
            "--format",
            "triplets",
            "--reward-rule",
            "discounted",
            "--gamma=.5",
        ],
    )
    assert result.exit_code == 0, result.output
    triplets = [json.loads(line) for line in result.stdout.splitlines()]
    ids, logprobs = _expected_completion()
    assert [t["reward"] for t in triplets] == [0.25, 0.5, 1.0]
    assert all(t["response_token_ids"] == ids for t in triplets)
    assert all(t["prompt_token_ids"] == prompt_token_ids(MESSAGES) for t in triplets)
    assert triplets[0]["logprobs"] == logprobs

    last = runner.invoke(
        cli,
        [*EXPORT, str(db_path), "--format", "triplets", "--reward-rule", "last", "--with-reward"],
    )
    assert [json.loads(line)["seq"] for line in last.stdout.splitlines()] == [3]

    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out = tmp_path / "triplets.parquet"
    result = runner.invoke(
        cli, ["export", "--db", str(db_path), "--format", "parquet", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pylist()
    assert [row["response_token_ids"] for row in table] == [ids] * 3
    assert table[0]["reward"] == 1.0


def test_triplet_export_of_an_empty_store_prints_nothing(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    connect(db).close()
    result = CliRunner().invoke(cli, [*EXPORT, str(db), "--format", "triplets"])
    assert result.exit_code == 0 and result.stdout == "", result.output


# -- live model registry ---------------------------------------------------------------


def test_a_deployment_registered_through_the_api_serves_the_next_call(
    make_gateway: Any, fake_provider: FakeProviderThread, second_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(
        auth={
            "keys": [
                {"key": ADMIN_KEY, "scopes": ["admin"]},
                {"key": USER_KEY, "scopes": ["proxy", "read", "write"]},
            ]
        }
    )
    registration = {"model": "policy", "api_base": second_provider.url, "version": "step-100"}
    refused = httpx.post(
        f"{gateway.base}/api/models",
        json=registration,
        headers={"Authorization": f"Bearer {USER_KEY}"},
    )
    assert refused.status_code == 403
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    added = httpx.post(f"{gateway.base}/api/models", json=registration, headers=admin)
    assert added.status_code == 201, added.text

    second_provider.state.reset()
    client = _client(gateway, "reg-1", api_key=USER_KEY)
    answer = client.chat.completions.create(model="policy", messages=MESSAGES)
    assert answer.choices[0].message.content == REPLY
    assert len(second_provider.state.requests_to("/v1/chat/completions")) == 1
    [span] = gateway.spans(rollout_id="reg-1")
    assert span["model_version"] == "step-100"

    listed = httpx.get(f"{gateway.base}/api/models", headers=admin).json()["data"]
    [entry] = [d for d in listed if d["model"] == "policy"]
    assert entry["version"] == "step-100" and entry["registered"] is True

    # A new version at the same address replaces the old one.
    registration["version"] = "step-200"
    httpx.post(f"{gateway.base}/api/models", json=registration, headers=admin)
    client.chat.completions.create(model="policy", messages=MESSAGES)
    assert [s["model_version"] for s in gateway.spans(rollout_id="reg-1")] == [
        "step-100",
        "step-200",
    ]
    assert read_rows(gateway.db_path, "select version from model_registry") == [
        {"version": "step-200"}
    ]

    boards = httpx.get(f"{gateway.base}/api/leaderboard", headers=admin).json()
    assert [row["model_version"] for row in boards["model_versions"]] == ["step-100"]

    removed = httpx.delete(
        f"{gateway.base}/api/models",
        params={"model": "policy", "api_base": second_provider.url},
        headers=admin,
    )
    assert removed.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="policy", messages=MESSAGES)


def test_registered_deployments_survive_a_restart(
    make_gateway: Any, second_provider: FakeProviderThread
) -> None:
    first = make_gateway()
    registration = {"model": "policy", "api_base": second_provider.url, "version": "v7"}
    assert httpx.post(f"{first.base}/api/models", json=registration).status_code == 201
    first.stop()
    second = make_gateway()
    _client(second, "reg-2").chat.completions.create(model="policy", messages=MESSAGES)
    assert [s["model_version"] for s in second.spans(rollout_id="reg-2")] == ["v7"]


def test_a_new_checkpoint_at_a_configured_address_keeps_the_deployments_settings(
    make_gateway: Any, vllm: FakeProviderThread
) -> None:
    """Only the version changes: the deployment's `training` (and key, timeouts, limits)
    stay, so the trainer's token ids keep coming."""
    deployment = {
        "provider": "openai",
        "model": "upstream-model",
        "api_base": vllm.url,
        "version": "step-0",
        "api_key": "sk-configured",
        "training": TRAINING,
    }
    gateway = make_gateway(models=[{"name": "policy", "deployments": [deployment]}])
    client = _client(gateway, "ckpt-1")
    client.chat.completions.create(model="policy", messages=MESSAGES)
    registration = {
        "model": "policy",
        "api_base": vllm.url,
        "version": "step-100",
        "upstream_model": "upstream-model",
    }
    assert httpx.post(f"{gateway.base}/api/models", json=registration).status_code == 201
    client.chat.completions.create(model="policy", messages=MESSAGES)
    spans = gateway.spans(rollout_id="ckpt-1")
    assert [s["model_version"] for s in spans] == ["step-0", "step-100"]
    ids = [unpack_ints(s["prompt_token_ids"]) for s in spans]
    assert ids == [prompt_token_ids(MESSAGES)] * 2
    assert vllm.state.last_request.body.get("return_token_ids") is True
    assert vllm.state.last_request.header("authorization") == "Bearer sk-configured"


def test_a_new_checkpoint_keeps_the_configured_upstream_model(
    make_gateway: Any, fake_provider: FakeProviderThread
) -> None:
    """A registration with only `version` keeps sending the configured upstream model, not
    the group's name (which a vLLM server would answer 404)."""
    deployment = {"provider": "openai", "model": "upstream-model", "api_base": fake_provider.url}
    gateway = make_gateway(models=[{"name": "policy", "deployments": [deployment]}])
    registration = {"model": "policy", "api_base": fake_provider.url, "version": "v2"}
    added = httpx.post(f"{gateway.base}/api/models", json=registration)
    assert added.status_code == 201, added.text
    assert added.json()["upstream_model"] == "upstream-model"

    _client(gateway, "keep-1").chat.completions.create(model="policy", messages=MESSAGES)

    [span] = gateway.spans(rollout_id="keep-1")
    assert span["model_version"] == "v2"
    assert fake_provider.state.last_request.body["model"] == "upstream-model"


def test_a_new_checkpoint_keeps_the_rpm_every_replica_shares(
    make_gateway: Any, fake_provider: FakeProviderThread, redis_server: Any
) -> None:
    """With `shared.redis_url` the configured `rpm` of 1 holds across replicas, also after a
    new checkpoint is registered at the deployment's address: one call a minute in all."""
    deployment = {
        "provider": "openai",
        "model": "upstream-model",
        "api_base": fake_provider.url,
        "name": f"d-{uuid.uuid4().hex}",
        "rpm": 1,
    }
    settings: dict[str, Any] = {
        "models": [{"name": "policy", "deployments": [deployment]}],
        "retries": {"attempts": 1},
        "rate_limit_wait": 0,
        "shared": {"redis_url": redis_server.url, "sync_seconds": 0.1},
    }
    first, second = make_gateway(**settings), make_gateway(**settings)
    registration = {"model": "policy", "api_base": fake_provider.url, "version": "v2"}
    assert httpx.post(f"{first.base}/api/models", json=registration).status_code == 201

    def serves_v2() -> bool:
        data = httpx.get(f"{second.base}/api/models").json()["data"]
        return any(d["version"] == "v2" for d in data)

    wait_until(serves_v2, timeout=10, what="the second replica following the registry")
    codes = []
    for gateway in (first, second):
        answer = httpx.post(
            f"{gateway.url()}/chat/completions",
            json={"model": "policy", "messages": MESSAGES},
            headers={"Authorization": "Bearer sk-client"},
        )
        codes.append(answer.status_code)
    assert codes == [200, 429]


def test_removing_a_fallback_group_leaves_the_group_it_backed_up_serving(
    make_gateway: Any, fake_provider: FakeProviderThread
) -> None:
    upstream = {"provider": "openai", "model": "upstream-model", "api_base": fake_provider.url}
    backup_base = fake_provider.url.replace("127.0.0.1", "localhost")
    gateway = make_gateway(
        models=[
            {"name": "primary", "deployments": [upstream], "fallbacks": ["backup"]},
            {"name": "backup", "deployments": [{**upstream, "api_base": backup_base}]},
        ]
    )
    client = _client(gateway, "fb-1")
    client.chat.completions.create(model="primary", messages=MESSAGES)
    removed = httpx.delete(
        f"{gateway.base}/api/models", params={"model": "backup", "api_base": backup_base}
    )
    assert removed.status_code == 200, removed.text
    answer = client.chat.completions.create(model="primary", messages=MESSAGES)
    assert answer.choices[0].message.content == REPLY
    # Readiness is about the groups served now: the removed one is no problem of it.
    ready = httpx.get(f"{gateway.base}/health/ready")
    assert (ready.status_code, ready.json()["problems"]) == (200, [])


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/api/rollouts/ex-1/export", {"params": {"format": "triplets", "gamma": "abc"}}, 422),
        ("GET", "/api/rollouts/ex-1/export", {"params": {"format": "triplets", "gamma": "2"}}, 422),
        ("GET", "/api/rollouts/ex-1/export", {"params": {"reward_rule": "sometimes"}}, 422),
        ("GET", "/api/rollouts/ex-1/export", {"params": {"format": "parquet"}}, 422),
        ("GET", "/api/rollouts/nope/export", {"params": {"format": "triplets"}}, 404),
        ("POST", "/api/models", {"json": []}, 400),
        ("POST", "/api/models", {"content": b"{not json"}, 400),
        ("POST", "/api/models", {"json": {"model": "p", "api_base": "file:///etc", "version": "v"}}, 422),
        ("POST", "/api/models", {"json": {"model": "p", "api_base": "http://x/v1", "version": "v", "weight": 0}}, 422),
        ("DELETE", "/api/models", {}, 422),
        ("DELETE", "/api/models", {"params": {"model": "nope", "api_base": "http://x/v1"}}, 404),
        ("POST", "/api/proxy/pause", {"json": {"mode": "sometimes"}}, 422),
        ("POST", "/api/proxy/pause", {"json": {"retry_after_seconds": -1}}, 422),
        ("POST", "/api/proxy/pause", {"json": ["hold"]}, 400),
        ("GET", "/api/experiments/nope", {}, 404),
    ],
)  # fmt: skip
def test_training_routes_answer_bad_input_with_a_clear_error(
    gateway: GatewayThread, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    httpx.post(f"{gateway.base}/api/rollouts", json={"id": "ex-1"})
    answer = httpx.request(method, f"{gateway.base}{path}", timeout=10, **kwargs)
    assert answer.status_code == status, answer.text
    assert set(answer.json()["error"]) >= {"message", "type", "code"}
    assert httpx.get(f"{gateway.base}/api/proxy/state").json()["paused"] is False


# -- pause and drain -------------------------------------------------------------------


def test_pause_in_hold_mode_holds_a_call_until_resume(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    paused = httpx.post(
        f"{gateway.base}/api/proxy/pause", json={"reason": "weight sync", "mode": "hold"}
    )
    assert paused.json()["paused"] is True
    client = _client(gateway, "hold-1")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.chat.completions.create, model="gpt-test", messages=MESSAGES)
        wait_until(
            lambda: httpx.get(f"{gateway.base}/api/proxy/state").json()["held"] == 1,
            what="the call to be held",
        )
        assert fake_provider.state.requests_to("/v1/chat/completions") == []
        state = httpx.post(f"{gateway.base}/api/proxy/resume").json()
        assert state["paused"] is False
        answer = pending.result(timeout=10)
    assert answer.choices[0].message.content == REPLY
    [span] = gateway.spans(rollout_id="hold-1")
    assert span["status"] == "ok" and span["held_ms"] > 0


def test_pause_in_reject_mode_answers_429_with_retry_after(gateway: GatewayThread) -> None:
    httpx.post(
        f"{gateway.base}/api/proxy/pause",
        json={"reason": "weight sync", "mode": "reject", "retry_after_seconds": 7},
    )
    client = _client(gateway, "rej-1", max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.response.headers["Retry-After"] == "7"
    assert caught.value.code == "proxy_paused"
    httpx.post(f"{gateway.base}/api/proxy/resume")
    client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    # The refused call is the rollout's first, in its attempt like the one after it.
    refused, answered = gateway.spans(rollout_id="rej-1")
    assert refused["http_status"] == 429 and refused["error_type"] == "proxy_paused"
    assert [(s["attempt_id"], s["seq"]) for s in (refused, answered)] == [("1", 1), ("1", 2)]


def test_in_flight_calls_drain_to_zero(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    fake_provider.state.add_fault(delay=1.0)
    client = _client(gateway, "drain-1")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.chat.completions.create, model="gpt-test", messages=MESSAGES)
        wait_until(
            lambda: httpx.get(f"{gateway.base}/api/proxy/state").json()["in_flight"] == 1,
            what="the call to be in flight",
        )
        paused = httpx.post(f"{gateway.base}/api/proxy/pause", json={"mode": "hold"}).json()
        # Pausing holds new calls; the one already under way goes on and drains.
        assert paused["in_flight"] == 1
        wait_until(
            lambda: httpx.get(f"{gateway.base}/api/proxy/state").json()["in_flight"] == 0,
            what="in-flight calls to drain",
        )
        pending.result(timeout=10)
    httpx.post(f"{gateway.base}/api/proxy/resume")


# -- rollout affinity ------------------------------------------------------------------


def _named(name: str, url: str) -> dict[str, Any]:
    return {"provider": "openai", "model": "upstream-model", "api_base": url, "name": name}


def test_rollout_affinity_keeps_a_rollout_on_one_deployment_and_survives_adding_one(
    make_gateway: Any,
    fake_provider: FakeProviderThread,
    second_provider: FakeProviderThread,
    third_provider: FakeProviderThread,
) -> None:
    gateway = make_gateway(
        models=[
            {
                "name": "policy",
                "routing": "rollout-affinity",
                "deployments": [_named("a", fake_provider.url), _named("b", second_provider.url)],
            }
        ]
    )
    rollouts = [f"aff-{i}" for i in range(12)]

    def serve_all(prefix: str) -> dict[str, set[str]]:
        for rid in rollouts:
            client = _client(gateway, f"{prefix}{rid}")
            for _ in range(2):
                client.chat.completions.create(model="policy", messages=MESSAGES)
        return {
            rid: {s["deployment"] for s in gateway.spans(rollout_id=f"{prefix}{rid}")}
            for rid in rollouts
        }

    before = serve_all("")
    assert all(len(used) == 1 for used in before.values())
    assert {d for used in before.values() for d in used} == {"a", "b"}

    httpx.post(
        f"{gateway.base}/api/models",
        json={"model": "policy", "api_base": third_provider.url, "version": "v2"},
    )
    after = {}
    for rid in rollouts:
        _client(gateway, rid).chat.completions.create(model="policy", messages=MESSAGES)
        after[rid] = gateway.spans(rollout_id=rid)[-1]["deployment"]
    # A rollout either stays where it was or moves to the new server, never between old ones.
    moved = [rid for rid in rollouts if after[rid] not in before[rid]]
    assert all(after[rid].endswith(f"@{third_provider.url}") for rid in moved)
    assert len(moved) < len(rollouts)


def test_a_new_checkpoint_at_a_configured_server_moves_no_rollout(
    make_gateway: Any, fake_provider: FakeProviderThread, second_provider: FakeProviderThread
) -> None:
    """A new checkpoint at `a`'s address adds and removes no server: no rollout changes
    server, and `a` is still named `a` on spans."""
    gateway = make_gateway(
        models=[
            {
                "name": "policy",
                "routing": "rollout-affinity",
                "deployments": [_named("a", fake_provider.url), _named("b", second_provider.url)],
            }
        ]
    )
    rollouts = [f"ckpt-aff-{i}" for i in range(16)]

    def home(rid: str) -> str:
        _client(gateway, rid).chat.completions.create(model="policy", messages=MESSAGES)
        return str(gateway.spans(rollout_id=rid)[-1]["deployment"])

    before = {rid: home(rid) for rid in rollouts}
    assert set(before.values()) == {"a", "b"}
    registration = {"model": "policy", "api_base": fake_provider.url, "version": "v2"}
    assert httpx.post(f"{gateway.base}/api/models", json=registration).status_code == 201

    after = {rid: home(rid) for rid in rollouts}
    assert after == before


def test_rollout_affinity_falls_back_when_the_breaker_is_open(
    make_gateway: Any, fake_provider: FakeProviderThread, second_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(
        models=[
            {
                "name": "policy",
                "routing": "rollout-affinity",
                "deployments": [_named("a", fake_provider.url), _named("b", second_provider.url)],
                "retries": {"attempts": 1},
                "circuit_breaker": {"fail_max": 1, "reset_timeout": 60},
            }
        ]
    )
    client = _client(gateway, "aff-breaker", max_retries=0)
    client.chat.completions.create(model="policy", messages=MESSAGES)
    [home] = {s["deployment"] for s in gateway.spans(rollout_id="aff-breaker")}
    server = fake_provider if home == "a" else second_provider
    server.state.add_fault(status=500)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="policy", messages=MESSAGES)
    client.chat.completions.create(model="policy", messages=MESSAGES)
    last = gateway.spans(rollout_id="aff-breaker")[-1]
    assert last["status"] == "ok" and last["deployment"] != home


# -- modes -----------------------------------------------------------------------------


def test_a_rollouts_mode_overrides_sampling_parameters_upstream(
    make_gateway: Any, fake_provider: FakeProviderThread
) -> None:
    deployment = {"provider": "openai", "model": "upstream-model", "api_base": fake_provider.url}
    gateway = make_gateway(
        models=[
            {
                "name": "policy",
                "deployments": [deployment],
                "modes": {"train": {"temperature": 1.0}, "val": {"temperature": 0.7}},
            }
        ]
    )
    rid = f"mode-{uuid.uuid4().hex[:6]}"
    created = httpx.post(f"{gateway.base}/api/rollouts", json={"id": rid, "mode": "train"})
    assert created.status_code == 201
    _client(gateway, rid).chat.completions.create(
        model="policy", messages=MESSAGES, temperature=0.2
    )
    assert fake_provider.state.last_request.body["temperature"] == 1.0
    _client(gateway, rid, default_headers={"X-Rollout-Mode": "val"}).chat.completions.create(
        model="policy", messages=MESSAGES
    )
    assert fake_provider.state.last_request.body["temperature"] == 0.7
    assert [s["mode"] for s in gateway.spans(rollout_id=rid)] == ["train", "val"]


def test_posting_an_existing_rollout_again_keeps_its_calls_in_the_stored_mode(
    make_gateway: Any, fake_provider: FakeProviderThread
) -> None:
    deployment = {"provider": "openai", "model": "upstream-model", "api_base": fake_provider.url}
    gateway = make_gateway(
        models=[
            {
                "name": "policy",
                "deployments": [deployment],
                "modes": {"train": {"temperature": 1.0}, "val": {"temperature": 0.7}},
            }
        ]
    )
    first = httpx.post(f"{gateway.base}/api/rollouts", json={"id": "mm", "mode": "train"})
    assert first.status_code == 201
    again = httpx.post(f"{gateway.base}/api/rollouts", json={"id": "mm", "mode": "val"})
    assert again.status_code == 200, again.text
    stored = again.json()["metadata"]["mode"]
    _client(gateway, "mm").chat.completions.create(model="policy", messages=MESSAGES)
    [span] = gateway.spans(rollout_id="mm")
    assert span["mode"] == stored


def _mode_chat(gateway: GatewayThread, rollout: str, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{gateway.url(rollout)}/chat/completions",
        json={"model": model, "messages": MESSAGES, **extra},
        timeout=10,
    )


def test_a_rollouts_mode_survives_a_gateway_restart(
    make_gateway: Any, fake_provider: FakeProviderThread
) -> None:
    # The mode is kept in the rollout's metadata.mode: a gateway that did not see the rollout
    # created reads it from the store on the rollout's first call.
    deployment = {"provider": "openai", "model": "upstream-model", "api_base": fake_provider.url}
    models = [
        {
            "name": "policy",
            "deployments": [deployment],
            "modes": {"train": {"temperature": 1.0}, "val": {"temperature": 0.7}},
        }
    ]
    first = make_gateway(models=models)
    created = httpx.post(f"{first.base}/api/rollouts", json={"id": "mode-r", "mode": "val"})
    assert created.status_code == 201, created.text
    assert _mode_chat(first, "mode-r", "policy", temperature=0.2).status_code == 200
    assert fake_provider.state.last_request.body["temperature"] == 0.7
    first.stop()
    second = make_gateway(models=models)
    assert _mode_chat(second, "mode-r", "policy", temperature=0.2).status_code == 200
    assert fake_provider.state.last_request.body["temperature"] == 0.7
    assert [s["mode"] for s in second.spans(rollout_id="mode-r")] == ["val", "val"]
