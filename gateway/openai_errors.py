"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``, with ``Retry-After`` on 429 and 503."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from starlette.responses import Response

from cortex.gateway.errors import UNREADABLE_BODY_ERRORS, ApiError, InvalidRequest, retry_headers, unreadable_body

T = TypeVar("T")
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def error_body(exc: ApiError) -> dict[str, object]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def error_response(exc: ApiError) -> Response:
    return Response(
        msgspec.json.encode(error_body(exc)), status_code=exc.status, headers=retry_headers(exc),
        media_type="application/json",
    )  # fmt: skip


def decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode an OpenAI request body: any mistake is a 400 naming the field, and `model` must be set."""
    try:
        req = decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise from_decode_error(exc) from None
    except UNREADABLE_BODY_ERRORS as exc:
        raise unreadable_body(exc) from None
    if not getattr(req, "model", None):
        raise InvalidRequest("`model` must not be empty.", param="model")
    return req


def from_decode_error(exc: msgspec.DecodeError) -> InvalidRequest:
    """A 400 naming the offending field, e.g. ``max_tokens`` from `` at `$.max_tokens` ``."""
    text = str(exc)
    match = _PATH.search(text)
    param = match.group(1) if match else None
    missing = _MISSING.search(text)
    if missing:
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
    if isinstance(exc, msgspec.ValidationError):
        return InvalidRequest(f"Invalid request body: {text}", param=param or None)
    return InvalidRequest(f"The request body is not valid JSON: {text}")
