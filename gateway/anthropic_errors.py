"""Anthropic's error envelope, ``{"type": "error", "error": {"type", "message"}}``, and body decoding in its words.

The status codes are the OpenAI routes' (`cortex.gateway.errors`) but one: a full
queue is Anthropic's 529 ``overloaded_error`` (its SDK raises `OverloadedError`),
where OpenAI's is a 429. A 503 (no worker can serve the model, NATS is away) stays
a 503, typed ``overloaded_error`` as the closest of Anthropic's types: its SDK
raises `ServiceUnavailableError`. Both carry ``Retry-After`` and both are retried by
the SDK. Otherwise only the envelope and the way a field is named differ.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from starlette.responses import Response

from cortex.gateway.errors import (
    UNREADABLE_BODY_ERRORS,
    ApiError,
    InvalidRequest,
    QueueFull,
    retry_headers,
    unreadable_body,
)

T = TypeVar("T")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OVERLOADED = 529
"""Anthropic's status for "too busy now, try again": what a full queue is on its routes."""
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_encoder = msgspec.json.Encoder()


def status_of(exc: ApiError) -> int:
    """The HTTP status of `exc` on Anthropic's routes."""
    return OVERLOADED if isinstance(exc, QueueFull) else exc.status


def error_body(exc: ApiError) -> dict[str, Any]:
    """Anthropic's errors have no `param`: the field leads the message instead (``tools.0.name: ...``)."""
    kind = _ERROR_TYPES.get(status_of(exc), "api_error")
    message = f"{exc.param}: {exc.message}" if exc.param else exc.message
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(exc: ApiError) -> Response:
    return Response(
        _encoder.encode(error_body(exc)), status_code=status_of(exc), headers=retry_headers(exc),
        media_type="application/json",
    )  # fmt: skip


def decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode an Anthropic request body: any mistake is a 400 naming the field as Anthropic does (``messages.0``)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_describe(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    except UNREADABLE_BODY_ERRORS as exc:
        raise unreadable_body(exc) from None


def _describe(text: str) -> str:
    """msgspec's message with its JSON path written the way Anthropic's errors name fields."""
    match = _PATH.search(text)
    field = match.group(1).replace("[", ".").replace("]", "") if match else ""
    message = _PATH.sub("", text).strip(" -")
    return f"{field}: {message}" if field else message
