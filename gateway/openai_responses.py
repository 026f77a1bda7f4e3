"""OpenAI ``POST /v1/responses`` (text and function tools), with ``store`` and ``previous_response_id`` kept in NATS KV.

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
from cortex.gateway.exchange import Answer, Plan
from cortex.gateway.formats import response_format
from cortex.gateway.openai_errors import decode_body, error_body, error_response
from cortex.gateway.openai_params import (
    check_logprobs,
    check_sampling,
    check_verbosity,
    logprob_objects,
    metadata,
    reasoning,
    to_sampling,
)
from cortex.gateway.services import Services
from cortex.gateway.tools import check_choice, check_tools, make_tool, openai_tool_choice, unknown_tool_result
from cortex.protocol import Chunk, Message, TokenLogprob, Tool, ToolCall, ToolCallDelta, ToolChoice, Usage
from cortex.protocol.messages import (
    FINISH_LENGTH,
    TOOL_CHOICE_FUNCTION,
)

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
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[Part] | None = None


class FunctionTool(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ReasoningOptions(msgspec.Struct, kw_only=True):
    effort: str | None = None
    summary: str | None = None


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None


class TextFormat(msgspec.Struct, kw_only=True):
    type: str = "text"
    name: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None


class TextOptions(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None
    verbosity: str | None = None
    """Checked, then ignored: the models served here have no verbosity setting."""


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
    tools: list[FunctionTool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    reasoning: ReasoningOptions | None = None
    metadata: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    """A limit on calls of built-in tools, which Cortex has none of: honoured by never making one."""
    truncation: str | None = None
    # Read only to be checked: refused, or ignored (named in the `Warning` header).
    background: bool | None = None
    prompt: Any = None
    conversation: Any = None
    moderation: Any = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    user: str | None = None


TRUNCATIONS = ("disabled", "auto")
"""`disabled` is what Cortex does (a prompt over the context is a 400); `auto` is ignored."""
LOGPROBS_INCLUDE = "message.output_text.logprobs"


class Stored(msgspec.Struct, kw_only=True):
    """What the responses bucket keeps per response id: the conversation, without instructions, and the response."""

    messages: list[Message]
    response: msgspec.Raw = msgspec.Raw(b"null")
    """The response object as returned (JSON); null if an older gateway stored only the conversation."""


_decoder = msgspec.json.Decoder(ResponsesRequest)
_stored_decoder = msgspec.json.Decoder(Stored)
_encoder = msgspec.json.Encoder()


def _text(content: str | list[Part] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for i, part in enumerate(content):
        if part.type not in _TEXT_PARTS:
            raise InvalidRequest(f"Content parts of type {part.type!r} are not supported yet.", param=f"{where}[{i}]")
        if part.text is None:
            raise InvalidRequest(f"A {part.type!r} content part needs its `text`.", param=f"{where}[{i}].text")
    return "".join(part.text or "" for part in content)


def parse(body: bytes) -> ResponsesRequest:
    req = decode_body(_decoder, body)
    if req.input is None or req.input == "" or req.input == []:
        raise InvalidRequest("`input` must not be empty.", param="input")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise InvalidRequest("`max_output_tokens` must be at least 1.", param="max_output_tokens")
    check_sampling(req)
    check_logprobs(wants_logprobs(req), req.top_logprobs, asked_by=f'`include: ["{LOGPROBS_INCLUDE}"]`')
    if req.previous_response_id is not None and not _RESPONSE_ID.fullmatch(req.previous_response_id):
        raise InvalidRequest("`previous_response_id` is not a response id.", param="previous_response_id")
    _check_options(req)
    return req


def _check_options(req: ResponsesRequest) -> None:
    """Refuse what Cortex cannot do (run in the background, keep prompts or conversations); check the rest."""
    metadata(req.metadata)
    if req.max_tool_calls is not None and req.max_tool_calls < 1:
        raise InvalidRequest("`max_tool_calls` must be at least 1.", param="max_tool_calls")
    if req.truncation is not None and req.truncation not in TRUNCATIONS:
        raise InvalidRequest(f"Invalid `truncation` {req.truncation!r}; expected disabled or auto.", param="truncation")
    check_verbosity(req.text.verbosity if req.text else None, param="text.verbosity")
    if req.background:
        raise InvalidRequest("Background responses are not supported: wait for the answer, or stream it.",
                             param="background")  # fmt: skip
    if req.prompt is not None:
        raise InvalidRequest("Prompt templates are not supported: send the `instructions` and `input` themselves.",
                             param="prompt")  # fmt: skip
    if req.conversation is not None:
        raise InvalidRequest("Conversations are not supported: continue a conversation with `previous_response_id`.",
                             param="conversation")  # fmt: skip
    if req.moderation is not None:
        # Answering unmoderated when moderation was asked for would be worse than refusing.
        raise InvalidRequest("Moderation is not supported by this server.", param="moderation")


def ignored_options(req: ResponsesRequest) -> list[str]:
    """Fields this request sent that are ignored only for their value, or nested: for the `Warning` header."""
    ignored = ["truncation"] if req.truncation == "auto" else []
    return ignored + (["text.verbosity"] if req.text and req.text.verbosity is not None else [])


def wants_logprobs(req: ResponsesRequest) -> bool:
    return LOGPROBS_INCLUDE in (req.include or [])


def input_messages(req: ResponsesRequest) -> list[Message]:
    if isinstance(req.input, str):
        return [Message(role="user", content=req.input)]
    messages: list[Message] = []
    for i, item in enumerate(req.input or []):
        where = f"input[{i}]"
        if item.type == "message" and item.role in _ROLES:
            messages.append(Message(role=_ROLES[item.role], content=_text(item.content, f"{where}.content")))
        elif item.type == "function_call":
            if not item.call_id or not item.name:
                raise InvalidRequest("A `function_call` item needs `call_id` and `name`.", param=where)
            call = ToolCall(id=item.call_id, name=item.name, arguments=item.arguments or "{}")
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":  # one assistant turn: its text and its calls
                messages[-1] = msgspec.structs.replace(last, tool_calls=[*last.tool_calls, call])
            else:
                messages.append(Message(role="assistant", tool_calls=[call]))
        elif item.type == "function_call_output":
            if not item.call_id:
                raise InvalidRequest("A `function_call_output` item needs the `call_id` it answers.", param=where)
            output = _text(item.output, f"{where}.output")
            messages.append(Message(role="tool", content=output, tool_call_id=item.call_id))
        elif item.type == "message":
            raise InvalidRequest(f"A message item's role must be one of {', '.join(_ROLES)}; tool results are "
                                 "`function_call_output` items.", param=f"{where}.role")  # fmt: skip
        elif item.type != "reasoning":  # earlier reasoning is not fed back to these models
            raise InvalidRequest(f"Input items of type {item.type!r} are not supported.", param=where)
    return messages


def canonical_tools(req: ResponsesRequest) -> tuple[list[Tool], ToolChoice]:
    tools = []
    for i, spec in enumerate(req.tools or []):
        if spec.type != "function":
            raise InvalidRequest(f"Tools of type {spec.type!r} are not supported; only `function` tools are.",
                                 param=f"tools[{i}]")  # fmt: skip
        if not spec.name:
            raise InvalidRequest("A function tool needs its `name` (Responses tools are flat: no `function` object).",
                                 param=f"tools[{i}].name")  # fmt: skip
        tools.append(make_tool(spec.name, spec.description, spec.parameters, param=f"tools[{i}]"))
    check_tools(tools, param="tools")
    choice_in = req.tool_choice
    named = choice_in.name if isinstance(choice_in, NamedToolChoice) and choice_in.type == "function" else None
    choice = openai_tool_choice(choice_in, named, shape='{"type": "function", "name": ...}')
    check_choice(tools, choice, param="tool_choice")
    return tools, choice


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


class ResponsesFormatter:
    """A response object and its stream of events.

    Output items (a message, function calls) open as the answer reaches them, so
    an answer that only calls tools has no empty message item.
    """

    def __init__(self, *, request_id: str, model: str, created: int, plan: ResponsesPlan) -> None:
        self.request_id = request_id
        self.id = f"resp_{request_id}"
        self.model = model
        self.created = created
        self.plan = plan
        self.request = plan.request
        self.sequence = 0
        self.logprobs = plan.sampling.logprobs
        self.items: list[dict[str, Any]] = []
        """Output items streamed so far, kept current (the last one may still be open)."""
        self._open = False
        self._pieces: list[str] = []
        """The open item's text (or arguments) so far, joined when it closes: no quadratic `+=` per token."""
        self._started = False
        self._final: dict[str, Any] | None = None
        """The response as the client got it: stored as is."""
        self._tools = [self._tool(t, spec.strict) for t, spec in zip(plan.tools, plan.request.tools or [], strict=True)]
        """The tools as every response object shows them, decoded once."""

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
            "top_logprobs": req.top_logprobs,
            "parallel_tool_calls": self.plan.parallel_tool_calls,
            "tool_choice": self._tool_choice(),
            "tools": self._tools,
            "previous_response_id": req.previous_response_id,
            "store": bool(req.store),
            "text": {"format": self._text_format()},
            "metadata": req.metadata or {},
            "max_tool_calls": req.max_tool_calls,
            "usage": usage_object(usage) if usage is not None or status != "in_progress" else None,
        }

    def _tool_choice(self) -> Any:
        choice = self.plan.tool_choice
        return {"type": "function", "name": choice.name} if choice.mode == TOOL_CHOICE_FUNCTION else choice.mode

    @staticmethod
    def _tool(tool: Tool, strict: bool | None) -> dict[str, Any]:
        """A tool as the response echoes it; `strict` as sent (Responses function tools default to strict)."""
        parameters = msgspec.json.decode(tool.parameters) if tool.parameters else None
        return {"type": "function", "name": tool.name, "description": tool.description or None,
                "parameters": parameters, "strict": strict is not False}  # fmt: skip

    def _text_format(self) -> dict[str, Any]:
        fmt = self.request.text.format if self.request.text else None
        if fmt is None or fmt.type == "text":
            return {"type": "text"}
        if fmt.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "name": fmt.name or "response", "schema": fmt.schema, "strict": bool(fmt.strict)}

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

    async def after_complete(self, answer: Answer, last: Chunk) -> None:
        """Store the conversation, with this answer, if asked to."""
        if not self.request.store:
            return
        reply = Message(role="assistant", content=answer.text, tool_calls=answer.tool_calls)
        response = msgspec.Raw(_encoder.encode(self.final(answer, last)))
        stored = Stored(messages=[*self.plan.history, reply], response=response)
        try:
            await self.plan.bus.put_stored(self.id, _encoder.encode(stored))
        except BrokerError as exc:
            # The answer is done and paid for: deliver it; only a follow-up naming it will miss it.
            log.warning("response %s not stored: %s", self.id, exc)

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
        error = error_body(exc)["error"]
        failed = self.response("failed", [])
        failed["error"] = {"code": _RESPONSE_ERROR_CODES.get(exc.status, "server_error"), "message": exc.message}
        broke = self._event("error", {"code": error["code"], "message": error["message"], "param": error["param"]})
        return opening + broke + self._event("response.failed", {"response": failed})


