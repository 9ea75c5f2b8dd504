"""The operations beyond chat, completions, embeddings and responses — moderations, audio,
images, input-token counts: how each request is read, and what of each answer is recorded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.proxy.forms import Form, is_form, parse_form
from gateway.proxy.payload import loads, parse_payload

# What OpenAI assumes when a request names no model; the gateway routes by the same name.
DEFAULT_MODELS = {
    "moderations": "omni-moderation-latest",
    "image_generation": "dall-e-2",
    "image_edit": "dall-e-2",
    "image_variation": "dall-e-2",
}
# Sent as multipart/form-data (a file and its fields).
FORM_OPERATIONS = frozenset(
    {"audio_transcription", "audio_translation", "image_edit", "image_variation"}
)
# Answers that may be audio or plain text (`response_format: text`, `srt`, `vtt`), not JSON.
RAW_REPLY_OPERATIONS = frozenset({"audio_speech", "audio_transcription", "audio_translation"})
_TEXT_TYPES = ("application/json", "text/", "application/x-ndjson")


def parse_request(
    raw: bytes, operation: str, content_type: str | None
) -> tuple[bytes, dict[str, Any], Form | None]:
    """(body, payload, form): the payload is the JSON body, or a form's fields."""
    if operation in FORM_OPERATIONS:
        if not is_form(content_type):
            raise InvalidRequest(
                f"this route takes a multipart/form-data body, not {content_type or 'none'!r}"
            )
        form = parse_form(raw, content_type or "")
        payload = form.fields()
        if "model" not in payload and operation in DEFAULT_MODELS:
            payload["model"] = DEFAULT_MODELS[operation]
        if not isinstance(payload.get("model"), str) or not payload["model"]:
            raise InvalidRequest("you must provide a model parameter", param="model")
        return raw, payload, form
    default = DEFAULT_MODELS.get(operation)
    if default is not None and raw.strip():
        body = loads(raw)
        if isinstance(body, dict) and "model" not in body:
            raw = orjson.dumps({**body, "model": default})
    return raw, parse_payload(raw, operation), None


def expects_json(operation: str, headers: Mapping[str, str]) -> bool:
    """Whether a successful plain answer must be a JSON object (anything else is a broken
    upstream); audio answers are JSON only when they say so."""
    if operation not in RAW_REPLY_OPERATIONS:
        return True
    return "json" in _content_type(headers)


def binary_answer(headers: Mapping[str, str], body: bytes | None) -> dict[str, Any] | None:
    """What a span records of an answer that is not text (speech audio): its type and size."""
    kind = _content_type(headers)
    if not kind or kind.startswith(_TEXT_TYPES):
        return None
    return {"content_type": kind, "size": len(body or b"")}


def _content_type(headers: Mapping[str, str]) -> str:
    for name, value in headers.items():
        if name.lower() == "content-type":
            return value.lower()
    return ""
