"""The layers of DESIGN.md, checked from the code's own imports (module-level and inside
functions): an arrow pointing the wrong way fails here before it spreads."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("gateway", "store", "judge", "config")

# Which of our packages each layer may import (itself always allowed).
ALLOWED: dict[str, tuple[str, ...]] = {
    "config": (),
    "store": (),
    "judge": ("store", "config"),
    "gateway.errors": (),
    "gateway.providers": ("config", "gateway.errors"),
    "gateway.proxy": ("gateway.providers", "config", "gateway.errors"),
    "gateway.exporters": ("gateway.proxy", "config", "gateway.errors"),
    "gateway.web": (
        "gateway.proxy",
        "gateway.providers",
        "store",
        "config",
        "gateway.errors",
    ),
}
# The composition root (compose, its judge routes, replica wiring and retention), the server
# and the CLI join everything; only they may import judge.
COMPOSITION = (
    "gateway.compose",
    "gateway.judge_routes",
    "gateway.scaling",
    "gateway.retention",
    "gateway.server",
    "gateway.cli",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            # `from gateway import errors` names a module too.
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if within(name, layer):
            return layer
    return None


def source_files() -> list[Path]:
    return sorted(p for package in OURS for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers(path: Path) -> None:
    module = module_name(path)
    if module == "gateway" or any(within(module, root) for root in COMPOSITION):
        return
    layer = layer_of(module)
    assert layer is not None, f"{module} is in no layer; add it to ALLOWED or COMPOSITION"
    allowed = (layer, *ALLOWED[layer])
    wrong = []
    for line, imported in our_imports(path):
        if imported.split(".")[0] not in OURS:
            if layer.startswith("gateway.proxy") and within(imported, "aiohttp.web"):
                wrong.append(f"line {line}: {imported} (the proxy knows no aiohttp.web)")
            continue
        target = layer_of(imported) or imported.split(".")[0]
        if imported == "gateway":  # `from gateway import x` is judged by x
            continue
        if not any(within(target, ok) for ok in allowed):
            wrong.append(f"line {line}: {imported}")
    assert not wrong, f"{module} ({layer}) imports across the layers: " + "; ".join(wrong)


def test_only_the_composition_root_the_server_and_the_cli_import_judge() -> None:
    offenders = []
    for path in source_files():
        module = module_name(path)
        if within(module, "judge") or any(within(module, root) for root in COMPOSITION):
            continue
        for line, imported in our_imports(path):
            if within(imported, "judge"):
                offenders.append(f"{module} line {line}")
    assert not offenders, "judge imported outside the composition root: " + ", ".join(offenders)
