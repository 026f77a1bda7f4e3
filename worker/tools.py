"""Tool calling in the worker: tools into the prompt, tool calls out of the model's text.

Models write tool calls in one of a few conventions (`ToolSyntax`): Hermes/Qwen
wrap a ``{"name", "arguments"}`` object in ``<tool_call>`` tags; Llama 3 answers
with a bare ``{"name", "parameters"}`` object. A chat template that knows about
tools renders them itself; for one that does not (the default model's), the
tools are described in a system message in the Hermes convention, which small
instruct models have mostly seen.

`ToolCallParser` turns the generated text into plain text plus canonical
`ToolCallDelta` pieces as it streams, so no markup ever reaches a client.
`tool_grammar` builds the llguidance grammar that keeps calls well-formed: a
whole-answer grammar when a call is required, a lazily triggered one (free text
until the model opens a call) under ``auto``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from cortex.protocol import GenerateRequest, Message, Tool, ToolCall, ToolCallDelta, ToolChoice
from cortex.protocol import messages as m
from cortex.worker.stops import partial_suffix


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


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text  # kept as the model (or client) wrote it


def _schema(tool: Tool) -> Any:
    return json.loads(tool.parameters) if tool.parameters else {"type": "object"}


def render_call(syntax: ToolSyntax, call: ToolCall) -> str:
    body = json.dumps({"name": call.name, syntax.arguments_key: _arguments(call.arguments)}, ensure_ascii=False)
    return f"{syntax.open}\n{body}\n{syntax.close}" if syntax.open else body


def tools_system_prompt(syntax: ToolSyntax, tools: list[Tool]) -> str:
    """Instructions for a model whose chat template cannot render tools."""
    listing = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": _schema(t)}, ensure_ascii=False)
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
                turn = {"role": "tool", "content": result, "tool_call_id": msg.tool_call_id}
                turns.append(turn | {"name": names.get(msg.tool_call_id or "", "")})
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
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": _schema(t)}}
            for t in tools
        ]
    instructions = tools_system_prompt(syntax, tools)
    if turns and turns[0]["role"] == "system":
        turns[0] = turns[0] | {"content": f"{turns[0]['content']}\n\n{instructions}"}
    else:
        turns.insert(0, {"role": "system", "content": instructions})
    return turns, None


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
                            closed_objects(_schema(t)), f"#/anyOf/{i}/properties/{syntax.arguments_key}"
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


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass
class _ValueScanner:
    """Finds where one JSON object or array ends, a character at a time."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False

    def feed(self, text: str) -> int:
        """How many characters of `text` belong to the value; len(text) if it has not ended yet."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
                self.started = True
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0 and self.started:
                    return i + 1
        return len(text)

    @property
    def complete(self) -> bool:
        return self.started and self.depth == 0


@dataclass
class _Call:
    index: int
    body: str = ""
    """The call's text since the opening tag."""
    streaming: bool = False
    """Header sent: arguments go out as they come."""
    sent: int = 0
    """How much of `body` has gone out as arguments."""
    scanner: _ValueScanner = field(default_factory=_ValueScanner)
    held: list[ToolCallDelta] | None = None
    """Pieces kept until the call is complete (every call after the first), else None."""
    name: str = ""
    start: int = 0
    """Where the arguments begin in `body`."""


