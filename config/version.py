"""The installed spangate version, for headers, reports and exported resources."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version


@functools.cache
def package_version() -> str:
    try:
        return version("spangate")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"
