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

    async def allocate(rollout_id: str, count: int, floor: int, *, create: bool = True) -> int:
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


class HeldCounter:
    """A shared counter whose first request waits until released; later requests fail while
    `failing` is set (a pool that timed out)."""

    def __init__(self) -> None:
        self.value = 0
        self.requests: list[int] = []
        self.release = asyncio.Event()
        self.failing = False

    async def allocate(
        self, rollout_id: str, count: int, floor: int, *, create: bool = True
    ) -> int:
        self.requests.append(count)
        if len(self.requests) == 1:
            await self.release.wait()
        elif self.failing:
            raise ConnectionError("no connection in time")
        self.value = max(self.value, floor) + count
        return self.value


async def until(condition: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 2
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0)


async def one_in_flight(counter: HeldCounter) -> tuple[Sequencer, asyncio.Task[int]]:
    """A sequencer on `counter` with one call whose request is on its way."""
    seq = Sequencer(no_history, capacity=10, allocate=counter.allocate)
    await seq.attempt_of("r", None)
    call = asyncio.create_task(seq.reserve("r"))
    await until(lambda: counter.requests, "the first request never went out")
    return seq, call


def test_a_failure_beside_a_request_in_flight_never_duplicates_a_number() -> None:
    # The CI failure this guards: one call's request timed out while another's was still
    # on its way, the first numbered itself locally, and the second came back with the same.
    counter = HeldCounter()
    counter.failing = True

    async def run() -> list[int]:
        seq, first = await one_in_flight(counter)
        second = asyncio.create_task(seq.reserve("r"))
        await asyncio.sleep(0)
        counter.release.set()
        return [await first, await second, await seq.reserve("r")]

    numbers = asyncio.run(run())
    assert sorted(numbers) == [1, 2, 3]


def test_calls_queued_behind_a_request_share_the_next_one() -> None:
    counter = HeldCounter()

    async def run() -> list[int]:
        seq, first = await one_in_flight(counter)
        queued = [asyncio.create_task(seq.reserve("r", 2)) for _ in range(10)]
        await asyncio.sleep(0)
        counter.release.set()
        return [await first, *[await task for task in queued]]

    numbers = asyncio.run(run())
    assert numbers == [1, *range(2, 22, 2)]
    assert counter.requests == [1, 20], "ten queued calls, one request for all of them"


def test_a_cancelled_call_neither_stalls_nor_takes_the_numbers_of_the_others() -> None:
    counter = HeldCounter()

    async def run() -> list[int]:
        seq, holder = await one_in_flight(counter)
        waiting = asyncio.create_task(seq.reserve("r"))
        given_up = asyncio.create_task(seq.reserve("r"))
        await asyncio.sleep(0)
        given_up.cancel()
        holder.cancel()  # cancelled with its request in flight: the queued call goes on
        counter.release.set()
        with pytest.raises(asyncio.CancelledError):
            await holder
        with pytest.raises(asyncio.CancelledError):
            await given_up
        return [await waiting, await seq.reserve("r")]

    first, then = asyncio.run(run())
    assert then == first + 1, "the cancelled call's count was still asked for"
