"""Tool calls out of the model's text: `ToolCallParser` splits a streamed answer into text and calls.

The calls come out as canonical `ToolCallDelta` pieces as they stream, so no
markup in the model's tool syntax ever reaches a client.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from cortex.protocol import ToolCallDelta
from cortex.worker.stops import partial_suffix
from cortex.worker.tool_prompt import ToolSyntax


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


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
