"""A pause sent to one replica holds on every replica sharing the store, and so does the
resume; a replica started while the store says paused starts paused. The model registry
follows the store the same way; neither is undone by a read of the store older than it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from servers import GatewayThread, wait_until

from gateway.web import routes_pause
from store import registry

SYNC = {"sync_seconds": 0.1}


def state(gateway: GatewayThread) -> dict[str, object]:
    return httpx.get(f"{gateway.base}/api/proxy/state", timeout=5).json()


def chat(gateway: GatewayThread) -> httpx.Response:
    return httpx.post(
        f"{gateway.url('paused-1')}/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )


def test_a_pause_on_one_replica_holds_on_the_other(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread, db_path: Path
) -> None:
    first = make_gateway(shared=SYNC)
    second = GatewayThread(gateway_settings(fake_provider.url, shared=SYNC), db_path).start()
    try:
        paused = httpx.post(
            f"{first.base}/api/proxy/pause",
            json={"reason": "weight sync", "mode": "reject", "retry_after_seconds": 3},
            timeout=5,
        )
        assert paused.status_code == 200, paused.text
        wait_until(lambda: state(second)["paused"], timeout=10, what="the other replica paused")
        refused = chat(second)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "3"
        assert state(second)["reason"] == "weight sync"

        # A replica that starts now starts paused too.
        third = GatewayThread(gateway_settings(fake_provider.url, shared=SYNC), db_path).start()
        try:
            wait_until(lambda: state(third)["paused"], timeout=10, what="a new replica paused")
        finally:
            third.stop()

        assert httpx.post(f"{second.base}/api/proxy/resume", timeout=5).status_code == 200
        wait_until(lambda: not state(first)["paused"], timeout=10, what="the first resumed")
        assert chat(first).status_code == 200 and chat(second).status_code == 200
    finally:
        second.stop()


def test_a_model_registered_on_one_replica_serves_on_the_other(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread, db_path: Path
) -> None:
    first = make_gateway(shared=SYNC)
    second = GatewayThread(gateway_settings(fake_provider.url, shared=SYNC), db_path).start()
    try:
        registered = httpx.post(
            f"{first.base}/api/models",
            json={"model": "trained", "api_base": fake_provider.url, "version": "step-7"},
            timeout=5,
        )
        assert registered.status_code == 201, registered.text

        def served() -> bool:
            listed = httpx.get(f"{second.base}/api/models", timeout=5).json()["data"]
            return any(d["model"] == "trained" and d["version"] == "step-7" for d in listed)

        wait_until(served, timeout=10, what="the other replica to serve the new model")
        answer = httpx.post(
            f"{second.url('reg-1')}/chat/completions",
            json={"model": "trained", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text

        removed = httpx.request(
            "DELETE",
            f"{first.base}/api/models",
            params={"model": "trained", "api_base": fake_provider.url},
            timeout=5,
        )
        assert removed.status_code == 200, removed.text
        wait_until(lambda: not served(), timeout=10, what="the other replica to drop it")
    finally:
        second.stop()


class HeldReads:
    """Wraps a store read so that, while `holding`, each read is reported (with what it
    read) and waits to be released before it returns: a read begun before a change is then
    applied after it for certain, as a busy store makes happen by chance."""

    def __init__(self, read: Callable[[Any], Any]) -> None:
        self.read = read
        self.holding = threading.Event()
        self.reads: queue.Queue[Any] = queue.Queue()
        self.releases: queue.Queue[None] = queue.Queue()

    def __call__(self, db: Any) -> Any:
        value = self.read(db)
        if self.holding.is_set():
            self.reads.put(value)
            self.releases.get(timeout=10)
        return value

    def release(self) -> None:
        self.releases.put(None)

    def stop(self) -> None:
        self.holding.clear()
        for _ in range(3):
            self.release()


def test_a_pause_is_not_undone_by_a_read_of_the_store_begun_before_it(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Else the trainer is told `paused: true` and syncs weights while calls go upstream."""
    held = HeldReads(routes_pause.load_pause)
    monkeypatch.setattr(routes_pause, "load_pause", held)
    gateway = make_gateway(shared={"sync_seconds": 0.05})
    try:
        assert httpx.post(f"{gateway.base}/api/proxy/resume", timeout=5).status_code == 200
        held.holding.set()
        assert not held.reads.get(timeout=10)["paused"]  # read, not yet applied
        paused = httpx.post(f"{gateway.base}/api/proxy/pause", json={"mode": "reject"})
        assert paused.json()["paused"] is True
        held.release()  # the stale "not paused" would be applied now
        assert held.reads.get(timeout=10)["paused"]  # the next read has begun
        assert state(gateway)["paused"] is True
        fake_provider.state.reset()
        assert chat(gateway).status_code == 429
        assert fake_provider.state.snapshot() == []
    finally:
        held.stop()


def test_a_registration_is_not_undone_by_a_registry_read_begun_before_it(
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Else the old version serves again for a while, and then the new one without the
    `api_key` it was registered with."""
    held = HeldReads(registry.list_deployments)
    monkeypatch.setattr(registry, "list_deployments", held)
    gateway = make_gateway(shared={"sync_seconds": 0.05})
    first = {
        "model": "policy",
        "api_base": fake_provider.url,
        "version": "v1",
        "upstream_model": "upstream-model",
        "api_key": "sk-one-registered",
    }
    assert httpx.post(f"{gateway.base}/api/models", json=first).status_code == 201
    try:
        held.holding.set()
        assert [e["version"] for e in held.reads.get(timeout=10)] == ["v1"]
        second = {**first, "version": "v2", "api_key": "sk-two-registered"}
        assert httpx.post(f"{gateway.base}/api/models", json=second).status_code == 201
        held.release()  # the stale v1 would be applied now

        def served() -> tuple[str, str | None]:
            response = httpx.post(
                f"{gateway.url('reg-race')}/chat/completions",
                json={"model": "policy", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer sk-client-own"},
                timeout=10,
            )
            assert response.status_code == 200, response.text
            version = gateway.spans(rollout_id="reg-race")[-1]["model_version"]
            return version, fake_provider.state.last_request.header("authorization")

        # The follower reads one after the other: once a read begins, the one before it
        # was applied (or ignored).
        assert [e["version"] for e in held.reads.get(timeout=10)] == ["v2"]
        assert served() == ("v2", "Bearer sk-two-registered")
        held.release()  # v2 as stored, which holds no key
        held.reads.get(timeout=10)
        assert served() == ("v2", "Bearer sk-two-registered")
    finally:
        held.stop()


def test_a_replica_restarted_while_paused_refuses_its_first_call(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    first = make_gateway()
    assert httpx.post(f"{first.base}/api/proxy/pause", json={"mode": "reject"}).status_code == 200
    first.stop()
    fake_provider.state.reset()
    second = make_gateway()
    assert chat(second).status_code == 429
    assert fake_provider.state.snapshot() == []
