"""OpenAI ``POST /v1/responses`` (text), with ``store`` and ``previous_response_id`` kept in NATS KV.

A stored response keeps the whole conversation that produced it (canonical
messages plus the answer), so a follow-up naming it continues through any
gateway replica. Streaming follows the event sequence the SDK's
``responses.stream()`` helper accumulates, every event with a ``sequence_number``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.responses import Response

from cortex.broker.errors import BrokerError
from cortex.gateway.errors import ApiError, InvalidRequest, ModelNotFound, NoCapacity
from cortex.gateway.exchange import Plan
from cortex.gateway.formats import response_format
from cortex.gateway.openai_errors import decode_body, error_body, error_response
from cortex.gateway.openai_params import check_sampling, to_sampling
from cortex.gateway.services import Services
from cortex.protocol import Chunk, Message, Usage

log = logging.getLogger("cortex.gateway")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_PARTS = {"input_text", "output_text", "text"}
_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")


class Part(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class InputItem(msgspec.Struct, kw_only=True):
    type: str = "message"
    role: str | None = None
    content: str | list[Part] | None = None


class TextFormat(msgspec.Struct, kw_only=True):
    type: str = "text"
    name: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None


class TextOptions(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """The fields Cortex reads; any other field is accepted and ignored."""

    model: str
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    text: TextOptions | None = None


class Stored(msgspec.Struct, kw_only=True):
    """What the responses bucket keeps per response id: the conversation, without instructions."""

    messages: list[Message]


_decoder = msgspec.json.Decoder(ResponsesRequest)
_stored_decoder = msgspec.json.Decoder(Stored)
_encoder = msgspec.json.Encoder()


def _text(content: str | list[Part] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for i, part in enumerate(content):
        if part.type not in _TEXT_PARTS or part.text is None:
            raise InvalidRequest(f"Content parts of type {part.type!r} are not supported yet.", param=f"{where}[{i}]")
    return "".join(part.text or "" for part in content)


def parse(body: bytes) -> ResponsesRequest:
    req = decode_body(_decoder, body)
    if req.input is None or req.input == "" or req.input == []:
        raise InvalidRequest("`input` must not be empty.", param="input")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise InvalidRequest("`max_output_tokens` must be at least 1.", param="max_output_tokens")
    check_sampling(req)
    if req.previous_response_id is not None and not _RESPONSE_ID.fullmatch(req.previous_response_id):
        raise InvalidRequest("`previous_response_id` is not a response id.", param="previous_response_id")
    return req


def input_messages(req: ResponsesRequest) -> list[Message]:
    if isinstance(req.input, str):
        return [Message(role="user", content=req.input)]
    messages = []
    for i, item in enumerate(req.input or []):
        if item.type != "message" or item.role not in _ROLES:
            raise InvalidRequest(f"Input items of type {item.type!r} are not supported yet.", param=f"input[{i}]")
        messages.append(Message(role=_ROLES[item.role], content=_text(item.content, f"input[{i}].content")))
    return messages


def usage_object(usage: Usage | None) -> dict[str, Any]:
    prompt, completion, cached = (
        (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) if usage else (0, 0, 0)
    )
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


class ResponsesFormatter:
    def __init__(self, *, request_id: str, model: str, created: int, plan: ResponsesPlan) -> None:
        self.id = f"resp_{request_id}"
        self.item_id = f"msg_{request_id}"
        self.model = model
        self.created = created
        self.plan = plan
        self.request = plan.request
        self.sequence = 0
        self.text = ""

    def response(self, status: str, output: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
        req = self.request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": self.plan.sampling.temperature,
            "top_p": self.plan.sampling.top_p,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "previous_response_id": req.previous_response_id,
            "store": bool(req.store),
            "text": {"format": self._text_format()},
            "metadata": {},
            "usage": usage_object(usage) if usage is not None or status != "in_progress" else None,
        }

    def _text_format(self) -> dict[str, Any]:
        fmt = self.request.text.format if self.request.text else None
        if fmt is None or fmt.type == "text":
            return {"type": "text"}
        if fmt.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "name": fmt.name or "response", "schema": fmt.schema, "strict": bool(fmt.strict)}

    def _item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def final(self, text: str, last: Chunk) -> dict[str, Any]:
        status = "incomplete" if last.finish_reason == "length" else "completed"
        return self.response(status, [self._item(text, status)], last.usage)

    async def after_complete(self, text: str, last: Chunk) -> None:
        """Remember the text for the closing events, and store the conversation if asked to."""
        self.text = text
        if not self.request.store:
            return
        answer = Message(role="assistant", content=text)
        stored = Stored(messages=[*self.plan.history, answer])
        try:
            await self.plan.bus.put_stored(self.id, _encoder.encode(stored))
        except BrokerError as exc:
            # The answer is done and paid for: deliver it; only a follow-up naming it will miss it.
            log.warning("response %s not stored: %s", self.id, exc)

    def complete(self, text: str, last: Chunk) -> Response:
        return Response(_encoder.encode(self.final(text, last)), media_type="application/json")

    def _event(self, kind: str, body: dict[str, Any]) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **body}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(body) + b"\n\n"

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": []}

    def stream_start(self, first: Chunk) -> bytes:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return (
            self._event("response.created", {"response": self.response("in_progress", [])})
            + self._event("response.in_progress", {"response": self.response("in_progress", [])})
            + self._event("response.output_item.added", {"output_index": 0, "item": self._item(None, "in_progress")})
            + self._event("response.content_part.added", {**where, "part": self._part("")})
        )

    def stream_text(self, text: str) -> bytes:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return self._event("response.output_text.delta", {**where, "delta": text, "logprobs": []})

    def stream_end(self, last: Chunk) -> bytes:
        text = self.text  # set by after_complete, which runs first
        final = self.final(text, last)
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return (
            self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
            + self._event("response.content_part.done", {**where, "part": self._part(text)})
            + self._event("response.output_item.done", {"output_index": 0, "item": final["output"][0]})
            + self._event(kind, {"response": final})
        )

    def stream_error(self, exc: ApiError) -> bytes:
        """`error`, then `response.failed`, as OpenAI ends a stream that broke."""
        error = error_body(exc)["error"]
        failed = self.response("failed", [])
        failed["error"] = {
            "code": "rate_limit_exceeded" if exc.status == 429 else "server_error",
            "message": exc.message,
        }
        return self._event("error", {"code": error["code"], "message": error["message"], "param": error["param"]}) + (
            self._event("response.failed", {"response": failed})
        )


@dataclass
class ResponsesPlan(Plan):
    request: ResponsesRequest = field(default_factory=lambda: ResponsesRequest(model=""))
    bus: Any = None
    history: list[Message] = field(default_factory=list)
    """The conversation without instructions: what is stored for a follow-up."""


def _with_instructions(req: ResponsesRequest, history: list[Message]) -> list[Message]:
    if not req.instructions:
        return list(history)
    return [Message(role="system", content=req.instructions), *history]


class OpenAIResponses:
    """The exchange dialect of ``POST /v1/responses``."""

    name = "openai-responses"

    def parse(self, body: bytes) -> Plan:
        req = parse(body)
        history = input_messages(req)
        messages = _with_instructions(req, history)
        sampling = to_sampling(req, max_tokens=req.max_output_tokens)
        fmt = req.text.format if req.text else None
        constraint = response_format(fmt.type, fmt.schema, param="text.format") if fmt else None
        return ResponsesPlan(
            model=req.model, sampling=sampling, messages=messages, stream=bool(req.stream), request=req,
            response_format=constraint, history=history,
        )  # fmt: skip

    async def prepare(self, plan: Plan, svc: Services) -> Plan:
        """Put the stored conversation of `previous_response_id` before this turn."""
        assert isinstance(plan, ResponsesPlan)
        plan.bus = svc.bus
        previous = plan.request.previous_response_id
        if previous is None:
            return plan
        try:
            raw = await svc.bus.get_stored(previous)
        except BrokerError as exc:
            raise NoCapacity(f"Stored responses are unavailable: {exc}") from exc
        stored = None
        if raw is not None:
            try:
                stored = _stored_decoder.decode(raw)
            except msgspec.DecodeError:
                log.warning("stored response %s is unreadable", previous)
        if stored is None:
            raise ModelNotFound(f"Previous response with id '{previous}' not found.", param="previous_response_id",
                                code="previous_response_not_found")  # fmt: skip
        # Earlier turns' instructions are not kept (as in OpenAI's API); this turn's lead.
        plan.history = [*stored.messages, *plan.history]
        plan.messages = _with_instructions(plan.request, plan.history)
        return plan

    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> ResponsesFormatter:
        assert isinstance(plan, ResponsesPlan)
        return ResponsesFormatter(request_id=request_id, model=model, created=created, plan=plan)

    def error_response(self, exc: ApiError) -> Response:
        return error_response(exc)

    def internal_error(self, request_id: str) -> ApiError:
        return ApiError(f"Internal error (request {request_id}); it has been logged.")
