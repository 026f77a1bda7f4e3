"""Which tools a request offers, and the llguidance grammar that keeps the model's calls well-formed.

`tool_grammar` builds a whole-answer grammar when a call is required, and a
lazily triggered one (free text until the model opens a call) under ``auto``.
"""

from __future__ import annotations

import json
from typing import Any

from cortex.protocol import GenerateRequest, Tool, ToolChoice
from cortex.protocol import messages as m
from cortex.worker.tool_prompt import ToolSyntax, schema_of


def one_call(request: GenerateRequest) -> bool:
    """At most one call in the answer: parallel calls are off, or the choice names the tool to call."""
    return not request.parallel_tool_calls or request.tool_choice.mode == m.TOOL_CHOICE_FUNCTION


def offered_tools(tools: list[Tool], choice: ToolChoice) -> list[Tool]:
    """The tools the model may call under `choice` (none under ``none``)."""
    if choice.mode == m.TOOL_CHOICE_NONE:
        return []
    if choice.mode == m.TOOL_CHOICE_FUNCTION:
        return [t for t in tools if t.name == choice.name]
    return list(tools)


def tool_grammar(tools: list[Tool], choice: ToolChoice, parallel: bool, syntax: ToolSyntax) -> str | None:
    """A Lark grammar (llguidance dialect) for the answer, or None when it stays unconstrained.

    Calls come last: once one has closed, the answer may hold only more calls
    (when parallel calls are allowed) or end, so a finished call ends the turn.
    """
    callable_tools = offered_tools(tools, choice)
    if not callable_tools:
        return None
    schema = json.dumps(
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        syntax.arguments_key: _rebase(
                            closed_objects(schema_of(t)), f"#/anyOf/{i}/properties/{syntax.arguments_key}"
                        ),
                    },
                    "required": ["name", syntax.arguments_key],
                    "additionalProperties": False,
                }
                for i, t in enumerate(callable_tools)
            ],
            # One line, single spaces: unbounded whitespace is where small models loop forever.
            "x-guidance": {"whitespace_pattern": "[ ]?"},
        }
    )
    if not syntax.open:
        # A bare-JSON syntax can only be enforced for the whole answer (one call).
        return None if choice.mode == m.TOOL_CHOICE_AUTO else f"start: %json {schema}"
    opening, closing = json.dumps(syntax.open), json.dumps("\n" + syntax.close)
    more = ' ("\\n" call)*' if parallel else ""
    call = f"call: {json.dumps(syntax.open + chr(10))} %json {schema} {closing}\n"
    if choice.mode == m.TOOL_CHOICE_AUTO:
        # Free text until the model opens a call (the lazy trigger ends at the first opening tag).
        return (
            "%llguidance {}\n"
            f"start: TEXT | first{more}\n"
            "TEXT: /(.|\\n)*/\n"
            f"trigger[lazy]: TEXT {opening}\n"
            f'first: trigger "\\n" %json {schema} {closing}\n'
            f"{call}"
        )
    return f"start: call{more}\n{call}"


_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose values are data, not schemas."""
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
"""Keywords whose values map names to schemas."""
_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed_objects(schema: Any) -> Any:
    """`schema` with ``additionalProperties: false`` on every object that lists its properties and says nothing else.

    A schema that leaves extra properties open lets a model (a small one
    especially) invent keys for as long as it likes; the properties a tool
    declares are the ones it reads, as OpenAI's strict mode assumes.
    """
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _DATA_KEYWORDS else closed_objects(value)
    if isinstance(schema.get("properties"), dict) and not any(key in schema for key in _OPEN_KEYWORDS):
        out["additionalProperties"] = False
    return out


def _rebase(schema: Any, base: str) -> Any:
    """`schema` moved to `base` inside a bigger document: its local ``$ref``s (``#/$defs/...``) follow it."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                out[key] = base + value[1:]
            else:
                out[key] = _rebase(value, base)
        return out
    if isinstance(schema, list):
        return [_rebase(item, base) for item in schema]
    return schema
