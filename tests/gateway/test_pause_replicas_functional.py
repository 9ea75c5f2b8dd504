"""A pause sent to one replica holds on every replica sharing the store, and so does the
resume; a replica started while the store says paused starts paused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from servers import GatewayThread, wait_until

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
