"""Anthropic ``POST /v1/messages`` and ``/v1/messages/count_tokens``: text, tools and tool results.

Request fields that would not change the answer (``metadata``, ``service_tier``,
``container``, ``output_config.effort``, ...) are ignored and named in a ``Warning``
header; ``cache_control`` hints need no action (the workers' prefix cache is
automatic); MCP servers, which Cortex cannot reach, are a 400. Errors use
Anthropic's envelope (`anthropic_errors`) with the same status codes as the
OpenAI routes; the answers' JSON and SSE are `anthropic_format`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway.anthropic_errors import decode_body, error_response
from cortex.gateway.anthropic_format import CountFormatter, MessageFormatter
from cortex.gateway.errors import ApiError, InvalidRequest
from cortex.gateway.exchange import UNASSIGNED, Dialect, Plan
from cortex.gateway.formats import response_format
from cortex.gateway.tools import arguments_json, check_choice, check_tools, make_tool
from cortex.protocol import GenerateRequest, Message, Reasoning, Sampling, Tool, ToolCall, ToolChoice
from cortex.protocol.messages import TOOL_CHOICE_AUTO, TOOL_CHOICE_FUNCTION, TOOL_CHOICE_NONE, TOOL_CHOICE_REQUIRED

MAX_STOP = 16


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


_SKIPPED_BLOCKS = {"thinking", "redacted_thinking"}
"""Earlier turns' reasoning: the models served here do not take it back as input."""


def _text(content: str | list[Block] | list[ResultBlock] | None, where: str, *, sep: str = "") -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    blocks: Sequence[Block | ResultBlock] = content
    for i, block in enumerate(blocks):
        if block.type in _SKIPPED_BLOCKS:
            continue
        if block.type != "text":
            raise InvalidRequest(f"{where}.{i}: content blocks of type {block.type!r} are not supported.")
        if block.text is None:
            raise InvalidRequest(f"{where}.{i}.text: Field required")
        parts.append(block.text)
    return sep.join(parts)


def parse(body: bytes, *, need_max_tokens: bool = True) -> MessagesRequest:
    req = decode_body(_decoder, body)
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


class AnthropicMessages(Dialect):
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
        request = GenerateRequest(
            request_id=UNASSIGNED,
            model=req.model,
            messages=canonical_messages(req),
            sampling=sampling,
            stream=bool(req.stream) and not self.count_only,
            count_only=self.count_only,
            response_format=constraint,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=parallel,
            reasoning=thinking(req),
        )
        return Plan(request=request, ignored=["output_config.effort"] if effort is not None else [])

    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> MessageFormatter:
        cls = CountFormatter if self.count_only else MessageFormatter
        return cls(request_id=request_id, model=model, show_thinking=plan.request.reasoning.enabled is True)

    def error_response(self, exc: ApiError) -> Response:
        return error_response(exc)


class AnthropicCountTokens(AnthropicMessages):
    """``POST /v1/messages/count_tokens``: the model's own tokenizer and chat template, on a worker."""

    name = "anthropic-count"
    count_only = True
    metered = False
