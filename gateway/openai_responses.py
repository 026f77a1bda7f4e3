"""OpenAI ``POST /v1/responses`` (text and function tools): the HTTP body checked and turned into the wire request.

``store`` and ``previous_response_id`` work through `responses_store` (NATS KV);
the response object and its events are `responses_format`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway import responses_store
from cortex.gateway.errors import ApiError, InvalidRequest, ModelNotFound
from cortex.gateway.exchange import UNASSIGNED, Dialect, Plan
from cortex.gateway.formats import response_format
from cortex.gateway.openai_errors import decode_body, error_response
from cortex.gateway.openai_params import (
    check_logprobs,
    check_sampling,
    check_verbosity,
    metadata,
    reasoning,
    to_sampling,
)
from cortex.gateway.responses_format import ResponsesFormatter
from cortex.gateway.services import Services
from cortex.gateway.tools import check_choice, check_tools, make_tool, openai_tool_choice, unknown_tool_result
from cortex.protocol import GenerateRequest, Message, Tool, ToolCall, ToolChoice
from cortex.protocol.messages import TOOL_CHOICE_FUNCTION

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_PARTS = {"input_text", "output_text", "text"}


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


_decoder = msgspec.json.Decoder(ResponsesRequest)


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
    if req.previous_response_id is not None and not responses_store.RESPONSE_ID.fullmatch(req.previous_response_id):
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


def echo(req: ResponsesRequest, request: GenerateRequest) -> dict[str, Any]:
    """The request's settings as every response object repeats them, from the body as sent and as understood."""
    choice = request.tool_choice
    named = choice.mode == TOOL_CHOICE_FUNCTION
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": request.sampling.temperature,
        "top_p": request.sampling.top_p,
        "top_logprobs": req.top_logprobs,
        "parallel_tool_calls": request.parallel_tool_calls,
        "tool_choice": {"type": "function", "name": choice.name} if named else choice.mode,
        "tools": [_tool(tool, spec.strict) for tool, spec in zip(request.tools, req.tools or [], strict=True)],
        "previous_response_id": req.previous_response_id,
        "store": bool(req.store),
        "text": {"format": _text_format(req)},
        "metadata": req.metadata or {},
        "max_tool_calls": req.max_tool_calls,
    }


def _tool(tool: Tool, strict: bool | None) -> dict[str, Any]:
    """A tool as the response echoes it; `strict` as sent (Responses function tools default to strict)."""
    parameters = msgspec.json.decode(tool.parameters) if tool.parameters else None
    return {"type": "function", "name": tool.name, "description": tool.description or None,
            "parameters": parameters, "strict": strict is not False}  # fmt: skip


def _text_format(req: ResponsesRequest) -> dict[str, Any]:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return {"type": "text"}
    if fmt.type == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "name": fmt.name or "response", "schema": fmt.schema, "strict": bool(fmt.strict)}


@dataclass(kw_only=True)
class ResponsesPlan(Plan):
    body: ResponsesRequest
    """The request as the client sent it: what the response object echoes."""
    history: list[Message] = field(default_factory=list)
    """The conversation without instructions: what is stored for a follow-up."""


def _check_outputs(plan: ResponsesPlan) -> None:
    """Every `function_call_output` answers a `function_call` of the conversation (stored turns included)."""
    unknown = unknown_tool_result(plan.history)
    if unknown is None:
        return
    call_id = plan.history[unknown].tool_call_id
    items = plan.body.input if isinstance(plan.body.input, list) else []
    at = next((i for i, item in enumerate(items) if item.type == "function_call_output" and item.call_id == call_id), 0)
    raise InvalidRequest(f"No tool call found for function call output with call_id {call_id}.",
                         param=f"input[{at}].call_id")  # fmt: skip


def _with_instructions(req: ResponsesRequest, history: list[Message]) -> list[Message]:
    if not req.instructions:
        return list(history)
    return [Message(role="system", content=req.instructions), *history]


class OpenAIResponses(Dialect):
    """The exchange dialect of ``POST /v1/responses``."""

    name = "openai-responses"
    ignored_fields = frozenset({"service_tier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                                "safety_identifier", "user", "context_management"})  # fmt: skip
    """Accepted by OpenAI and without effect here (they bill, route or speed up; never change the answer)."""

    def parse(self, body: bytes) -> Plan:
        req = parse(body)
        history = input_messages(req)
        sampling = to_sampling(req, max_tokens=req.max_output_tokens, logprobs=wants_logprobs(req),
                               top_logprobs=req.top_logprobs or 0)  # fmt: skip
        fmt = req.text.format if req.text else None
        constraint = response_format(fmt.type, fmt.schema, param="text.format") if fmt else None
        tools, choice = canonical_tools(req)
        request = GenerateRequest(
            request_id=UNASSIGNED, model=req.model, messages=_with_instructions(req, history), sampling=sampling,
            stream=bool(req.stream), response_format=constraint, tools=tools, tool_choice=choice,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            reasoning=reasoning(req.reasoning.effort if req.reasoning else None, param="reasoning.effort"),
        )  # fmt: skip
        return ResponsesPlan(request=request, body=req, history=history, prompt_param="input",
                             ignored=ignored_options(req))  # fmt: skip

    async def prepare(self, plan: Plan, svc: Services) -> Plan:
        """Put the stored conversation of `previous_response_id` before this turn."""
        assert isinstance(plan, ResponsesPlan)
        previous = plan.body.previous_response_id
        if previous is None:
            _check_outputs(plan)
            return plan
        try:
            stored = await responses_store.load(svc, previous, param="previous_response_id")
        except ModelNotFound:
            raise ModelNotFound(f"Previous response with id '{previous}' not found.", param="previous_response_id",
                                code="previous_response_not_found") from None  # fmt: skip
        # Earlier turns' instructions are not kept (as in OpenAI's API); this turn's lead.
        plan.history = [*stored.messages, *plan.history]
        plan.request = msgspec.structs.replace(plan.request, messages=_with_instructions(plan.body, plan.history))
        _check_outputs(plan)
        return plan

    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> ResponsesFormatter:
        assert isinstance(plan, ResponsesPlan)
        return ResponsesFormatter(request_id=request_id, model=model, created=created,
                                  echo=echo(plan.body, plan.request), logprobs=plan.request.sampling.logprobs,
                                  store=bool(plan.body.store), history=plan.history)  # fmt: skip

    def error_response(self, exc: ApiError) -> Response:
        return error_response(exc)
