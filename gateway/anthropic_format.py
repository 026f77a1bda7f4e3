"""Anthropic messages' answers: a ``message`` object, or the stream of events that builds it."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway.anthropic_errors import error_body
from cortex.gateway.errors import UNREADABLE_BODY_ERRORS, ApiError
from cortex.gateway.exchange import Answer, Formatter
from cortex.protocol import Chunk, TokenLogprob, ToolCallDelta, Usage
from cortex.protocol.messages import FINISH_LENGTH, FINISH_TOOL_CALLS

_encoder = msgspec.json.Encoder()


def _event(name: str, body: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encoder.encode(body) + b"\n\n"


def stop_reason(last: Chunk, *, clamped: bool = False) -> str:
    """Anthropic's stop reason; a limit lowered to fit the context is the context window's, not max_tokens'."""
    if last.finish_reason == FINISH_LENGTH:
        return "model_context_window_exceeded" if clamped else "max_tokens"
    if last.finish_reason == FINISH_TOOL_CALLS:
        return "tool_use"
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


def tool_use_id(call_id: str) -> str:
    """A worker's call id (``call_…``) as Anthropic spells tool-use ids (``toolu_…``): the same id, both ways stable."""
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> Any:
    """A call's arguments as the object Anthropic's `input` must be (empty if cut off mid-way)."""
    try:
        value = msgspec.json.decode(arguments or "{}")
    except (msgspec.DecodeError, *UNREADABLE_BODY_ERRORS):
        return {}
    return value if isinstance(value, dict) else {}


class MessageFormatter(Formatter):
    def __init__(self, *, request_id: str, model: str, show_thinking: bool = False) -> None:
        self.id = f"msg_{request_id}"
        self.model = model
        self.show_thinking = show_thinking
        """Thinking blocks only for a request that turned thinking on, as in Anthropic's API."""
        self._blocks = 0
        self._answer_blocks = 0
        self._open: str | None = None
        """Type of the content block being streamed (``text`` or ``tool_use``), if one is open."""
        self._clamped = False
        """The worker lowered max_tokens to fit the context (the first chunk says so)."""

    def complete(self, answer: Answer, last: Chunk) -> Response:
        calls = answer.tool_calls
        content: list[dict[str, Any]] = [{"type": "text", "text": answer.text}] if answer.text or not calls else []
        content += [{"type": "tool_use", "id": tool_use_id(c.id), "name": c.name, "input": _input(c.arguments)}
                    for c in calls]  # fmt: skip
        if answer.reasoning and self.show_thinking:
            content.insert(0, {"type": "thinking", "thinking": answer.reasoning, "signature": ""})
        body = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason(last, clamped=answer.clamped_to > 0),
            "stop_sequence": last.stop_sequence,
            "usage": _usage(last.usage),
        }
        return Response(_encoder.encode(body), media_type="application/json")

    def stream_start(self, first: Chunk) -> bytes:
        self._clamped = first.max_tokens > 0
        message: dict[str, Any] = {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": first.prompt_tokens, "output_tokens": 0},
        }  # fmt: skip
        return _event("message_start", {"type": "message_start", "message": message})

    def _start_block(self, block: dict[str, Any]) -> bytes:
        out = self._stop_block()
        self._open = block["type"]
        self._answer_blocks += block["type"] != "thinking"
        out += _event("content_block_start", {"type": "content_block_start", "index": self._blocks,
                                              "content_block": block})  # fmt: skip
        # Anthropic pings right after the first block opens; clients that count events expect it there.
        return out + _event("ping", {"type": "ping"}) if self._blocks == 0 else out

    def _stop_block(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        self._blocks += 1
        return _event("content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self._blocks, "delta": delta})

    def stream_text(self, text: str, logprobs: list[TokenLogprob]) -> bytes:
        out = b"" if self._open == "text" else self._start_block({"type": "text", "text": ""})
        return out + self._delta({"type": "text_delta", "text": text})

    def stream_reasoning(self, text: str) -> bytes:
        if not self.show_thinking:
            return b""
        out = (
            b""
            if self._open == "thinking"
            else self._start_block({"type": "thinking", "thinking": "", "signature": ""})
        )
        return out + self._delta({"type": "thinking_delta", "thinking": text})

    def stream_tool_calls(self, deltas: list[ToolCallDelta]) -> bytes:
        out = b""
        for d in deltas:
            if d.id:
                out += self._start_block({"type": "tool_use", "id": tool_use_id(d.id), "name": d.name, "input": {}})
            if d.arguments:
                out += self._delta({"type": "input_json_delta", "partial_json": d.arguments})
        return out

    def stream_end(self, last: Chunk) -> bytes:
        out = b""
        if self._answer_blocks == 0 and self._open in (None, "thinking"):
            out += self._start_block({"type": "text", "text": ""})  # as the whole answer has: one text block
        delta = {"stop_reason": stop_reason(last, clamped=self._clamped), "stop_sequence": last.stop_sequence}
        usage = _usage(last.usage)  # complete here, since the cached part is known only at the end
        return (
            out
            + self._stop_block()
            + _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            + _event("message_stop", {"type": "message_stop"})
        )

    def stream_error(self, exc: ApiError) -> bytes:
        return _event("error", error_body(exc))


class CountFormatter(MessageFormatter):
    def complete(self, answer: Answer, last: Chunk) -> Response:
        tokens = last.usage.prompt_tokens if last.usage else last.prompt_tokens
        return Response(_encoder.encode({"input_tokens": tokens}), media_type="application/json")
