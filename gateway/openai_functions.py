"""OpenAI chat's deprecated ``functions`` and ``function_call``: the same tool calling in its older shape.

OpenAI still serves them, so Cortex does: the functions become canonical tools
(one call per answer, as then), ``function_call`` the tool choice. Earlier
turns have no call ids: an assistant ``function_call`` and the ``function``
message answering it are paired by the function's name (`call_id`), which is
how the worker looks the name up again. The answer's call comes back as
``message.function_call`` (``delta.function_call`` pieces when streaming) with
``finish_reason: "function_call"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cortex.gateway.errors import InvalidRequest
from cortex.gateway.tools import check_choice, check_tools, make_tool
from cortex.protocol import Tool, ToolCall, ToolCallDelta, ToolChoice
from cortex.protocol import messages as m

if TYPE_CHECKING:
    from cortex.gateway.openai_chat import ChatRequest

MODES = (m.TOOL_CHOICE_NONE, m.TOOL_CHOICE_AUTO)
FINISH_FUNCTION_CALL = "function_call"


def call_id(name: str) -> str:
    """The id a call of `name` and its result share inside Cortex (the older shape has none)."""
    return f"call_{name}"


def uses_functions(req: ChatRequest) -> bool:
    return req.functions is not None or req.function_call is not None


def canonical_functions(req: ChatRequest) -> tuple[list[Tool], ToolChoice]:
    """`functions` and `function_call` as canonical tools and tool choice; mixed with `tools` they are a 400."""
    if req.tools is not None:
        raise InvalidRequest("Send either `tools` or the deprecated `functions`, not both.", param="functions")
    if req.tool_choice is not None:
        raise InvalidRequest("Send either `tool_choice` or the deprecated `function_call`, not both.",
                             param="function_call")  # fmt: skip
    if not req.functions:
        param = "functions" if req.functions is not None else "function_call"
        raise InvalidRequest("`function_call` needs at least one function in `functions`.", param=param)
    tools = [make_tool(fn.name, fn.description, fn.parameters, param=f"functions[{i}]")
             for i, fn in enumerate(req.functions)]  # fmt: skip
    check_tools(tools, param="functions")
    choice_in = req.function_call
    if choice_in is None:
        choice = ToolChoice()
    elif isinstance(choice_in, str):
        if choice_in not in MODES:
            raise InvalidRequest(f"Invalid `function_call` {choice_in!r}: expected none, auto or "
                                 '{"name": ...}.', param="function_call")  # fmt: skip
        choice = ToolChoice(mode=choice_in)
    else:
        choice = ToolChoice(mode=m.TOOL_CHOICE_FUNCTION, name=choice_in.name)
    check_choice(tools, choice, param="function_call")
    return tools, choice


def function_call_object(calls: list[ToolCall]) -> dict[str, Any]:
    """``message.function_call``: the answer's call (there is only one: parallel calls are off)."""
    return {"name": calls[0].name, "arguments": calls[0].arguments}


def function_call_delta(deltas: list[ToolCallDelta]) -> dict[str, Any] | None:
    """``delta.function_call``: the call's name in its first piece, then arguments fragments."""
    pieces = [d for d in deltas if d.index == 0]
    if not pieces:
        return None
    piece: dict[str, Any] = {"arguments": "".join(d.arguments for d in pieces)}
    head = next((d for d in pieces if d.id), None)
    if head is not None:
        piece["name"] = head.name
    return piece


def function_finish_reason(reason: str) -> str:
    return FINISH_FUNCTION_CALL if reason == m.FINISH_TOOL_CALLS else reason
