"""OpenAI ``POST /v1/chat/completions``: HTTP body → canonical request, chunks → JSON or SSE."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from cortex.gateway.errors import InvalidRequest
from cortex.protocol import Message, Sampling, Usage

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP = 16


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, kw_only=True):
    """The fields Cortex reads; any other field is accepted and ignored."""

    model: str
    messages: list[ChatMessage]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    user: str | None = None


_decoder = msgspec.json.Decoder(ChatRequest)
_encoder = msgspec.json.Encoder()


def parse(body: bytes) -> ChatRequest:
    try:
        req = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        from cortex.gateway.openai_errors import from_decode_error

        raise from_decode_error(exc) from None
    _validate(req)
    return req


def _validate(req: ChatRequest) -> None:
    if not req.model:
        raise InvalidRequest("`model` must not be empty.", param="model")
    if not req.messages:
        raise InvalidRequest("`messages` must contain at least one message.", param="messages")
    for i, message in enumerate(req.messages):
        if message.role not in ROLES:
            raise InvalidRequest(
                f"Invalid role {message.role!r}; expected one of {', '.join(ROLES)}.", param=f"messages[{i}].role"
            )
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise InvalidRequest(
                        f"Content part type {part.type!r} is not supported; only `text` parts are.",
                        param=f"messages[{i}].content[{j}]",
                    )
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise InvalidRequest("`temperature` must be between 0 and 2.", param="temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise InvalidRequest("`top_p` must be greater than 0 and at most 1.", param="top_p")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise InvalidRequest(f"`{name}` must be at least 1.", param=name)
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise InvalidRequest("`seed` must be a 64-bit signed integer.", param="seed")
    if req.n is not None and req.n != 1:
        raise InvalidRequest("Only `n=1` is supported.", param="n")
    stops = _stops(req)
    if len(stops) > MAX_STOP:
        raise InvalidRequest(f"At most {MAX_STOP} stop sequences are supported.", param="stop")


def _stops(req: ChatRequest) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content)


def canonical_messages(req: ChatRequest) -> list[Message]:
    return [Message(role=ROLES[m.role], content=_text(m.content), name=m.name) for m in req.messages]


def sampling(req: ChatRequest) -> Sampling:
    return Sampling(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        stop=_stops(req),
        seed=req.seed,
    )


def _usage(usage: Usage | None) -> dict[str, object] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def completion_body(
    *, completion_id: str, model: str, created: int, text: str, finish_reason: str, usage: Usage | None
) -> bytes:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": _usage(usage),
    }
    return _encoder.encode(body)


class ChunkFormatter:
    """Builds the ``chat.completion.chunk`` SSE events of one streamed answer."""

    def __init__(self, *, completion_id: str, model: str, include_usage: bool) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._role_sent = False

    def _event(self, choices: list[dict[str, Any]], usage: Usage | None = None, *, final_usage: bool = False) -> bytes:
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = _usage(usage) if final_usage else None
        return b"data: " + _encoder.encode(body) + b"\n\n"

    def delta(self, text: str, finish_reason: str | None = None) -> bytes:
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        if text or finish_reason is None:
            delta["content"] = text
        return self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def usage(self, usage: Usage | None) -> bytes:
        return self._event([], usage, final_usage=True)


DONE = b"data: [DONE]\n\n"
