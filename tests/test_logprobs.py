"""Log probabilities on the OpenAI endpoints, with the official SDK (tiny random model, greedy)."""

from __future__ import annotations

import math

import openai
import pytest

from tests.conftest import TINY_MODEL, Gateway

pytestmark = pytest.mark.usefixtures("gateway")
PROMPT = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


def check_greedy_entries(entries: list, top: int) -> None:  # type: ignore[type-arg]
    for entry in entries:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == top
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert math.isclose(entry.logprob, values[0], abs_tol=1e-5)  # greedy takes the most likely token
        assert entry.bytes == list(entry.token.encode())


def test_chat_logprobs_one_per_token_and_stream_agrees(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=TINY_MODEL, messages=PROMPT, temperature=0, max_tokens=12,  # type: ignore[arg-type]
                                           logprobs=True, top_logprobs=3)  # fmt: skip
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and reply.usage is not None
    assert len(logprobs.content) == reply.usage.completion_tokens == 12
    check_greedy_entries(logprobs.content, 3)
    stream = client.chat.completions.create(model=TINY_MODEL, messages=PROMPT, temperature=0, max_tokens=12,  # type: ignore[arg-type]
                                            logprobs=True, top_logprobs=3, stream=True)  # fmt: skip
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content or []]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in logprobs.content
    ]


def test_chat_without_logprobs_has_none(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=TINY_MODEL, messages=PROMPT, max_tokens=3)  # type: ignore[arg-type]
    assert reply.choices[0].logprobs is None


def test_constrained_answer_reports_the_constrained_distribution(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=TINY_MODEL, messages=PROMPT, temperature=0, max_tokens=6,  # type: ignore[arg-type]
                                           logprobs=True, top_logprobs=2,
                                           response_format={"type": "json_object"})  # fmt: skip
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert content[0].token.strip().startswith("{") or content[0].token.isspace()
    assert content[0].logprob > -9999.0


def test_completions_logprobs_legacy_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=TINY_MODEL, prompt="The quick brown", max_tokens=8, temperature=0,
                                      logprobs=2)  # fmt: skip
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.text_offset is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs or []) == len(logprobs.top_logprobs or []) == 8
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs or [])
    assert all(token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs or [], strict=True))  # greedy
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0


def test_completions_logprobs_stop_where_a_stop_sequence_cuts_the_text(client: openai.OpenAI) -> None:
    params = {"model": TINY_MODEL, "prompt": "The quick brown", "max_tokens": 16, "temperature": 0, "logprobs": 1}
    first = client.completions.create(**params).choices[0]  # type: ignore[call-overload]
    whole, logprobs = first.text, first.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.text_offset
    # A later token's own text, first found where that token starts: the stop swallows it whole.
    stop = next(token for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True)
                if offset > 0 and token.strip() and whole.index(token) == offset)  # fmt: skip
    cut = client.completions.create(**params, stop=[stop]).choices[0]  # type: ignore[call-overload]
    # Not strict: the SDK's Completion type has no null finish_reason, which every streamed chunk but the last has.
    lenient = openai.OpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=60)
    streamed = list(lenient.completions.create(**params, stop=[stop], stream=True))  # type: ignore[call-overload]
    assert cut.text == whole[: whole.index(stop)]
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens or []) if c.choices[0].logprobs]
    offsets = [o for c in streamed for o in (c.choices[0].logprobs.text_offset or []) if c.choices[0].logprobs]
    assert cut.logprobs is not None and cut.logprobs.tokens == tokens and cut.logprobs.text_offset == offsets
    assert "".join(tokens).startswith(cut.text) and all(offset < len(cut.text) for offset in offsets)


def test_responses_logprobs_on_output_text(client: openai.OpenAI) -> None:
    response = client.responses.create(model=TINY_MODEL, input="Hello", temperature=0, max_output_tokens=5,
                                       top_logprobs=2, include=["message.output_text.logprobs"])  # fmt: skip
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "output_text" and part.logprobs is not None
    assert len(part.logprobs) == 5
    assert all(len(e.top_logprobs) == 2 for e in part.logprobs)
    with client.responses.stream(model=TINY_MODEL, input="Hello", temperature=0, max_output_tokens=5, top_logprobs=2,
                                 include=["message.output_text.logprobs"]) as stream:  # fmt: skip
        deltas = [e for e in stream if e.type == "response.output_text.delta"]
    assert [lp.token for d in deltas for lp in d.logprobs] == [lp.token for lp in part.logprobs]


@pytest.mark.parametrize(("extra", "param"), [({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
                                              ({"top_logprobs": 2}, "top_logprobs")])  # fmt: skip
def test_bad_logprobs_are_400(client: openai.OpenAI, extra: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=TINY_MODEL, messages=PROMPT, max_tokens=2, **extra)  # type: ignore[arg-type,call-overload]
    assert caught.value.param == param
