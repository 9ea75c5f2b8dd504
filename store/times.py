"""Time arguments as users type them (`7d`, `2026-11-22T08:00Z`), for the API, the CLI and
retention alike."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_NS = 2**63  # the store's integers are signed 64-bit


def parse_since(text: str, *, now_ns: int | None = None) -> int:
    """A point in time as ns since the epoch, from ISO 8601 or a duration ago.

    `2026-11-22`, `2026-11-22T08:00:00`, `2026-11-22 08:00:00+02:00`, `...Z`: a time
    without an offset is local time, as the CLI prints times. `30s`, `30m`, `1h`, `7d`,
    `2w`: that long before `now_ns` (default: now). Raises ValueError otherwise, and for a
    time the store cannot hold (before 1970, or past 2262).
    """
    try:
        moment = _parse(text, now_ns)
    except OverflowError:
        moment = -1
    if not 0 <= moment < MAX_NS:
        raise ValueError(f"{text!r} is outside the storable time range")
    return moment


def _parse(text: str, now_ns: int | None) -> int:
    value = text.strip()
    match = _DURATION.fullmatch(value.lower())
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        now = now_ns if now_ns is not None else _ns(datetime.now(UTC))
        return now - int(amount * _UNIT_SECONDS[unit] * 1_000_000_000)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give ISO 8601 (2026-11-22, 2026-11-22T08:00:00, "
            "optionally with Z or +02:00) or a duration ago (30m, 1h, 7d)"
        ) from None
    return _ns(moment)


def _ns(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.astimezone()  # naive means local time
    # Integer arithmetic: a float timestamp would lose the last digits of the ns value.
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000
