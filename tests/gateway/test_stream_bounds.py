"""bounded_stream (gateway/proxy/limits.py): one deadline for a whole upstream stream, whether
the upstream stalls, trickles, or the time runs out while the gateway is busy with a chunk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import uvloop

from gateway.errors import UpstreamTimeout, UpstreamTooLarge
from gateway.proxy.limits import bounded_stream


async def chunks(*pieces: bytes, then_stall: bool = False) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece
    if then_stall:
        await asyncio.Event().wait()  # an upstream that never sends again


async def collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in stream]


def test_a_stream_inside_its_bounds_passes_whole() -> None:
    stream = bounded_stream(chunks(b"a", b"bc"), max_bytes=3, max_seconds=5)
    assert uvloop.run(collect(stream)) == [b"a", b"bc"]


def test_a_stream_past_its_bytes_is_cut() -> None:
    stream = bounded_stream(chunks(b"ab", b"cd"), max_bytes=3, max_seconds=5)
    with pytest.raises(UpstreamTooLarge, match="max_stream_bytes"):
        uvloop.run(collect(stream))


def test_a_stalled_upstream_is_cut_at_the_deadline() -> None:
    async def run() -> list[bytes]:
        got: list[bytes] = []
        with pytest.raises(UpstreamTimeout, match="max_stream_seconds"):
            async for chunk in bounded_stream(
                chunks(b"a", then_stall=True), max_bytes=100, max_seconds=0.05
            ):
                got.append(chunk)
        # The cut is a timeout, not a cancellation: the task carries on.
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        return got

    assert uvloop.run(run()) == [b"a"]


def test_time_running_out_while_a_chunk_is_handled_cuts_the_next_read() -> None:
    async def run() -> list[bytes]:
        got: list[bytes] = []
        with pytest.raises(UpstreamTimeout):
            async for chunk in bounded_stream(
                chunks(b"a", b"b", b"c"), max_bytes=100, max_seconds=0.05
            ):
                got.append(chunk)
                await asyncio.sleep(0.1)  # a slow client write: the behaviour under test
        return got

    assert uvloop.run(run()) == [b"a"]


def test_a_real_cancellation_while_waiting_stays_a_cancellation() -> None:
    async def run() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in bounded_stream(
                chunks(b"a", then_stall=True), max_bytes=100, max_seconds=30
            ):
                first.set()  # then straight on to the next read, which stalls

        task = asyncio.ensure_future(consume())
        await first.wait()
        task.cancel()  # the client left: nothing to do with the stream's deadline
        with pytest.raises(asyncio.CancelledError):
            await task

    uvloop.run(run())
