"""IncrementalDetokenizer with a real byte-level BPE tokenizer (multi-byte characters span tokens)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.worker.detokenize import IncrementalDetokenizer
from tests.tiny_model import SPECIAL, build_tokenizer

REPLACEMENT = "\ufffd"
SAMPLES = [
    "naïve café 日本語 🙂🚀 ß",
    "🙂",
    "日本語のテキスト",
    "emoji 🙂🚀 and ß.",
    "Hello, how are you today?",
    "a  b\n\n c",
    "\U0001d518\U0001d52b ∑∫√ 👩\u200d👩\u200d👧 \u01c5",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def reference(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def stream(tokenizer: Any, ids: list[int], prompt_ids: list[int] | None = None) -> tuple[list[str], str]:
    """Push `ids` one by one; return the deltas and the flushed tail."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.push(token_id) for token_id in ids]
    return deltas, detok.flush()


def check_stream(tokenizer: Any, text: str) -> None:
    ids = encode(tokenizer, text)
    deltas, tail = stream(tokenizer, ids)
    assert not any(REPLACEMENT in delta for delta in deltas), deltas
    assert "".join(deltas) + tail == reference(tokenizer, ids)
    # The byte-level tokenizer round-trips any text exactly.
    assert "".join(deltas) + tail == text


def test_characters_really_span_several_tokens(tokenizer: Any) -> None:
    # Otherwise the tests below could not fail: some token must decode to a lone partial character.
    ids = encode(tokenizer, SAMPLES[0])
    pieces = [reference(tokenizer, [i]) for i in ids]
    assert any(REPLACEMENT in piece for piece in pieces), pieces
    assert len(encode(tokenizer, "🙂")) > 1


def test_naive_decoding_would_show_replacement_characters(tokenizer: Any) -> None:
    # What the detokenizer protects against: decoding growing prefixes shows U+FFFD mid-character.
    ids = encode(tokenizer, "🙂🚀")
    prefixes = [reference(tokenizer, ids[: n + 1]) for n in range(len(ids))]
    assert any(p.endswith(REPLACEMENT) for p in prefixes[:-1]), prefixes


@pytest.mark.parametrize("text", SAMPLES)
def test_multibyte_text_streams_without_replacement_characters(tokenizer: Any, text: str) -> None:
    check_stream(tokenizer, text)


def test_each_character_is_released_whole(tokenizer: Any) -> None:
    text = "日本語 🙂🚀"
    deltas, tail = stream(tokenizer, encode(tokenizer, text))
    assert tail == ""
    released = [d for d in deltas if d]
    assert "".join(released) == text
    # Each multi-byte character comes out whole, inside a single delta.
    for char in "日本語🙂🚀":
        assert sum(char in d for d in released) == 1, (char, released)


def test_incomplete_character_is_held_then_flushed(tokenizer: Any) -> None:
    ids = encode(tokenizer, "ab🙂")
    # Find a cut that leaves the emoji incomplete.
    cut = next(n for n in range(1, len(ids)) if reference(tokenizer, ids[:n]).endswith(REPLACEMENT))
    deltas, tail = stream(tokenizer, ids[:cut])
    assert not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) == reference(tokenizer, ids[:cut]).rstrip(REPLACEMENT)
    # At the end of generation the incomplete bytes are released as they are.
    assert tail.endswith(REPLACEMENT)
    assert "".join(deltas) + tail == reference(tokenizer, ids[:cut])


def test_prompt_context_is_not_repeated(tokenizer: Any) -> None:
    prompt = encode(tokenizer, "日本語のテキスト, ")
    generated = encode(tokenizer, "naïve café 🙂 ß")
    deltas, tail = stream(tokenizer, generated, prompt_ids=prompt)
    assert not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) + tail == reference(tokenizer, generated)


def test_prompt_context_cut_inside_a_character(tokenizer: Any) -> None:
    # Only the last few prompt tokens are kept as context; they may start mid-character.
    prompt = encode(tokenizer, "🙂🚀🙂🚀")
    generated = encode(tokenizer, " café 日本")
    for start in range(len(prompt)):
        deltas, tail = stream(tokenizer, generated, prompt_ids=prompt[start:])
        assert "".join(deltas) + tail == reference(tokenizer, generated), start


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    end = tokenizer.convert_tokens_to_ids(SPECIAL[2])
    ids = [*encode(tokenizer, "é"), end, *encode(tokenizer, "日")]
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == "é日"
    assert not any(REPLACEMENT in d for d in deltas)


def test_flush_with_nothing_pushed(tokenizer: Any) -> None:
    assert IncrementalDetokenizer(tokenizer).flush() == ""
    assert IncrementalDetokenizer(tokenizer, encode(tokenizer, "hi")).flush() == ""


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters=REPLACEMENT, blacklist_categories=("Cs",)), max_size=40))
def test_any_text_streams_exactly(tokenizer: Any, text: str) -> None:
    if any(special in text for special in SPECIAL):
        return
    check_stream(tokenizer, text)


@settings(max_examples=25, deadline=None)
@given(
    prompt=st.text(alphabet=st.characters(blacklist_characters=REPLACEMENT, blacklist_categories=("Cs",)), max_size=20),
    text=st.text(alphabet=st.characters(blacklist_characters=REPLACEMENT, blacklist_categories=("Cs",)), max_size=20),
)
def test_any_text_after_any_prompt(tokenizer: Any, prompt: str, text: str) -> None:
    if any(special in prompt or special in text for special in SPECIAL):
        return
    ids = encode(tokenizer, text)
    deltas, tail = stream(tokenizer, ids, prompt_ids=encode(tokenizer, prompt))
    assert not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) + tail == text
