"""RolloutModes (gateway.proxy.training) driven directly: a rollout's mode known from
`POST /api/rollouts`, or read once from the store when this process has not seen it."""

from __future__ import annotations

import asyncio

from gateway.proxy.training import RolloutModes, stored_mode


def test_a_rollout_unknown_here_has_its_stored_mode_read_once() -> None:
    asked: list[str] = []
    stored = {"made-before-restart": "val", "made-elsewhere-odd": "fast"}

    async def lookup(rollout_id: str) -> str | None:
        asked.append(rollout_id)
        return stored_mode({"mode": stored.get(rollout_id)})

    modes = RolloutModes(lookup=lookup)
    modes.set("made-here", "train")

    async def resolve_all() -> None:
        for rollout_id in ("made-here", "made-before-restart", "made-elsewhere-odd", "plain"):
            for _ in range(3):
                await modes.resolve(rollout_id)
        await modes.resolve(None)

    asyncio.run(resolve_all())
    assert [modes.get(r) for r in ("made-here", "made-before-restart", "plain")] == [
        "train",
        "val",
        None,
    ]
    # An unknown mode is no mode; "no mode" is remembered too, so each is read once.
    assert modes.get("made-elsewhere-odd") is None
    assert asked == ["made-before-restart", "made-elsewhere-odd", "plain"]


def test_without_a_lookup_only_modes_set_here_are_known() -> None:
    modes = RolloutModes()
    asyncio.run(modes.resolve("r1"))
    modes.set("r2", "val")
    assert (modes.get("r1"), modes.get("r2"), modes.get(None)) == (None, "val", None)