_RESPONSE_ERROR_CODES = {400: "invalid_prompt", 429: "rate_limit_exceeded"}
"""`response.error.code` is one of OpenAI's few codes; the `error` event carries the exact one."""


@dataclass
class ResponsesPlan(Plan):
    request: ResponsesRequest = field(default_factory=lambda: ResponsesRequest(model=""))
    bus: Any = None
    history: list[Message] = field(default_factory=list)
    """The conversation without instructions: what is stored for a follow-up."""


def _check_outputs(plan: ResponsesPlan) -> None:
    """Every `function_call_output` answers a `function_call` of the conversation (stored turns included)."""
    unknown = unknown_tool_result(plan.history)
    if unknown is None:
        return
    call_id = plan.history[unknown].tool_call_id
    items = plan.request.input if isinstance(plan.request.input, list) else []
    at = next((i for i, item in enumerate(items) if item.type == "function_call_output" and item.call_id == call_id), 0)
    raise InvalidRequest(f"No tool call found for function call output with call_id {call_id}.",
                         param=f"input[{at}].call_id")  # fmt: skip


def _with_instructions(req: ResponsesRequest, history: list[Message]) -> list[Message]:
    if not req.instructions:
        return list(history)
    return [Message(role="system", content=req.instructions), *history]


async def _load(svc: Services, response_id: str, *, param: str) -> Stored:
    """A stored response, or 404 in OpenAI's words."""
    if not _RESPONSE_ID.fullmatch(response_id):
        raise ModelNotFound(f"Response with id '{response_id}' not found.", param=param, code="not_found")
    try:
        raw = await svc.bus.get_stored(response_id)
    except BrokerError as exc:
        raise NoCapacity(f"Stored responses are unavailable: {exc}") from exc
    stored = None
    if raw is not None:
        try:
            stored = _stored_decoder.decode(raw)
        except msgspec.DecodeError:
            log.warning("stored response %s is unreadable", response_id)
    if stored is None:
        raise ModelNotFound(f"Response with id '{response_id}' not found.", param=param, code="not_found")
    return stored


