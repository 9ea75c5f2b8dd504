"""Experiments on the request path: pick a call's variant (sticky per rollout) and apply it to
the parsed body before it is forwarded, so the stored request is what went upstream.

`fixed` hashes experiment and rollout into the weights; `thompson` draws each new rollout's
variant from the posterior of each variant's reward (Beta for rewards in [0, 1], Normal
otherwise), fed by rewards as they arrive and rebuilt from the store at start; replicas
agree on a rollout's draw through a first-come claim in the state they share.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from config.models import Experiment, ExperimentVariant
from gateway.errors import GuidelineMissing, InvalidRequest
from gateway.proxy.shared_guard import SHARED_TIMEOUT, SharedGuard

if TYPE_CHECKING:
    # call.py needs the context, which holds the experiments: only a type here.
    from gateway.proxy.call import Call

log = logging.getLogger("spangate.experiments")

# Units (rollouts, lone calls) whose variant and reward are kept in memory per experiment;
# older ones are forgotten by the posterior only through eviction, never counted twice.
UNIT_CAPACITY = 100_000
# Before a variant has two rewards its spread is unknown: this prior keeps it in play.
NORMAL_PRIOR_SD = 1.0

GuidelineLoader = Callable[[str, int], Awaitable[str | None]]
# The variant a rollout already ran under an experiment (experiment name, rollout id), as
# the store's spans say: another replica may have drawn it.
AssignmentLookup = Callable[[str, str], Awaitable[str | None]]
# Claims a drawn variant for (experiment name, rollout id, this replica's draw) in state every
# replica shares; returns the variant that stands (the first claim's).
VariantClaim = Callable[[str, str, str], Awaitable[str]]


@dataclass(slots=True)
class Arm:
    """Running reward sums of one variant: enough for either posterior."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, value: float, sign: int = 1) -> None:
        self.n += sign
        self.total += sign * value
        self.squares += sign * value * value

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def variance(self) -> float | None:
        if self.n < 2:
            return None
        return max((self.squares - self.n * self.mean**2) / (self.n - 1), 0.0)


@dataclass(slots=True)
class Unit:
    variant: str
    reward: float | None = None
    final: bool = False


@dataclass
class ExperimentState:
    """One experiment as this process runs it: arms, units seen, the decision in force."""

    config: Experiment
    arms: dict[str, Arm] = field(default_factory=dict)
    units: OrderedDict[str, Unit] = field(default_factory=OrderedDict)
    # Set once any reward falls outside [0, 1]: from then on the posterior is Normal.
    unbounded: bool = False
    decision: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.arms = {variant.name: Arm() for variant in self.config.variants}

    @property
    def kind(self) -> str:
        if self.config.posterior != "auto":
            return self.config.posterior
        return "normal" if self.unbounded else "beta"

    @property
    def draws(self) -> bool:
        """Whether a new unit's variant is a random draw, which another replica's may not
        match (a `fixed` split hashes to the same variant everywhere)."""
        return self.decision is None and self.config.policy == "thompson"

    def variant(self, name: str) -> ExperimentVariant | None:
        return next((v for v in self.config.variants if v.name == name), None)

    def remember(self, unit: str, variant: str) -> None:
        self.units[unit] = Unit(variant)
        self.units.move_to_end(unit)
        while len(self.units) > UNIT_CAPACITY:
            _, old = self.units.popitem(last=False)
            if old.reward is not None and old.variant in self.arms:
                self.arms[old.variant].add(old.reward, -1)

    def reward(self, unit: str, value: float, final: bool) -> bool:
        """Count `value` for the unit's variant, replacing its earlier reward (newest final
        one wins); False when the unit is not one of ours."""
        known = self.units.get(unit)
        if known is None or known.variant not in self.arms:
            return False
        if known.final and not final:
            return True
        arm = self.arms[known.variant]
        if known.reward is not None:
            arm.add(known.reward, -1)
        arm.add(value)
        known.reward, known.final = value, final
        if not 0.0 <= value <= 1.0:
            self.unbounded = True
        return True


async def recall(state: ExperimentState, rollout_id: str, assigned: AssignmentLookup) -> None:
    """Take the variant the rollout already ran, if any: one store read, on a rollout's
    first call on this replica only (it is remembered after)."""
    try:
        variant = await assigned(state.config.name, rollout_id)
    except Exception:
        # A busy store costs the rollout its stickiness, never the call.
        log.warning("could not read the assignment of rollout %s", rollout_id, exc_info=True)
        return
    # A call of the rollout may have drawn meanwhile; its variant stands.
    if variant in state.arms and rollout_id not in state.units:
        state.remember(rollout_id, variant)


