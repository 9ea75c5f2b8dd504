"""A trajectory as text for a judge model, fitted into a token budget.

The task, the final answer and every error always survive; long middles are elided
first, then long messages are shortened.
"""

from __future__ import annotations

from judge.trajectory import Step, Trajectory, text_of

CHARS_PER_TOKEN = 4
MESSAGE_LIMITS = (2000, 600, 200, 80)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return (
        text
        if len(text) <= limit
        else text[: limit - 20] + f" …[{len(text) - limit + 20} chars cut]"
    )


def _step_lines(step: Step, limit: int, new_messages: list[dict]) -> list[str]:
    head = (
        f"[step {step.seq} span={step.span_id}] model={step.model} status={step.status} "
        f"{step.duration_ms:.0f}ms tokens={step.input_tokens}+{step.output_tokens}"
    )
    if step.finish_reason:
        head += f" finish={step.finish_reason}"
    if step.retries:
        head += f" retries={step.retries}"
    lines = [head]
    for message in new_messages:
        role = message.get("role") or message.get("type") or "?"
        content = message.get("content") if "content" in message else message.get("output")
        text = text_of(content)
        if role == "tool":
            lines.append(f"  tool result ({message.get('tool_call_id')}): {_clip(text, limit)}")
        elif text:
            lines.append(f"  {role}: {_clip(text, limit)}")
    if step.error:
        lines.append(f"  ERROR: {_clip(step.error, max(limit, 300))}")
    if step.reply:
        lines.append(f"  assistant: {_clip(step.reply, limit)}")
    for use in step.tool_uses:
        flags = []
        if not use.arguments_valid:
            flags.append("INVALID JSON ARGUMENTS")
        if not use.offered:
            flags.append("TOOL NOT OFFERED")
        note = f" [{', '.join(flags)}]" if flags else ""
        lines.append(f"  → calls {use.name}({_clip(use.arguments, limit)}){note}")
    return lines


def _new_messages(previous: int, step: Step) -> list[dict]:
    # Each request repeats the conversation so far; show only what is new since the last one.
    return step.messages[previous:] if previous <= len(step.messages) else step.messages


def render(t: Trajectory, budget_tokens: int) -> str:
    budget = budget_tokens * CHARS_PER_TOKEN
    for limit in MESSAGE_LIMITS:
        text = _render(t, limit, budget)
        if len(text) <= budget:
            return text
    return _squeeze(_render(t, MESSAGE_LIMITS[-1], budget), budget)


def _squeeze(text: str, budget: int) -> str:
    """Last resort: cut lines from the middle, never the task (top) or final answer (bottom)."""
    lines = text.split("\n")
    head, tail = lines[:2], lines[-1:]
    middle = lines[2:-1]
    room = budget - len("\n".join(head + tail)) - 80
    kept_front: list[str] = []
    kept_back: list[str] = []
    while middle and room > 0:
        line = middle.pop(0) if len(kept_front) <= len(kept_back) else middle.pop()
        if len(line) + 1 > room:
            break
        room -= len(line) + 1
        (kept_front if len(kept_front) <= len(kept_back) else kept_back).append(line)
    omitted = f"[… {len(middle)} lines omitted to fit the budget …]"
    squeezed = "\n".join(head + kept_front + [omitted] + kept_back[::-1] + tail)
    return squeezed[:budget] if len(squeezed) > budget else squeezed


def _render(t: Trajectory, limit: int, budget: int) -> str:
    header = [
        f"TASK: {_clip(t.task, max(limit, 1000))}",
        f"rollout {t.rollout_id} status={t.status}",
    ]
    if t.agent:
        header.append(f"agent: {t.agent}")
    footer = [f"FINAL ANSWER: {_clip(t.final_answer, max(limit, 1000)) or '(none)'}"]
    for reward in t.rewards:
        footer.append(
            f"reward {reward.get('name')}={reward.get('value')} from {reward.get('source')}"
        )
    blocks: list[tuple[Step, list[str]]] = []
    for attempt in t.attempts:
        seen = 0
        for step in attempt.steps:
            blocks.append((step, [f"--- attempt {attempt.id}"] if not seen else []))
            blocks[-1][1].extend(_step_lines(step, limit, _new_messages(seen, step)))
            seen = len(step.messages) + 1
    fixed = len("\n".join(header + footer))
    lines = [line for _, block in blocks for line in block]
    if fixed + len("\n".join(lines)) <= budget or len(blocks) <= 4:
        return "\n".join(header + lines + footer)
    # Keep the first two and last two steps and every error; elide the rest.
    keep = {0, 1, len(blocks) - 2, len(blocks) - 1}
    keep |= {i for i, (step, _) in enumerate(blocks) if step.status == "error"}
    out, skipped = [], 0
    for index, (_, block) in enumerate(blocks):
        if index in keep:
            if skipped:
                out.append(f"[… {skipped} steps omitted to fit the budget …]")
                skipped = 0
            out.extend(block)
        else:
            skipped += 1
    if skipped:
        out.append(f"[… {skipped} steps omitted to fit the budget …]")
    return "\n".join(header + out + footer)
