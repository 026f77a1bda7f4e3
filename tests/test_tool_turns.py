"""A tool call ends the turn; ids look like each API's own; agents' oversized max_tokens are clamped to fit.

The tiny random model never ends an answer by itself (its end token can't win a
greedy pick), so whatever ends these answers is the engine's doing: a call that
closed, a repeated call, the token limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import TINY_MODEL, Gateway, ready_models, start_gateway, stop_process, wait_for
from tests.test_tools import ASK, OPENAI_TOOLS, RESPONSES_TOOLS, WEATHER, valid_weather

pytestmark = pytest.mark.usefixtures("gateway")
CONTEXT = 4096
"""The tiny model's context (its max_position_embeddings)."""
NAMED = {"type": "function", "function": {"name": "get_weather"}}
GREEDY = {"temperature": 0}
"""Anthropic's current SDK no longer takes `temperature`; the API still does."""
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather forecast", "input_schema": WEATHER}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


@pytest.fixture(scope="module")
def claude(gateway: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.root_url, api_key="unused", max_retries=0, timeout=60,
                               _strict_response_validation=True)  # fmt: skip


def chat(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    params: dict[str, object] = {"model": TINY_MODEL, "messages": ASK, "tools": OPENAI_TOOLS, "temperature": 0,
                                 "max_tokens": 200}  # fmt: skip
    return client.chat.completions.create(**(params | kwargs))  # type: ignore[call-overload,no-any-return]


# -- a call ends the turn ------------------------------------------------------------


@pytest.mark.parametrize(("choice", "parallel"), [(NAMED, None), ("required", False), (NAMED, False)])
def test_no_token_is_generated_after_the_call_closes(client: openai.OpenAI, choice: object, parallel: bool) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    reply = chat(client, tool_choice=choice, **extra)
    finish = reply.choices[0].finish_reason
    assert finish == ("stop" if choice == NAMED else "tool_calls")  # OpenAI ends a named call with "stop"
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1  # a named tool is called once, parallel calls or not
    valid_weather(calls[0].function.arguments)
    assert reply.usage is not None
    spent = reply.usage.completion_tokens
    # One token fewer cannot finish the call: the last token counted was the one that completed it.
    cut = chat(client, tool_choice=choice, max_tokens=spent - 1, **extra)
    assert cut.choices[0].finish_reason == "length"
    assert [c.function.arguments for c in cut.choices[0].message.tool_calls or []] != [calls[0].function.arguments]


def test_parallel_calls_end_the_turn_without_text(client: openai.OpenAI) -> None:
    reply = chat(client, tool_choice="required", max_tokens=1500)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"  # ended by the calls (a repeated call ends them), not the limit
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert calls and len({(c.function.name, c.function.arguments) for c in calls}) == len(calls)


def test_anthropic_forced_tool_ends_with_tool_use(claude: anthropic.Anthropic) -> None:
    for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any", "disable_parallel_tool_use": True}):
        message = claude.messages.create(model=TINY_MODEL, max_tokens=500, messages=ASK, tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
                                         tool_choice=choice, extra_body=GREEDY)  # type: ignore[arg-type]  # fmt: skip
        assert message.stop_reason == "tool_use"
        assert [block.type for block in message.content] == ["tool_use"]
        cut = claude.messages.create(model=TINY_MODEL, max_tokens=message.usage.output_tokens - 1, messages=ASK,  # type: ignore[arg-type]
                                     tools=ANTHROPIC_TOOLS, tool_choice=choice, extra_body=GREEDY)  # type: ignore[arg-type]  # fmt: skip
        assert cut.stop_reason == "max_tokens"
        assert [b.input for b in cut.content if b.type == "tool_use"] != [message.content[0].input]  # type: ignore[union-attr]


def test_responses_call_item_is_completed(client: openai.OpenAI) -> None:
    response = client.responses.create(model=TINY_MODEL, input="Weather in Paris?", tools=RESPONSES_TOOLS,  # type: ignore[arg-type]
                                       tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                       max_output_tokens=500)  # fmt: skip
    assert response.status == "completed"
    assert [(item.type, item.status) for item in response.output] == [("function_call", "completed")]  # type: ignore[union-attr]
    assert [tool.strict for tool in response.tools] == [True]  # type: ignore[union-attr]  # echoed as sent


# -- ids ---------------------------------------------------------------------------------


def test_anthropic_tool_use_ids_are_anthropic_shaped_and_stable(claude: anthropic.Anthropic) -> None:
    named = {"type": "tool", "name": "get_weather"}
    with claude.messages.stream(model=TINY_MODEL, max_tokens=500, messages=ASK, tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
                                tool_choice=named, extra_body=GREEDY) as stream:  # type: ignore[arg-type]  # fmt: skip
        started = [event.content_block.id for event in stream
                   if event.type == "content_block_start" and event.content_block.type == "tool_use"]  # fmt: skip
        final = stream.get_final_message()
    ids = [block.id for block in final.content if block.type == "tool_use"]
    assert ids == started and len(ids) == 1 and ids[0].startswith("toolu_")
    whole = claude.messages.create(model=TINY_MODEL, max_tokens=500, messages=ASK, tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
                                   tool_choice=named, extra_body=GREEDY)  # type: ignore[arg-type]  # fmt: skip
    assert all(block.id.startswith("toolu_") for block in whole.content if block.type == "tool_use")


def test_openai_call_ids_are_stable_across_the_stream(client: openai.OpenAI) -> None:
    pieces = list(chat(client, tool_choice=NAMED, stream=True))
    streamed = [call.id for p in pieces for c in p.choices for call in c.delta.tool_calls or [] if call.id]
    assert len(streamed) == 1 and streamed[0].startswith("call_")
    entries = [[call.index for call in c.delta.tool_calls] for p in pieces for c in p.choices if c.delta.tool_calls]
    assert entries and all(len(set(indices)) == len(indices) for indices in entries)  # one entry per call and chunk
    openings = [c.delta for p in pieces for c in p.choices if c.delta.role]
    assert len(openings) == 1 and openings[0].content is None and openings[0].tool_calls  # OpenAI's opening
    with client.responses.stream(model=TINY_MODEL, input="Weather in Paris?", tools=RESPONSES_TOOLS,  # type: ignore[arg-type]
                                 tool_choice="required", temperature=0, max_output_tokens=500) as stream:  # fmt: skip
        added = [event.item for event in stream if event.type == "response.output_item.added"]
        final = stream.get_final_response()
    item = final.output[0]
    assert item.type == "function_call" and item.id.startswith("fc_") and item.call_id.startswith("call_")  # type: ignore[union-attr]
    assert (added[0].id, added[0].call_id) == (item.id, item.call_id)  # type: ignore[union-attr]


# -- results must answer a call ------------------------------------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_a_tool_message_for_an_unknown_call_is_400(client: openai.OpenAI) -> None:
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_2", "content": "Sunny"}]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, messages=messages, max_tokens=4)
    assert caught.value.param == "messages[2].tool_call_id"
    messages[2]["tool_call_id"] = "call_1"
    assert chat(client, messages=messages, max_tokens=4, tool_choice="none").choices[0].finish_reason == "length"


def test_a_tool_result_for_an_unknown_tool_use_is_400(claude: anthropic.Anthropic) -> None:
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    messages = [
        *ASK,
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "Sunny"}]},
    ]
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=TINY_MODEL, max_tokens=4, messages=messages, tools=ANTHROPIC_TOOLS)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert caught.value.body["error"]["message"].startswith("messages.2.content.0.tool_use_id:")  # type: ignore[index]