async def claim(
    state: ExperimentState,
    rollout_id: str,
    drawn: str,
    claim_variant: VariantClaim,
    guard: SharedGuard,
) -> None:
    """Remember the variant that stands for the rollout: the first replica's claim, or this
    draw (the first claim, or the shared state did not answer)."""
    chosen = drawn
    if guard.may_answer():
        try:
            async with asyncio.timeout(SHARED_TIMEOUT):
                claimed = await claim_variant(state.config.name, rollout_id, drawn)
        except Exception as exc:
            # Unclaimed, the rollout may run two variants if its calls reach two replicas
            # at once; it is never refused for it.
            log.warning("could not claim the variant of rollout %s (%s)", rollout_id, exc)
            guard.failed(exc)
        else:
            guard.answered()
            if claimed in state.arms:
                chosen = claimed
            else:
                # Another replica runs another config of the experiment (a rollout of the
                # config in progress): this replica's draw stands here.
                log.warning(
                    "rollout %s was claimed for variant %r, which experiment %s here lacks",
                    rollout_id,
                    claimed,
                    state.config.name,
                )
    # A call of the rollout may have drawn meanwhile; its variant stands.
    if rollout_id not in state.units:
        state.remember(rollout_id, chosen)


def unit_fraction(experiment: str, unit: str) -> float:
    """A stable number in [0, 1) for this experiment and unit (the same on every replica)."""
    digest = hashlib.sha256(f"{experiment}\x00{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def weighted_pick(variants: list[ExperimentVariant], fraction: float) -> str:
    total = sum(variant.weight for variant in variants)
    edge = 0.0
    for variant in variants:
        edge += variant.weight / total
        if fraction < edge and variant.weight > 0:
            return variant.name
    return next(v.name for v in reversed(variants) if v.weight > 0)


def posterior_draw(arm: Arm, kind: str, rng: random.Random, pooled_sd: float) -> float:
    """One draw of the variant's mean reward."""
    if kind == "beta":
        # A reward in [0, 1] counts as that fraction of a success (fractional Bernoulli).
        successes = min(max(arm.total, 0.0), float(arm.n))
        return rng.betavariate(1.0 + successes, 1.0 + arm.n - successes)
    if arm.n == 0:
        return rng.gauss(0.0, pooled_sd * 10)
    variance = arm.variance
    sd = math.sqrt(variance) if variance is not None else pooled_sd
    return rng.gauss(arm.mean, max(sd, 1e-9) / math.sqrt(arm.n))


def thompson_pick(arms: dict[str, Arm], kind: str, floor: float, rng: random.Random) -> str:
    """The variant whose posterior draw is highest; with probability `floor` per variant, one
    picked uniformly instead, so none starves."""
    names = list(arms)
    if rng.random() < floor * len(names):
        return rng.choice(names)
    pooled = _pooled_sd(arms.values())
    draws = {name: posterior_draw(arm, kind, rng, pooled) for name, arm in arms.items()}
    return max(draws, key=lambda name: draws[name])


def _pooled_sd(arms: Iterable[Arm]) -> float:
    n = total = squares = 0.0
    for arm in arms:
        n, total, squares = n + arm.n, total + arm.total, squares + arm.squares
    if n < 2:
        return NORMAL_PRIOR_SD
    variance = (squares - total * total / n) / (n - 1)
    return math.sqrt(variance) if variance > 0 else NORMAL_PRIOR_SD


class Experiments:
    """Every configured experiment, by the model group it covers."""

    def __init__(
        self,
        experiments: list[Experiment],
        *,
        guideline: GuidelineLoader | None = None,
        assigned: AssignmentLookup | None = None,
        claim_variant: VariantClaim | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.by_model = {e.model: ExperimentState(e) for e in experiments}
        self.by_name = {state.config.name: state for state in self.by_model.values()}
        self.guideline = guideline
        self.assigned = assigned
        self.claim_variant = claim_variant
        self._claims = SharedGuard("shared-variants")
        self.rng = rng or random.Random()
        self._guidelines: dict[tuple[str, int], str] = {}

    def covering(self, model: str) -> ExperimentState | None:
        return self.by_model.get(model)

    def choose(self, state: ExperimentState, unit: str | None) -> str | None:
        """The unit's variant (None: stopped, the plain model group answers)."""
        decision = state.decision
        if decision is not None:
            return decision["variant"] if decision["action"] == "promote" else None
        if unit is not None:
            known = state.units.get(unit)
            if known is not None:
                return known.variant
        config = state.config
        if config.policy == "fixed":
            fraction = unit_fraction(config.name, unit) if unit else self.rng.random()
            chosen = weighted_pick(config.variants, fraction)
        else:
            chosen = thompson_pick(state.arms, state.kind, config.floor, self.rng)
        return chosen

    async def apply(
        self,
        state: ExperimentState,
        unit: str,
        payload: dict[str, Any],
        operation: str,
        *,
        rollout: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The payload as the unit's variant sends it, and the span attributes saying so;
        None when the experiment is stopped. A `rollout` unit may have run on another
        replica already."""
        if rollout and unit not in state.units and state.draws:
            if self.assigned is not None:
                await recall(state, unit, self.assigned)
            if self.claim_variant is not None and unit not in state.units:
                drawn = self.choose(state, unit)
                if drawn is not None:
                    await claim(state, unit, drawn, self.claim_variant, self._claims)
        name = self.choose(state, unit)
        variant = state.variant(name) if name else None
        if variant is None:
            return None
        if unit not in state.units:
            state.remember(unit, variant.name)
        changed = {**payload, **variant.params}
        if variant.model:
            changed["model"] = variant.model
        attributes: dict[str, Any] = {"experiment": state.config.name, "variant": variant.name}
        if variant.guideline is not None:
            ref = variant.guideline
            text = await self._guideline_text(ref.agent, ref.version)
            guided = with_guideline(changed, operation, text)
            if guided is not None:
                # Said on the span only when it went upstream: the analysis trusts it.
                changed = guided
                attributes["guideline.agent"] = ref.agent
                attributes["guideline.version"] = ref.version
        return changed, attributes

    async def _guideline_text(self, agent: str, version: int) -> str:
        key = (agent, version)
        text = self._guidelines.get(key)
        if text is None:
            # Versions never change once written, so one read per version is enough.
            text = await self.guideline(agent, version) if self.guideline else None
            if text is None:
                raise GuidelineMissing(
                    f"the experiment's guideline version {version} for agent {agent!r} "
                    "is not stored; write it with `spangate patterns guidelines`"
                )
            self._guidelines[key] = text
        return text

    def on_reward(self, reward: dict[str, Any]) -> None:
        """A reward arrived (recorder bus or the store): count it for its unit's variant."""
        unit = reward.get("rollout_id") or reward.get("span_id")
        if not unit:
            return
        for state in self.by_name.values():
            if reward.get("name") == state.config.reward:
                state.reward(unit, float(reward["value"]), bool(reward.get("final")))

    def unknown_units(self, rewards: list[dict[str, Any]]) -> list[str]:
        """Units of these rewards that a Thompson experiment deciding by them has not seen:
        rollouts another replica assigned, whose rewards count for the posterior here too."""
        units: dict[str, None] = {}
        for reward in rewards:
            unit = reward.get("rollout_id") or reward.get("span_id")
            if unit and any(
                state.config.policy == "thompson"
                and reward.get("name") == state.config.reward
                and unit not in state.units
                for state in self.by_name.values()
            ):
                units[unit] = None
        return list(units)

    def learn(self, assigned: list[dict[str, Any]]) -> None:
        """Units the store says ran a variant (first call's), unless known here already."""
        for row in assigned:
            state = self.by_name.get(row["experiment"])
            if (
                state is not None
                and row["variant"] in state.arms
                and row["unit"] not in state.units
            ):
                state.remember(row["unit"], row["variant"])

    def rebuild(self, assigned: list[dict[str, Any]], rewards: list[dict[str, Any]]) -> None:
        """The units and rewards the store holds, so a restart keeps stickiness and posteriors."""
        self.learn(assigned)
        for reward in rewards:
            self.on_reward(reward)

    def set_decisions(self, decisions: dict[str, dict[str, Any]]) -> None:
        for name, state in self.by_name.items():
            decision = decisions.get(name)
            promoted = decision is not None and decision["action"] == "promote"
            if promoted and decision is not None and state.variant(decision["variant"]) is None:
                log.warning("experiment %s: promoted %r is no variant", name, decision)
                decision = None
            if decision != state.decision:
                log.info("experiment %s: decision now %s", name, decision or "none (running)")
            state.decision = decision


def with_guideline(payload: dict[str, Any], operation: str, text: str) -> dict[str, Any] | None:
    """The payload with the guideline put before everything the client sent; None for an
    operation without a prompt (embeddings, images), which goes as it came."""
    if operation == "chat":
        system = {"role": "system", "content": text}
        return {**payload, "messages": [system, *payload["messages"]]}
    if operation == "responses":
        instructions = payload.get("instructions")
        joined = f"{text}\n\n{instructions}" if isinstance(instructions, str) else text
        return {**payload, "instructions": joined}
    if operation == "text_completion":
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            return {**payload, "prompt": f"{text}\n\n{prompt}"}
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            # A batch: each prompt is its own completion, so each gets the guideline.
            return {**payload, "prompt": [f"{text}\n\n{p}" for p in prompt]}
        # Token ids: the guideline's tokens depend on the upstream's tokenizer, unknown here,
        # and sending the plain prompt would make the variant a silent copy of control.
        raise InvalidRequest(
            "this call falls under an experiment variant that prepends a guideline, which "
            "needs a text `prompt` (a string or a list of strings), not token ids",
            param="prompt",
        )
    return None


async def enter_experiment(experiments: Experiments, call: Call) -> None:
    """Apply the experiment covering the call's model, if any, to the call itself."""
    state = experiments.covering(call.group_name)
    if state is None:
        return
    rollout_id = call.attribution.rollout_id
    unit = rollout_id or call.span_id
    applied = await experiments.apply(
        state, unit, call.payload, call.operation, rollout=rollout_id is not None
    )
    if applied is None:
        return
    payload, attributes = applied
    call.payload = payload
    call.group_name = payload["model"]
    call.raw_request = orjson.dumps(payload)
    call.extra_attributes.update(attributes)
