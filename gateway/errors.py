"""Every error the gateway answers with, each tied to its HTTP status and OpenAI type/code.

- GatewayError (500 api_error)
  - InvalidRequest (400 invalid_request_error)
    - UnreadableBody (400, code invalid_content_encoding; the connection is closed)
    - RolloutRequired (400, code rollout_required)
    - BodyTooLarge (413, code request_too_large)
    - RequestTimeout (408, code request_timeout)
  - AuthenticationFailed (401 authentication_error)
  - BudgetExceeded (402 insufficient_quota, code budget_exceeded; never retried by SDKs)
  - PermissionDenied (403 permission_error, code insufficient_scope)
  - NotFoundError (404 not_found_error)
    - ModelNotFound (404 invalid_request_error, code model_not_found)
  - UnsupportedMediaType (415 invalid_request_error, code unsupported_media_type)
  - ConflictError (409 conflict_error)
  - ValidationFailed (422 invalid_request_error)
  - TooManyJudgeRuns (429 rate_limit_error, code too_many_judge_runs)
  - RateLimited (429, code rate_limit_exceeded; answered with Retry-After)
  - ProxyPaused (429 rate_limit_error, code proxy_paused; answered with Retry-After)
  - Unavailable (503 service_unavailable, code no_healthy_deployment; Retry-After)
  - UpstreamError (502 upstream_error)
    - UpstreamUnreachable (502, code upstream_unreachable)
    - UpstreamTimeout (504, code upstream_timeout)
    - UpstreamProtocolError (502, code upstream_bad_response)
      - UpstreamAnswerUnreadable (502; a 2xx whose body does not parse: never sent again)
    - UpstreamTooLarge (502, code upstream_too_large)
  - ServiceUnavailable (503 service_unavailable, code store_busy; answered with Retry-After)
    - BudgetUnavailable (503, code budget_unavailable; the budget state cannot be reached)
  - TooManySubscribers (503 service_unavailable, code too_many_subscribers)
  - GuidelineMissing (500 api_error, code guideline_not_found)

Messages are scrubbed of Python tracebacks and server file paths when the error is made, so
neither reaches a client nor a stored span whichever way the error travels.

ClientTooSlow (a ConnectionError) is not answered: the client stopped reading and is dropped.
"""

from __future__ import annotations

import re
from typing import Any


class GatewayError(Exception):
    """Base for every error answered in OpenAI's error shape."""

    status = 500
    type = "api_error"
    code: str | None = None
    # Set when the rest of the request cannot be read, so the connection cannot be reused.
    close_connection = False

    def __init_subclass__(
        cls, *, status: int | None = None, type: str | None = None, code: str | None = None
    ) -> None:
        # Each error states its status, OpenAI type and code in its class line.
        super().__init_subclass__()
        if status is not None:
            cls.status = status
        if type is not None:
            cls.type = type
        if code is not None:
            cls.code = code

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        message = scrub(message)
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(GatewayError, status=400, type="invalid_request_error"):
    """The request cannot be understood (bad JSON, missing or wrong fields)."""


class UnreadableBody(InvalidRequest, code="invalid_content_encoding"):
    """The body is not encoded as its `Content-Encoding` says."""

    close_connection = True


class RolloutRequired(InvalidRequest, code="rollout_required"):
    """`require_rollout` is on and the call named no rollout."""


class BodyTooLarge(InvalidRequest, status=413, code="request_too_large"):
    """The request body is larger than `server.max_body_bytes`."""


class RequestTimeout(InvalidRequest, status=408, code="request_timeout"):
    """The client did not send its whole body within `server.body_timeout`."""


class AuthenticationFailed(
    GatewayError, status=401, type="authentication_error", code="invalid_api_key"
):
    """No valid key was given."""


class BudgetExceeded(GatewayError, status=402, type="insufficient_quota", code="budget_exceeded"):
    """The rollout or attempt has spent a budget limit; the call never goes upstream.

    402, not 429: the OpenAI SDKs retry 408, 409, 429 and 5xx, and waiting does not refill
    a budget. Not 403 either: the key is allowed, this spend is not.
    """

    def __init__(self, message: str, *, scope: str, limit: str) -> None:
        super().__init__(message)
        self.scope = scope
        self.limit = limit


class PermissionDenied(
    GatewayError, status=403, type="permission_error", code="insufficient_scope"
):
    """The key is valid but lacks the scope the route needs."""


class NotFoundError(GatewayError, status=404, type="not_found_error"):
    """The route or the named object does not exist."""


class ModelNotFound(NotFoundError, type="invalid_request_error", code="model_not_found"):
    """The requested model is not a configured model group."""


