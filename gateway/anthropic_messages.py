"""Anthropic ``POST /v1/messages`` and ``/v1/messages/count_tokens`` (text content, for now).

Request fields the gateway has no use for (``metadata``, ``cache_control``,
``service_tier``, ``container``, ...) are accepted and ignored. Errors use
Anthropic's envelope ``{"type": "error", "error": {"type", "message"}}`` with
the same status codes as the OpenAI routes.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway.errors import ApiError, InvalidRequest
from cortex.gateway.exchange import Plan
from cortex.gateway.formats import response_format
from cortex.protocol import Chunk, Message, Sampling, Usage

MAX_STOP = 16
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
_PATH = re.compile(r"at `\$\.?([^`]*)`")


class Block(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class AnthropicMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[Block]


class OutputFormat(msgspec.Struct, kw_only=True):
    type: str
    schema: dict[str, Any] | bool | None = None


class OutputConfig(msgspec.Struct, kw_only=True):
    format: OutputFormat | None = None
    effort: str | None = None
    """Accepted; the models served have no reasoning budget to set (yet)."""


class MessagesRequest(msgspec.Struct, kw_only=True):
    """The fields Cortex reads; any other field is accepted and ignored."""

    model: str
    messages: list[AnthropicMessage]
    max_tokens: int | None = None
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    output_config: OutputConfig | None = None


_decoder = msgspec.json.Decoder(MessagesRequest)
_encoder = msgspec.json.Encoder()


def _text(content: str | list[Block] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise InvalidRequest(f"{where}.{i}: content blocks of type {block.type!r} are not supported yet.")
        parts.append(block.text)
    return "".join(parts)


def parse(body: bytes, *, need_max_tokens: bool = True) -> MessagesRequest:
    try:
        req = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_describe(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not req.model:
        raise InvalidRequest("model: Field required")
    if need_max_tokens and req.max_tokens is None:
        raise InvalidRequest("max_tokens: Field required")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest("max_tokens: must be greater than or equal to 1")
    if not req.messages:
        raise InvalidRequest("messages: at least one message is required")
    for i, message in enumerate(req.messages):
        if message.role not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
    if req.temperature is not None and not 0.0 <= req.temperature <= 1.0:
        raise InvalidRequest("temperature: must be between 0 and 1")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise InvalidRequest("top_p: must be greater than 0 and at most 1")
    if req.top_k is not None and req.top_k < 0:
        raise InvalidRequest("top_k: must be greater than or equal to 0")
    if req.stop_sequences and len(req.stop_sequences) > MAX_STOP:
        raise InvalidRequest(f"stop_sequences: at most {MAX_STOP} are supported")
    return req


def _describe(text: str) -> str:
    """msgspec's message with its JSON path written the way Anthropic's errors name fields."""
    match = _PATH.search(text)
    field = match.group(1).replace("[", ".").replace("]", "") if match else ""
    message = _PATH.sub("", text).strip(" -")
    return f"{field}: {message}" if field else message


def canonical_messages(req: MessagesRequest) -> list[Message]:
    messages = []
    system = _text(req.system, "system")
    if system:
        messages.append(Message(role="system", content=system))
    for i, message in enumerate(req.messages):
        messages.append(Message(role=message.role, content=_text(message.content, f"messages.{i}.content")))
    return messages


def error_body(exc: ApiError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(exc.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def error_response(exc: ApiError) -> Response:
    return Response(_encoder.encode(error_body(exc)), status_code=exc.status, media_type="application/json")


def _event(name: str, body: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encoder.encode(body) + b"\n\n"


def stop_reason(last: Chunk) -> str:
    if last.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if last.stop_sequence else "end_turn"


def _usage(usage: Usage | None) -> dict[str, int]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }


class MessageFormatter:
    def __init__(self, *, request_id: str, model: str) -> None:
        self.id = f"msg_{request_id}"
        self.model = model

    def complete(self, text: str, last: Chunk) -> Response:
        body = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason(last),
            "stop_sequence": last.stop_sequence,
            "usage": _usage(last.usage),
        }
        return Response(_encoder.encode(body), media_type="application/json")

    def stream_start(self, first: Chunk) -> bytes:
        message = {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": first.prompt_tokens, "output_tokens": 0},
        }  # fmt: skip
        return (
            _event("message_start", {"type": "message_start", "message": message})
            + _event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            + _event("ping", {"type": "ping"})
        )

    def stream_text(self, text: str) -> bytes:
        return _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        )

    def stream_end(self, last: Chunk) -> bytes:
        delta = {"stop_reason": stop_reason(last), "stop_sequence": last.stop_sequence}
        usage = _usage(last.usage)  # complete here, since the cached part is known only at the end
        return (
            _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            + _event("message_stop", {"type": "message_stop"})
        )

    def stream_error(self, exc: ApiError) -> bytes:
        return _event("error", error_body(exc))


class CountFormatter(MessageFormatter):
    def complete(self, text: str, last: Chunk) -> Response:
        tokens = last.usage.prompt_tokens if last.usage else last.prompt_tokens
        return Response(_encoder.encode({"input_tokens": tokens}), media_type="application/json")


class AnthropicMessages:
    """The exchange dialect of ``POST /v1/messages``."""

    name = "anthropic"
    count_only = False

    def parse(self, body: bytes) -> Plan:
        req = parse(body, need_max_tokens=not self.count_only)
        sampling = Sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            max_tokens=req.max_tokens,
            stop=list(req.stop_sequences or []),
        )
        fmt = req.output_config.format if req.output_config else None
        constraint = None
        if fmt is not None and not self.count_only:
            try:
                constraint = response_format(fmt.type, fmt.schema, param="output_config.format")
            except InvalidRequest as exc:
                raise InvalidRequest(f"output_config.format: {exc.message}") from None
        return Plan(model=req.model, sampling=sampling, messages=canonical_messages(req),
                    stream=bool(req.stream) and not self.count_only, count_only=self.count_only,
                    response_format=constraint)  # fmt: skip

    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> MessageFormatter:
        cls = CountFormatter if self.count_only else MessageFormatter
        return cls(request_id=request_id, model=model)

    def error_response(self, exc: ApiError) -> Response:
        return error_response(exc)

    def internal_error(self, request_id: str) -> ApiError:
        return ApiError(f"Internal error (request {request_id}); it has been logged.")


class AnthropicCountTokens(AnthropicMessages):
    """``POST /v1/messages/count_tokens``: the model's own tokenizer and chat template, on a worker."""

    name = "anthropic-count"
    count_only = True
