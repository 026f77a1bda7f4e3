"""OpenAI Responses' answers: the response object, and the stream of events that builds it.

Streaming follows the event sequence the SDK's ``responses.stream()`` helper
accumulates, every event with a ``sequence_number``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway import responses_store
from cortex.gateway.errors import ApiError
from cortex.gateway.exchange import Answer, Formatter
from cortex.gateway.openai_params import logprob_objects
from cortex.gateway.services import Services
from cortex.protocol import Chunk, Message, TokenLogprob, ToolCall, ToolCallDelta, Usage
from cortex.protocol.messages import FINISH_LENGTH

_encoder = msgspec.json.Encoder()


def usage_object(usage: Usage | None) -> dict[str, Any]:
    prompt, completion, cached = (
        (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) if usage else (0, 0, 0)
    )
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens if usage else 0},
        "total_tokens": prompt + completion,
    }


class ResponsesFormatter(Formatter):
    """A response object and its stream of events.

    Output items (a message, function calls) open as the answer reaches them, so
    an answer that only calls tools has no empty message item.
    """

    def __init__(
        self, *, request_id: str, model: str, created: int, echo: dict[str, Any], logprobs: bool, store: bool,
        history: list[Message],
    ) -> None:  # fmt: skip
        self.request_id = request_id
        self.id = f"resp_{request_id}"
        self.model = model
        self.created = created
        self.echo = echo
        """The request's settings, as every response object repeats them (``instructions`` ... ``max_tool_calls``)."""
        self.store = store
        self.history = history
        """The conversation without instructions: stored, with the answer, for a follow-up."""
        self.sequence = 0
        self.logprobs = logprobs
        self.items: list[dict[str, Any]] = []
        """Output items streamed so far, kept current (the last one may still be open)."""
        self._open = False
        self._pieces: list[str] = []
        """The open item's text (or arguments) so far, joined when it closes: no quadratic `+=` per token."""
        self._started = False
        self._final: dict[str, Any] | None = None
        """The response as the client got it: stored as is."""

    def response(self, status: str, output: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            **self.echo,
            "usage": usage_object(usage) if usage is not None or status != "in_progress" else None,
        }

    def _message_id(self) -> str:
        n = sum(item["type"] == "message" for item in self.items)
        return f"msg_{self.request_id}" if not n else f"msg_{self.request_id}_{n}"

    def _message(self, item_id: str, text: str | None, status: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        content = [] if text is None else [self._part(text, logprobs)]
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}

    def _reasoning(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [{"type": "reasoning_text", "text": text}]
        return {"type": "reasoning", "id": f"rs_{self.request_id}", "summary": [], "content": content,
                "status": status}  # fmt: skip

    def _call(self, call: ToolCall, index: int, status: str) -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{self.request_id}_{index}", "call_id": call.id,
                "name": call.name, "arguments": call.arguments, "status": status}  # fmt: skip

    def final(self, answer: Answer, last: Chunk) -> dict[str, Any]:
        """The finished response: the one `stream_end` sent, or else built from the whole answer."""
        if self._final is None:
            status = "incomplete" if last.finish_reason == FINISH_LENGTH else "completed"
            calls = answer.tool_calls
            message = self._message(f"msg_{self.request_id}", answer.text, status, answer.logprobs)
            output = [self._reasoning(answer.reasoning, status)] if answer.reasoning else []
            output += [message] if answer.text or not calls else []
            output += [self._call(call, i, status) for i, call in enumerate(calls)]
            self._final = self.response(status, output, last.usage)
        return self._final

    async def after_complete(self, answer: Answer, last: Chunk, svc: Services) -> None:
        """Store the conversation, with this answer, if asked to."""
        if self.store:
            reply = Message(role="assistant", content=answer.text, tool_calls=answer.tool_calls)
            await responses_store.save(svc, self.id, [*self.history, reply], self.final(answer, last))

    def complete(self, answer: Answer, last: Chunk) -> Response:
        return Response(_encoder.encode(self.final(answer, last)), media_type="application/json")

    def _event(self, kind: str, body: dict[str, Any]) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **body}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(body) + b"\n\n"

    def stream_start(self, first: Chunk) -> bytes:
        self._started = True
        return self._event("response.created", {"response": self.response("in_progress", [])}) + self._event(
            "response.in_progress", {"response": self.response("in_progress", [])}
        )

    def _add(self, item: dict[str, Any]) -> bytes:
        out = self._close("completed")
        self.items.append(item)
        self._open = True
        return out + self._event("response.output_item.added", {"output_index": len(self.items) - 1, "item": item})

    def _close(self, status: str) -> bytes:
        """The `.done` events of the open item."""
        if not self._open:
            return b""
        self._open = False
        index, item = len(self.items) - 1, self.items[-1]
        item["status"] = status
        joined, self._pieces = "".join(self._pieces), []
        if item["type"] == "function_call":
            item["arguments"] = joined
        else:
            item["content"][0]["text"] = joined
        out = b""
        if item["type"] == "reasoning":
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out += self._event("response.reasoning_text.done", {**where, "text": item["content"][0]["text"]})
        elif item["type"] == "message":
            text = item["content"][0]["text"]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            logprobs = item["content"][0].get("logprobs", [])
            out += self._event("response.output_text.done", {**where, "text": text, "logprobs": logprobs})
            out += self._event("response.content_part.done", {**where, "part": item["content"][0]})
        else:
            done = {"item_id": item["id"], "output_index": index, "name": item["name"], "arguments": item["arguments"]}
            out += self._event("response.function_call_arguments.done", done)
        return out + self._event("response.output_item.done", {"output_index": index, "item": item})

    def stream_text(self, text: str, logprobs: list[TokenLogprob]) -> bytes:
        if not text and self.items and self.items[-1]["type"] == "function_call":
            return b""  # only log probabilities of tokens that became no text: no message for them
        out = b""
        if not (self._open and self.items[-1]["type"] == "message"):
            item = self._message(self._message_id(), None, "in_progress", [])
            out += self._add(item)
            part = self._part("", [])
            where = {"item_id": item["id"], "output_index": len(self.items) - 1, "content_index": 0}
            out += self._event("response.content_part.added", {**where, "part": dict(part)})
            item["content"].append(part)
        item = self.items[-1]
        self._pieces.append(text)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1, "content_index": 0}
        entries = logprob_objects(logprobs) if self.logprobs else []
        if self.logprobs:
            item["content"][0]["logprobs"] += entries
        return out + self._event("response.output_text.delta", {**where, "delta": text, "logprobs": entries})

    def _part(self, text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self.logprobs:
            part["logprobs"] = logprob_objects(logprobs)
        return part

    def stream_reasoning(self, text: str) -> bytes:
        out = b""
        if not (self._open and self.items[-1]["type"] == "reasoning"):
            out += self._add(self._reasoning(None, "in_progress"))
            self.items[-1]["content"].append({"type": "reasoning_text", "text": ""})
        item = self.items[-1]
        self._pieces.append(text)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1, "content_index": 0}
        return out + self._event("response.reasoning_text.delta", {**where, "delta": text})

    def stream_tool_calls(self, deltas: list[ToolCallDelta]) -> bytes:
        out = b""
        for d in deltas:
            if d.id:
                call = ToolCall(id=d.id, name=d.name, arguments="")
                out += self._add(self._call(call, d.index, "in_progress"))
            if d.arguments:
                item = self.items[-1]
                self._pieces.append(d.arguments)
                where = {"item_id": item["id"], "output_index": len(self.items) - 1}
                out += self._event("response.function_call_arguments.delta", {**where, "delta": d.arguments})
        return out

    def stream_end(self, last: Chunk) -> bytes:
        status = "incomplete" if last.finish_reason == FINISH_LENGTH else "completed"
        answered = any(item["type"] != "reasoning" for item in self.items)
        out = b"" if answered else self.stream_text("", [])  # as the whole answer has: one message
        out += self._close(status)
        self._final = self.response(status, self.items, last.usage)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._event(kind, {"response": self._final})

    def stream_error(self, exc: ApiError) -> bytes:
        """`error`, then `response.failed`, as OpenAI ends a stream that broke (created first if not yet)."""
        opening = b"" if self._started else self.stream_start(Chunk(request_id=self.request_id, seq=0))
        failed = self.response("failed", [])
        failed["error"] = {"code": _RESPONSE_ERROR_CODES.get(exc.status, "server_error"), "message": exc.message}
        broke = self._event("error", {"code": exc.code, "message": exc.message, "param": exc.param})
        return opening + broke + self._event("response.failed", {"response": failed})


_RESPONSE_ERROR_CODES = {400: "invalid_prompt", 429: "rate_limit_exceeded"}
"""`response.error.code` is one of OpenAI's few codes; the `error` event carries the exact one."""