def test_a_function_call_output_for_an_unknown_call_is_400(client: openai.OpenAI) -> None:
    first = client.responses.create(model=TINY_MODEL, input="Weather in Paris?", tools=RESPONSES_TOOLS,  # type: ignore[arg-type]
                                    tool_choice="required", temperature=0, max_output_tokens=500)  # fmt: skip
    call_id = first.output[0].call_id  # type: ignore[union-attr]
    for answered, status in (("call_unknown", 400), (call_id, 200)):
        output = [{"type": "function_call_output", "call_id": answered, "output": "Sunny"}]
        try:
            client.responses.create(model=TINY_MODEL, input=output, previous_response_id=first.id,  # type: ignore[arg-type]
                                    max_output_tokens=4, temperature=0)  # fmt: skip
            got = 200
        except openai.BadRequestError as exc:
            got = 400
            assert exc.param == "input[0].call_id"
        assert got == status
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=TINY_MODEL, max_output_tokens=4, input=[  # type: ignore[arg-type]
            {"type": "message", "role": "user", "content": "Hi"},
            {"type": "function_call_output", "call_id": "call_x", "output": "Sunny"}])  # fmt: skip
    assert caught.value.param == "input[1].call_id"


# -- max_tokens past the context --------------------------------------------------------------


@pytest.fixture(scope="module")
def near_full(claude: anthropic.Anthropic) -> tuple[list[dict[str, str]], int]:
    """A conversation that leaves a few tokens of the context, and how many it leaves."""

    def count(words: int) -> int:
        messages = [{"role": "user", "content": "fox " * words}]
        return claude.messages.count_tokens(model=TINY_MODEL, messages=messages).input_tokens  # type: ignore[arg-type]

    low, high = 1, CONTEXT
    while low < high:  # the most words whose prompt leaves at least 8 tokens
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count(mid) <= CONTEXT - 8 else (low, mid - 1)
    return [{"role": "user", "content": "fox " * low}], CONTEXT - count(low)


