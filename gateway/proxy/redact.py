"""Keys out of what is recorded and answered: upstreams echo keys back (in error messages,
sometimes in bodies), and no provider or gateway key may reach the store or a client."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from config.models import Settings

REDACTED = "[redacted]"
# Shorter values are too likely to occur by chance in ordinary text to be worth replacing.
MIN_SECRET_LENGTH = 8


class Redactor:
    """Replaces each known secret with `[redacted]`, in text, bytes or any JSON value."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = frozenset(s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH)
        # Longest first, so a key that contains another is replaced whole.
        ordered = sorted(self.secrets, key=len, reverse=True)
        self._text = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._bytes = (
            re.compile(b"|".join(re.escape(s.encode()) for s in ordered)) if ordered else None
        )

    @classmethod
    def for_settings(cls, settings: Settings) -> Redactor:
        """Every deployment's provider key and every gateway key the settings hold."""
        provider_keys = (d.api_key for g in settings.models for d in g.deployments if d.api_key)
        gateway_keys = (k.key for k in settings.auth.keys)
        return cls([*provider_keys, *gateway_keys, settings.judge.api_key or ""])

    def adding(self, secret: str | None) -> Redactor:
        """This redactor plus one more secret (a key the client sent for the provider)."""
        if not secret or secret in self.secrets or len(secret) < MIN_SECRET_LENGTH:
            return self
        return Redactor([*self.secrets, secret])

    def text(self, value: str) -> str:
        return self._text.sub(REDACTED, value) if self._text is not None else value

    def bytes(self, value: bytes) -> bytes:
        if self._bytes is None or self._bytes.search(value) is None:
            return value
        return self._bytes.sub(REDACTED.encode(), value)

    def value(self, value: Any) -> Any:
        """`value` with every secret replaced, wherever it sits (a string, or inside JSON)."""
        if self._bytes is None or value is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return self.bytes(bytes(value))
        try:
            raw = orjson.dumps(value)
        except TypeError:
            return value  # not JSON: the writer will refuse it on its own terms
        if self._bytes.search(raw) is None:
            return value
        return orjson.loads(self._bytes.sub(REDACTED.encode(), raw))
