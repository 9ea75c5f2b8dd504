"""What a training run needs from each call: token ids and logprobs asked of the upstream and
kept (packed) on the span, hidden from clients that did not ask, and per-mode parameters."""

from __future__ import annotations

import base64
import sys
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from config.models import Deployment, ModelGroup, TrainingSettings
from gateway.errors import InvalidRequest

# Operations whose upstreams (vLLM, SGLang) can return token ids and logprobs.
TOKEN_OPERATIONS = frozenset({"chat", "text_completion"})
MODES = ("train", "val")


def _pack(kind: str, values: list[int] | list[float]) -> str:
    """Base64 of a little-endian int32 ("i") or float32 ("f") array: the span's token id and
    logprobs columns, read back by store/packed.py."""
    packed = array(kind, values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def pack_ints(values: list[int]) -> str:
    return _pack("i", values)


def pack_floats(values: list[float]) -> str:
    return _pack("f", values)


@dataclass(slots=True)
class TokenCapture:
    """Token ids and logprobs of choice 0, collected from one answer (plain or streamed)."""

    operation: str
    # What the gateway added to the request, so it is taken out of the answer again.
    strip_ids: bool = False
    strip_logprobs: bool = False
    prompt_ids: list[int] | None = None
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    seen_ids: bool = False
    seen_logprobs: bool = False

    def take(self, obj: dict[str, Any]) -> bool:
        """Collect from an answer or a stream chunk; True if it was changed (stripped)."""
        changed = False
        prompt = obj.get("prompt_token_ids")
        if isinstance(prompt, list) and self.prompt_ids is None:
            self.prompt_ids = [t for t in prompt if isinstance(t, int)]
        if self.strip_ids and "prompt_token_ids" in obj:
            del obj["prompt_token_ids"]
            changed = True
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) == 0:
                self._take_choice(choice)
            if self.strip_ids and "token_ids" in choice:
                del choice["token_ids"]
                changed = True
            # vLLM's completions put prompt ids on the choice rather than the top level.
            if self.strip_ids and "prompt_token_ids" in choice:
                del choice["prompt_token_ids"]
                changed = True
            if self.strip_logprobs and choice.get("logprobs") is not None:
                choice["logprobs"] = None
                changed = True
        return changed

    def _take_choice(self, choice: dict[str, Any]) -> None:
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.seen_ids = True
            self.completion_ids.extend(t for t in ids if isinstance(t, int))
        prompt = choice.get("prompt_token_ids")
        if isinstance(prompt, list) and self.prompt_ids is None:
            self.prompt_ids = [t for t in prompt if isinstance(t, int)]
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict):
            return
        if isinstance(logprobs.get("content"), list):  # chat: [{token, logprob, ...}]
            self.seen_logprobs = True
            self.logprobs.extend(
                float(item["logprob"])
                for item in logprobs["content"]
                if isinstance(item, dict) and isinstance(item.get("logprob"), int | float)
            )
        elif isinstance(logprobs.get("token_logprobs"), list):  # completions: parallel lists
            self.seen_logprobs = True
            self.logprobs.extend(
                float(v) if isinstance(v, int | float) else 0.0 for v in logprobs["token_logprobs"]
            )

    def fields(self) -> dict[str, Any]:
        """The span columns: packed arrays, or nothing for what the upstream did not send."""
        return {
            "prompt_token_ids": pack_ints(self.prompt_ids) if self.prompt_ids is not None else None,
            "completion_token_ids": pack_ints(self.completion_ids) if self.seen_ids else None,
            "logprobs": pack_floats(self.logprobs) if self.seen_logprobs else None,
        }


def training_of(group: ModelGroup, deployment: Deployment) -> TrainingSettings | None:
    return deployment.training or group.training


def upstream_changes(
    payload: dict[str, Any],
    operation: str,
    group: ModelGroup,
    deployment: Deployment,
    mode: str | None,
) -> tuple[dict[str, Any], TokenCapture | None]:
    """Request fields to set for this deployment and mode, and the capture of what comes back."""
    forced = next((params for name, params in group.modes.items() if name == mode), None)
    changes: dict[str, Any] = dict(forced) if forced else {}
    training = training_of(group, deployment)
    if training is None or operation not in TOKEN_OPERATIONS:
        return changes, None
    capture = TokenCapture(operation)
    if training.return_token_ids and not payload.get("return_token_ids"):
        changes["return_token_ids"] = True
        capture.strip_ids = True
    asked = payload.get("logprobs")
    if training.logprobs and (asked is None or asked is False):
        capture.strip_logprobs = True
        if operation == "chat":
            changes["logprobs"] = True
            if training.top_logprobs:
                changes["top_logprobs"] = training.top_logprobs
        else:
            # Completions take the number of alternatives; 0 still gives the chosen token's.
            changes["logprobs"] = training.top_logprobs or 0
    return changes, capture


def stored_mode(metadata: Any) -> str | None:
    """The mode a rollout's stored metadata gives it, if a known one."""
    mode = metadata.get("mode") if isinstance(metadata, dict) else None
    return mode if mode in MODES else None


# The mode a rollout was created with, as the store keeps it (its `metadata.mode`); None if
# it has none or does not exist.
ModeLookup = Callable[[str], Awaitable[str | None]]


class RolloutModes:
    """The mode each rollout was created with (`POST /api/rollouts {mode}`), newest kept.

    With a `lookup`, a rollout this process has not seen (created before a restart, or on
    another replica) is read from the store once by `resolve`; the answer is kept, "no mode"
    too, so later calls of the rollout read nothing.
    """

    def __init__(self, capacity: int = 100_000, lookup: ModeLookup | None = None) -> None:
        self._capacity = capacity
        self._lookup = lookup
        self._modes: OrderedDict[str, str | None] = OrderedDict()

    def set(self, rollout_id: str, mode: str | None) -> None:
        self._modes[rollout_id] = mode
        self._modes.move_to_end(rollout_id)
        if len(self._modes) > self._capacity:
            self._modes.popitem(last=False)

    def get(self, rollout_id: str | None) -> str | None:
        return self._modes.get(rollout_id) if rollout_id is not None else None

    def unknown(self, rollout_id: str | None) -> bool:
        """Whether `resolve` would read the store for this rollout (checked first, so the
        calls of a known rollout pay no await)."""
        return rollout_id is not None and self._lookup is not None and rollout_id not in self._modes

    async def resolve(self, rollout_id: str | None) -> None:
        """Make `get` know the rollout's stored mode (a store read on a miss only)."""
        lookup = self._lookup
        if rollout_id is None or lookup is None or rollout_id in self._modes:
            return
        mode = await lookup(rollout_id)
        # A mode set meanwhile (`POST /api/rollouts`) is newer than this read.
        if rollout_id not in self._modes:
            self.set(rollout_id, mode)


def rollout_mode(
    modes: RolloutModes, headers: Mapping[str, str], rollout_id: str | None
) -> str | None:
    """The call's mode: `X-Rollout-Mode` if sent, else the mode its rollout was created with."""
    sent = headers.get("X-Rollout-Mode")
    if sent is not None:
        mode = sent.strip().lower()
        if mode not in MODES:
            raise InvalidRequest(
                f"X-Rollout-Mode must be one of {', '.join(MODES)}, not {sent!r}",
                param="X-Rollout-Mode",
            )
        return mode
    return modes.get(rollout_id)
