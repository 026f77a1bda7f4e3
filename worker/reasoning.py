"""Reasoning models: their thinking, separated from the answer as it streams.

Qwen3, DeepSeek-R1 and their kind write their thinking between ``<think>`` and
``</think>`` before answering; some chat templates open the tag themselves at
the end of the prompt, so the output starts inside it. `ReasoningParser` splits
the generated text into reasoning and answer; the sequence uses its state to
hold constraints (a JSON grammar, tool calls) until the answer begins, and to
close the thinking when its token budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

from cortex.worker.stops import partial_suffix

START, THINKING, ANSWER = "start", "thinking", "answer"


@dataclass(frozen=True)
class ReasoningSyntax:
    open: str = "<think>"
    close: str = "</think>"


def detect_reasoning(template: str, configured: bool | None) -> ReasoningSyntax | None:
    """The catalogue's ``reasoning`` if set, else whether the chat template knows the thinking tags."""
    if configured is False:
        return None
    if configured or "<think>" in template or "</think>" in template:
        return ReasoningSyntax()
    return None


def opens_thinking(prompt: str, syntax: ReasoningSyntax) -> bool:
    """Whether the rendered prompt ends inside an open thinking tag (the template opened it)."""
    tail = prompt.rstrip()
    return tail.endswith(syntax.open)


class ReasoningParser:
    """Splits streamed text into (reasoning, answer), holding back what may be a tag."""

    def __init__(self, syntax: ReasoningSyntax, *, thinking: bool) -> None:
        self.syntax = syntax
        self.state = THINKING if thinking else START
        self._pending = ""
        self._answer_started = False

    @property
    def thinking(self) -> bool:
        return self.state == THINKING

    def push(self, text: str) -> tuple[str, str]:
        self._pending += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        answer: list[str] = []
        if self.state == START:
            head = self._pending.lstrip()
            if head.startswith(self.syntax.open):
                self.state, self._pending = THINKING, head[len(self.syntax.open) :]
            elif head and (final or not self.syntax.open.startswith(head)):
                self.state = ANSWER
            elif not final:
                return "", ""
        if self.state == THINKING:
            at = self._pending.find(self.syntax.close)
            if at >= 0:
                reasoning.append(self._pending[:at])
                self.state, self._pending = ANSWER, self._pending[at + len(self.syntax.close) :]
            else:
                keep = 0 if final else partial_suffix(self._pending, self.syntax.close)
                reasoning.append(self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
        if self.state == ANSWER:
            text = self._pending
            if not self._answer_started:
                text = text.lstrip()  # the blank line between thinking and answer is layout
                self._answer_started = bool(text)
            answer.append(text)
            self._pending = ""
        return "".join(reasoning), "".join(answer)
