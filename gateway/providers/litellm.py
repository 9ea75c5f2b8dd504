"""Non-OpenAI providers (anthropic, gemini, bedrock, ...) via litellm, imported lazily, with
answers and failures turned back into OpenAI's wire format and the gateway's errors.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import struct
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from types import ModuleType
from typing import Any

import orjson

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamAnswerUnreadable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_body,
)
from gateway.providers.base import UpstreamRequest, UpstreamResponse, too_large
from gateway.providers.headers import client_headers_for

_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
# Upstream headers worth keeping on an error: the gateway's retry policy honours them.
_KEPT_ERROR_HEADERS = ("retry-after", "retry-after-ms")
_OWN_ACCEPT = frozenset({"accept"})

# Only these request fields reach litellm. Everything else is dropped: litellm reads many
# keyword arguments as its own settings (`api_base`, `mock_response`, `metadata`, ...), and
# a client must never steer those (no arbitrary upstream URLs from clients).
_CHAT_PARAMS = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "modalities",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "reasoning_effort",
        "response_format",
        "seed",
        "service_tier",
        "stop",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
        # Not OpenAI's, but litellm maps them for Anthropic/Gemini; clients send them via extra_body.
        "thinking",
        "top_k",
    }
)
_COMPLETION_PARAMS = frozenset(
    {
        "best_of",
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stop",
        "suffix",
        "temperature",
        "top_p",
        "user",
    }
)
# `encoding_format` is handled here (base64 is ours to produce), not by the provider.
_EMBEDDING_PARAMS = frozenset({"dimensions", "user"})

_litellm: ModuleType | None = None
_load_lock = threading.Lock()


def load_litellm() -> ModuleType:
    """Import and configure litellm once (seconds of work: call it in a thread at startup)."""
    global _litellm
    if _litellm is not None:
        return _litellm
    with _load_lock:
        if _litellm is None:
            # Without this litellm fetches its cost map from GitHub at import and stalls offline.
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            import litellm

            # Its default aiohttp transport keeps private sessions alive beyond any call and
            # cannot be observed by respx; httpx is the transport our tests check.
            litellm.disable_aiohttp_transport = True
            # Otherwise every error prints a "Provider List" banner to stdout.
            litellm.suppress_debug_info = True
            _warm_up()
            _litellm = litellm
    return _litellm


def _warm_up() -> None:
    """Finish building litellm's response models now, where pydantic's warning can be silenced.

    litellm defers its pydantic schemas to the first use, and building them warns (UserWarning)
    about a `ReadOnly` TypedDict; inside a call that warning would surface in the gateway's
    worker threads (and fail tests that turn warnings into errors). Takes about 50 ms.
    """
    import pydantic
    from litellm.types import utils as types

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`ReadOnly` qualifier", category=UserWarning)
        for model in vars(types).values():
            if (
                isinstance(model, type)
                and issubclass(model, pydantic.BaseModel)
                and model.__module__ == types.__name__
            ):
                model.model_rebuild()


def litellm_loaded() -> bool:
    return _litellm is not None


def is_litellm_provider(name: str) -> bool:
    """Whether litellm knows the provider name (loads litellm: call it off the event loop)."""
    names = {str(getattr(p, "value", p)) for p in load_litellm().provider_list}
    return name in names


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _dump(obj: Any) -> dict[str, Any]:
    """A litellm response object as a plain dict (it is a pydantic model, or already a dict)."""
    if isinstance(obj, dict):
        return obj
    # warnings=False: litellm's models hold values their own field types do not declare.
    return obj.model_dump(warnings=False)


def _api_key(request: UpstreamRequest) -> str | None:
    """The deployment's key, else the client's bearer token (litellm falls back to env vars)."""
    if request.deployment.api_key:
        return request.deployment.api_key
    auth = request.client_headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


# ---------------------------------------------------------------------------------------------
# Answers: litellm's objects reshaped into exactly what OpenAI sends.


def _without_none(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not None}


def _usage(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(raw.get("total_tokens") or prompt + completion),
    }
    for name, keys in (
        ("prompt_tokens_details", ("cached_tokens", "audio_tokens")),
        (
            "completion_tokens_details",
            (
                "reasoning_tokens",
                "audio_tokens",
                "accepted_prediction_tokens",
                "rejected_prediction_tokens",
            ),
        ),
    ):
        details = raw.get(name) or {}
        kept = {k: details[k] for k in keys if isinstance(details.get(k), int)}
        if kept:
            usage[name] = kept
    return usage


def _tool_calls(raw: Any, *, delta: bool) -> list[dict[str, Any]] | None:
    if not raw:
        return None
    calls = []
    for position, call in enumerate(raw):
        function = call.get("function") or {}
        if delta:
            # Stream deltas carry only what is new; `index` ties the pieces together.
            out: dict[str, Any] = {"index": call.get("index", position)}
            out.update(_without_none({"id": call.get("id"), "type": call.get("type")}))
            out["function"] = _without_none(
                {"name": function.get("name"), "arguments": function.get("arguments")}
            )
        else:
            out = {
                "id": call.get("id"),
                "type": call.get("type") or "function",
                "function": {
                    "name": function.get("name"),
                    "arguments": function.get("arguments") or "",
                },
            }
        calls.append(out)
    return calls


def _message(raw: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": raw.get("role") or "assistant",
        "content": raw.get("content"),
        "refusal": raw.get("refusal"),
    }
    tool_calls = _tool_calls(raw.get("tool_calls"), delta=False)
    if tool_calls:
        message["tool_calls"] = tool_calls
    if raw.get("function_call"):
        message["function_call"] = raw["function_call"]
    # litellm's cross-provider reasoning fields; clients that do not know them ignore them.
    for extra in ("reasoning_content", "thinking_blocks", "annotations", "audio"):
        if raw.get(extra):
            message[extra] = raw[extra]
    return message


def chat_completion(raw: dict[str, Any]) -> dict[str, Any]:
    """litellm's ModelResponse (as a dict) in OpenAI's `chat.completion` shape."""
    body: dict[str, Any] = {
        "id": raw.get("id"),
        "object": "chat.completion",
        "created": raw.get("created"),
        "model": raw.get("model"),
    }
    if raw.get("system_fingerprint"):
        body["system_fingerprint"] = raw["system_fingerprint"]
    body["choices"] = [
        {
            "index": choice.get("index", i),
            "message": _message(choice.get("message") or {}),
            "logprobs": choice.get("logprobs"),
            "finish_reason": choice.get("finish_reason"),
        }
        for i, choice in enumerate(raw.get("choices") or ())
    ]
    body["usage"] = _usage(raw.get("usage"))
    return body


def text_completion(raw: dict[str, Any]) -> dict[str, Any]:
    """litellm's TextCompletionResponse (as a dict) in OpenAI's `text_completion` shape."""
    return {
        "id": raw.get("id"),
        "object": "text_completion",
        "created": raw.get("created"),
        "model": raw.get("model"),
        "choices": [
            {
                "index": choice.get("index", i),
                "text": choice.get("text") or "",
                "logprobs": choice.get("logprobs"),
                "finish_reason": choice.get("finish_reason"),
            }
            for i, choice in enumerate(raw.get("choices") or ())
        ],
        "usage": _usage(raw.get("usage")),
    }


def embeddings(raw: dict[str, Any], encoding_format: str | None) -> dict[str, Any]:
    """litellm's EmbeddingResponse in OpenAI's shape, base64-packed when the client asked so."""
    data = []
    for i, item in enumerate(raw.get("data") or ()):
        vector = item.get("embedding") if isinstance(item, dict) else item.embedding
        index = item.get("index", i) if isinstance(item, dict) else i
        if encoding_format == "base64" and isinstance(vector, list):
            # OpenAI's base64 format: little-endian float32s (the OpenAI SDK asks for it by default).
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    usage = raw.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    return {
        "object": "list",
        "data": data,
        "model": raw.get("model"),
        "usage": {
            "prompt_tokens": prompt,
            "total_tokens": int(usage.get("total_tokens") or prompt),
        },
    }


def _chat_chunk(raw: dict[str, Any]) -> dict[str, Any] | None:
    """One litellm stream chunk as a `chat.completion.chunk` without usage; None if empty."""
    choices = []
    for i, choice in enumerate(raw.get("choices") or ()):
        delta_in = choice.get("delta") or {}
        delta = _without_none(
            {
                "role": delta_in.get("role"),
                "content": delta_in.get("content"),
                "refusal": delta_in.get("refusal"),
                "reasoning_content": delta_in.get("reasoning_content"),
                "function_call": delta_in.get("function_call"),
                "tool_calls": _tool_calls(delta_in.get("tool_calls"), delta=True),
            }
        )
        finish = choice.get("finish_reason")
        if not delta and finish is None:
            continue
        choices.append(
            {
                "index": choice.get("index", i),
                "delta": delta,
                "logprobs": choice.get("logprobs"),
                "finish_reason": finish,
            }
        )
    if not choices:
        return None
    return {**_chunk_meta(raw, "chat.completion.chunk"), "choices": choices}


def _completion_chunk(raw: dict[str, Any]) -> dict[str, Any] | None:
    choices = [
        {
            "index": choice.get("index", i),
            "text": choice.get("text") or "",
            "logprobs": choice.get("logprobs"),
            "finish_reason": choice.get("finish_reason"),
        }
        for i, choice in enumerate(raw.get("choices") or ())
        if choice.get("text") or choice.get("finish_reason") is not None
    ]
    if not choices:
        return None
    return {**_chunk_meta(raw, "text_completion"), "choices": choices}


def _chunk_meta(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    meta = {
        "id": raw.get("id"),
        "object": kind,
        "created": raw.get("created"),
        "model": raw.get("model"),
    }
    if raw.get("system_fingerprint"):
        meta["system_fingerprint"] = raw["system_fingerprint"]
    return meta


# ---------------------------------------------------------------------------------------------
# Failures: litellm's exceptions become the upstream's status with an OpenAI error body, or
# one of our UpstreamErrors when there was no answer at all.

# (OpenAI error type, code) by litellm exception class name, most specific first.
_ERROR_KINDS: tuple[tuple[str, str, str | None], ...] = (
    ("ContextWindowExceededError", "invalid_request_error", "context_length_exceeded"),
    ("ContentPolicyViolationError", "invalid_request_error", "content_policy_violation"),
    ("UnsupportedParamsError", "invalid_request_error", "unsupported_parameter"),
    ("BadRequestError", "invalid_request_error", None),
    ("UnprocessableEntityError", "invalid_request_error", None),
    ("AuthenticationError", "authentication_error", "invalid_api_key"),
    ("PermissionDeniedError", "permission_error", None),
    ("NotFoundError", "invalid_request_error", "model_not_found"),
    ("RateLimitError", "requests", "rate_limit_exceeded"),
    ("ServiceUnavailableError", "service_unavailable", None),
)
# When only the status is known (an exception litellm did not classify).
_STATUS_KINDS = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_LITELLM_PREFIX = re.compile(r"^(litellm\.\w+:\s*)+")
# Behind litellm's catch-all error, these mean the answer came but could not be translated.
_UNREADABLE = (ValueError, LookupError, TypeError, AttributeError)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything behind it (cause, context, litellm's original_exception)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for nxt in (
            current.__cause__,
            current.__context__,
            getattr(current, "original_exception", None),
        ):
            if isinstance(nxt, BaseException):
                pending.append(nxt)


def _no_answer(exc: BaseException, label: str, api_key: str | None) -> UpstreamError | None:
    """Our error for a call that got no usable HTTP answer: timeout, connection, garbage."""
    import aiohttp
    import httpx

    litellm = load_litellm()
    chain = list(_causes(exc))
    # Timeouts first: some are also connection errors (aiohttp.ServerTimeoutError).
    if any(isinstance(e, TimeoutError | httpx.TimeoutException | litellm.Timeout) for e in chain):
        return UpstreamTimeout(f"upstream {label} did not answer in time")
    for e in chain:
        if isinstance(e, httpx.TransportError | aiohttp.ClientError | ConnectionError):
            detail = _redact(f"{type(e).__name__}: {e}", api_key)
            return UpstreamUnreachable(f"upstream {label} unreachable: {detail}")
    if isinstance(exc, litellm.APIConnectionError):
        # litellm's catch-all: also what it raises when it cannot parse the provider's answer.
        message = _redact(_clean(str(exc)), api_key)
        if any(isinstance(e, _UNREADABLE) for e in chain):
            # An answer came (and was billed): a retry would pay for it twice.
            return UpstreamAnswerUnreadable(f"upstream {label} answered unreadably: {message}")
        return UpstreamUnreachable(f"upstream {label} unreachable: {message}")
    return None


def _clean(message: str) -> str:
    """litellm's message without its `litellm.XError: ` prefixes and debugging hints."""
    message = _LITELLM_PREFIX.sub("", message.strip())
    return message.split(". Handle with `litellm.", 1)[0].strip()


