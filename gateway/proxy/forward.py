"""Sending one call upstream, in layers: fallbacks, then retries, then a single try.

`forward()` → `_with_fallbacks()` → `_with_retries()` → `_send_once()`. Everything
here happens before the first byte goes to the client, which is why a stream's
first chunk is awaited (under the first-token timeout) before `forward()` returns.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from config.models import DEFAULT_MAX_TOKENS_ESTIMATE, ModelGroup, RetryPolicy
from gateway.errors import (
    GatewayError,
    RateLimited,
    Unavailable,
    UpstreamAnswerUnreadable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from gateway.providers.base import UpstreamRequest, UpstreamResponse
from gateway.proxy.context import ProxyContext
from gateway.proxy.forms import Form
from gateway.proxy.operations import expects_json
from gateway.proxy.resilience import Guard, estimate_tokens
from gateway.proxy.stream_usage import asks_for_usage, refused_stream_options, remember_refusal
from gateway.proxy.training import TokenCapture, upstream_changes

# Operations whose streams report usage only when asked through stream_options.
USAGE_ON_REQUEST = frozenset({"chat", "text_completion"})
CONTEXT_WINDOW_CODES = frozenset({"context_length_exceeded", "context_window_exceeded"})
CONTEXT_WINDOW_PHRASES = ("maximum context length", "context window", "prompt is too long")


def counts_against_breaker(status: int) -> bool:
    """Statuses that say the deployment is unwell, as opposed to the request being wrong."""
    return status >= 500 or status in (408, 429)


def parse_retry_after(headers: dict[str, str]) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None when
    neither says a finite number of seconds (`soon`, `nan`, a date that is no date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lowered:
        millis = _finite(lowered["retry-after-ms"])
        if millis is not None:
            return max(millis / 1000.0, 0.0)
    value = lowered.get("retry-after")
    if not value:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return max(seconds, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError, OverflowError, IndexError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _finite(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def upstream_body(
    raw: bytes,
    payload: dict[str, Any],
    model: str,
    operation: str,
    stream: bool,
    extra: dict[str, Any] | None = None,
    *,
    ask_usage: bool = True,
) -> tuple[bytes, dict[str, Any], bool]:
    """The body to send upstream, and whether we asked for usage the client did not."""
    changes: dict[str, Any] = dict(extra) if extra else {}
    if payload["model"] != model:
        changes["model"] = model
    options = payload.get("stream_options") or {}
    inject = (
        ask_usage and stream and operation in USAGE_ON_REQUEST and not options.get("include_usage")
    )
    if inject:
        changes["stream_options"] = {**options, "include_usage": True}
    if not changes:
        return raw, payload, False
    changed = {**payload, **changes}
    return orjson.dumps(changed), changed, inject


class UpstreamStatus(Exception):
    """The upstream answered, but with a status worth another try or another group."""

    def __init__(self, outcome: Outcome, retry_after: float | None = None) -> None:
        super().__init__(f"upstream answered {outcome.response.status}")
        self.outcome = outcome
        self.retry_after = retry_after


class ContextWindowExceeded(UpstreamStatus):
    """The prompt does not fit this model; a fallback group may have a larger window."""


@dataclass(slots=True)
class Outcome:
    """The answer to pass on, and who gave it."""

    response: UpstreamResponse
    guard: Guard
    group: ModelGroup
    parsed: Any = None
    injected_usage: bool = False
    # Token ids and logprobs being collected for a training deployment.
    capture: TokenCapture | None = None


@dataclass
class Job:
    """One client call and everything that happened while forwarding it."""

    operation: str
    raw: bytes
    payload: dict[str, Any]
    stream: bool
    group: ModelGroup
    client_headers: Any
    # Estimated tokens, for deployments with a tpm limit; computed when first needed.
    tokens: int | None = None
    tries: list[dict[str, Any]] = field(default_factory=list)
    limiter_wait: float = 0.0
    fallback: str | None = None
    sent_ns: int | None = None
    next_wait: float = 0.0
    # The deployment of the latest try, so a call that failed everywhere still names it.
    guard: Guard | None = None
    # Keeps a rollout on one deployment (`rollout-affinity`); picks per-mode parameters.
    rollout_id: str | None = None
    mode: str | None = None
    # A multipart body (audio, image edits): sent as a form, its fields rewritten in place.
    form: Form | None = None

    def estimated_tokens(self) -> int:
        if self.tokens is None:
            reply_cap = 0 if self.operation == "embeddings" else DEFAULT_MAX_TOKENS_ESTIMATE
            self.tokens = estimate_tokens(self.payload, reply_cap)
        return self.tokens

    @property
    def retries(self) -> int:
        return max(len(self.tries) - 1, 0)


async def forward(gw: ProxyContext, job: Job) -> Outcome:
    """The upstream answer for `job`, after whatever retries and fallbacks it took."""
    return await _with_fallbacks(gw, job)


async def _with_fallbacks(gw: ProxyContext, job: Job) -> Outcome:
    chain = gw.router.chain(job.group)
    answered: UpstreamStatus | None = None
    failure: GatewayError | None = None
    limited: RateLimited | None = None
    for index, group in enumerate(chain):
        if index:
            job.fallback = group.name
        try:
            return await _with_retries(gw, job, group)
        except UpstreamStatus as exc:
            answered = exc
        except RateLimited as exc:
            failure = exc
            if limited is None or exc.retry_after < limited.retry_after:
                limited = exc
        except (Unavailable, UpstreamError) as exc:
            failure = exc
    if answered is not None:
        # An upstream's own answer tells the client more than our summary of it.
        return answered.outcome
    if isinstance(failure, Unavailable) and limited is not None:
        # Not every breaker is open: a group is out of budget, and its Retry-After says when
        # it has some again (a retry in a second would only meet the limit).
        raise limited
    if isinstance(failure, Unavailable):
        raise Unavailable(
            f"every deployment of {job.group.name!r} and its fallbacks is failing; "
            "circuit breakers are open",
            retry_after=max(gw.router.reopens_in(chain), 1.0),
        )
    assert failure is not None
    raise failure


def _retryable(exc: BaseException) -> bool:
    # An oversized answer would be oversized again, and each try costs the read up to the limit;
    # an unreadable 2xx was generated (and billed) already.
    if isinstance(exc, ContextWindowExceeded | UpstreamTooLarge | UpstreamAnswerUnreadable):
        return False
    return isinstance(exc, UpstreamStatus | UpstreamError)


def _waits(policy: RetryPolicy) -> Any:
    backoff = wait_exponential_jitter(
        multiplier=policy.backoff.initial, max=policy.backoff.max, jitter=policy.backoff.jitter
    )

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(retry_after, policy.retry_after_cap)
        return backoff(state)

    return wait


def _stops(policy: RetryPolicy) -> Any:
    attempts = stop_after_attempt(policy.attempts)

    def stop(state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        # An upstream that asks for a longer pause than we allow: try the next group now.
        if retry_after is not None and retry_after > policy.retry_after_cap:
            return True
        return attempts(state)

    return stop


async def _with_retries(gw: ProxyContext, job: Job, group: ModelGroup) -> Outcome:
    policy = gw.settings.retry_policy(group)

    def note_wait(state: RetryCallState) -> None:
        job.next_wait = state.next_action.sleep if state.next_action else 0.0

    # Most calls succeed at once: they skip building tenacity's machinery altogether.
    try:
        return await _send_once(gw, job, group, policy)
    except Exception as exc:
        if policy.attempts <= 1 or not _retryable(exc):
            raise
        first_failure: BaseException | None = exc
        answered: UpstreamStatus | None = exc if isinstance(exc, UpstreamStatus) else None
    retrying = AsyncRetrying(
        stop=_stops(policy),
        wait=_waits(policy),
        retry=retry_if_exception(_retryable),
        before_sleep=note_wait,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                if first_failure is not None:
                    # Tenacity's first attempt is the failure already seen, so its stop and
                    # wait rules (Retry-After, backoff) decide the pause before the real second.
                    failure, first_failure = first_failure, None
                    raise failure
                try:
                    return await _send_once(gw, job, group, policy)
                except UpstreamStatus as exc:
                    answered = exc
                    raise
    except (Unavailable, RateLimited):
        if answered is None:
            raise
        # The breaker opened (or the budget ran out) on the upstream's own failures: its last
        # answer tells the client more than our refusal to try again.
        raise answered from None
    raise AssertionError("tenacity ended without an outcome")  # pragma: no cover


async def _peek(chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """Wait for the first chunk now (so a silent upstream can still be retried), then replay it."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        # Nothing reached the client yet: an empty stream is a failure that may be retried.
        raise UpstreamProtocolError("the upstream's stream ended before its first event") from None
    except BaseException:
        await chunks.aclose()
        raise

    async def replay() -> AsyncGenerator[bytes, None]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    return replay()


