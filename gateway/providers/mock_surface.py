"""The `mock` provider's answers beyond chat: moderations, speech, transcriptions, images,
input-token counts, and the responses it made, kept a while so they can be read back."""

from __future__ import annotations

import base64
import itertools
import math
import struct
import time
from collections import OrderedDict
from typing import Any

import orjson

from gateway.providers.base import RESPONSE_OPERATIONS, UpstreamRequest, UpstreamResponse

_JSON = {"Content-Type": "application/json"}
_ids = itertools.count(1)
# The mock remembers this many of its responses (with their input) for GET /responses/{id}.
REMEMBERED_RESPONSES = 1000
_responses: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()
# A 1x1 transparent PNG: the smallest valid image.
PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
# One silent MPEG-1 Layer III frame (128 kbit/s, 44.1 kHz): about 26 ms of valid mp3.
SILENT_MP3 = b"\xff\xfb\x90\x64" + bytes(413)
MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


def _id(prefix: str) -> str:
    return f"{prefix}-mock{next(_ids):010d}"


def _json(status: int, body: Any) -> UpstreamResponse:
    return UpstreamResponse(status, dict(_JSON), body=orjson.dumps(body))


def _not_found(response_id: str) -> UpstreamResponse:
    message = f"Response with id '{response_id}' not found."
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return _json(404, {"error": error})


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v if isinstance(v, str) else str(v.get("text", "")) for v in value if v]
    return []


def _moderation(payload: dict[str, Any], model: str) -> UpstreamResponse:
    """Nothing is flagged, unless the text says `flag me` (so both paths can be shown)."""
    results = []
    for text in _texts(payload.get("input")) or [""]:
        flagged = "flag me" in text.lower()
        scores = {name: 0.0001 for name in MODERATION_CATEGORIES}
        if flagged:
            scores["violence"] = 0.9
        results.append(
            {
                "flagged": flagged,
                "categories": {name: score > 0.5 for name, score in scores.items()},
                "category_scores": scores,
                "category_applied_input_types": {name: ["text"] for name in scores},
            }
        )
    return _json(200, {"id": _id("modr"), "model": model, "results": results})


def wav_silence(seconds: float = 0.1, rate: int = 8000) -> bytes:
    """A valid mono 16-bit PCM WAV file of silence."""
    samples = bytes(2 * int(rate * seconds))
    header = b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return header + b"data" + struct.pack("<I", len(samples)) + samples


def _speech(payload: dict[str, Any]) -> UpstreamResponse:
    if payload.get("response_format") in ("wav", "pcm"):
        return UpstreamResponse(200, {"Content-Type": "audio/wav"}, body=wav_silence())
    return UpstreamResponse(200, {"Content-Type": "audio/mpeg"}, body=SILENT_MP3 * 4)


def _transcription(payload: dict[str, Any], translate: bool) -> UpstreamResponse:
    given = payload.get("file")
    file: dict[str, Any] = given if isinstance(given, dict) else {}
    name, size = file.get("filename") or "audio", int(file.get("size") or 0)
    verb = "translation" if translate else "transcription"
    text = f"This is a mock {verb} of {name} ({size} bytes)."
    if payload.get("response_format") in ("text", "srt", "vtt"):
        return UpstreamResponse(
            200, {"Content-Type": "text/plain; charset=utf-8"}, body=text.encode()
        )
    heard, said = max(1, size // 1000), _tokens(text)
    usage = {"type": "tokens", "input_tokens": heard, "output_tokens": said}
    return _json(200, {"text": text, "usage": {**usage, "total_tokens": heard + said}})


def _count(value: Any) -> int:
    """`n` as JSON sends it, or as a form field (text); 1 to 10, as OpenAI allows."""
    try:
        count = int(value) if isinstance(value, int | str) else 1
    except ValueError:
        count = 1
    return min(max(count, 1), 10)


def _images(payload: dict[str, Any]) -> UpstreamResponse:
    encoded = base64.b64encode(PIXEL_PNG).decode()
    item: dict[str, Any]
    if payload.get("response_format") == "url":
        item = {"url": f"data:image/png;base64,{encoded}"}
    else:
        item = {"b64_json": encoded}
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and prompt:
        item["revised_prompt"] = prompt
    data = [item for _ in range(_count(payload.get("n")))]
    return _json(200, {"created": int(time.time()), "data": data})


def _input_items(payload: dict[str, Any]) -> list[dict[str, Any]]:
    given = payload.get("input")
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    items = []
    for item in given or []:
        if not isinstance(item, dict):
            continue
        if item.get("type", "message") == "message" and isinstance(item.get("content"), str):
            content = [{"type": "input_text", "text": item["content"]}]
            item = {"type": "message", "role": item.get("role", "user"), "content": content}
        items.append({"id": item.get("id") or _id("msg"), "status": "completed", **item})
    return items


def remember(response: dict[str, Any], payload: dict[str, Any]) -> None:
    """Keep a response the mock made (and its input), for reading back by id."""
    _responses[response["id"]] = (response, _input_items(payload))
    if len(_responses) > REMEMBERED_RESPONSES:
        _responses.popitem(last=False)


def _stored_response(request: UpstreamRequest) -> UpstreamResponse:
    response_id = request.response_id or ""
    found = _responses.get(response_id)
    if found is None:
        return _not_found(response_id)
    response, items = found
    if request.operation == "responses_delete":
        del _responses[response_id]
        return _json(200, {"id": response_id, "object": "response", "deleted": True})
    if request.operation == "responses_input_items":
        data = list(reversed(items)) if request.query.get("order", "desc") == "desc" else items
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        page = {"object": "list", "data": data, "first_id": first, "last_id": last}
        return _json(200, {**page, "has_more": False})
    if request.operation == "responses_cancel":
        # Only background responses can be cancelled; the mock's are complete at once.
        message = "Only background responses can be cancelled."
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        return _json(400, {"error": error})
    return _json(200, response)


def answer(request: UpstreamRequest, model: str) -> UpstreamResponse:
    """The mock's answer to one of `OPERATIONS`."""
    payload, operation = request.payload, request.operation
    if operation in RESPONSE_OPERATIONS:
        return _stored_response(request)
    if operation == "moderations":
        return _moderation(payload, model)
    if operation == "audio_speech":
        return _speech(payload)
    if operation in ("audio_transcription", "audio_translation"):
        return _transcription(payload, operation == "audio_translation")
    if operation == "input_tokens":
        texts = [t for item in _input_items(payload) for t in _texts(item.get("content"))]
        count = 3 + sum(4 + _tokens(text) for text in texts)
        return _json(200, {"object": "response.input_tokens", "input_tokens": count})
    return _images(payload)


OPERATIONS = frozenset(
    {
        *RESPONSE_OPERATIONS,
        "moderations",
        "audio_speech",
        "audio_transcription",
        "audio_translation",
        "image_generation",
        "image_edit",
        "image_variation",
        "input_tokens",
    }
)