def _provider_error(exc: BaseException) -> Any:
    """The provider's own exception (real HTTP status and headers), if one is in the chain."""
    from litellm.llms.base_llm.chat.transformation import BaseLLMException

    return next((e for e in _causes(exc) if isinstance(e, BaseLLMException)), None)


def _provider_message(text: str) -> tuple[str | None, str | None]:
    """(message, type) from a provider's JSON error body, e.g. Anthropic's `{"error": {...}}`."""
    start = text.find("{")
    if start < 0:
        return None, None
    try:
        body = orjson.loads(text[start:])
    except orjson.JSONDecodeError:
        return None, None
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, str):
        return error, None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        kind = error.get("type") if isinstance(error.get("type"), str) else None
        return error["message"], kind
    return None, None


def _redact(text: str, secret: str | None) -> str:
    # Some providers echo the key back in their error messages; it must not reach the record.
    return text.replace(secret, "[redacted]") if secret and len(secret) >= 8 else text


def upstream_error_response(exc: Exception, api_key: str | None = None) -> UpstreamResponse:
    """An upstream's failure answer, in OpenAI's error shape with the upstream's own status."""
    provider = _provider_error(exc)
    status = getattr(exc, "status_code", None)
    if provider is not None and not getattr(provider, "status_code_is_synthesized", True):
        # litellm rewrites some statuses (Anthropic's 529 "overloaded" becomes 500).
        status = provider.status_code
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = 500
    message = upstream_type = None
    if provider is not None:
        message, upstream_type = _provider_message(str(provider.message))
    message = message or _clean(str(getattr(exc, "message", None) or exc))
    names = {cls.__name__ for cls in type(exc).__mro__ if cls.__module__.startswith("litellm")}
    kind = next(((t, c) for name, t, c in _ERROR_KINDS if name in names), None)
    if kind is None:
        kind = _STATUS_KINDS.get(status, ("api_error", None))
    type_, code = kind
    if code is None and upstream_type:
        code = upstream_type
    param = "messages" if code == "context_length_exceeded" else None
    headers = dict(_JSON_HEADERS)
    raw_headers = getattr(exc, "litellm_response_headers", None) or getattr(
        provider, "headers", None
    )
    if raw_headers:
        lowered = {str(k).lower(): str(v) for k, v in dict(raw_headers).items()}
        headers.update({k: lowered[k] for k in _KEPT_ERROR_HEADERS if k in lowered})
    body = error_body(_redact(message, api_key), type_, param=param, code=code)
    return UpstreamResponse(status, headers, body=orjson.dumps(body))


