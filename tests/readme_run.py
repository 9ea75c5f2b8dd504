"""README.md's examples as data a test can run: its scripts (a ```python block named as a file
in the paragraph before it) and its shell sessions (``` blocks of `$ command` lines, each
followed by what it prints), and a normaliser that takes out what differs between runs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FILE_NAMED = re.compile(r"(?:`|<code>)([\w-]+\.(?:py|yaml))(?:`|</code>)")
# A YAML block can name itself in its first line: `# bad.yaml`.
SELF_NAMED = re.compile(r"# ([\w-]+\.yaml)$")
# `$ a \` continues on the next line, as in a shell.
CONTINUED = "\\"
ELIDED = "..."


@dataclass
class Step:
    """One `$ command` and the lines README says it prints."""

    command: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    """A fenced block of README.md: `line` is its opening fence (1-based)."""

    line: int
    section: str
    lang: str
    body: str
    file: str | None = None

    @property
    def is_session(self) -> bool:
        return not self.lang and self.body.startswith("$ ")

    def steps(self) -> list[Step]:
        steps: list[Step] = []
        lines = iter(self.body.splitlines())
        for line in lines:
            if line.startswith("$ "):
                command = line[2:]
                while command.endswith(CONTINUED):
                    command += "\n" + next(lines)
                steps.append(Step(command))
            else:
                steps[-1].expected.append(line)
        return steps


def blocks(text: str) -> Iterator[Block]:
    """Every fenced block, with the `##`/`###` section it is in and, for code, the file name
    the paragraph before it gives (`agent.py`, `<code>many.py</code>`)."""
    lines = text.splitlines()
    section, index = "", 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
            body = "\n".join(lines[index + 1 : end])
            named = SELF_NAMED.match(lines[index + 1]) if end > index + 1 else None
            file = named.group(1) if named else _named_file(lines, index)
            yield Block(index + 1, section, line[3:].strip(), body, file)
            index = end
        index += 1


def _named_file(lines: list[str], fence: int) -> str | None:
    """The `x.py` named in the paragraph right before a fence."""
    index = fence - 1
    while index >= 0 and not lines[index].strip():
        index -= 1
    paragraph: list[str] = []
    while index >= 0 and lines[index].strip() and not lines[index].startswith("```"):
        paragraph.insert(0, lines[index])
        index -= 1
    names = FILE_NAMED.findall(" ".join(paragraph))
    return names[-1] if names else None


# -- what differs between runs --------------------------------------------------------

_VOLATILE = [
    (re.compile(r"\b\d\d:\d\d:\d\d\.\d+"), "<time>"),
    (re.compile(r"\b\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d)?"), "<date>"),
    (re.compile(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT"), "<http-date>"),
    (re.compile(r"\b\d{19}\b"), "<ns>"),
    (re.compile(r'"(created|created_at)":\d{10}'), r'"\1":<epoch>'),
    (re.compile(r'"paused_at":[\d.]+'), '"paused_at":<epoch>'),
    # A judge run's process: host, pid and start.
    (re.compile(r'"owner":"[^"]*"'), '"owner":<owner>'),
    (re.compile(r'"([\w.]+_ms)":( ?)[-\d.e]+'), r'"\1":\2<ms>'),
    (re.compile(r"\b\d+(\.\d+)?ms\b"), "<n>ms"),
    (re.compile(r"\+\d+\.\d{3}s\b"), "+<s>s"),
    (re.compile(r"X-Gateway-Overhead-Ms: [\d.]+"), "X-Gateway-Overhead-Ms: <ms>"),
    (re.compile(r"Server: .*"), "Server: <server>"),
    (re.compile(r"\b(jr|rw)-[0-9a-f]{16}\b"), r"\1-<id>"),
    (re.compile(r"\b(chatcmpl|resp|msg|cmpl)-mock\d{10}\b"), r"\1-mock<n>"),
    (re.compile(r"\bcall_[0-9a-f]{24}\b"), "call_<id>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<hex32>"),
    (re.compile(r"\b[0-9a-f]{16}\b"), "<hex16>"),
    (re.compile(r"^id: \d+$"), "id: <n>"),
    (re.compile(r"\(\d+ KiB\)"), "(<n> KiB)"),
    # /health/ready while the writer is at work.
    (re.compile(r'"(queue_depth|written)": \d+'), r'"\1": <n>'),
    # jq before 1.7 prints 1.0 as 1.
    (re.compile(r"(?<![\d.])(\d+)\.0\b(?!\.)"), r"\1"),
]


def normalise(line: str) -> str:
    """A printed line with times, ids and durations replaced, and column padding collapsed:
    what stays is every column in its order, counts, statuses, tokens, costs and texts."""
    for pattern, placeholder in _VOLATILE:
        line = pattern.sub(placeholder, line)
    return " ".join(line.split())


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether `actual` is what README shows: a line `...` stands for any lines, a line
    ending in `...` for any line that starts the same."""
    want = [normalise(line) for line in trimmed(expected)]
    got = [normalise(line) for line in trimmed(actual)]
    return _match(want, got)


def trimmed(lines: list[str]) -> list[str]:
    """Without blank lines at either end (a progress line cleared on stderr leaves one)."""
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _match(want: list[str], got: list[str]) -> bool:
    if not want:
        return not got
    head, rest = want[0], want[1:]
    if head == ELIDED:
        return any(_match(rest, got[i:]) for i in range(len(got) + 1))
    if not got:
        return False
    if ELIDED in head:
        # `{"a":1,...}`: the line starts the same, and the rest is left out.
        return got[0].startswith(head[: head.index(ELIDED)]) and _match(rest, got[1:])
    return head == got[0] and _match(rest, got[1:])


def id_pairs(expected: list[str], actual: list[str]) -> dict[str, str]:
    """Ids README shows and the ones this run printed in their place, so a later command
    that uses README's id (`GET /api/judge/runs/jr-...`) can be sent with the real one."""
    pattern = re.compile(r"\bjr-[0-9a-f]{16}\b")
    shown = pattern.findall("\n".join(expected))
    printed = pattern.findall("\n".join(actual))
    return dict(zip(shown, printed, strict=False))
