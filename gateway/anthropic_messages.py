"""Anthropic ``POST /v1/messages`` and ``/v1/messages/count_tokens``: text, tools and tool results.

Request fields that would not change the answer (``metadata``, ``service_tier``,
``container``, ``output_config.effort``, ...) are ignored and named in a ``Warning``
header; ``cache_control`` hints need no action (the workers' prefix cache is
automatic); MCP servers, which Cortex cannot reach, are a 400. Errors use
Anthropic's envelope ``{"type": "error", "error": {"type", "message"}}`` with
the same status codes as the OpenAI routes.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway.errors import UNREADABLE_BODY_ERRORS, ApiError, InvalidRequest, unreadable_body
from cortex.gateway.exchange import Answer, Plan
from cortex.gateway.formats import response_format
from cortex.gateway.tools import arguments_json, check_choice, check_tools, make_tool
from cortex.protocol import (
    Chunk,
    Message,
    Reasoning,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from cortex.protocol.messages import (
    FINISH_LENGTH,
    FINISH_TOOL_CALLS,
    TOOL_CHOICE_AUTO,
    TOOL_CHOICE_FUNCTION,
    TOOL_CHOICE_NONE,
    TOOL_CHOICE_REQUIRED,
)

MAX_STOP = 16
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
_PATH = re.compile(r"at `\$\.?([^`]*)`")


class ResultBlock(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class Block(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: str | list[ResultBlock] | None = None
    is_error: bool | None = None


class AnthropicMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[Block]


class ToolDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ThinkingIn(msgspec.Struct, kw_only=True):
    type: str
    budget_tokens: int | None = None


class ToolChoiceIn(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(msgspec.Struct, kw_only=True):
    type: str
    schema: dict[str, Any] | bool | None = None


class OutputConfig(msgspec.Struct, kw_only=True):
    format: OutputFormat | None = None
    effort: str | None = None
    """Checked, then ignored (with a warning): the models served have no effort setting."""


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
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None
    mcp_servers: list[Any] | None = None


EFFORTS = ("low", "medium", "high", "xhigh", "max")
_decoder = msgspec.json.Decoder(MessagesRequest)
_encoder = msgspec.json.Encoder()


_SKIPPED_BLOCKS = {"thinking", "redacted_thinking"}
"""Earlier turns' reasoning: the models served here do not take it back as input."""


def _text(content: str | list[Block] | list[ResultBlock] | None, where: str, *, sep: str = "") -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.type in _SKIPPED_BLOCKS:
            continue
        if block.type != "text":
            raise InvalidRequest(f"{where}.{i}: content blocks of type {block.type!r} are not supported.")
        if block.text is None:
            raise InvalidRequest(f"{where}.{i}.text: Field required")
        parts.append(block.text)
    return sep.join(parts)


