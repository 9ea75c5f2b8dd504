"""Multipart request bodies (audio transcriptions, image edits): read their fields, and rewrite
a text field (the model) without touching a byte of the files beside it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from gateway.errors import InvalidRequest

_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(rb'\bfilename="([^"]*)"', re.IGNORECASE)
_PART_TYPE = re.compile(rb"^content-type:\s*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)
# Text fields longer than this are kept as a size in the record, like files.
MAX_TEXT_FIELD = 64 * 1024


@dataclass(slots=True)
class Part:
    """One part of the form: its headers and its content, as bytes slices of the body."""

    name: str
    headers: bytes
    content: bytes
    filename: str | None = None
    content_type: str | None = None


@dataclass(slots=True)
class Form:
    """A parsed `multipart/form-data` body, and what the record and the router see of it."""

    content_type: str
    boundary: bytes
    parts: list[Part] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        """Text fields as values; files (and huge fields) as `{filename, content_type, size}`."""
        out: dict[str, Any] = {}
        for part in self.parts:
            if part.filename is None and len(part.content) <= MAX_TEXT_FIELD:
                value: Any = part.content.decode("utf-8", "replace")
            else:
                value = {
                    "filename": part.filename,
                    "content_type": part.content_type,
                    "size": len(part.content),
                }
            if part.name.endswith("[]"):
                out.setdefault(part.name, []).append(value)
            else:
                out.setdefault(part.name, value)
        return out

    def body_for(self, payload: dict[str, Any]) -> bytes:
        """The form again, with each text field `payload` changed (the model) rewritten and any
        new scalar field appended; every other byte as the client sent it."""
        seen: set[str] = set()
        pieces: list[bytes] = []
        for part in self.parts:
            content = part.content
            wanted = payload.get(part.name)
            if part.filename is None and part.name not in seen and _scalar(wanted):
                content = _text(wanted)
            seen.add(part.name)
            pieces.append(part.headers + b"\r\n\r\n" + content)
        for name, value in payload.items():
            if name not in seen and _scalar(value):
                disposition = f'Content-Disposition: form-data; name="{name}"'.encode()
                pieces.append(disposition + b"\r\n\r\n" + _text(value))
        delimiter = b"--" + self.boundary
        body = b"".join(delimiter + b"\r\n" + piece + b"\r\n" for piece in pieces)
        return body + delimiter + b"--\r\n"


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) and value is not None


def _text(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"true" if value else b"false"
    return str(value).encode()


def is_form(content_type: str | None) -> bool:
    return (content_type or "").lower().startswith("multipart/form-data")


def parse_form(raw: bytes, content_type: str) -> Form:
    """The parts of a multipart body; InvalidRequest when it is not the form it says it is."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise InvalidRequest("a multipart/form-data body needs a boundary in its Content-Type")
    form = Form(content_type, boundary.encode())
    delimiter = b"--" + form.boundary
    chunks = raw.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise InvalidRequest("the multipart/form-data body is incomplete or malformed")
    for chunk in chunks[1:-1]:
        # Each part sits between "\r\n" after the delimiter and "\r\n" before the next one.
        chunk = chunk.removeprefix(b"\r\n").removesuffix(b"\r\n")
        headers, separator, content = chunk.partition(b"\r\n\r\n")
        name = _NAME.search(headers)
        if not separator or name is None:
            raise InvalidRequest("a part of the multipart/form-data body has no field name")
        filename = _FILENAME.search(headers)
        part_type = _PART_TYPE.search(headers)
        form.parts.append(
            Part(
                name.group(1).decode("utf-8", "replace"),
                headers,
                content,
                filename.group(1).decode("utf-8", "replace") if filename else None,
                part_type.group(1).decode("latin-1").strip() if part_type else None,
            )
        )
    return form
