"""OpenAI chat completions' answers: a ``chat.completion`` object, or ``chat.completion.chunk`` SSE events.

Also the pieces legacy completions share with it (usage, finish reasons, the
stream's end and errors).
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway.errors import ApiError
from cortex.gateway.exchange import Answer, Formatter
from cortex.gateway.openai_errors import error_body
from cortex.gateway.openai_functions import function_call_delta, function_call_object, function_finish_reason
from cortex.gateway.openai_params import logprob_objects
from cortex.protocol import Chunk, TokenLogprob, ToolCall, ToolCallDelta, Usage
from cortex.protocol.messages import FINISH_LENGTH, FINISH_TOOL_CALLS

_encoder = msgspec.json.Encoder()


def usage_object(usage: Usage | None) -> dict[str, object] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def tool_call_object(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def choice_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": logprob_objects(entries), "refusal": None}


def completion_body(
    *,
    completion_id: str,
    model: str,
    created: int,
    answer: Answer,
    finish_reason: str,
    usage: Usage | None,
    logprobs: bool = False,
    functions: bool = False,
) -> bytes:
    """`functions`: the request used the deprecated `functions`, so a call comes back as `function_call`."""
    calls = answer.tool_calls
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or (None if calls else ""), "refusal": None}
    if calls and functions:
        message["function_call"] = function_call_object(calls)
    elif calls:
        message["tool_calls"] = [tool_call_object(call) for call in calls]
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning  # as DeepSeek's and vLLM's APIs name it
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": choice_logprobs(answer.logprobs if logprobs else None),
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_object(usage),
    }
    return _encoder.encode(body)


class ChunkFormatter:
    """Builds the ``chat.completion.chunk`` SSE events of one streamed answer."""

    def __init__(
        self,
        *,
        completion_id: str,
        model: str,
        created: int,
        include_usage: bool,
        logprobs: bool = False,
        functions: bool = False,
    ) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.functions = functions
        """Calls go out as the deprecated `delta.function_call`."""
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
            body["usage"] = usage_object(usage) if final_usage else None
        return b"data: " + _encoder.encode(body) + b"\n\n"

    def delta(self, text: str, finish_reason: str | None = None, logprobs: list[TokenLogprob] | None = None) -> bytes:
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        if text or finish_reason is None:
            delta["content"] = text
        entries = choice_logprobs(logprobs) if self.logprobs and logprobs else None
        return self._event([{"index": 0, "delta": delta, "logprobs": entries, "finish_reason": finish_reason}])

    def reasoning(self, text: str) -> bytes:
        delta: dict[str, Any] = {"reasoning_content": text}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        return self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def _opening(self) -> dict[str, Any]:
        """The role, with the first piece of an answer that opens with a call (OpenAI's ``content: null``)."""
        if self._role_sent:
            return {}
        self._role_sent = True
        return {"role": "assistant", "content": None}

    def tool_calls(self, deltas: list[ToolCallDelta]) -> bytes:
        """Each call's id, type and name in its first piece only: the SDK concatenates what repeats."""
        if self.functions:
            piece = function_call_delta(deltas)
            if piece is None:
                return b""
            return self._event([{"index": 0, "delta": self._opening() | {"function_call": piece}, "logprobs": None,
                                 "finish_reason": None}])  # fmt: skip
        pieces: list[dict[str, Any]] = []
        for d in deltas:
            if pieces and pieces[-1]["index"] == d.index and not d.id:
                pieces[-1]["function"]["arguments"] += d.arguments  # one entry per call and chunk, as OpenAI's
            elif d.id:
                function = {"name": d.name, "arguments": d.arguments}
                pieces.append({"index": d.index, "id": d.id, "type": "function", "function": function})
            else:
                pieces.append({"index": d.index, "function": {"arguments": d.arguments}})
        delta: dict[str, Any] = self._opening() | {"tool_calls": pieces}
        return self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def usage(self, usage: Usage | None) -> bytes:
        return self._event([], usage, final_usage=True)


DONE = b"data: [DONE]\n\n"


def finish_reason(chunk: Chunk, *, named_tool: bool = False) -> str:
    """OpenAI's finish reason; calls forced by naming the function end with ``stop``, as OpenAI's own do."""
    if chunk.finish_reason == FINISH_TOOL_CALLS and named_tool:
        return "stop"
    if chunk.finish_reason in (FINISH_LENGTH, FINISH_TOOL_CALLS):
        return chunk.finish_reason
    return "stop"


def error_event(exc: ApiError) -> bytes:
    """An error after the SSE headers: the OpenAI SDK raises it from the stream."""
    return b"data: " + _encoder.encode(error_body(exc)) + b"\n\n"


class ChatFormatter(Formatter):
    def __init__(
        self, *, request_id: str, model: str, created: int, include_usage: bool, logprobs: bool,
        functions: bool = False, named_tool: bool = False,
    ) -> None:  # fmt: skip
        self.request_id = request_id
        self.named_tool = named_tool
        self.model = model
        self.created = created
        self.logprobs = logprobs
        self.functions = functions
        self.chunks = ChunkFormatter(completion_id=f"chatcmpl-{request_id}", model=model, created=created,
                                     include_usage=include_usage, logprobs=logprobs, functions=functions)  # fmt: skip

    def _finish_reason(self, last: Chunk) -> str:
        reason = finish_reason(last, named_tool=self.named_tool)
        return function_finish_reason(reason) if self.functions else reason

    def complete(self, answer: Answer, last: Chunk) -> Response:
        body = completion_body(
            completion_id=f"chatcmpl-{self.request_id}", model=self.model, created=self.created, answer=answer,
            finish_reason=self._finish_reason(last), usage=last.usage, logprobs=self.logprobs,
            functions=self.functions,
        )  # fmt: skip
        return Response(body, media_type="application/json")

    def stream_start(self, first: Chunk) -> bytes:
        return b""  # the role goes with the first piece: its `content` is "" for text, null for a call

    def stream_text(self, text: str, logprobs: list[TokenLogprob]) -> bytes:
        return self.chunks.delta(text, logprobs=logprobs)

    def stream_tool_calls(self, deltas: list[ToolCallDelta]) -> bytes:
        return self.chunks.tool_calls(deltas)

    def stream_reasoning(self, text: str) -> bytes:
        return self.chunks.reasoning(text)

    def stream_end(self, last: Chunk) -> bytes:
        out = self.chunks.delta("", finish_reason=self._finish_reason(last))
        if self.chunks.include_usage:
            out += self.chunks.usage(last.usage)
        return out + DONE

    def stream_error(self, exc: ApiError) -> bytes:
        return error_event(exc)