class _Relayed(AsyncGenerator[bytes, None]):
    """A stream's chunks that keep their deployment's call in flight until they end or are
    closed (least-busy routing and the in-flight gauge count streams being relayed)."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], guard: Guard) -> None:
        self._chunks = chunks
        self._guard: Guard | None = guard

    def _done(self) -> None:
        if self._guard is not None:
            self._guard.in_flight -= 1
            self._guard = None

    async def asend(self, value: None) -> bytes:
        try:
            return await self._chunks.asend(value)
        except BaseException:
            self._done()
            raise

    async def athrow(self, *args: Any) -> bytes:
        try:
            return await self._chunks.athrow(*args)
        except BaseException:
            self._done()
            raise

    async def aclose(self) -> None:
        self._done()
        await self._chunks.aclose()


async def _first_answer(
    provider: Any, request: UpstreamRequest, first_token: float | None
) -> UpstreamResponse:
    """Headers, and for a stream its first chunk, under the first-token deadline.

    One deadline in this task: a real upstream sends its headers when the first token is
    ready, so the wait can fall on either side of them.
    """
    if first_token is None:
        # No deadline (a plain call): no timer to schedule and cancel on every call.
        return await _answer_of(provider, request)
    try:
        async with asyncio.timeout(first_token):
            return await _answer_of(provider, request)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"no first token within {first_token:g}s") from exc


async def _answer_of(provider: Any, request: UpstreamRequest) -> UpstreamResponse:
    response = await provider(request)
    if response.chunks is not None and response.ok:
        response.chunks = await _peek(response.chunks)
    return response


class _Failed(Exception):
    """Raised inside the breaker so pybreaker counts an upstream answer as a failure."""

    def __init__(self, response: UpstreamResponse) -> None:
        self.response = response


def _context_window_exceeded(status: int, parsed: Any) -> bool:
    if status not in (400, 413, 422) or not isinstance(parsed, dict):
        return False
    error = parsed.get("error")
    if not isinstance(error, dict):
        return False
    if error.get("code") in CONTEXT_WINDOW_CODES:
        return True
    message = str(error.get("message") or "").lower()
    return any(phrase in message for phrase in CONTEXT_WINDOW_PHRASES)


async def _send_once(gw: ProxyContext, job: Job, group: ModelGroup, policy: RetryPolicy) -> Outcome:
    guard = gw.router.pick(group, job.rollout_id)
    if guard is None or not guard.claim_probe():
        raise Unavailable(
            f"no deployment of {group.name!r} is taking calls (circuit breakers open)",
            retry_after=max(gw.router.reopens_in([group]), 1.0),
        )
    job.guard = guard
    deployment = guard.deployment
    record: dict[str, Any] = {
        "deployment": deployment.label,
        "group": group.name,
        "wait_ms": round(job.next_wait * 1000, 3),
        "status": None,
        "error": None,
    }
    job.next_wait = 0.0
    job.tries.append(record)
    started = time.perf_counter()
    # The tpm estimate this try holds: given back when it ends without a good answer, which
    # used no tokens (a good one is settled with its usage when the call is recorded).
    taken = 0
    try:
        tokens = job.estimated_tokens() if guard.tpm is not None else 0
        waited = await guard.acquire(tokens, gw.settings.rate_limit_wait)
        taken = tokens
        job.limiter_wait += waited
        record["limiter_wait_ms"] = round(waited * 1000, 3)
        extra, capture = upstream_changes(job.payload, job.operation, group, deployment, job.mode)
        body_for = functools.partial(
            upstream_body, job.raw, job.payload, deployment.model, job.operation, job.stream, extra
        )
        body, payload, injected = body_for(ask_usage=asks_for_usage(guard))
        request = UpstreamRequest(
            job.operation, body, payload, job.stream, deployment, job.client_headers
        )
        if job.form is not None:
            request.content_type = job.form.content_type
            if payload is not job.payload:
                request.body = job.form.body_for(payload)
        provider = gw.providers[deployment.provider]
        guard.in_flight += 1
        relayed = False
        started = time.perf_counter()
        job.sent_ns = time.perf_counter_ns()
        try:
            first_token = deployment.timeout.first_token if job.stream else None
            response = await _first_answer(provider, request, first_token)
            if (
                injected
                and "stream_options" not in job.payload
                and refused_stream_options(response)
            ):
                # The field was ours, not the client's: the same call at once without it.
                remember_refusal(guard)
                record["stream_options_refused"] = True
                body, payload, injected = body_for(ask_usage=False)
                request.body, request.payload = body, payload
                response = await _first_answer(provider, request, first_token)
            if counts_against_breaker(response.status):
                raise _Failed(response)
            parsed = None
            if response.chunks is None and response.ok:
                if expects_json(job.operation, response.headers):
                    parsed = _json_object(response.body or b"", deployment.label)
                else:
                    parsed = _loads(response.body)
        except (_Failed, UpstreamError, TimeoutError) as exc:
            # Only what the upstream did counts against it: not a cancelled call (the client
            # left), nor a request a provider could not even build.
            guard.failed(exc)
            raise
        else:
            guard.succeeded()
            if response.chunks is not None:
                response.chunks = _Relayed(response.chunks, guard)
                relayed = True
        finally:
            if not relayed:
                guard.in_flight -= 1
    except _Failed as failed:
        guard.correct_tokens(taken, 0)
        response = failed.response
        record["status"] = response.status
        outcome = Outcome(response, guard, group, _loads(response.body))
        if response.status in policy.on_status:
            raise UpstreamStatus(outcome, parse_retry_after(response.headers)) from None
        return outcome
    except GatewayError as exc:
        if not isinstance(exc, UpstreamAnswerUnreadable):
            # An unreadable 2xx did use tokens, about as many as the estimate says.
            guard.correct_tokens(taken, 0)
        record["status"] = exc.status
        record["error"] = exc.code or exc.type
        raise
    finally:
        record["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if guard.probing:
            guard.probing = False
    record["status"] = response.status
    outcome = Outcome(response, guard, group, parsed, injected, capture)
    if not response.ok and response.chunks is None:
        guard.correct_tokens(taken, 0)
        outcome.parsed = _loads(response.body)
        if _context_window_exceeded(response.status, outcome.parsed):
            raise ContextWindowExceeded(outcome)
        if response.status in policy.on_status:
            # A listed status the breaker does not count (409, or a 404 of a server still
            # loading its model): worth another try all the same.
            raise UpstreamStatus(outcome, parse_retry_after(response.headers))
    return outcome


def _loads(body: bytes | None) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def _json_object(body: bytes, label: str) -> dict[str, Any]:
    parsed = _loads(body)
    if not isinstance(parsed, dict):
        raise UpstreamAnswerUnreadable(f"upstream {label} answered with a body that is not JSON")
    return parsed