def test_max_tokens_past_the_context_is_clamped(
    claude: anthropic.Anthropic, client: openai.OpenAI, near_full: tuple[list[dict[str, str]], int]
) -> None:
    messages, room = near_full
    # Greedy: the tiny model then never ends by itself, so the answer surely reaches the lowered limit.
    raw = claude.messages.with_raw_response.create(model=TINY_MODEL, max_tokens=32000, messages=messages,  # type: ignore[arg-type]
                                                   extra_body=GREEDY)  # fmt: skip
    assert f"max_tokens lowered from 32000 to {room}" in raw.headers["warning"]
    message = raw.parse()
    assert message.stop_reason == "model_context_window_exceeded"
    assert message.usage.output_tokens == room
    with claude.messages.stream(model=TINY_MODEL, max_tokens=32000, messages=messages, extra_body=GREEDY) as stream:  # type: ignore[arg-type]
        assert f"to {room}" in stream.response.headers["warning"]
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "model_context_window_exceeded" and streamed.usage.output_tokens == room
    reply = client.chat.completions.with_raw_response.create(model=TINY_MODEL, messages=messages, max_tokens=32000,  # type: ignore[arg-type]
                                                             temperature=0)  # fmt: skip
    assert f"to {room}" in reply.headers["warning"]
    completion = reply.parse()
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == room  # type: ignore[union-attr]


def test_a_max_tokens_that_fits_is_untouched(claude: anthropic.Anthropic, near_full: tuple[list[dict], int]) -> None:
    messages, room = near_full
    raw = claude.messages.with_raw_response.create(model=TINY_MODEL, max_tokens=room, messages=messages,  # type: ignore[arg-type]
                                                   extra_body=GREEDY)  # fmt: skip
    assert "warning" not in raw.headers
    assert raw.parse().stop_reason == "max_tokens"


def test_a_prompt_over_the_context_is_400_under_clamp(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=TINY_MODEL, max_tokens=10, messages=[{"role": "user", "content": "fox " * 5000}])


@pytest.fixture(scope="module")
def rejecting(nats_server: EmbeddedNats, logs_dir: Path) -> Iterator[Gateway]:
    gateway = start_gateway(nats_server.url, logs_dir, "--max-tokens-policy", "reject")
    wait_for(lambda: TINY_MODEL in ready_models(gateway.base_url), timeout=30, what="fleet view")
    yield gateway
    stop_process(gateway.proc)


def test_the_reject_policy_keeps_the_400(rejecting: Gateway, near_full: tuple[list[dict[str, str]], int]) -> None:
    messages, _ = near_full
    body = {"model": TINY_MODEL, "max_tokens": 32000, "messages": messages}
    response = httpx.post(f"{rejecting.root_url}/v1/messages", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(f"{rejecting.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
