"""The gateway's exception tree, raised anywhere and mapped to HTTP once per dialect.

::

    ApiError (status, type, code)
    ├── InvalidRequest      400 invalid_request_error   bad JSON, bad parameter, prompt too long
    ├── Unauthenticated     401 invalid_request_error   no API key, or one unknown, revoked or expired
    ├── PermissionDenied    403 permission_error        the key may not use this model
    ├── ModelNotFound       404 invalid_request_error   no catalogue in the fleet knows the model
    ├── PayloadTooLarge     413 invalid_request_error   body over the broker's message limit
    ├── RateLimited         429 requests | tokens       the key is over its rpm, tpm or concurrency (Anthropic: 429)
    ├── QueueFull           429 requests                the model's queue is at its limit (Anthropic: 529)
    ├── UpstreamError       502 server_error            a worker failed while generating
    ├── NoCapacity          503 service_unavailable     nobody can serve the model (or NATS is away)
    └── DeadlineExceeded    504 timeout                 no complete answer before the deadline

`QueueFull` and `NoCapacity` are backpressure: their responses carry
``Retry-After`` (`RETRY_AFTER_S`), and both official SDKs retry them by
themselves, waiting as long as it says.

Anything else raised while handling a request is a bug: a logged 500.
"""

from __future__ import annotations

RETRY_AFTER_S = 1
"""Seconds a 429/529/503 tells the client to wait before trying again (``Retry-After``).

A full queue gains a place whenever any worker finishes a request, and the
gateway reconnects to NATS within half a second of its return, so a second is
enough to find out. Both SDKs sleep exactly this long (they accept up to two
minutes) and retry twice by default: a short burst costs the caller a second or
two, a lasting overload reaches it as the error after a few.
"""


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    retry_after: int | None = None
    """Seconds to wait before retrying, sent as ``Retry-After``; None: no header (the same request would fail again)."""
    headers: dict[str, str] | None = None
    """More headers for the error response (a rate limit's ``x-ratelimit-*``)."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after


def retry_headers(exc: ApiError) -> dict[str, str]:
    """``Retry-After`` for an error that may pass by itself, as every dialect sends it, and the error's own headers."""
    retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
    return retry | exc.headers if exc.headers else retry


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthenticated(ApiError):
    """OpenAI's 401 (``"code": "invalid_api_key"``); Anthropic's ``authentication_error``."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ApiError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ModelNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(ApiError):
    """OpenAI's own rate-limit envelope (``"type": "requests"``, ``"code": "rate_limit_exceeded"``);
    the Anthropic routes answer it as 529 ``overloaded_error`` (`cortex.gateway.anthropic_errors`)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    retry_after = RETRY_AFTER_S


class RateLimited(ApiError):
    """A key over one of its limits: a 429 in both dialects (Anthropic's ``rate_limit_error``), typed by what ran
    out as OpenAI does (``requests`` or ``tokens``), with ``Retry-After`` and the rate-limit headers."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, retry_after: int, headers: dict[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.type = kind
        self.headers = headers


class UpstreamError(ApiError):
    status = 502
    type = "server_error"
    code = "worker_error"


class NoCapacity(ApiError):
    status = 503
    type = "service_unavailable"
    code = "no_capacity"
    retry_after = RETRY_AFTER_S


class DeadlineExceeded(ApiError):
    status = 504
    type = "timeout"
    code = "deadline_exceeded"


UNREADABLE_BODY_ERRORS = (RecursionError, UnicodeDecodeError)
"""What msgspec raises, beside its DecodeError, for JSON nested too deeply or strings not UTF-8."""


def unreadable_body(exc: Exception) -> InvalidRequest:
    """The 400 for a body msgspec could not read for one of `UNREADABLE_BODY_ERRORS`."""
    if isinstance(exc, RecursionError):
        return InvalidRequest("The request body is not valid JSON: it is nested too deeply (1,000 levels at most).")
    return InvalidRequest(f"The request body is not valid JSON: a string is not valid UTF-8 ({exc}).")
