"""Constrained decoding: JSON output that always parses and matches its schema, via llguidance.

A grammar compiled from the request's schema masks, at every step, the tokens
that could not continue a valid document; the end token is allowed only once
the document is complete. It runs as one of the sequence's logits processors,
so it works inside the batch like any other per-request setting.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from cortex.protocol import GenerateRequest, ResponseFormat
from cortex.protocol import messages as m
from cortex.worker.loader import LoadedModel
from cortex.worker.sequence import LogitsProcessor
from cortex.worker.tool_grammar import offered_tools, one_call, tool_grammar

log = logging.getLogger("cortex.worker")
_BITS = torch.arange(32, dtype=torch.int32)
WHITESPACE = "[ \\n\\t]{0,24}"
"""Whitespace allowed between JSON tokens of structured output."""


class GrammarError(ValueError):
    """The schema cannot be compiled into a grammar (the client's mistake: a 400)."""


def _tokenizer(loaded: LoadedModel) -> Any:
    """llguidance's view of the model's tokenizer, built once per model (it takes about a second)."""
    cached = loaded.extra.get("llguidance_tokenizer")
    if cached is None:
        import llguidance.hf

        cached = llguidance.hf.from_tokenizer(loaded.tokenizer, eos_token=sorted(loaded.eos_ids))
        loaded.extra["llguidance_tokenizer"] = cached
    return cached


def request_constraints(loaded: LoadedModel, request: GenerateRequest) -> list[LogitsProcessor]:
    """What keeps `request`'s answer well-formed: its tool calls' grammar or its response format.

    Both at once cannot be expressed in one grammar; a forced call wins over the
    format, and under ``auto`` the format wins (calls are then parsed unconstrained).
    """
    lark = None
    if offered_tools(request.tools, request.tool_choice):
        syntax = loaded.tool_syntax
        lark = tool_grammar(request.tools, request.tool_choice, not one_call(request), syntax)
    forced = request.tool_choice.mode in (m.TOOL_CHOICE_REQUIRED, m.TOOL_CHOICE_FUNCTION)
    if lark is not None and (forced or request.response_format is None):
        return [lark_processor(loaded, lark, what="the tools' parameter schemas")]
    if request.response_format is not None:
        return [json_processor(loaded, request.response_format)]
    return []


def json_processor(loaded: LoadedModel, fmt: ResponseFormat) -> LogitsProcessor:
    """A logits processor that keeps the output inside `fmt`'s JSON schema (any object for json_object)."""
    from llguidance import LLMatcher

    try:
        schema: Any = json.loads(fmt.schema) if fmt.type == "json_schema" else {"type": "object"}
    except ValueError as exc:
        raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
    if isinstance(schema, dict) and "x-guidance" not in schema:
        # Room for pretty-printing, but no endless run of whitespace (a small model's favourite loop).
        schema = schema | {"x-guidance": {"whitespace_pattern": WHITESPACE}}
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema)
    except Exception as exc:  # llguidance raises ValueError subclasses for malformed schemas
        raise GrammarError(f"the JSON schema cannot be used: {exc}") from exc
    return grammar_processor(loaded, grammar, what="the JSON schema")


def lark_processor(loaded: LoadedModel, lark: str, *, what: str) -> LogitsProcessor:
    """A logits processor for a Lark grammar in llguidance's dialect (tool calls)."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_lark(lark)
    except Exception as exc:
        raise GrammarError(f"{what} cannot be used: {exc}") from exc
    return grammar_processor(loaded, grammar, what=what)


def grammar_processor(loaded: LoadedModel, grammar: str, *, what: str) -> LogitsProcessor:
    from llguidance import LLMatcher

    matcher = LLMatcher(_tokenizer(loaded), grammar)
    if matcher.is_error():
        raise GrammarError(f"{what} cannot be used: {_first_line(matcher.get_error())}")
    consumed = 0

    def constrain(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        nonlocal consumed
        if len(generated) < consumed:  # the answer started over (a token or two came before the thinking)
            matcher.reset()
            consumed = 0
        for token in generated[consumed:]:
            matcher.consume_token(token)
        consumed = len(generated)
        mask = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        if matcher.is_error():
            # The matcher would now allow only the end token: a silent, invalid answer. Fail loudly.
            raise RuntimeError(f"structured output failed: {_first_line(matcher.get_error())}")
        allowed = ((mask.unsqueeze(1) >> _BITS) & 1).flatten().bool()
        vocab = logits.shape[-1]
        if allowed.shape[0] < vocab:
            allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.shape[0])])
        return logits.masked_fill(~allowed[:vocab].to(logits.device), float("-inf"))

    return constrain


def _first_line(error: str, limit: int = 300) -> str:
    """llguidance's errors can carry the parser state and the whole grammar: clients get the headline.

    The whole text goes to the log at DEBUG only: the grammar comes from the request's schema, and
    request contents stay out of the log at the levels a fleet runs at.
    """
    if len(error) > limit or "\n" in error:
        log.debug("llguidance: %s", error)
    headline = error.split("\n", 1)[0].split(" <", 1)[0]
    return headline if len(headline) <= limit else headline[: limit - 1] + "…"
