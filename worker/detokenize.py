"""Incremental detokenization that never splits a UTF-8 character.

Byte-level tokenizers emit a multi-byte character across several tokens; decoding
token by token would show U+FFFD in between. Text is released only once the
decoded tail no longer ends in an incomplete character. The few tokens before
the new ones are decoded with them so that tokenizers which drop a leading space
(SentencePiece) still produce the right spacing.
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], *, skip_special_tokens: bool, clean_up_tokenization_spaces: bool) -> str: ...


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text deltas.

    ::

        detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        for token in generated:
            print(detok.push(token), end="")
        print(detok.flush())
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int] | None = None) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list((prompt_ids or [])[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Release whatever is held back, complete or not (end of generation)."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (not final and after.endswith(_REPLACEMENT)):
            return ""
        delta = after[len(before) :]
        self._prefix = self._read
        self._read = len(self._ids)
        return delta
