"""The one place that reaches inside aiolimiter: its bucket level, which it offers no public
way to read or correct. Pinned to aiolimiter 1.3.0; tests/proxy/test_bucket.py fails if the
library changes what these two functions rely on."""

from __future__ import annotations

from aiolimiter import AsyncLimiter


def bucket_level(limiter: AsyncLimiter) -> float:
    """Capacity in use right now (after leaking what has drained since the last look)."""
    limiter._leak()
    return float(limiter._level)


def adjust_bucket(limiter: AsyncLimiter, delta: float) -> None:
    """Add (or give back, when negative) capacity, kept within 0..max_rate: how a call's
    estimated tokens are settled with what it really used."""
    level = bucket_level(limiter)
    limiter._level = min(max(level + delta, 0.0), limiter.max_rate)
