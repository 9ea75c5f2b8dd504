"""The dashboard shows what budgets and experiments do: a budget bar on a rollout's page and
an experiments page with each variant against control."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from servers import GatewayThread, wait_until


def chat(gateway: GatewayThread, rollout: str, model: str = "mock") -> httpx.Response:
    return httpx.post(
        f"{gateway.url(rollout)}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )


def test_a_rollout_page_shows_its_budget_spent(make_gateway: Callable[..., GatewayThread]) -> None:
    gateway = make_gateway(budgets={"rollout": {"max_calls": 3, "max_tokens": 10_000}})
    assert chat(gateway, "bar-1").status_code == 200
    gateway.flush()
    page = httpx.get(f"{gateway.base}/ui/rollouts/bar-1", timeout=10)
    assert page.status_code == 200
    assert 'data-limit="max_calls"' in page.text and "1 of 3 calls" in page.text
    assert 'data-limit="max_tokens"' in page.text


def test_the_experiments_page_lists_variants_and_a_verdict(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    experiment = {
        "name": "concise-v2",
        "model": "gpt-test",
        "variants": [{"name": "control"}, {"name": "cooler", "params": {"temperature": 0.1}}],
    }
    gateway = make_gateway(experiments=[experiment], experiment_refresh=0.2)
    for n in range(4):
        assert chat(gateway, f"exp-{n}", model="gpt-test").status_code == 200
    gateway.flush()

    def listed() -> str | None:
        page = httpx.get(f"{gateway.base}/ui/experiments", timeout=10)
        return page.text if page.status_code == 200 and "data-experiment" in page.text else None

    text = wait_until(listed, timeout=10, what="the experiment on the page")
    assert 'data-experiment="concise-v2"' in text
    assert 'data-variant="control"' in text and 'data-variant="cooler"' in text
    assert 'class="verdict"' in text
    assert 'href="/ui/experiments"' in text  # in the navigation of every page
