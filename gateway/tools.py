"""Tool definitions and tool choices of every dialect, checked once and made canonical.

A bad tool is a 400 before anything reaches a worker: a name clients could not
match, parameters that are not a JSON schema the workers' grammar compiler can
use, a choice naming a tool that was not offered.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from cortex.gateway.errors import InvalidRequest
from cortex.gateway.schemas import schema_problem
from cortex.protocol import Message, Tool, ToolChoice
from cortex.protocol import messages as m

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_TOOLS = 128
_encoder = msgspec.json.Encoder()


def make_tool(
    name: str, description: str | None, parameters: Any, *, param: str, schema_field: str = "parameters"
) -> Tool:
    """A canonical tool; `parameters` is the arguments' JSON schema (None: any object), sent as `schema_field`."""
    if not TOOL_NAME.fullmatch(name):
        raise InvalidRequest(
            f"Invalid tool name {name!r}: use 1 to 64 letters, digits, underscores or dashes.", param=f"{param}.name"
        )
    if parameters is None:
        return Tool(name=name, description=description or "")
    if not isinstance(parameters, dict):
        raise InvalidRequest("A tool's parameters must be a JSON schema object.", param=f"{param}.{schema_field}")
    problem = schema_problem(parameters)
    if problem:
        raise InvalidRequest(f"The tool's parameter schema cannot be used: {problem}", param=f"{param}.{schema_field}")
    return Tool(name=name, description=description or "", parameters=_encoder.encode(parameters).decode())


def check_tools(tools: list[Tool], *, param: str) -> None:
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"At most {MAX_TOOLS} tools are supported.", param=param)
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise InvalidRequest(f"Tool names must be unique; {tool.name!r} is given twice.", param=f"{param}[{i}]")
        seen.add(tool.name)


def check_choice(tools: list[Tool], choice: ToolChoice, *, param: str) -> None:
    """A choice that forces a call needs tools to call, and a named tool must be one of them."""
    if choice.mode in (m.TOOL_CHOICE_REQUIRED, m.TOOL_CHOICE_FUNCTION) and not tools:
        raise InvalidRequest("A tool choice that requires a call is only allowed when tools are given.", param=param)
    if choice.mode == m.TOOL_CHOICE_FUNCTION and all(t.name != choice.name for t in tools):
        raise InvalidRequest(f"The tool choice names {choice.name!r}, which is not among the tools.", param=param)


OPENAI_MODES = (m.TOOL_CHOICE_AUTO, m.TOOL_CHOICE_NONE, m.TOOL_CHOICE_REQUIRED)


def openai_tool_choice(choice: object, named: str | None, *, shape: str) -> ToolChoice:
    """OpenAI's `tool_choice`: absent, a mode, or an object naming a function (`named`; None when malformed)."""
    if choice is None:
        return ToolChoice()
    if isinstance(choice, str):
        if choice not in OPENAI_MODES:
            raise InvalidRequest(f"Invalid `tool_choice` {choice!r}: expected none, auto, required or a function.",
                                 param="tool_choice")  # fmt: skip
        return ToolChoice(mode=choice)
    if not named:
        raise InvalidRequest(f"A named `tool_choice` must be {shape}.", param="tool_choice")
    return ToolChoice(mode=m.TOOL_CHOICE_FUNCTION, name=named)


def unknown_tool_result(messages: list[Message]) -> int | None:
    """The index of the first tool result that answers no earlier call of the conversation, if one does.

    A result for a call the model never made is a client's bookkeeping error:
    rendered anyway, the model would read a result out of nowhere.
    """
    called: set[str] = set()
    for i, msg in enumerate(messages):
        called.update(call.id for call in msg.tool_calls)
        if msg.role == "tool" and msg.tool_call_id not in called:
            return i
    return None


def arguments_json(value: Any) -> str:
    """Tool-call arguments as JSON text, whether a client sent an object or (OpenAI) a string."""
    if isinstance(value, str):
        return value
    return _encoder.encode(value).decode()
