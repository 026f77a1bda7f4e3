"""The gateway's exception tree, raised anywhere and mapped to HTTP once per dialect.

::

    ApiError (status, type, code)
    ├── InvalidRequest      400 invalid_request_error   bad JSON, bad parameter, prompt too long
    ├── ModelNotFound       404 invalid_request_error   no catalogue in the fleet knows the model
    ├── PayloadTooLarge     413 invalid_request_error   body over the broker's message limit
    ├── QueueFull           429 rate_limit_error        the model's queue is at its limit
    ├── UpstreamError       502 server_error            a worker failed while generating
    ├── NoCapacity          503 service_unavailable     nobody can serve the model (or NATS is away)
    └── DeadlineExceeded    504 timeout                 no complete answer before the deadline

Anything else raised while handling a request is a bug: a logged 500.
"""

from __future__ import annotations


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class UpstreamError(ApiError):
    status = 502
    type = "server_error"
    code = "worker_error"


class NoCapacity(ApiError):
    status = 503
    type = "service_unavailable"
    code = "no_capacity"


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
