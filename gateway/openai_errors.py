"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re

import msgspec
from starlette.responses import Response

from cortex.gateway.errors import ApiError, InvalidRequest

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def error_body(exc: ApiError) -> dict[str, object]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def error_response(exc: ApiError) -> Response:
    return Response(msgspec.json.encode(error_body(exc)), status_code=exc.status, media_type="application/json")


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
