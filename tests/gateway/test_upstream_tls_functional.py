"""An https upstream, as every hosted provider is: the OpenAI SDK through the gateway to the
fake provider over TLS, trusted through the system store (`SSL_CERT_FILE`) or refused."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from certs import self_signed_localhost
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from servers import GatewayThread

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def https_provider(tmp_path: Path) -> Iterator[tuple[FakeProviderThread, Path]]:
    server_tls, cert_file = self_signed_localhost(tmp_path)
    provider = FakeProviderThread(ssl_context=server_tls).start()
    yield provider, cert_file
    provider.stop()
    # asyncio's TLS server (the fake's; the gateway is the client here) leaves the sockets it
    # served for the garbage collector on Python 3.11: collected now, not in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_calls_and_streams_reach_an_https_upstream_trusted_by_the_system_store(
    make_gateway: Callable[..., GatewayThread],
    https_provider: tuple[FakeProviderThread, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider, cert_file = https_provider
    url = provider.url.replace("127.0.0.1", "localhost")
    assert url.startswith("https://localhost:")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    gateway = make_gateway(settings=gateway_settings(url))
    client = openai.OpenAI(base_url=gateway.url("tls-1"), api_key="sk-client")

    answer = client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    streamed = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)

    assert answer.choices[0].message.content and text
    seen = provider.state.requests
    assert [r.path for r in seen] == ["/v1/chat/completions"] * 2
    assert seen[0].header("host") == f"localhost:{provider.port}"
    assert seen[0].header("authorization") == "Bearer sk-upstream-secret"
    spans = gateway.spans(rollout_id="tls-1")
    assert [(s["status"], s["stream"]) for s in spans] == [("ok", 0), ("ok", 1)]


def test_an_https_upstream_with_an_untrusted_certificate_is_refused_and_recorded(
    make_gateway: Callable[..., GatewayThread],
    https_provider: tuple[FakeProviderThread, Path],
) -> None:
    provider, _ = https_provider
    gateway = make_gateway(settings=gateway_settings(provider.url, retries={"attempts": 1}))
    client = openai.OpenAI(base_url=gateway.url("tls-2"), api_key="sk-client", max_retries=0)

    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    assert refused.value.status_code == 502
    error = refused.value.body  # the SDK hands over the `error` object itself
    assert isinstance(error, dict)
    assert error["code"] == "upstream_unreachable"
    assert "CERTIFICATE_VERIFY_FAILED" in error["message"]
    assert provider.state.requests == []
    (span,) = gateway.spans(rollout_id="tls-2")
    assert span["status"] == "error" and span["error_type"] == "upstream_unreachable"
