"""StopMatcher: stop strings are never emitted, also when split across deltas."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cortex.worker.stops import StopMatcher


def feed(matcher: StopMatcher, deltas: list[str]) -> tuple[list[str], str | None]:
    """Push `deltas` until a stop matches; return the emitted pieces and the stop (flushing if none)."""
    out: list[str] = []
    for delta in deltas:
        text, hit = matcher.push(delta)
        out.append(text)
        if hit is not None:
            return out, hit
    out.append(matcher.flush())
    return out, None


def split_at(text: str, cuts: list[int]) -> list[str]:
    """Split `text` at the given (unsorted, possibly repeated) positions."""
    points = sorted({min(c, len(text)) for c in cuts})
    pieces: list[str] = []
    start = 0
    for point in [*points, len(text)]:
        pieces.append(text[start:point])
        start = point
    return pieces


def expected(text: str, stop: str) -> str:
    at = text.find(stop)
    return text if at == -1 else text[:at]


def test_docstring_example() -> None:
    stops = StopMatcher(["\n\n", "END"])
    assert stops.push("Hello EN") == ("Hello ", None)
    assert stops.push("D more") == ("", "END")


def test_stop_split_char_by_char_is_never_emitted() -> None:
    stop = "<|STOP|>"
    before = "Some answer with < and <| and <|S in it, then "
    text = before + stop + " trailing text that must not appear"
    matcher = StopMatcher([stop])
    emitted: list[str] = []
    hit = None
    for char in text:
        piece, hit = matcher.push(char)
        emitted.append(piece)
        if hit is not None:
            break
    assert hit == stop
    assert "".join(emitted) == before
    # No piece emitted while the stop was being spelled out may carry any of its prefixes.
    stop_start = len(before)
    for i in range(stop_start, stop_start + len(stop)):
        assert emitted[i] == "", (i, emitted[i])
    assert not "".join(emitted).endswith("<")


def test_stop_split_across_multichar_deltas() -> None:
    matcher = StopMatcher(["\n\nUser:"])
    out, hit = feed(matcher, ["Fine, thanks.", "\n", "\nUs", "er", ":", " next turn"])
    assert hit == "\n\nUser:"
    assert "".join(out) == "Fine, thanks."
    assert all("\n" not in piece for piece in out)


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["world", "lo w", "xyz"])
    text, hit = matcher.push("hello world xyz")
    assert (text, hit) == ("hel", "lo w")


def test_earliest_stop_wins_when_both_complete_in_one_delta() -> None:
    matcher = StopMatcher(["BBB", "A"])
    assert matcher.push("xxBB") == ("xx", None)
    assert matcher.push("BxA") == ("", "BBB")


def test_later_listed_stop_can_win_by_position() -> None:
    matcher = StopMatcher(["second", "first"])
    assert matcher.push("a first then a second") == ("a ", "first")


def test_false_prefix_is_released() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("EN") == ("", None)
    text, hit = matcher.push("X")
    assert hit is None
    assert text == "ENX"
    assert matcher.flush() == ""


def test_false_prefix_then_real_stop() -> None:
    matcher = StopMatcher(["END"])
    out, hit = feed(matcher, ["E", "N", "E", "N", "D", "tail"])
    assert hit == "END"
    assert "".join(out) == "EN"


def test_overlapping_prefix_is_held_only_as_long_as_needed() -> None:
    matcher = StopMatcher(["abab"])
    assert matcher.push("xaba") == ("x", None)
    assert matcher.push("c") == ("abac", None)


def test_flush_releases_held_text() -> None:
    matcher = StopMatcher(["END", "\n\n"])
    assert matcher.push("the E") == ("the ", None)
    assert matcher.push("N") == ("", None)
    assert matcher.flush() == "EN"
    assert matcher.flush() == ""


def test_flush_after_trailing_newline() -> None:
    matcher = StopMatcher(["\n\n"])
    assert matcher.push("line\n") == ("line", None)
    assert matcher.flush() == "\n"


@pytest.mark.parametrize("stops", [[], [""], ["", ""]])
def test_no_stops_passes_text_through(stops: list[str]) -> None:
    matcher = StopMatcher(stops)
    for delta in ["a", "", "END", "\n\n", "🙂"]:
        assert matcher.push(delta) == (delta, None)
    assert matcher.flush() == ""


def test_duplicate_stops_are_harmless() -> None:
    matcher = StopMatcher(["END", "END"])
    out, hit = feed(matcher, ["aE", "N", "D"])
    assert (("".join(out)), hit) == ("a", "END")


def test_stop_at_start() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.push("### rest") == ("", "###")


def test_single_char_stop_never_held() -> None:
    matcher = StopMatcher(["."])
    assert matcher.push("abc") == ("abc", None)
    assert matcher.push("d.e") == ("d", ".")


alphabet = st.sampled_from("abAB \n.")


@given(
    text=st.text(alphabet=alphabet, max_size=40),
    stop=st.text(alphabet=alphabet, min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=40),
)
def test_random_splits_match_reference(text: str, stop: str, cuts: list[int]) -> None:
    want = expected(text, stop)
    want_hit = stop if stop in text else None

    single = StopMatcher([stop])
    single_out, single_hit = feed(single, [text])
    assert ("".join(single_out), single_hit) == (want, want_hit)

    split = StopMatcher([stop])
    pieces, hit = feed(split, split_at(text, cuts))
    assert "".join(pieces) == want
    assert hit == want_hit
    # The stop never appears in the output, not even across piece boundaries.
    assert stop not in "".join(pieces)


@given(
    text=st.text(alphabet=alphabet, max_size=30),
    stop=st.text(alphabet=alphabet, min_size=1, max_size=4),
)
def test_char_by_char_never_emits_a_stop_prefix_that_completes(text: str, stop: str) -> None:
    matcher = StopMatcher([stop])
    emitted = ""
    for char in text:
        piece, hit = matcher.push(char)
        emitted += piece
        if hit is not None:
            break
    else:
        emitted += matcher.flush()
    assert emitted == expected(text, stop)
    if stop in text:
        # Nothing past the start of the stop leaked: the output ends exactly where it begins.
        assert len(emitted) == text.find(stop)


@given(
    text=st.text(alphabet=alphabet, max_size=30),
    stops=st.lists(st.text(alphabet=alphabet, min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=30),
)
def test_multiple_stops_never_emitted(text: str, stops: list[str], cuts: list[int]) -> None:
    matcher = StopMatcher(stops)
    pieces, hit = feed(matcher, split_at(text, cuts))
    out = "".join(pieces)
    assert text.startswith(out)
    assert not any(stop in out for stop in stops)
    if hit is None:
        assert out == text
    else:
        assert hit in stops
        assert text[len(out) :].startswith(hit)
        # Detection happens in the delta that completes the first stop: the one that fired
        # ends no earlier than that and starts no later.
        first_end = min(text.find(s) + len(s) for s in stops if s in text)
        first_start = min(text.find(s) for s in stops if s in text and text.find(s) + len(s) == first_end)
        assert len(out) + len(hit) >= first_end
        assert len(out) <= first_start


@given(
    text=st.text(alphabet=alphabet, max_size=30),
    stops=st.lists(st.text(alphabet=alphabet, min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_multiple_stops_char_by_char_stop_at_first_completion(text: str, stops: list[str]) -> None:
    matcher = StopMatcher(stops)
    pieces, hit = feed(matcher, list(text))
    out = "".join(pieces)
    found = [s for s in stops if s in text]
    if not found:
        assert (out, hit) == (text, None)
        return
    first_end = min(text.find(s) + len(s) for s in found)
    assert hit is not None
    assert len(out) + len(hit) == first_end
    assert text[len(out) : first_end] == hit
    # Of the stops completed by that character, the longest (earliest-starting) wins.
    assert len(hit) == max(len(s) for s in found if text.find(s) + len(s) == first_end)