@dataclass
class ToolCallParser:
    """Splits a streamed answer into text and tool calls, holding back what may be markup."""

    syntax: ToolSyntax
    names: frozenset[str] = frozenset()
    """The tools offered: a bare-JSON answer naming anything else is text (empty: any name)."""
    calls: int = 0
    """Calls started so far."""
    completed: int = 0
    """Calls whose arguments are complete."""
    repeated: bool = False
    """The model repeated a call it had already made: a loop, so the answer should end here."""
    _pending: str = ""
    _held: str = ""
    """Whitespace after a call, sent only if more text follows."""
    _call: _Call | None = None
    _seen_text: bool = False
    _made: set[tuple[str, str]] = field(default_factory=set)
    _truncated: bool = False

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Text and call pieces, text first: what follows a closed call waits for the next push."""
        if self.repeated:
            return "", []
        self._pending += text
        before, deltas, _ = self._advance(final=False)
        return before, deltas

    def finish(self, *, truncated: bool = False) -> tuple[str, list[ToolCallDelta], str]:
        """Everything still held back, at the end of the answer: (text, call pieces, text after them).

        A call cut off by the token limit before its name was known is dropped
        (the finish reason says the answer was cut); other markup that never
        became a call goes out as the text it was.
        """
        self._truncated = truncated
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> tuple[str, list[ToolCallDelta], str]:
        before: list[str] = []
        after: list[str] = []
        deltas: list[ToolCallDelta] = []
        while not self.repeated:
            out = after if deltas else before
            if self._call is None and not self._scan_text(out, final):
                break
            if self._call is not None and (not self._scan_call(out, deltas, final) or not final):
                break
        return "".join(before), deltas, "".join(after)

    def _scan_text(self, out: list[str], final: bool) -> bool:
        """Move plain text to `out`; True once a call has opened."""
        syntax, pending = self.syntax, self._pending
        if not syntax.open:
            # Llama 3: a call is the whole answer, so only an answer that opens with `{` may be one.
            stripped = pending.lstrip()
            if self._seen_text or (stripped and not stripped.startswith("{")):
                self._seen_text = True
                out.append(pending)
                self._pending = ""
                return False
            if stripped:
                self._open_call(stripped)
                return True
            if final:
                out.append(pending)
                self._pending = ""
            return False
        at = pending.find(syntax.open)
        if at >= 0:
            self._emit_text(out, pending[:at])
            self._open_call(pending[at + len(syntax.open) :])
            return True
        keep = 0 if final else partial_suffix(pending, syntax.open)
        self._emit_text(out, pending[: len(pending) - keep], final=final)
        self._pending = pending[len(pending) - keep :]
        return False

    def _emit_text(self, out: list[str], text: str, *, final: bool = False) -> None:
        # Whitespace around calls is layout, not an answer.
        if self.calls and not text.strip():
            if not final:
                self._held += text
            return
        out.append(self._held + text)
        self._held = ""

    def _open_call(self, rest: str) -> None:
        # The first call streams as it comes; later ones wait until complete, so a repeat can be dropped.
        self._call = _Call(index=self.calls, held=[] if self.calls else None)
        self.calls += 1
        self._pending = rest
        self._held = ""

    def _scan_call(self, out: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        """Follow the open call; True once it has closed and text scanning may go on."""
        call, syntax = self._call, self.syntax
        assert call is not None
        call.body += self._pending
        self._pending = ""
        target = deltas if call.held is None else call.held
        if not call.streaming:
            self._start_streaming(call, target)
        if call.streaming and not call.scanner.complete:
            # The arguments run to their closing brace: a closing tag inside a string is just text.
            fresh = call.body[call.sent :]
            taken = call.scanner.feed(fresh)
            if taken:
                target.append(ToolCallDelta(index=call.index, arguments=fresh[:taken]))
                call.sent += taken
            if call.scanner.complete:
                self._complete(call.name, call.body[call.start : call.sent], call.held, deltas)
        searched_from = call.sent if call.streaming else 0
        end = call.body.find(syntax.close, searched_from) if syntax.close else -1
        if call.streaming and not call.scanner.complete:
            end = -1
        if end < 0 and not final:
            return False
        body = call.body if end < 0 else call.body[:end]
        if not call.streaming:
            if end < 0 and self._truncated:
                self.calls -= 1
            else:
                self._finish_whole(body, out, deltas, closed=end >= 0)
        elif call.held is not None and not call.scanner.complete:
            self.calls -= 1  # a later call cut off mid-way: nothing of it went out
        self._call = None
        if end >= 0:
            self._pending = call.body[end + len(syntax.close) :]
        return end >= 0

    def _start_streaming(self, call: _Call, target: list[ToolCallDelta]) -> None:
        """Once the name is known (and is one of the tools), the call goes out as it is written."""
        header = _HEADER.match(call.body)
        if header is None or call.body[header.end() : header.end() + 1] not in ("{", "["):
            return
        try:
            name = json.loads(f'"{header.group(1)}"')
        except ValueError:
            return  # an odd name: parsed whole at the end, or given back as text
        if self.names and name not in self.names:
            return
        call.name = name
        target.append(ToolCallDelta(index=call.index, id=new_call_id(), name=name))
        call.streaming, call.sent = True, header.end()
        call.start = call.sent

    def _finish_whole(self, body: str, out: list[str], deltas: list[ToolCallDelta], *, closed: bool) -> None:
        """A call whose header did not stream (an unusual key order, a list of calls): parse it now."""
        parsed = _parse_calls(body, self.syntax, self.names)
        if parsed is None:
            self.calls -= 1  # not a call after all: give the text back
            out.append(self.syntax.open + body + (self.syntax.close if closed else ""))
            return
        self.calls -= 1
        for name, arguments in parsed:
            if self.repeated:
                break
            self.calls += 1
            self._complete(name, arguments, [ToolCallDelta(index=self.calls - 1, id=new_call_id(), name=name,
                                                           arguments=arguments)], deltas)  # fmt: skip

    def _complete(
        self, name: str, arguments: str, held: list[ToolCallDelta] | None, deltas: list[ToolCallDelta]
    ) -> None:
        """A call is whole: send what was held of it, unless it repeats an earlier call."""
        try:
            key = (name, json.dumps(json.loads(arguments), sort_keys=True))
        except (ValueError, RecursionError):
            key = (name, arguments)
        if key in self._made:
            self.repeated = True
            self.calls -= 1
            return
        self._made.add(key)
        self.completed += 1
        if held is not None:
            deltas.extend(held)


def _parse_calls(body: str, syntax: ToolSyntax, names: frozenset[str]) -> list[tuple[str, str]] | None:
    text = body.strip().removeprefix("<|python_tag|>")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        if not syntax.open and ("arguments" not in item and "parameters" not in item):
            return None  # bare JSON that is not shaped like a call is an answer
        if names and item["name"] not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append((item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls or None
