"""Structured-output requests of every dialect, turned into the canonical `ResponseFormat`."""

from __future__ import annotations

from typing import Any

import msgspec

from cortex.gateway.errors import InvalidRequest
from cortex.gateway.schemas import schema_problem
from cortex.protocol import ResponseFormat

_encoder = msgspec.json.Encoder()


def response_format(kind: str | None, schema: Any, *, param: str) -> ResponseFormat | None:
    """`kind` is ``text`` (or None: no constraint), ``json_object`` or ``json_schema`` (with `schema`)."""
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ResponseFormat(type="json_object")
    if kind == "json_schema":
        if not isinstance(schema, dict | bool):
            raise InvalidRequest("A `json_schema` format needs a `schema` object.", param=f"{param}.schema")
        problem = schema_problem(schema)
        if problem:
            raise InvalidRequest(f"The JSON schema cannot be used: {problem}", param=f"{param}.schema")
        return ResponseFormat(type="json_schema", schema=_encoder.encode(schema).decode())
    raise InvalidRequest(f"Unknown format type {kind!r}: expected text, json_object or json_schema.", param=param)
