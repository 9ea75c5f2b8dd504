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

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        message = scrub(message)
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(GatewayError):
    """The request cannot be understood (bad JSON, missing or wrong fields)."""

    status = 400
    type = "invalid_request_error"


class UnreadableBody(InvalidRequest):
    """The body is not encoded as its `Content-Encoding` says."""

    code = "invalid_content_encoding"
    close_connection = True


class RolloutRequired(InvalidRequest):
    """`require_rollout` is on and the call named no rollout."""

    code = "rollout_required"


class BodyTooLarge(InvalidRequest):
    """The request body is larger than `server.max_body_bytes`."""

    status = 413
    code = "request_too_large"


class RequestTimeout(InvalidRequest):
    """The client did not send its whole body within `server.body_timeout`."""

    status = 408
    code = "request_timeout"


class AuthenticationFailed(GatewayError):
    """No valid key was given."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class BudgetExceeded(GatewayError):
    """The rollout or attempt has spent a budget limit; the call never goes upstream.

    402, not 429: the OpenAI SDKs retry 408, 409, 429 and 5xx, and waiting does not refill
    a budget. Not 403 either: the key is allowed, this spend is not.
    """

    status = 402
    type = "insufficient_quota"
    code = "budget_exceeded"

    def __init__(self, message: str, *, scope: str, limit: str) -> None:
        super().__init__(message)
        self.scope = scope
        self.limit = limit


class PermissionDenied(GatewayError):
    """The key is valid but lacks the scope the route needs."""

    status = 403
    type = "permission_error"
    code = "insufficient_scope"


class NotFoundError(GatewayError):
    """The route or the named object does not exist."""

    status = 404
    type = "not_found_error"


class ModelNotFound(NotFoundError):
    """The requested model is not a configured model group."""

    type = "invalid_request_error"
    code = "model_not_found"


class UnsupportedMediaType(GatewayError):
    """`/v1/traces` takes OTLP protobuf or JSON only."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class ConflictError(GatewayError):
    """The request clashes with stored state (a terminal rollout, a reused id)."""

    status = 409
    type = "conflict_error"
    code = "conflict"


class ValidationFailed(GatewayError):
    """The body is well-formed JSON but a field is invalid."""

    status = 422
    type = "invalid_request_error"
    code = "validation_error"


class TooManyJudgeRuns(GatewayError):
    """`judge.max_runs` judge runs are running already; a new one is refused, not queued."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_judge_runs"


class RateLimited(GatewayError):
    """The deployment's rpm/tpm budget stayed exhausted for longer than `rate_limit_wait`."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, kind: str = "requests") -> None:
        super().__init__(message)
        self.type = kind
        self.retry_after = retry_after


class ProxyPaused(GatewayError):
    """Model calls are paused in `reject` mode (`POST /api/proxy/pause`), say for a weight sync."""

    status = 429
    type = "rate_limit_error"
    code = "proxy_paused"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(GatewayError):
    """Every deployment of the group (and of its fallbacks) has an open breaker."""

    status = 503
    type = "service_unavailable"
    code = "no_healthy_deployment"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(GatewayError):
    """The upstream provider could not give a usable answer."""

    status = 502
    type = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    """Connecting to or talking with the upstream failed."""

    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time."""

    status = 504
    code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream answered something that is not the API it claims to speak."""

    code = "upstream_bad_response"


class UpstreamTooLarge(UpstreamError):
    """The upstream's answer is over `limits.max_upstream_body_bytes` or a stream limit."""

    code = "upstream_too_large"


class TooManySubscribers(GatewayError):
    """`server.max_sse_subscribers` live event streams are open already."""

    status = 503
    type = "service_unavailable"
    code = "too_many_subscribers"


class GuidelineMissing(GatewayError):
    """An experiment variant names a guideline version the store does not hold."""

    status = 500
    code = "guideline_not_found"


class ServiceUnavailable(GatewayError):
    """The store cannot take the write right now (locked, full, catching up), or an `/api`
    write did not get through in time; the client should try again after `retry_after`."""

    status = 503
    type = "service_unavailable"
    code = "store_busy"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BudgetUnavailable(ServiceUnavailable):
    """The budget state (Redis or the PostgreSQL store) did not answer and a limit holds for
    the call: it is refused rather than let through unchecked."""

    code = "budget_unavailable"


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