class UnsupportedMediaType(
    GatewayError, status=415, type="invalid_request_error", code="unsupported_media_type"
):
    """`/v1/traces` takes OTLP protobuf or JSON only."""


class ConflictError(GatewayError, status=409, type="conflict_error", code="conflict"):
    """The request clashes with stored state (a terminal rollout, a reused id)."""


class ValidationFailed(
    GatewayError, status=422, type="invalid_request_error", code="validation_error"
):
    """The body is well-formed JSON but a field is invalid."""


class TooManyJudgeRuns(
    GatewayError, status=429, type="rate_limit_error", code="too_many_judge_runs"
):
    """`judge.max_runs` judge runs are running already; a new one is refused, not queued."""


class RateLimited(GatewayError, status=429, type="requests", code="rate_limit_exceeded"):
    """The deployment's rpm/tpm budget stayed exhausted for longer than `rate_limit_wait`."""

    def __init__(self, message: str, *, retry_after: float, kind: str = "requests") -> None:
        super().__init__(message)
        self.type = kind
        self.retry_after = retry_after


class ProxyPaused(GatewayError, status=429, type="rate_limit_error", code="proxy_paused"):
    """Model calls are paused in `reject` mode (`POST /api/proxy/pause`), say for a weight sync."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(
    GatewayError, status=503, type="service_unavailable", code="no_healthy_deployment"
):
    """Every deployment of the group (and of its fallbacks) has an open breaker."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(GatewayError, status=502, type="upstream_error"):
    """The upstream provider could not give a usable answer."""


class UpstreamUnreachable(UpstreamError, code="upstream_unreachable"):
    """Connecting to or talking with the upstream failed."""


class UpstreamConnectionLost(UpstreamUnreachable):
    """A reused keep-alive connection closed before any answer, most often the upstream closing
    it while idle as the request went out: retried at once when the retry policy allows."""

    retry_after = 0.0


class UpstreamTimeout(UpstreamError, status=504, code="upstream_timeout"):
    """The upstream did not answer in time."""


class UpstreamProtocolError(UpstreamError, code="upstream_bad_response"):
    """The upstream answered something that is not the API it claims to speak."""


class UpstreamAnswerUnreadable(UpstreamProtocolError):
    """The upstream answered 2xx (so generated, and billed, the answer) with a body that does
    not parse: sending the call again would pay for it twice."""


class UpstreamTooLarge(UpstreamError, code="upstream_too_large"):
    """The upstream's answer is over `limits.max_upstream_body_bytes` or a stream limit."""


class TooManySubscribers(
    GatewayError, status=503, type="service_unavailable", code="too_many_subscribers"
):
    """`server.max_sse_subscribers` live event streams are open already."""


class GuidelineMissing(GatewayError, status=500, code="guideline_not_found"):
    """An experiment variant names a guideline version the store does not hold."""


class ServiceUnavailable(GatewayError, status=503, type="service_unavailable", code="store_busy"):
    """The store cannot take the write right now (locked, full, catching up), or an `/api`
    write did not get through in time; the client should try again after `retry_after`."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BudgetUnavailable(ServiceUnavailable, code="budget_unavailable"):
    """The budget state (Redis or the PostgreSQL store) did not answer and a limit holds for
    the call: it is refused rather than let through unchecked."""


# A traceback's header and its indented frames go; the exception's own line after them stays.
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):[^\n]*\n?(?:[ \t]+[^\n]*\n?)*")
_FRAME = re.compile(r'\s*File "[^"\n]*", line \d+[^\n]*')
# Absolute paths under the usual roots of a server's filesystem, or naming a Python file. A
# URL's path is left alone: it follows a host, which the look-behind excludes.
_PATH = re.compile(
    r"(?<![\w:/.@-])"
    r"(?:[A-Za-z]:\\[^\s'\"<>|]+"
    r"|/(?:home|usr|opt|tmp|var|etc|root|srv|work|app|lib|lib64|proc|sys|run|mnt|nix|private"
    r"|Users|System|Library)(?:/[^\s'\",:;()<>]*)?"
    r"|(?:/[^\s'\",:;()<>/]+)+\.(?:py|pyc|pyx|so|db|sqlite|sqlite3|yaml|yml|journal))"
)


def scrub(message: str) -> str:
    """`message` without Python tracebacks, stack frames or server file paths."""
    if "/" not in message and "\\" not in message and "Traceback" not in message:
        return message
    message = _TRACEBACK.sub("", message)
    message = _FRAME.sub("", message)
    return _PATH.sub("<path>", message).strip() or "error details withheld"


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ClientTooSlow(ConnectionError):
    """A write to the client made no progress within `server.write_timeout`: it stopped reading.

    A `ConnectionError`, so every path that handles a client that went away handles it too.
    """
