"""A generated answer's text, split into thinking, answer text and tool calls as it streams."""

from __future__ import annotations

from dataclasses import dataclass, field

from cortex.protocol import ToolCallDelta
from cortex.worker.reasoning import ReasoningParser
from cortex.worker.tool_parser import ToolCallParser


@dataclass
class Piece:
    """Thinking, then text, then tool-call pieces, then (rarely, at the very end) text after the calls."""

    reasoning: str = ""
    text: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)
    tail: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.text or self.calls or self.tail)

    def __add__(self, other: Piece) -> Piece:
        if self.calls or self.tail:  # the other's text comes after our calls
            return Piece(self.reasoning + other.reasoning, self.text, self.calls + other.calls,
                         self.tail + other.text + other.tail)  # fmt: skip
        return Piece(self.reasoning + other.reasoning, self.text + other.text, other.calls, other.tail)


@dataclass
class OutputSplitter:
    """Thinking first (for reasoning models), then tool calls out of the answer (when tools are offered)."""

    reasoning: ReasoningParser | None = None
    tools: ToolCallParser | None = None

    def push(self, text: str) -> Piece:
        thought = ""
        if self.reasoning is not None:
            thought, text = self.reasoning.push(text)
        return self._answer(thought, text, final=False, truncated=False)

    def finish(self, *, truncated: bool) -> Piece:
        thought, text = self.reasoning.finish() if self.reasoning is not None else ("", "")
        return self._answer(thought, text, final=True, truncated=truncated)

    def _answer(self, thought: str, text: str, *, final: bool, truncated: bool) -> Piece:
        if self.tools is None:
            return Piece(thought, text)
        piece = Piece(thought, *self.tools.push(text)) if text else Piece(thought)
        if final:
            piece += Piece("", *self.tools.finish(truncated=truncated))
        return piece