# ---------------------------------------------------------------------------------------------


class LiteLLMProvider:
    """The seam's provider for every deployment whose `provider` is a litellm provider name."""

    def __init__(self, *, drop_params: bool = True, max_body_bytes: int | None = None) -> None:
        # drop_params: an OpenAI parameter the provider lacks (say `seed` for Anthropic) is
        # left out instead of failing the call, so agents written for OpenAI keep working.
        self.drop_params = drop_params
        # limits.max_upstream_body_bytes, as for OpenAI-compatible upstreams: litellm reads
        # the answer itself, so a larger one is refused once translated, not while it streams.
        self.max_body_bytes = max_body_bytes
        # Calls given up on (timeout, client gone) that litellm is still finishing; see _start.
        self._orphans: set[asyncio.Future[Any]] = set()

    async def __call__(self, request: UpstreamRequest) -> UpstreamResponse:
        deployment = request.deployment
        if request.operation == "responses":
            raise InvalidRequest(
                f"the Responses API is not supported for provider {deployment.provider!r}; "
                "use /v1/chat/completions"
            )
        if request.operation not in ("chat", "text_completion", "embeddings"):
            raise InvalidRequest(f"operation {request.operation!r} is not supported")
        if _litellm is None:
            # The gateway preloads at startup; if it did not, never stall the loop importing.
            await asyncio.to_thread(load_litellm)
        litellm = load_litellm()
        api_key = _api_key(request)
        kwargs = self._arguments(request, api_key)
        call = {
            "chat": litellm.acompletion,
            "text_completion": litellm.atext_completion,
            "embeddings": litellm.aembedding,
        }[request.operation]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deployment.timeout.total
        try:
            result = await self._start(call(**kwargs), deadline)
        except (GatewayError, asyncio.CancelledError):
            raise
        except Exception as exc:
            unreachable = _no_answer(exc, deployment.label, api_key)
            if unreachable is not None:
                raise unreachable from exc
            if _is_litellm_error(exc):
                return upstream_error_response(exc, api_key)
            raise UpstreamAnswerUnreadable(
                f"upstream {deployment.label} answered something litellm could not translate: "
                f"{type(exc).__name__}: {_redact(str(exc), api_key)}"
            ) from exc
        if request.operation == "embeddings":
            encoding = request.payload.get("encoding_format")
            body = embeddings(_dump(result), encoding if isinstance(encoding, str) else None)
            return self._answer(orjson.dumps(body), deployment.label)
        if request.stream:
            options = request.payload.get("stream_options") or {}
            return UpstreamResponse(
                200,
                dict(_SSE_HEADERS),
                chunks=_stream(
                    result,
                    request.operation,
                    include_usage=bool(options.get("include_usage")),
                    deadline=deadline,
                    label=deployment.label,
                    api_key=api_key,
                ),
            )
        shape = chat_completion if request.operation == "chat" else text_completion
        return self._answer(orjson.dumps(shape(_dump(result))), deployment.label)

    def _answer(self, body: bytes, label: str) -> UpstreamResponse:
        if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
            raise too_large(label, self.max_body_bytes)
        return UpstreamResponse(200, dict(_JSON_HEADERS), body=body)

    async def _start(self, call: Awaitable[Any], deadline: float) -> Any:
        """Await litellm's call within the deadline, without ever cancelling it half-way.

        litellm prepares each call in a worker thread, which hands back a coroutine; cancelling
        while that thread runs drops the coroutine unawaited (a RuntimeWarning at GC). So a call
        we stop waiting for is left to end on its own (litellm has the same timeout), and what
        it returns is closed then.
        """
        task = asyncio.ensure_future(call)
        try:
            # litellm's own timeout covers each read; this bounds the whole call.
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(task)
        except BaseException:
            if not task.done():
                self._orphans.add(task)
                task.add_done_callback(self._orphan_done)
            raise

    def _orphan_done(self, task: asyncio.Future[Any]) -> None:
        self._orphans.discard(task)
        if task.cancelled() or task.exception() is not None:
            return  # exception() also marks it retrieved, so asyncio does not log it
        close = getattr(task.result(), "aclose", None)
        if close is not None:
            closing = asyncio.ensure_future(close())
            self._orphans.add(closing)
            closing.add_done_callback(self._orphans.discard)

    def _arguments(self, request: UpstreamRequest, api_key: str | None) -> dict[str, Any]:
        import httpx

        deployment = request.deployment
        # A private copy: litellm may edit messages in place, and the gateway may retry the
        # same payload on another deployment.
        payload: dict[str, Any] = orjson.loads(orjson.dumps(request.payload))
        allowed, main_field = {
            "chat": (_CHAT_PARAMS, "messages"),
            "text_completion": (_COMPLETION_PARAMS, "prompt"),
            "embeddings": (_EMBEDDING_PARAMS, "input"),
        }[request.operation]
        if main_field not in payload:
            raise InvalidRequest(f"`{main_field}` is required", param=main_field)
        kwargs: dict[str, Any] = {k: v for k, v in payload.items() if k in allowed}
        kwargs.update(
            model=f"{deployment.provider}/{deployment.model}",
            api_key=api_key,
            api_base=deployment.api_base,
            timeout=httpx.Timeout(deployment.timeout.total, connect=deployment.timeout.connect),
            # The gateway's retry policy is the only one: no hidden extra tries inside litellm.
            num_retries=0,
            max_retries=0,
        )
        kwargs[main_field] = payload[main_field]
        # litellm sets its own Accept for the provider it translates to.
        forwarded = client_headers_for(deployment, request.client_headers, skip=_OWN_ACCEPT)
        if forwarded:
            kwargs["extra_headers"] = forwarded
        if request.operation != "embeddings":
            kwargs["stream"] = request.stream
            kwargs["drop_params"] = self.drop_params
            if request.stream and isinstance(payload.get("stream_options"), dict):
                kwargs["stream_options"] = payload["stream_options"]
        return {k: v for k, v in kwargs.items() if v is not None}

    async def aclose(self) -> None:
        """Close litellm's cached HTTP clients and its logging worker (at gateway shutdown)."""
        if self._orphans:
            _, pending = await asyncio.wait(set(self._orphans), timeout=5.0)
            for task in pending:
                task.cancel()
        if _litellm is None:
            return
        from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

        # litellm runs its success/failure bookkeeping as tasks on our loop; let them finish
        # briefly, then stop the worker so none is left pending when the loop closes.
        # RuntimeError: the worker's queue belongs to an earlier loop (tests run one per test).
        with contextlib.suppress(TimeoutError, RuntimeError):
            async with asyncio.timeout(1.0):
                await GLOBAL_LOGGING_WORKER.flush()
        await GLOBAL_LOGGING_WORKER.stop()
        await _litellm.close_litellm_async_clients()


