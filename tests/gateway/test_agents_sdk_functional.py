"""The OpenAI Agents SDK, pointed at spangate by `base_url` alone, runs its loop to the end and
every step is recorded: README's agent on the offline mock (its code taken from README.md),
streamed and chat-completions runs, and a structured `output_type` through the fake provider."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from pydantic import BaseModel
from readme_run import README, blocks
from servers import GatewayThread, read_rows

from config import default_settings

README_BASE = "http://127.0.0.1:8400"
README_ANSWER = "The tool returned '18C and sunny in example', so that is my answer."
# The SDK would send its own traces to OpenAI; there is no network in the tests.
set_tracing_disabled(True)


@pytest.fixture
def quickstart_gateway(tmp_path: Path) -> Iterator[GatewayThread]:
    """A gateway with the settings `spangate serve` has without a config: the mock, four names."""
    gateway = GatewayThread(default_settings(), tmp_path / "spangate.db").start()
    yield gateway
    gateway.stop()


def readme_script(name: str) -> str:
    (block,) = [b for b in blocks(README.read_text(encoding="utf-8")) if b.file == name]
    return block.body + "\n"


def client_for(gateway: GatewayThread, rollout: str) -> AsyncOpenAI:
    """Closed with `async with` on the loop that used it: a leftover connection is a failure."""
    return AsyncOpenAI(base_url=gateway.url(rollout, "1"), api_key="anything", max_retries=0)


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"18C and sunny in {city}"


@function_tool
def get_time(zone: str) -> str:
    """The time in a time zone."""
    return f"09:00 in {zone}"


def test_readme_agent_finishes_on_the_mock_and_every_step_is_recorded(
    quickstart_gateway: GatewayThread, tmp_path: Path
) -> None:
    script = readme_script("agent_sdk.py")
    assert README_BASE in script
    path = tmp_path / "agent_sdk.py"
    path.write_text(script.replace(README_BASE, quickstart_gateway.base))
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == README_ANSWER

    spans = quickstart_gateway.spans(rollout_id="sdk-1")
    assert [(s["seq"], s["name"], s["status"]) for s in spans] == [
        (1, "responses gpt-4o-mini", "ok"),
        (2, "execute_tool get_weather", "ok"),
        (3, "responses gpt-4o-mini", "ok"),
    ]
    first, tool, last = spans
    assert {s["attempt_id"] for s in spans} == {"1"}
    (asked,) = first["tool_calls"]
    assert (asked["name"], asked["arguments"]) == ("get_weather", '{"city":"example"}')
    assert tool["parent_span_id"] == first["span_id"]
    assert tool["request_body"]["call_id"] == asked["id"]
    assert tool["request_body"]["arguments"] == '{"city":"example"}'
    assert tool["response_body"]["content"] == "18C and sunny in example"
    assert first["attributes"]["gen_ai.agent.id"] == "weather-agent"
    assert last["response_body"]["output"][0]["content"][0]["text"] == README_ANSWER
    (rollout,) = read_rows(quickstart_gateway.db_path, "select * from rollouts")
    assert (rollout["id"], rollout["agent"]) == ("sdk-1", "weather-agent")


def test_streamed_run_with_parallel_tools_on_the_mock(quickstart_gateway: GatewayThread) -> None:
    async def run() -> Any:
        async with client_for(quickstart_gateway, "sdk-stream") as client:
            agent = Agent(
                name="planner",
                model=OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client),
                tools=[get_weather, get_time],
            )
            result = Runner.run_streamed(agent, "Weather and time in Paris?")
            kinds = [event.type async for event in result.stream_events()]
        assert "raw_response_event" in kinds
        return result.final_output

    answer = asyncio.run(run())
    assert answer == (
        "The tools returned '18C and sunny in example' and '09:00 in example', so that is my answer."
    )
    spans = quickstart_gateway.spans(rollout_id="sdk-stream")
    assert [s["name"] for s in spans] == [
        "responses gpt-4o-mini",
        "execute_tool get_weather",
        "execute_tool get_time",
        "responses gpt-4o-mini",
    ]
    assert spans[0]["stream"] == 1
    assert [c["name"] for c in spans[0]["tool_calls"]] == ["get_weather", "get_time"]


def test_chat_completions_model_runs_the_tool_loop_on_the_mock(
    quickstart_gateway: GatewayThread,
) -> None:
    async def run() -> Any:
        async with client_for(quickstart_gateway, "sdk-chat") as client:
            model = OpenAIChatCompletionsModel(model="gpt-4o-mini", openai_client=client)
            agent = Agent(name="chatty", model=model, tools=[get_weather])
            return (await Runner.run(agent, "Weather in Paris?")).final_output

    assert asyncio.run(run()) == README_ANSWER
    spans = quickstart_gateway.spans(rollout_id="sdk-chat")
    assert [s["name"] for s in spans] == [
        "chat gpt-4o-mini",
        "execute_tool get_weather",
        "chat gpt-4o-mini",
    ]


class Forecast(BaseModel):
    city: str
    celsius: int
    sunny: bool


def test_structured_output_type_through_the_fake_provider(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway()

    async def run() -> Any:
        async with client_for(gateway, "sdk-structured") as client:
            model = OpenAIResponsesModel(model="gpt-test", openai_client=client)
            agent = Agent(name="forecaster", model=model, output_type=Forecast)
            return (await Runner.run(agent, "Forecast for Paris")).final_output

    assert asyncio.run(run()) == Forecast(city="test", celsius=1, sunny=True)
    (span,) = gateway.spans(rollout_id="sdk-structured")
    sent_format = span["request_body"]["text"]["format"]
    assert (sent_format["type"], sent_format["name"]) == ("json_schema", "final_output")
    assert sent_format["schema"]["required"] == ["city", "celsius", "sunny"]
    assert span["response_body"]["output"][0]["content"][0]["text"] == (
        '{"city":"test","celsius":1,"sunny":true}'
    )
    assert (span["status"], span["request_model"]) == ("ok", "gpt-test")
