"""Multipart forms: fields read, the model rewritten, every file byte kept, bad forms refused."""

from __future__ import annotations

import httpx
import pytest

from gateway.errors import InvalidRequest
from gateway.proxy.forms import parse_form

AUDIO = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"


def _form(**fields: str) -> tuple[bytes, str]:
    """A body and Content-Type as httpx (the OpenAI SDK's client) builds them."""
    request = httpx.Request(
        "POST", "http://x/", data=fields, files={"file": ("clip.wav", AUDIO, "audio/wav")}
    )
    return request.read(), request.headers["Content-Type"]


def test_fields_are_read_and_files_summarised() -> None:
    body, content_type = _form(model="whisper", language="en")
    assert parse_form(body, content_type).fields() == {
        "model": "whisper",
        "language": "en",
        "file": {"filename": "clip.wav", "content_type": "audio/wav", "size": len(AUDIO)},
    }


def test_the_model_is_rewritten_and_the_file_kept_byte_for_byte() -> None:
    body, content_type = _form(model="whisper", language="en")
    form = parse_form(body, content_type)
    rewritten = form.body_for({**form.fields(), "model": "whisper-1", "temperature": 0.2})
    again = parse_form(rewritten, content_type)
    assert again.fields()["model"] == "whisper-1"
    assert again.fields()["language"] == "en"
    assert again.fields()["temperature"] == "0.2"
    (file,) = [part for part in again.parts if part.filename]
    assert file.content == AUDIO
    # Nothing changed: the same bytes go out.
    assert form.body_for(form.fields()) == body


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (
            b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n',
            "multipart/form-data; boundary=b",
        ),
        (b"anything", "multipart/form-data"),
        (b"--b\r\nno headers here\r\n--b--\r\n", "multipart/form-data; boundary=b"),
    ],
    ids=["unterminated", "no-boundary", "nameless-part"],
)
def test_a_broken_form_is_a_400(body: bytes, content_type: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_form(body, content_type)
