"""README.md tells the truth: its examples, run in order as a new user would (a fresh folder,
`spangate serve` on the built-in mock, each script and `$ command` after the other), print what
README shows, up to times, ids and durations (`readme_run.normalise`).

`SPANGATE_README_UPDATE=1 python -m pytest tests/test_readme_examples.py` writes what this run
printed into README.md where it differs (blocks with `...` elisions are left to a person).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from readme_run import README, Block, Step, blocks, id_pairs, matches, trimmed
from servers import REPO_ROOT, free_port, wait_until

# Sections whose examples run against the quickstart gateway, in README order. The others
# need what a test machine has not got (a provider key, Docker) or a config of their own.
SECTIONS = {
    "Recording an agent",
    "An agent framework: the OpenAI Agents SDK",
    "Attribution",
    "`require_rollout`",
    "OpenAI-compatible routes",
    "Operations routes",
    "Gateway API",
    "API keys",
    "Judges",
    "`spangate judge calibrate`",
    "Patterns",
    "`spangate patterns guidelines`",
    "Report",
    "Metrics",
    "Resilience",
    "Configuration",
    "`spangate prune`",
    "`spangate tail`",
    "`spangate reward`",
    "`spangate export`",
}
# Commands in those sections that cannot run here, and why.
NOT_RUN = {
    "curl -s http://127.0.0.1:8400/v1/models": "needs a gateway with auth.keys",
    "curl -s http://127.0.0.1:8400/api/stats -H": "needs a gateway with auth.keys",
    "spangate serve --config bad2.yaml": "the file is described in a comment, not shown",
    "spangate serve --config bad3.yaml": "the file is described in a comment, not shown",
    "spangate serve --config claude.yaml": "the file is described in a comment, not shown",
}
README_PORTS = re.compile(
    r"(?<=127\.0\.0\.1:)84\d\d\b|(?<=localhost:)84\d\d\b|(?<=--port )84\d\d\b"
)
COMMAND_TIMEOUT = 120.0
STREAM_TIMEOUT = 15.0
UPDATE = os.environ.get("SPANGATE_README_UPDATE") == "1"


@dataclass
class Stream:
    """A command that keeps printing (`curl -N`): read while the next example runs."""

    process: subprocess.Popen[str]
    step: Step
    block: Block
    lines: list[str] = field(default_factory=list)

    def start_reading(self) -> None:
        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))

        threading.Thread(target=read, daemon=True).start()


class Walkthrough:
    """A new user's folder with a gateway on the mock, and a shell that runs README's commands."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "config").symlink_to(REPO_ROOT / "config")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SPANGATE_")}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.ports: dict[str, int] = {}
        self.background: list[subprocess.Popen[bytes]] = []
        self.ids: dict[str, str] = {}
        self.last_status = 0
        self.failures: list[str] = []
        self.printed: dict[tuple[int, int], list[str]] = {}
        self.stream: Stream | None = None

    # -- commands ------------------------------------------------------------------

    def port(self, readme_port: str) -> str:
        if readme_port not in self.ports:
            self.ports[readme_port] = free_port()
        return str(self.ports[readme_port])

    def to_here(self, command: str) -> str:
        command = README_PORTS.sub(lambda m: self.port(m.group(0)), command)
        for shown, real in self.ids.items():
            command = command.replace(shown, real)
        return command

    def to_readme(self, text: str) -> str:
        for readme_port, port in self.ports.items():
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{readme_port}")
        return text

    def serve(self, command: str) -> list[str]:
        """Start `spangate serve ...` in the background; its first lines once it listens."""
        log = self.folder / f"serve-{len(self.background)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.folder,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.background.append(process)
        port = re.search(r"--port (\d+)", command)
        assert port, f"README starts a gateway without --port: {command}"
        wait_until(
            lambda: _ready(int(port.group(1)), process, log),
            timeout=30,
            interval=0.05,
            what=command,
        )
        return self.to_readme(log.read_text()).splitlines()

    def run(self, step: Step, block: Block) -> list[str] | None:
        command = self.to_here(step.command)
        if command.strip() == "echo $?":
            return [str(self.last_status)]
        cat = re.fullmatch(r"cat ([\w.-]+)", command.strip())
        if cat and not (self.folder / cat.group(1)).exists():
            # README shows a file the user writes: the walkthrough writes it the same way.
            (self.folder / cat.group(1)).write_text("\n".join(step.expected) + "\n")
        if command.rstrip().endswith("&"):
            self.serve(command.rstrip()[:-1].strip())
            return []
        if " -N " in command:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.folder,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self.stream = Stream(process, step, block)
            self.stream.start_reading()
            return None
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=self.folder,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        self.last_status = done.returncode
        return self.to_readme(done.stdout).splitlines()

    # -- comparing -----------------------------------------------------------------

    def check(self, block: Block, number: int, step: Step, printed: list[str]) -> None:
        self.ids.update(id_pairs(step.expected, printed))
        if not matches(step.expected, printed):
            self.printed[(block.line, number)] = printed
            self.failures.append(
                f"README.md line {block.line} ({block.section}): `$ {step.command}`\n"
                f"--- README shows\n" + "\n".join(step.expected) + "\n"
                "--- it printed\n" + "\n".join(printed)
            )

    def finish_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is None:
            return
        wanted = len(stream.step.expected)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: len(stream.lines) >= wanted, timeout=STREAM_TIMEOUT, what="events")
        _end(stream.process)
        number = stream.block.steps().index(stream.step)
        self.check(stream.block, number, stream.step, stream.lines[:wanted])

    def session(self, block: Block) -> None:
        for number, step in enumerate(block.steps()):
            if any(step.command.startswith(c) for c in NOT_RUN):
                continue
            printed = self.run(step, block)
            if printed is not None:
                self.check(block, number, step, printed)
        if self.stream is not None and self.stream.block is not block:
            self.finish_stream()

    def stop(self) -> None:
        if self.stream is not None:
            _end(self.stream.process)
        for process in self.background:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _end(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


def _ready(port: int, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"spangate serve exited with {process.returncode}: {log.read_text()}")
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def quickstart(all_blocks: list[Block]) -> tuple[Block, Block]:
    """The install-and-serve command and the block of what `spangate serve` prints."""
    ours = [b for b in all_blocks if b.section == "Quickstart"]
    command = next(b for b in ours if b.lang == "bash" and "spangate serve" in b.body)
    printed = ours[ours.index(command) + 1]
    return command, printed


def examples(all_blocks: list[Block]) -> Iterator[Block]:
    return (b for b in all_blocks if b.section in SECTIONS and (b.is_session or b.file is not None))


@pytest.fixture
def walkthrough(tmp_path: Path) -> Iterator[Walkthrough]:
    run = Walkthrough(tmp_path)
    yield run
    run.stop()


def test_readme_examples_print_what_readme_shows(walkthrough: Walkthrough) -> None:
    text = README.read_text(encoding="utf-8")
    all_blocks = list(blocks(text))
    command, shown = quickstart(all_blocks)
    assert command.body.rstrip().endswith("spangate serve")
    printed = walkthrough.serve(
        "spangate serve --port 8400".replace("8400", walkthrough.port("8400"))
    )
    step = Step("spangate serve", shown.body.splitlines())
    walkthrough.check(shown, 0, step, printed[: len(step.expected)])
    ran = 0
    for block in examples(all_blocks):
        if block.file is not None:
            script = walkthrough.to_here(block.body)
            (walkthrough.folder / block.file).write_text(script + "\n")
        else:
            walkthrough.session(block)
            ran += 1
    walkthrough.finish_stream()
    if UPDATE:
        _update(text, all_blocks, walkthrough)
    assert ran >= 30, f"only {ran} README sessions ran"
    assert not walkthrough.failures, "\n\n".join(walkthrough.failures)


def _update(text: str, all_blocks: list[Block], run: Walkthrough) -> None:
    """Write what this run printed into README's sessions that differ (not those with `...`)."""
    lines = text.splitlines()
    for block in reversed(all_blocks):
        if not any(line == block.line for line, _ in run.printed):
            continue
        body: list[str] = []
        steps = [Step("", block.body.splitlines())] if not block.is_session else block.steps()
        for number, step in enumerate(steps):
            printed = run.printed.get((block.line, number))
            keep = printed is None or any("..." in s for s in step.expected)
            if block.is_session:
                body.extend(("$ " + step.command).split("\n"))
            body.extend(step.expected if keep else trimmed(printed or []))
        start = block.line
        end = start + len(block.body.splitlines())
        lines[start:end] = body
    README.write_text("\n".join(lines) + "\n", encoding="utf-8")
