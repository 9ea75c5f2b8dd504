"""The rest of the surface an SDK reaches, through the real `openai` SDK: a model by id,
stored responses by id (sent to the deployment that made them), moderations, audio, images,
input-token counts, and a clear 404 for what spangate does not serve."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import httpx
import openai
import pytest
from conftest import UPSTREAM_MODEL
from fake_provider import FakeProviderThread
from servers import GatewayThread

from gateway.providers.mock_surface import wav_silence


def _group(name: str, url: str) -> dict[str, object]:
    deployment = {"provider": "openai", "model": UPSTREAM_MODEL, "api_base": url, "api_key": "k"}
    return {"name": name, "deployments": [deployment]}


@pytest.fixture
def surface(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> GatewayThread:
    """`gpt-test` and the OpenAI default names in front of the fake; `mock` built in."""
    names = ("gpt-test", "omni-moderation-latest", "whisper-1", "tts-1", "dall-e-2")
    mock = {"name": "mock", "deployments": [{"provider": "mock", "model": "mock"}]}
    return make_gateway(models=[*(_group(n, fake_provider.url) for n in names), mock])


def _client(gateway: GatewayThread, rollout: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url(rollout), api_key="k", max_retries=0)


# -- models ------------------------------------------------------------------------------


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_named_in_a_404(
    surface: GatewayThread,
) -> None:
    client = _client(surface, "m-1")
    model = client.models.retrieve("gpt-test")
    assert (model.id, model.object, model.owned_by) == ("gpt-test", "model", "spangate")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-9")
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    assert "gpt-9" in error["message"] and error["param"] == "model"


# -- stored responses ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-test", "mock"])
def test_a_response_is_read_back_from_the_deployment_that_made_it(
    surface: GatewayThread, fake_provider: FakeProviderThread, model: str
) -> None:
    client = _client(surface, f"resp-{model}")
    made = client.responses.create(model=model, input="remember me")
    fake_provider.state.requests.clear()

    again = client.responses.retrieve(made.id)
    assert again.id == made.id and again.output_text == made.output_text
    items = client.responses.input_items.list(made.id)
    assert [item.type for item in items.data] == ["message"]
    assert items.data[0].content[0].text == "remember me"  # type: ignore[union-attr]

    reached = [r.path for r in fake_provider.state.snapshot()]
    if model == "gpt-test":
        assert reached == [f"/v1/responses/{made.id}", f"/v1/responses/{made.id}/input_items"]
    else:
        assert reached == []  # the mock kept it; the fake was never asked
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


def test_a_response_no_call_made_is_a_404_naming_it(surface: GatewayThread) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _client(surface).responses.retrieve("resp_never_made")
    assert "resp_never_made" in str(caught.value)


def test_a_response_is_found_through_the_store_after_a_restart(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    first = make_gateway()
    made = _client(first, "resp-restart").responses.create(model="gpt-test", input="hi")
    first.flush()
    first.stop()
    second = make_gateway()
    assert _client(second).responses.retrieve(made.id).id == made.id


# -- moderations, audio, images, input tokens ------------------------------------------


def test_moderations_pass_through_and_are_recorded(
    surface: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    client = _client(surface, "mod-1")
    result = client.moderations.create(input=["hello", "flag me"])
    assert [r.flagged for r in result.results] == [False, True]
    # No model named: routed by OpenAI's default, sent as the deployment's model.
    assert fake_provider.state.last_request.body["model"] == UPSTREAM_MODEL
    (span,) = surface.spans(rollout_id="mod-1")
    assert (span["operation"], span["model_group"], span["status"]) == (
        "moderations",
        "omni-moderation-latest",
        "ok",
    )
    assert span["response_id"] == result.id
    assert span["response_body"]["results"][1]["flagged"] is True


def test_a_transcription_sends_the_file_intact_and_records_the_form(
    surface: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    audio = wav_silence(0.5)
    client = _client(surface, "stt-1")
    text = client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", io.BytesIO(audio), "audio/wav"), language="en"
    )
    assert text.text == f"heard {len(audio)} bytes of clip.wav"
    seen = fake_provider.state.last_request.body
    assert seen["model"] == UPSTREAM_MODEL and seen["language"] == "en"
    assert seen["file"]["sha256"] == hashlib.sha256(audio).hexdigest()

    plain = client.audio.translations.create(
        model="whisper-1", file=("clip.wav", io.BytesIO(audio)), response_format="text"
    )
    assert "heard" in str(plain)

    transcription, translation = surface.spans(rollout_id="stt-1")
    assert transcription["operation"] == "audio_transcription"
    stored = transcription["request_body"]
    assert stored["model"] == "whisper-1" and stored["language"] == "en"
    assert stored["file"] == {
        "filename": "clip.wav",
        "content_type": "audio/wav",
        "size": len(audio),
    }
    assert transcription["response_body"] == {"text": text.text}
    assert translation["operation"] == "audio_translation" and translation["status"] == "ok"


def test_speech_comes_back_as_audio_and_is_recorded_by_size(
    surface: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    client = _client(surface, "tts-1")
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input="hello there")
    audio = speech.read()
    assert audio.startswith(b"RIFF") and speech.response.headers["content-type"] == "audio/wav"
    (span,) = surface.spans(rollout_id="tts-1")
    assert span["response_body"] == {"content_type": "audio/wav", "size": len(audio)}
    assert span["request_body"]["voice"] == "alloy"


def test_images_pass_through_with_usage_and_a_big_answer_is_stored_cut(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(
        models=[_group("dall-e-2", fake_provider.url)], limits={"max_stored_body_bytes": 1000}
    )
    client = _client(gateway, "img-1")
    images = client.images.generate(prompt="a red square", n=10)
    assert len(images.data) == 10 and images.data[0].b64_json
    (span,) = gateway.spans(rollout_id="img-1")
    assert span["operation"] == "image_generation" and span["model_group"] == "dall-e-2"
    assert (span["input_tokens"], span["output_tokens"]) == (10, 20)
    attributes = span["attributes"]
    assert attributes["spangate.response_body.truncated"] is True
    assert attributes["spangate.response_body.size"] > 1000


def test_input_tokens_are_counted_upstream(
    surface: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    counted = _client(surface, "tok-1").responses.input_tokens.count(
        model="gpt-test", input="how many tokens is this"
    )
    assert counted.input_tokens > 0
    assert fake_provider.state.last_request.path == "/v1/responses/input_tokens"


def test_the_mock_answers_every_new_operation_offline(surface: GatewayThread) -> None:
    client = _client(surface, "mock-1")
    assert client.moderations.create(model="mock", input="hi").results[0].flagged is False
    speech = client.audio.speech.create(model="mock", voice="alloy", input="hi")
    assert speech.read()[:2] == b"\xff\xfb"  # an mp3 frame
    text = client.audio.transcriptions.create(model="mock", file=("a.wav", wav_silence()))
    assert "mock transcription of a.wav" in text.text
    image = client.images.generate(model="mock", prompt="a dot")
    assert image.data and image.data[0].b64_json
    edit = client.images.edit(model="mock", image=("a.png", b"\x89PNG"), prompt="bigger")
    assert edit.data
    count = client.responses.input_tokens.count(model="mock", input="hello")
    assert count.input_tokens > 0
    spans = surface.spans(rollout_id="mock-1")
    assert [s["status"] for s in spans] == ["ok"] * 6


# -- what spangate does not serve ----------------------------------------------------------


def test_an_unsupported_route_is_a_404_naming_it(surface: GatewayThread) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _client(surface).fine_tuning.jobs.list()
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["message"] == "spangate does not support GET /v1/fine_tuning/jobs"
    assert (error["type"], error["code"]) == ("invalid_request_error", "unsupported_route")

    prefixed = f"{surface.base}/rollout/r1/attempt/1/v1/batches"
    response = httpx.post(prefixed, json={})
    assert response.status_code == 404
    assert (
        response.json()["error"]["message"]
        == f"spangate does not support POST {prefixed[len(surface.base) :]}"
    )
