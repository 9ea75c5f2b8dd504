"""`store` and `config` export exactly their public names, as httpx's test_exported_members does.

The packages are inspected in a fresh interpreter: inside pytest, `tests/store/` (a directory
without `__init__.py` on `sys.path`) can shadow the real `store` package as an empty namespace
package, and the check must look at what users import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["store", "config"]

_INSPECT = """
import json, sys, types
facts = {}
for name in sys.argv[1:]:
    package = __import__(name)
    namespace = {}
    exec(f"from {name} import *", namespace)
    facts[name] = {
        "file": package.__file__,
        "all": list(package.__all__),
        "present": [n for n in package.__all__ if hasattr(package, n)],
        "public": sorted(
            n for n, v in vars(package).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)
        ),
        "star": sorted(n for n in namespace if n != "__builtins__"),
    }
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts() -> dict[str, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", _INSPECT, *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("package", PACKAGES)
def test_the_real_package_is_inspected(facts: dict[str, dict[str, Any]], package: str) -> None:
    assert Path(facts[package]["file"]) == ROOT / package / "__init__.py"


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_exist(facts: dict[str, dict[str, Any]], package: str) -> None:
    info = facts[package]
    missing = sorted(set(info["all"]) - set(info["present"]))
    assert not missing, f"{package}.__all__ names what it lacks: {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_all_has_no_duplicates(facts: dict[str, dict[str, Any]], package: str) -> None:
    names = facts[package]["all"]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_in_all(facts: dict[str, dict[str, Any]], package: str) -> None:
    info = facts[package]
    unlisted = sorted(set(info["public"]) - set(info["all"]))
    assert not unlisted, f"{package} exposes names missing from __all__: {unlisted}"


@pytest.mark.parametrize("package", PACKAGES)
def test_star_import_gives_exactly_all(facts: dict[str, dict[str, Any]], package: str) -> None:
    info = facts[package]
    assert info["star"] == sorted(info["all"])