def _is_litellm_error(exc: BaseException) -> bool:
    """An error litellm classified (it carries the upstream's or its own HTTP status)."""
    import openai

    return isinstance(exc, openai.APIStatusError) or (
        type(exc).__module__.startswith("litellm") and hasattr(exc, "status_code")
    )


async def _stream(
    stream: Any,
    operation: str,
    *,
    include_usage: bool,
    deadline: float,
    label: str,
    api_key: str | None,
) -> AsyncIterator[bytes]:
    """litellm's stream wrapper as OpenAI SSE bytes, ending in a usage chunk and [DONE]."""
    shape = _chat_chunk if operation == "chat" else _completion_chunk
    usage: dict[str, Any] | None = None
    meta: dict[str, Any] = {}
    kind = "chat.completion.chunk" if operation == "chat" else "text_completion"
    iterator = stream.__aiter__()
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    raw_chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            raw = _dump(raw_chunk)
            if not meta:
                meta = _chunk_meta(raw, kind)
            if raw.get("usage"):
                usage = _usage(raw["usage"])
            chunk = shape(raw)
            if chunk is not None:
                yield _sse(chunk)
        if include_usage and usage is not None:
            yield _sse({**meta, "choices": [], "usage": usage})
        yield _DONE
    except (GatewayError, asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        # Bytes may already be with the client: no retry is possible, only a clear error.
        failure = _no_answer(exc, label, api_key)
        if failure is None:
            provider = _provider_error(exc)
            if _is_litellm_error(exc) and provider is not None:
                # The provider sent an error event after the stream began (say, overloaded).
                raw_message = str(provider.message)
                message = _provider_message(raw_message)[0] or _clean(raw_message)
                failure = UpstreamUnreachable(
                    f"upstream {label} failed mid-stream: {_redact(message, api_key)}"
                )
            else:
                failure = UpstreamProtocolError(
                    f"upstream {label} sent a stream litellm could not read: "
                    f"{type(exc).__name__}: {_redact(_clean(str(exc)), api_key)}"
                )
        raise failure from exc
    finally:
        # Release the upstream connection however the stream ended (client gone included).
        # A text-completion wrapper has no aclose of its own; the chat stream inside it does.
        inner = getattr(stream, "completion_stream", None)
        close = getattr(stream, "aclose", None) or getattr(inner, "aclose", None)
        if close is not None:
            # Never let a failing close hide the error the stream is ending with.
            with contextlib.suppress(Exception):
                await close()
