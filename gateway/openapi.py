"""The gateway's own OpenAPI document, served at ``GET /openapi.json``.

It describes what this gateway accepts (the routes, their bodies' main fields and types) and the error
envelope of each route's dialect, so that a client generator or a fuzzer (the suite runs schemathesis
against it: ``tests/test_fuzz.py``) knows the surface. It is written by hand as data, kept small: field
names and types follow OpenAI's and Anthropic's public documents, and docs/api.md says what each field
does here. A field it leaves out is still accepted (unknown fields are ignored, never a 400).
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _array(items: Schema, **limits: int) -> Schema:
    return {"type": "array", "items": items, **limits}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _enum(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
ANY_OBJECT: Schema = {"type": "object"}
SSE_EVENT: Schema = {"type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}
"""One server-sent event (``"stream": true``): its ``data`` is JSON text, or ``[DONE]``."""
JSON_SCHEMA: Schema = {"anyOf": [{"type": "object"}, {"type": "boolean"}]}
TOKENS: Schema = {"type": "integer", "minimum": 1}
"""A token limit; the context bounds it, on the worker (`--max-tokens-policy`)."""
STOP: Schema = {"anyOf": [STRING, _array(STRING, maxItems=16)]}
METADATA: Schema = {"type": "object", "maxProperties": 16, "additionalProperties": {"type": "string", "maxLength": 512}}
LOGIT_BIAS: Schema = {
    "type": "object",
    "maxProperties": 300,
    "propertyNames": {"pattern": "^[0-9]{1,9}$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
}


def _sampling(temperature_max: float) -> dict[str, Schema]:
    """What every generation route takes: sampling, and `stream`."""
    return {
        "temperature": {"type": "number", "minimum": 0, "maximum": temperature_max},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "stream": BOOLEAN,
    }


def _openai_sampling() -> dict[str, Schema]:
    return {
        **_sampling(2),
        "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "logit_bias": LOGIT_BIAS,
        "stream_options": _object({"include_usage": BOOLEAN}),
        "user": STRING,
    }


TEXT_PART = _object({"type": _enum("text"), "text": STRING}, ("type", "text"))
FUNCTION = _object(
    {
        "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
        "description": STRING,
        "parameters": JSON_SCHEMA,
        "strict": BOOLEAN,
    },
    ("name",),
)
CHAT_MESSAGE = _object(
    {
        "role": _enum("system", "developer", "user", "assistant", "tool", "function"),
        "content": _nullable({"anyOf": [STRING, _array(TEXT_PART)]}),
        "name": STRING,
        "tool_calls": _array(
            _object(
                {
                    "id": STRING,
                    "type": _enum("function"),
                    "function": _object({"name": STRING, "arguments": STRING}, ("name",)),
                },
                ("id", "function"),
            )
        ),
        "tool_call_id": STRING,
    },
    ("role",),
)
RESPONSE_FORMAT = _object(
    {
        "type": _enum("text", "json_object", "json_schema"),
        "json_schema": _object({"name": STRING, "schema": JSON_SCHEMA, "strict": BOOLEAN}),
    },
    ("type",),
)
OPENAI_TOOL_CHOICE: Schema = {
    "anyOf": [
        _enum("auto", "none", "required"),
        _object({"type": _enum("function"), "function": _object({"name": STRING}, ("name",))}, ("type",)),
    ],
}

CHAT_REQUEST = _object(
    {
        "model": STRING,
        "messages": _array(CHAT_MESSAGE, minItems=1),
        **_openai_sampling(),
        "max_tokens": TOKENS,
        "max_completion_tokens": TOKENS,
        "stop": STOP,
        "n": {"type": "integer", "minimum": 1, "maximum": 1},
        "response_format": RESPONSE_FORMAT,
        "tools": _array(_object({"type": _enum("function"), "function": FUNCTION}, ("type", "function"))),
        "tool_choice": OPENAI_TOOL_CHOICE,
        "parallel_tool_calls": BOOLEAN,
        "logprobs": BOOLEAN,
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "reasoning_effort": _enum("none", "minimal", "low", "medium", "high", "xhigh"),
        "metadata": METADATA,
        "store": BOOLEAN,
    },
    ("model", "messages"),
)
COMPLETION_REQUEST = _object(
    {
        "model": STRING,
        "prompt": {"anyOf": [{"type": "string", "minLength": 1}, _array(STRING, minItems=1, maxItems=1)]},
        **_openai_sampling(),
        "max_tokens": TOKENS,
        "stop": STOP,
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
        "n": {"type": "integer", "minimum": 1, "maximum": 1},
        "echo": {"type": "boolean", "enum": [False]},
    },
    ("model", "prompt"),
)
RESPONSES_INPUT_ITEM = _object(
    {
        "type": _enum("message", "function_call", "function_call_output", "reasoning"),
        "role": _enum("user", "assistant", "system", "developer"),
        "content": {
            "anyOf": [
                STRING,
                _array(_object({"type": _enum("input_text", "output_text"), "text": STRING}, ("type", "text"))),
            ]
        },
        "call_id": STRING,
        "name": STRING,
        "arguments": STRING,
        "output": STRING,
    }
)
RESPONSES_REQUEST = _object(
    {
        "model": STRING,
        "input": {"anyOf": [{"type": "string", "minLength": 1}, _array(RESPONSES_INPUT_ITEM, minItems=1)]},
        "instructions": STRING,
        "max_output_tokens": TOKENS,
        **_sampling(2),
        "store": BOOLEAN,
        "previous_response_id": {"type": "string", "pattern": "^resp_[0-9a-f]{32}$"},
        "text": _object(
            {
                "format": _object(
                    {
                        "type": _enum("text", "json_object", "json_schema"),
                        "name": STRING,
                        "schema": JSON_SCHEMA,
                        "strict": BOOLEAN,
                    },
                    ("type",),
                ),
                "verbosity": _enum("low", "medium", "high"),
            }
        ),
        "tools": _array(
            {
                **FUNCTION,
                "properties": {**FUNCTION["properties"], "type": _enum("function")},
                "required": ["type", "name"],
            }
        ),
        "tool_choice": {
            "anyOf": [
                _enum("auto", "none", "required"),
                _object({"type": _enum("function"), "name": STRING}, ("type",)),
            ]
        },
        "parallel_tool_calls": BOOLEAN,
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "include": _array(STRING),
        "reasoning": _object({"effort": _enum("none", "minimal", "low", "medium", "high", "xhigh")}),
        "metadata": METADATA,
        "max_tool_calls": {"type": "integer", "minimum": 1},
        "truncation": _enum("disabled", "auto"),
    },
    ("model", "input"),
)

ANTHROPIC_BLOCK = _object(
    {
        "type": _enum("text", "tool_use", "tool_result", "thinking"),
        "text": STRING,
        "id": STRING,
        "name": STRING,
        "input": ANY_OBJECT,
        "tool_use_id": STRING,
        "content": {"anyOf": [STRING, _array(TEXT_PART)]},
        "is_error": BOOLEAN,
    },
    ("type",),
)
ANTHROPIC_FIELDS: dict[str, Schema] = {
    "model": STRING,
    "messages": _array(
        _object(
            {"role": _enum("user", "assistant"), "content": {"anyOf": [STRING, _array(ANTHROPIC_BLOCK)]}},
            ("role", "content"),
        ),
        minItems=1,
    ),
    "system": {"anyOf": [STRING, _array(TEXT_PART)]},
    "max_tokens": TOKENS,
    "stop_sequences": _array(STRING, maxItems=16),
    **_sampling(1),
    "top_k": {"type": "integer", "minimum": 0},
    "tools": _array(_object({"name": STRING, "description": STRING, "input_schema": ANY_OBJECT}, ("name",))),
    "tool_choice": _object(
        {"type": _enum("auto", "any", "tool", "none"), "name": STRING, "disable_parallel_tool_use": BOOLEAN}, ("type",)
    ),
    "thinking": _object({"type": _enum("enabled", "adaptive", "disabled"), "budget_tokens": TOKENS}, ("type",)),
    "output_config": _object(
        {
            "format": _object({"type": _enum("json_schema"), "schema": JSON_SCHEMA}, ("type",)),
            "effort": _enum("low", "medium", "high", "xhigh", "max"),
        }
    ),
    "metadata": ANY_OBJECT,
}
MESSAGES_REQUEST = _object(ANTHROPIC_FIELDS, ("model", "messages", "max_tokens"))
COUNT_TOKENS_REQUEST = _object(ANTHROPIC_FIELDS, ("model", "messages"))

OPENAI_ERROR = _object(
    {
        "error": _object(
            {"message": STRING, "type": STRING, "param": _nullable(STRING), "code": _nullable(STRING)},
            ("message", "type", "param", "code"),
        )
    },
    ("error",),
)
ANTHROPIC_ERROR = _object(
    {"type": _enum("error"), "error": _object({"type": STRING, "message": STRING}, ("type", "message"))},
    ("type", "error"),
)
MODEL = _object(
    {"id": STRING, "object": _enum("model"), "created": {"type": "integer"}, "owned_by": STRING, "ready": BOOLEAN},
    ("id", "object"),
)

SCHEMAS: dict[str, Schema] = {
    "ChatCompletionRequest": CHAT_REQUEST,
    "CompletionRequest": COMPLETION_REQUEST,
    "ResponseRequest": RESPONSES_REQUEST,
    "MessagesRequest": MESSAGES_REQUEST,
    "CountTokensRequest": COUNT_TOKENS_REQUEST,
    "OpenAIError": OPENAI_ERROR,
    "AnthropicError": ANTHROPIC_ERROR,
    "Model": MODEL,
    "ModelList": _object({"object": _enum("list"), "data": _array(_ref("Model"))}, ("object", "data")),
}

OPENAI_STATUSES = {
    "400": "Bad body or parameter",
    "401": "No API key, or an unknown, revoked or expired one (once keys exist)",
    "403": "A model the key may not use",
    "404": "Unknown model, route or stored response",
    "413": "Body over the broker's message limit",
    "429": "The model's queue is full, or the key is over a limit",
    "502": "A worker failed",
    "503": "Nobody serves the model, or NATS is unreachable",
    "504": "No complete answer before the deadline",
}
ANTHROPIC_STATUSES = {**OPENAI_STATUSES, "429": "The key is over a limit", "529": "The model's queue is full"}


def _answers(ok: Schema, envelope: str, *statuses: str) -> Schema:
    """`ok` as the 200, then each error status in `envelope` (every one the dialect has, if none is named)."""
    known = ANTHROPIC_STATUSES if envelope == "AnthropicError" else OPENAI_STATUSES
    errors = {"content": {"application/json": {"schema": _ref(envelope)}}}
    return {"200": ok, **{status: {"description": known[status], **errors} for status in statuses or known}}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _generation(summary: str, request: str, envelope: str) -> Schema:
    """A POST route that answers in JSON, or in server-sent events with ``"stream": true``."""
    ok = {"description": "The answer", "content": {"application/json": {"schema": ANY_OBJECT},
                                                   "text/event-stream": {"schema": SSE_EVENT}}}  # fmt: skip
    body = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    return {"post": {"summary": summary, "requestBody": body, "responses": _answers(ok, envelope)}}


def _lookup(summary: str, ok: Schema, *statuses: str) -> Schema:
    return {"summary": summary, "responses": _answers(ok, "OpenAIError", "401", *statuses, "503")}


def _path(name: str) -> list[Schema]:
    return [{"name": name, "in": "path", "required": True, "schema": STRING}]


OPEN: Schema = {"security": []}
"""Served without a key, whether keys exist or not."""

DOCUMENT: Schema = {
    "openapi": "3.1.0",
    "info": {"title": "Cortex gateway", "version": "1",
             "description": "OpenAI- and Anthropic-compatible API; each field's status is in docs/api.md."},
    "security": [{"bearer": []}, {"apiKey": []}, {}],
    "paths": {
        "/health": {"get": {**OPEN, "summary": "NATS connection, live workers, ready models", "responses": {
            "200": _json("Connected", ANY_OBJECT), "503": _json("Degraded", ANY_OBJECT)}}},
        "/openapi.json": {"get": {**OPEN, "summary": "This document", "responses": {"200": _json("It", ANY_OBJECT)}}},
        "/v1/models": {"get": _lookup("Every model a live worker can serve", _json("The models", _ref("ModelList")))},
        "/v1/models/{model}": {"parameters": _path("model"),
                               "get": _lookup("One model, by id or alias", _json("It", _ref("Model")), "403", "404")},
        "/v1/chat/completions": _generation("OpenAI chat completion", "ChatCompletionRequest", "OpenAIError"),
        "/v1/completions": _generation("OpenAI legacy completion", "CompletionRequest", "OpenAIError"),
        "/v1/responses": _generation("OpenAI Responses", "ResponseRequest", "OpenAIError"),
        "/v1/responses/{response_id}": {
            "parameters": _path("response_id"),
            "get": _lookup("A stored response", _json("The response", ANY_OBJECT), "404"),
            "delete": _lookup("Forget a stored response", _json("Forgotten", ANY_OBJECT), "404"),
        },
        "/v1/messages": _generation("Anthropic Messages", "MessagesRequest", "AnthropicError"),
        "/v1/messages/count_tokens": _generation("Anthropic token count", "CountTokensRequest", "AnthropicError"),
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
    },
}  # fmt: skip

_body = msgspec.json.encode(DOCUMENT)


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``: the document above, encoded once."""
    return Response(_body, media_type="application/json")
