"""OpenAI ``POST /v1/chat/completions``: the HTTP body checked and turned into the wire request.

The answer's JSON and SSE are `openai_chat_format`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway.errors import ApiError, InvalidRequest
from cortex.gateway.exchange import UNASSIGNED, Dialect, Plan
from cortex.gateway.formats import response_format
from cortex.gateway.openai_chat_format import ChatFormatter
from cortex.gateway.openai_errors import decode_body, error_response
from cortex.gateway.openai_functions import call_id, canonical_functions, uses_functions
from cortex.gateway.openai_params import (
    check_logprobs,
    check_sampling,
    check_verbosity,
    metadata,
    reasoning,
    to_sampling,
)
from cortex.gateway.tools import check_choice, check_tools, make_tool, openai_tool_choice, unknown_tool_result
from cortex.protocol import GenerateRequest, Message, ResponseFormat, Sampling, Tool, ToolCall, ToolChoice
from cortex.protocol.messages import TOOL_CHOICE_FUNCTION

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "function": "tool"}  # fmt: skip
"""`function`: a result of the deprecated `function_call`, named by its function."""
MAX_STOP = 16


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class FunctionCallIn(msgspec.Struct, kw_only=True):
    name: str
    arguments: str = "{}"


class ToolCallIn(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionCallIn
    type: str = "function"


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallIn | None = None
    """The deprecated single call of an assistant turn."""


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct, kw_only=True):
    type: str
    function: FunctionDef | None = None


class FunctionName(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: str
    function: FunctionName | None = None


class JsonSchemaSpec(msgspec.Struct, kw_only=True):
    name: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None


class ResponseFormatIn(msgspec.Struct, kw_only=True):
    type: str
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class Prediction(msgspec.Struct, kw_only=True):
    """Predicted Output: a speed-up for answers known in advance, never a change to them."""

    type: str
    content: str | list[ContentPart]


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
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormatIn | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    reasoning_effort: str | None = None
    logit_bias: dict[str, Any] | None = None
    functions: list[FunctionDef] | None = None
    function_call: str | FunctionName | None = None
    # Read only to be checked: ignored (named in the `Warning` header) or refused.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: Prediction | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: Any = None
    moderation: Any = None


_decoder = msgspec.json.Decoder(ChatRequest)


def parse(body: bytes) -> ChatRequest:
    req = decode_body(_decoder, body)
    _validate(req)
    return req


def _validate(req: ChatRequest) -> None:
    if not req.messages:
        raise InvalidRequest("`messages` must contain at least one message.", param="messages")
    for i, message in enumerate(req.messages):
        if message.role not in ROLES:
            raise InvalidRequest(
                f"Invalid role {message.role!r}; expected one of {', '.join(ROLES)}.", param=f"messages[{i}].role"
            )
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest("A `tool` message needs the `tool_call_id` it answers.", param=f"messages[{i}]")
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest("Only assistant messages carry `tool_calls`.", param=f"messages[{i}].tool_calls")
        if message.function_call and message.role != "assistant":
            raise InvalidRequest("Only assistant messages carry `function_call`.",
                                 param=f"messages[{i}].function_call")  # fmt: skip
        if message.role == "function" and not message.name:
            raise InvalidRequest("A `function` message needs the `name` of the function it answers.",
                                 param=f"messages[{i}].name")  # fmt: skip
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise InvalidRequest(
                        f"Content part type {part.type!r} is not supported; only `text` parts are.",
                        param=f"messages[{i}].content[{j}]",
                    )
    check_sampling(req)
    check_logprobs(bool(req.logprobs), req.top_logprobs)
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise InvalidRequest(f"`{name}` must be at least 1.", param=name)
    if req.n is not None and req.n != 1:
        raise InvalidRequest("Only `n=1` is supported.", param="n")
    stops = _stops(req)
    if len(stops) > MAX_STOP:
        raise InvalidRequest(f"At most {MAX_STOP} stop sequences are supported.", param="stop")
    _check_output_options(req)


def _check_output_options(req: ChatRequest) -> None:
    """Refuse what Cortex cannot give (audio, web search, moderation); check the shape of what it ignores."""
    if req.audio is not None:
        raise InvalidRequest("Audio output is not supported: the models served here answer in text.", param="audio")
    if req.modalities is not None and any(modality != "text" for modality in req.modalities):
        raise InvalidRequest('Only text output is supported: `modalities` may only be ["text"].', param="modalities")
    if req.web_search_options is not None:
        raise InvalidRequest("Web search is not supported: the models served here cannot search the web.",
                             param="web_search_options")  # fmt: skip
    if req.moderation is not None:
        # Answering unmoderated when moderation was asked for would be worse than refusing.
        raise InvalidRequest("Moderation is not supported by this server.", param="moderation")
    if req.prediction is not None and req.prediction.type != "content":
        raise InvalidRequest("A prediction's `type` must be `content`.", param="prediction.type")
    metadata(req.metadata)
    check_verbosity(req.verbosity, param="verbosity")


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


def _message(msg: ChatMessage) -> Message:
    calls = [ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in msg.tool_calls or []]
    if msg.function_call is not None:
        fn = msg.function_call
        calls.append(ToolCall(id=call_id(fn.name), name=fn.name, arguments=fn.arguments))
    answers = call_id(msg.name or "") if msg.role == "function" else msg.tool_call_id
    return Message(role=ROLES[msg.role], content=_text(msg.content), name=msg.name, tool_calls=calls,
                   tool_call_id=answers)  # fmt: skip


def canonical_messages(req: ChatRequest) -> list[Message]:
    messages = [_message(msg) for msg in req.messages]
    unknown = unknown_tool_result(messages)
    if unknown is not None:
        answered = messages[unknown].tool_call_id
        raise InvalidRequest(f"The `tool` message answers {answered!r}, which no earlier assistant message's "
                             "`tool_calls` has.", param=f"messages[{unknown}].tool_call_id")  # fmt: skip
    return messages


def canonical_tools(req: ChatRequest) -> tuple[list[Tool], ToolChoice]:
    if uses_functions(req):
        return canonical_functions(req)
    tools = []
    for i, spec in enumerate(req.tools or []):
        if spec.type != "function":
            raise InvalidRequest(f"Tools of type {spec.type!r} are not supported; only `function` tools are.",
                                 param=f"tools[{i}]")  # fmt: skip
        if spec.function is None:
            raise InvalidRequest("A function tool needs a `function` object with its `name`.", param=f"tools[{i}]")
        fn = spec.function
        tools.append(make_tool(fn.name, fn.description, fn.parameters, param=f"tools[{i}].function"))
    check_tools(tools, param="tools")
    choice = req.tool_choice
    named = (
        choice.function.name
        if isinstance(choice, NamedToolChoice) and choice.type == "function" and choice.function
        else None
    )
    canonical = openai_tool_choice(choice, named, shape='{"type": "function", "function": {"name": ...}}')
    check_choice(tools, canonical, param="tool_choice")
    return tools, canonical


def sampling(req: ChatRequest) -> Sampling:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return to_sampling(req, max_tokens=max_tokens, stop=_stops(req), logprobs=bool(req.logprobs),
                       top_logprobs=req.top_logprobs or 0)  # fmt: skip


def _format(req: ChatRequest) -> ResponseFormat | None:
    spec = req.response_format
    if spec is None:
        return None
    schema = spec.json_schema.schema if spec.json_schema else None
    return response_format(spec.type, schema, param="response_format")


@dataclass(kw_only=True)
class ChatPlan(Plan):
    functions: bool = False
    """The request used the deprecated `functions`: the answer uses `function_call`."""


class OpenAIChat(Dialect):
    """The exchange dialect of ``POST /v1/chat/completions``."""

    name = "openai"
    ignored_fields = frozenset({"user", "store", "metadata", "service_tier", "prediction", "verbosity",
                                "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                                "safety_identifier"})  # fmt: skip
    """Accepted by OpenAI and without effect here (they bill, store, route or speed up; never change the answer)."""

    def parse(self, body: bytes) -> Plan:
        req = parse(body)
        tools, choice = canonical_tools(req)
        functions = uses_functions(req)
        request = GenerateRequest(
            request_id=UNASSIGNED,
            model=req.model,
            messages=canonical_messages(req),
            sampling=sampling(req),
            stream=bool(req.stream),
            response_format=_format(req),
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=req.parallel_tool_calls is not False and not functions,  # one function call, as then
            reasoning=reasoning(req.reasoning_effort, param="reasoning_effort"),
        )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatPlan(request=request, include_usage=include_usage, functions=functions)

    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> ChatFormatter:
        return ChatFormatter(request_id=request_id, model=model, created=created, include_usage=plan.include_usage,
                             logprobs=plan.request.sampling.logprobs,
                             functions=isinstance(plan, ChatPlan) and plan.functions,
                             named_tool=plan.request.tool_choice.mode == TOOL_CHOICE_FUNCTION)  # fmt: skip

    def error_response(self, exc: ApiError) -> Response:
        return error_response(exc)