async def retrieve(svc: Services, response_id: str) -> bytes:
    """``GET /v1/responses/{id}``: the response as it was returned."""
    stored = await _load(svc, response_id, param="response_id")
    if bytes(stored.response) == b"null":
        raise ModelNotFound(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
    return bytes(stored.response)


async def delete(svc: Services, response_id: str) -> bytes:
    """``DELETE /v1/responses/{id}``: forget it (a follow-up naming it is then a 404)."""
    await _load(svc, response_id, param="response_id")
    try:
        await svc.bus.delete_stored(response_id)
    except BrokerError as exc:
        raise NoCapacity(f"Stored responses are unavailable: {exc}") from exc
    return _encoder.encode({"id": response_id, "object": "response", "deleted": True})


class OpenAIResponses:
    """The exchange dialect of ``POST /v1/responses``."""

    name = "openai-responses"
    ignored_fields = frozenset({"service_tier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                                "safety_identifier", "user", "context_management"})  # fmt: skip
    """Accepted by OpenAI and without effect here (they bill, route or speed up; never change the answer)."""

    def parse(self, body: bytes) -> Plan:
        req = parse(body)
        history = input_messages(req)
        messages = _with_instructions(req, history)
        sampling = to_sampling(req, max_tokens=req.max_output_tokens, logprobs=wants_logprobs(req),
                               top_logprobs=req.top_logprobs or 0)  # fmt: skip
        fmt = req.text.format if req.text else None
        constraint = response_format(fmt.type, fmt.schema, param="text.format") if fmt else None
        tools, choice = canonical_tools(req)
        return ResponsesPlan(
            model=req.model, sampling=sampling, messages=messages, stream=bool(req.stream), request=req,
            prompt_param="input", response_format=constraint, history=history, tools=tools, tool_choice=choice,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            reasoning=reasoning(req.reasoning.effort if req.reasoning else None, param="reasoning.effort"),
            ignored=ignored_options(req),
        )  # fmt: skip

    async def prepare(self, plan: Plan, svc: Services) -> Plan:
        """Put the stored conversation of `previous_response_id` before this turn."""
        assert isinstance(plan, ResponsesPlan)
        plan.bus = svc.bus
        previous = plan.request.previous_response_id
        if previous is None:
            _check_outputs(plan)
            return plan
        try:
            stored = await _load(svc, previous, param="previous_response_id")
        except ModelNotFound:
            raise ModelNotFound(f"Previous response with id '{previous}' not found.", param="previous_response_id",
                                code="previous_response_not_found") from None  # fmt: skip
        # Earlier turns' instructions are not kept (as in OpenAI's API); this turn's lead.
        plan.history = [*stored.messages, *plan.history]
        plan.messages = _with_instructions(plan.request, plan.history)
        _check_outputs(plan)
        return plan

    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> ResponsesFormatter:
        assert isinstance(plan, ResponsesPlan)
        return ResponsesFormatter(request_id=request_id, model=model, created=created, plan=plan)

    def error_response(self, exc: ApiError) -> Response:
        return error_response(exc)

    def internal_error(self, request_id: str) -> ApiError:
        return ApiError(f"Internal error (request {request_id}); it has been logged.")