def parse(body: bytes, *, need_max_tokens: bool = True) -> MessagesRequest:
    try:
        req = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_describe(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    except UNREADABLE_BODY_ERRORS as exc:
        raise unreadable_body(exc) from None
    if not req.model:
        raise InvalidRequest("model: Field required")
    if need_max_tokens and req.max_tokens is None:
        raise InvalidRequest("max_tokens: Field required")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest("max_tokens: must be greater than or equal to 1")
    if not req.messages:
        raise InvalidRequest("messages: at least one message is required")
    for i, message in enumerate(req.messages):
        if message.role not in ("user", "assistant", "system"):
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user', 'assistant' or 'system'")
    if req.temperature is not None and not 0.0 <= req.temperature <= 1.0:
        raise InvalidRequest("temperature: must be between 0 and 1")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise InvalidRequest("top_p: must be greater than 0 and at most 1")
    if req.top_k is not None and req.top_k < 0:
        raise InvalidRequest("top_k: must be greater than or equal to 0")
    if req.stop_sequences and len(req.stop_sequences) > MAX_STOP:
        raise InvalidRequest(f"stop_sequences: at most {MAX_STOP} are supported")
    effort = req.output_config.effort if req.output_config else None
    if effort is not None and effort not in EFFORTS:
        raise InvalidRequest(f"Input should be one of {', '.join(EFFORTS)}", param="output_config.effort")
    if req.mcp_servers:
        # Anthropic would connect to them and offer their tools; answering without those tools would mislead.
        raise InvalidRequest("MCP servers are not supported: this server cannot connect to them; define their "
                             "tools in `tools` and run the calls yourself.", param="mcp_servers")  # fmt: skip
    return req


def thinking(req: MessagesRequest) -> Reasoning:
    """``thinking``: enabled (with a token budget below `max_tokens`), adaptive, or disabled."""
    spec = req.thinking
    if spec is None:
        return Reasoning()
    if spec.type == "disabled":
        return Reasoning(enabled=False)
    if spec.type == "adaptive":
        return Reasoning(enabled=True)
    if spec.type != "enabled":
        raise InvalidRequest("thinking.type: Input should be 'enabled', 'adaptive' or 'disabled'")
    budget = spec.budget_tokens
    if budget is None or budget < 1:
        raise InvalidRequest("thinking.budget_tokens: a positive number of tokens is required")
    if req.max_tokens is not None and budget >= req.max_tokens:
        raise InvalidRequest("thinking.budget_tokens: must be less than max_tokens")
    return Reasoning(enabled=True, budget_tokens=budget)


def _describe(text: str) -> str:
    """msgspec's message with its JSON path written the way Anthropic's errors name fields."""
    match = _PATH.search(text)
    field = match.group(1).replace("[", ".").replace("]", "") if match else ""
    message = _PATH.sub("", text).strip(" -")
    return f"{field}: {message}" if field else message


def _turn(message: AnthropicMessage, where: str, called: set[str]) -> list[Message]:
    """One Anthropic turn as canonical messages: tool results become ``tool`` messages, tool uses calls.

    `called` holds the ids of the conversation's earlier tool uses; a result must answer one of them.
    """
    if isinstance(message.content, str):
        return [Message(role=message.role, content=message.content)]
    results: list[Message] = []
    calls: list[ToolCall] = []
    text: list[Block] = []
    for j, block in enumerate(message.content):
        at = f"{where}.{j}"
        if block.type == "tool_result" and message.role == "user":
            if not block.tool_use_id:
                raise InvalidRequest(f"{at}.tool_use_id: Field required")
            if block.tool_use_id not in called:
                raise InvalidRequest(f"unexpected `tool_use_id` {block.tool_use_id!r} in a `tool_result` block: "
                                     "no earlier `tool_use` block has it", param=f"{at}.tool_use_id")  # fmt: skip
            content = _text(block.content, f"{at}.content", sep="\n")
            results.append(Message(role="tool", content=content, tool_call_id=block.tool_use_id,
                                   is_error=bool(block.is_error)))  # fmt: skip
        elif block.type == "tool_use" and message.role == "assistant":
            if not block.id or not block.name:
                raise InvalidRequest(f"{at}: a tool_use block needs `id` and `name`")
            calls.append(ToolCall(id=block.id, name=block.name, arguments=arguments_json(block.input or {})))
            called.add(block.id)
        else:
            text.append(block)
    turn = []
    body = _text(text, where)
    if body or calls or not results:
        turn.append(Message(role=message.role, content=body, tool_calls=calls))
    return results + turn


def canonical_messages(req: MessagesRequest) -> list[Message]:
    messages = []
    system = _text(req.system, "system")
    if system:
        messages.append(Message(role="system", content=system))
    called: set[str] = set()
    for i, message in enumerate(req.messages):
        if message.role == "system":
            messages.append(_system_turn(message, f"messages.{i}.content"))
        else:
            messages += _turn(message, f"messages.{i}.content", called)
    return _merge_user_turns(messages)


def _system_turn(message: AnthropicMessage, where: str) -> Message:
    """A ``system`` turn inside `messages` (Claude Code sends its environment so) as a reminder in a user turn.

    Chat templates take one system message, first; moving the text there would
    change the conversation's start (and its cached prefix) whenever a reminder
    is added, so it stays where it was sent, in the convention Claude Code uses itself.
    """
    return Message(role="user", content=f"<system-reminder>\n{_text(message.content, where)}\n</system-reminder>")


def _merge_user_turns(messages: list[Message]) -> list[Message]:
    """Adjacent user turns as one, as Anthropic's API joins them (many chat templates insist on alternation)."""
    merged: list[Message] = []
    for msg in messages:
        last = merged[-1] if merged else None
        if last is not None and last.role == msg.role == "user":
            merged[-1] = Message(role="user", content=f"{last.content}\n\n{msg.content}")
        else:
            merged.append(msg)
    return merged


def canonical_tools(req: MessagesRequest) -> tuple[list[Tool], ToolChoice, bool]:
    """The tools, the choice among them, and whether several calls may come in one answer."""
    tools = []
    for i, spec in enumerate(req.tools or []):
        if spec.type not in (None, "custom"):
            raise InvalidRequest(f"tools.{i}.type: server tools ({spec.type!r}) are not supported; "
                                 "define the tool with a name and an input_schema")  # fmt: skip
        schema = spec.input_schema or {}
        tools.append(make_tool(spec.name, spec.description, schema, param=f"tools.{i}", schema_field="input_schema"))
    choice_in = req.tool_choice
    kinds = {"auto": TOOL_CHOICE_AUTO, "any": TOOL_CHOICE_REQUIRED, "tool": TOOL_CHOICE_FUNCTION,
             "none": TOOL_CHOICE_NONE}  # fmt: skip
    if choice_in is not None and choice_in.type not in kinds:
        raise InvalidRequest(f"tool_choice.type: Input should be one of {', '.join(kinds)}")
    if choice_in is not None and choice_in.type == "tool" and not choice_in.name:
        raise InvalidRequest("tool_choice.name: Field required")
    choice = ToolChoice() if choice_in is None else ToolChoice(mode=kinds[choice_in.type], name=choice_in.name or "")
    check_tools(tools, param="tools")
    check_choice(tools, choice, param="tool_choice")
    parallel = not (choice_in is not None and choice_in.disable_parallel_tool_use)
    return tools, choice, parallel


def error_body(exc: ApiError) -> dict[str, Any]:
    """Anthropic's errors have no `param`: the field leads the message instead (``tools.0.name: ...``)."""
    kind = _ERROR_TYPES.get(exc.status, "api_error")
    message = f"{exc.param}: {exc.message}" if exc.param else exc.message
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(exc: ApiError) -> Response:
    return Response(_encoder.encode(error_body(exc)), status_code=exc.status, media_type="application/json")


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


class MessageFormatter:
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
        message = {
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


class AnthropicMessages:
    """The exchange dialect of ``POST /v1/messages``."""

    name = "anthropic"
    ignored_fields = frozenset({"metadata", "service_tier", "speed", "inference_geo", "container", "diagnostics",
                                "context_management"})  # fmt: skip
    """Accepted by Anthropic and without effect here; Claude Code sends `context_management`: never refuse it."""
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
            constraint = response_format(fmt.type, fmt.schema, param="output_config.format")
        tools, choice, parallel = canonical_tools(req)
        effort = req.output_config.effort if req.output_config else None
        return Plan(model=req.model, sampling=sampling, messages=canonical_messages(req),
                    stream=bool(req.stream) and not self.count_only, count_only=self.count_only,
                    response_format=constraint, tools=tools, tool_choice=choice,
                    parallel_tool_calls=parallel, reasoning=thinking(req),
                    ignored=["output_config.effort"] if effort is not None else [])  # fmt: skip

    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> MessageFormatter:
        cls = CountFormatter if self.count_only else MessageFormatter
        return cls(request_id=request_id, model=model, show_thinking=plan.reasoning.enabled is True)

    def error_response(self, exc: ApiError) -> Response:
        return error_response(exc)

    def internal_error(self, request_id: str) -> ApiError:
        return ApiError(f"Internal error (request {request_id}); it has been logged.")


class AnthropicCountTokens(AnthropicMessages):
    """``POST /v1/messages/count_tokens``: the model's own tokenizer and chat template, on a worker."""

    name = "anthropic-count"
    count_only = True
