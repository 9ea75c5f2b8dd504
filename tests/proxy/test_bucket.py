"""aiolimiter's bucket level, read and corrected through gateway/proxy/bucket.py: these fail
the day the library stops keeping its level where the wrapper looks."""

from __future__ import annotations

import asyncio
import importlib.metadata

from aiolimiter import AsyncLimiter

from gateway.proxy.bucket import adjust_bucket, bucket_level


def test_the_pinned_version_is_the_one_installed() -> None:
    assert importlib.metadata.version("aiolimiter") == "1.3.0"


def test_level_follows_acquire_and_adjust_gives_capacity_back() -> None:
    async def run() -> None:
        limiter = AsyncLimiter(100, time_period=3600)  # drains too slowly to matter here
        await limiter.acquire(60)
        assert 59.9 < bucket_level(limiter) <= 60
        assert not limiter.has_capacity(50)
        adjust_bucket(limiter, -40)  # the call used 40 fewer than it reserved
        assert 19.9 < bucket_level(limiter) <= 20
        assert limiter.has_capacity(50)
        adjust_bucket(limiter, 500)  # never past the bucket's size
        assert limiter.max_rate - 0.01 < bucket_level(limiter) <= limiter.max_rate
        adjust_bucket(limiter, -1000)  # nor below empty
        assert bucket_level(limiter) == 0

    asyncio.run(run())
