"""How tools reach the model: the tool-call conventions, and tools and earlier calls written into the prompt.

Models write tool calls in one of a few conventions (`ToolSyntax`): Hermes/Qwen
wrap a ``{"name", "arguments"}`` object in ``<tool_call>`` tags; Llama 3 answers
with a bare ``{"name", "parameters"}`` object. A chat template that knows about
tools renders them itself; for one that does not (the default model's), the
tools are described in a system message in the Hermes convention, which small
instruct models have mostly seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cortex.protocol import Message, Tool, ToolCall


@dataclass(frozen=True)
class ToolSyntax:
    name: str
    open: str
    """The tag that starts a call; empty when the whole answer is the call (Llama 3)."""
    close: str
    arguments_key: str


HERMES = ToolSyntax("hermes", "<tool_call>", "</tool_call>", "arguments")
LLAMA3 = ToolSyntax("llama3", "", "", "parameters")
SYNTAXES = {s.name: s for s in (HERMES, LLAMA3)}


def detect_syntax(template: str, configured: str = "") -> ToolSyntax:
    """The catalogue's ``tool_format`` if set, else what the chat template shows, else Hermes."""
    if configured:
        return SYNTAXES[configured]
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return HERMES


@dataclass(frozen=True)
class TemplateFeatures:
    """What a chat template renders by itself (a template that never mentions a field ignores it)."""

    tools: bool
    tool_calls: bool
    tool_role: bool

    @classmethod
    def of(cls, template: str) -> TemplateFeatures:
        return cls(
            tools="tools" in template,
            tool_calls="tool_calls" in template,
            tool_role="'tool'" in template or '"tool"' in template,
        )


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text  # kept as the model (or client) wrote it


def schema_of(tool: Tool) -> Any:
    """The tool's JSON schema for its arguments (any object when it declares none)."""
    return json.loads(tool.parameters) if tool.parameters else {"type": "object"}


def render_call(syntax: ToolSyntax, call: ToolCall) -> str:
    body = json.dumps({"name": call.name, syntax.arguments_key: _arguments(call.arguments)}, ensure_ascii=False)
    return f"{syntax.open}\n{body}\n{syntax.close}" if syntax.open else body


def tools_system_prompt(syntax: ToolSyntax, tools: list[Tool]) -> str:
    """Instructions for a model whose chat template cannot render tools."""
    listing = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": schema_of(t)}, ensure_ascii=False)
        for t in tools
    )
    example = render_call(syntax, ToolCall(id="", name="<function-name>", arguments='{"<argument>": "<value>"}'))
    return (
        "You can call functions to help answer. The available functions, one JSON description per line:\n"
        f"<tools>\n{listing}\n</tools>\n"
        f"To call a function, answer with exactly this form, one per call:\n{example}\n"
        "A function's result comes back in a <tool_response> turn."
    )


def chat_turns(
    messages: list[Message], tools: list[Tool], template: str, syntax: ToolSyntax
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Canonical messages as chat-template turns, and the ``tools`` argument for the template (or None).

    Whatever the template cannot render by itself (tools, earlier calls, tool
    results) is written into the turns' text in the model's own tool syntax.
    """
    features = TemplateFeatures.of(template)
    names = {call.id: call.name for msg in messages for call in msg.tool_calls}
    turns: list[dict[str, Any]] = []
    for msg in messages:
        if msg.role == "tool":
            result = f"Error: {msg.content}" if msg.is_error else msg.content
            if features.tool_role:
                answer = {"role": "tool", "content": result, "tool_call_id": msg.tool_call_id}
                turns.append(answer | {"name": names.get(msg.tool_call_id or "", "")})
            else:
                wrapped = f"<tool_response>\n{result}\n</tool_response>"
                if turns and turns[-1].get("tool_results"):
                    turns[-1]["content"] += "\n" + wrapped
                else:
                    turns.append({"role": "user", "content": wrapped, "tool_results": True})
            continue
        turn: dict[str, Any] = {"role": msg.role, "content": msg.content}
        if msg.tool_calls:
            if features.tool_calls:
                turn["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                    for c in msg.tool_calls
                ]
            else:
                calls = "\n".join(render_call(syntax, c) for c in msg.tool_calls)
                turn["content"] = f"{msg.content}\n{calls}" if msg.content else calls
        turns.append(turn)
    for turn in turns:
        turn.pop("tool_results", None)
    if not tools:
        return turns, None
    if features.tools:
        return turns, [
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": schema_of(t)}}
            for t in tools
        ]
    instructions = tools_system_prompt(syntax, tools)
    if turns and turns[0]["role"] == "system":
        turns[0] = turns[0] | {"content": f"{turns[0]['content']}\n\n{instructions}"}
    else:
        turns.insert(0, {"role": "system", "content": instructions})
    return turns, None
