"""The shared sequence counter: a replica numbers calls itself while the counter fails, and
goes back to it once the counter answers again (never staying on its own numbers)."""

from __future__ import annotations

import asyncio

import pytest

import gateway.proxy.sequencer as sequencer_module
from gateway.proxy.sequencer import Sequencer


async def no_history(rollout_id: str) -> tuple[int, str | None]:
    return 0, None


def test_after_a_failure_the_shared_counter_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sequencer_module, "SHARED_COUNTER_RETRY_SECONDS", 0.05)
    shared = {"next": 100, "up": False, "asked": 0}

    async def allocate(rollout_id: str, count: int, floor: int) -> int:
        shared["asked"] += 1
        if not shared["up"]:
            raise ConnectionError("counter away")
        shared["next"] = max(shared["next"], floor) + count
        return shared["next"]

    async def run() -> list[int]:
        seq = Sequencer(no_history, capacity=10, allocate=allocate)
        await seq.attempt_of("r", None)
        numbers = [await seq.reserve("r"), await seq.reserve("r")]
        assert shared["asked"] == 1  # the breaker is open: the second call did not ask
        shared["up"] = True
        deadline = asyncio.get_running_loop().time() + 2
        while shared["asked"] == 1 and asyncio.get_running_loop().time() < deadline:
            numbers.append(await seq.reserve("r"))
            await asyncio.sleep(0.01)  # poll until the breaker lets a call try again
        numbers.append(await seq.reserve("r"))
        return numbers

    numbers = asyncio.run(run())
    assert numbers[:2] == [1, 2]
    assert shared["asked"] >= 2, "the shared counter was never tried again"
    # Back on the shared counter, above what was handed out meanwhile.
    assert numbers[-1] > 100
    assert numbers == sorted(set(numbers))
