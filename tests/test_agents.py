"""Agent loops written with each official SDK, against a real worker and gateway.

Each loop is what an agent framework does: offer a tool, get a call back, run the tool (a
local Python function on the parsed arguments), send the call and its result back, and stop
when the model answers in text. Turn 1 forces the call (``required``, a named function,
``any``); turn 2 lets the model answer (``none`` or ``auto``, the tool still offered).

The worker serves ``brief`` (``build_brief_model``): a tiny model that answers "Hello" and
ends its turn, and that writes a minimal call where the grammar forces one. So every answer
here ends because the model or the engine ended it, never because of ``max_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import Gateway, serving_model
from tests.test_claude_code import check_schema
from tests.tiny_model import CORPUS, build_brief_model

MODEL = "brief"
CONTEXT = 8192
MAX_TOKENS = 128
"""Room for a forced call (about 50 tokens of markup with this tokenizer) and a short answer."""
MAX_TURNS = 4
"""An agent loop that has not ended after this many turns is a failure, not a wait."""
ANSWER = "Hello"
"""What ``brief`` answers in text to anything."""
QUESTION = "What is the weather in Paris for the next 3 days?"

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Tokyo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "note": {"type": "string"},
    },
    "required": ["city", "days"],
}
"""No ``additionalProperties``: a call keeps to the declared properties all the same."""
DESCRIPTION = "Weather forecast for a city"
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": DESCRIPTION, "parameters": WEATHER}}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": DESCRIPTION, "parameters": WEATHER}
ANTHROPIC_TOOL = {"name": "get_weather", "description": DESCRIPTION, "input_schema": WEATHER}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def get_weather(city: str, days: int, note: str = "") -> str:
    """The tool the agents run."""
    return json.dumps({"city": city, "forecast": ["sunny"] * days})


TOOLS: dict[str, Callable[..., str]] = {"get_weather": get_weather}


def run_tool(name: str, arguments: dict[str, Any]) -> str:
    """Run a call as an agent would, after checking its arguments against the tool's schema."""
    assert name in TOOLS, f"the model called an unknown tool {name!r}"
    check_schema(arguments, WEATHER, name)
    assert set(arguments) <= set(WEATHER["properties"]), f"{name}: undeclared arguments {arguments}"
    return TOOLS[name](**arguments)


def assert_calls_were_run(results: list[str]) -> None:
    assert results, "the loop ended without running a tool"
    assert all(json.loads(r)["city"] in ("Paris", "Berlin", "Tokyo") for r in results)


# -- a worker serving `brief`, and a gateway, of this module's own -------------------------

SAMPLE_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
BRIEF_CORPUS = [QUESTION, json.dumps(CHAT_TOOL), json.dumps(ANTHROPIC_TOOL), get_weather("Paris", 3), *CORPUS,
                *[SAMPLE_CALL] * 8]  # fmt: skip
"""Text like the prompts and calls: a real tokenizer writes a call's markup in a few tokens, not one per byte."""


@pytest.fixture(scope="module")
def brief_gateway(nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory,
                  logs_dir: Path) -> Iterator[Gateway]:  # fmt: skip
    folder = build_brief_model(tmp_path_factory.mktemp("brief-model"), BRIEF_CORPUS, vocab_size=1024,
                               max_positions=CONTEXT)  # fmt: skip
    with serving_model(nats_server.url, logs_dir, tmp_path_factory.mktemp("brief-catalogue"), folder, MODEL,
                       context_length=CONTEXT, worker_id="test-worker-brief") as gateway:  # fmt: skip
        yield gateway


@pytest.fixture(scope="module")
def client(brief_gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=brief_gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


@pytest.fixture(scope="module")
def claude(brief_gateway: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=brief_gateway.root_url, api_key="unused", max_retries=0, timeout=60,
                               _strict_response_validation=True)  # fmt: skip


# -- OpenAI chat completions ---------------------------------------------------------------


def chat_turn(client: openai.OpenAI, messages: list[dict[str, Any]], choice: object,
              streamed: bool) -> openai.types.chat.ChatCompletion:  # fmt: skip
    params: dict[str, Any] = {"model": MODEL, "messages": messages, "tools": [CHAT_TOOL], "tool_choice": choice,
                              "max_tokens": MAX_TOKENS}  # fmt: skip
    if streamed:  # usage comes in a last chunk, when asked for, as in OpenAI's API
        with client.chat.completions.stream(**params, stream_options={"include_usage": True}) as stream:
            return stream.get_final_completion()
    return client.chat.completions.create(**params)  # type: ignore[no-any-return]


def check_chat_usage(reply: openai.types.chat.ChatCompletion) -> None:
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize(
    ("forced", "then", "streamed"),
    [("required", "none", False), (NAMED, "auto", False), ("required", "auto", True), (NAMED, "none", True)],
    ids=["required-none", "named-auto", "required-auto-streamed", "named-none-streamed"],
)
def test_openai_chat_agent_loop(client: openai.OpenAI, forced: object, then: str, streamed: bool) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": QUESTION}]
    replies: list[openai.types.chat.ChatCompletion] = []
    results: list[str] = []
    for turn in range(MAX_TURNS):
        reply = chat_turn(client, messages, forced if turn == 0 else then, streamed)
        replies.append(reply)
        check_chat_usage(reply)
        (choice,) = reply.choices
        if not choice.message.tool_calls:
            break
        assert turn == 0, "a call after the tool's result, with no call forced"
        # OpenAI ends a call forced by name with "stop", and `required` calls with "tool_calls".
        assert choice.finish_reason == ("stop" if forced == NAMED else "tool_calls")
        assert choice.message.content is None  # streamed too: a call's first delta carries `content: null`
        messages.append(choice.message.model_dump(exclude_none=True))
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            result = run_tool(call.function.name, json.loads(call.function.arguments))
            results.append(result)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        if forced == NAMED:
            assert len(choice.message.tool_calls) == 1  # a named tool is called once
    assert_calls_were_run(results)
    assert len(replies) == 2
    final = replies[-1].choices[0]
    assert final.finish_reason == "stop"
    assert final.message.tool_calls is None or final.message.tool_calls == []
    assert final.message.content == ANSWER
    if then == "auto":  # the tools, the call and its result are all in the second prompt
        assert replies[1].usage.prompt_tokens > replies[0].usage.prompt_tokens  # type: ignore[union-attr]


# -- OpenAI Responses ----------------------------------------------------------------------


def respond(client: openai.OpenAI, streamed: bool, **params: Any) -> openai.types.responses.Response:
    params = {"model": MODEL, "tools": [RESPONSES_TOOL], "max_output_tokens": MAX_TOKENS} | params
    if streamed:
        with client.responses.stream(**params) as stream:
            return stream.get_final_response()
    return client.responses.create(**params)  # type: ignore[no-any-return]


def check_responses_usage(response: openai.types.responses.Response) -> None:
    usage = response.usage
    assert usage is not None
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def run_function_calls(response: openai.types.responses.Response) -> list[dict[str, Any]]:
    """Run every ``function_call`` item of `response`; their ``function_call_output`` items."""
    assert response.status == "completed"
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and len(calls) == len(response.output), "a forced call and nothing else"
    outputs = []
    for call in calls:
        assert call.status == "completed" and call.call_id.startswith("call_") and call.id.startswith("fc_")  # type: ignore[union-attr]
        outputs.append({"type": "function_call_output", "call_id": call.call_id,
                        "output": run_tool(call.name, json.loads(call.arguments))})  # fmt: skip
    return outputs


def check_text_answer(response: openai.types.responses.Response) -> None:
    check_responses_usage(response)
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text == ANSWER


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_responses_agent_loop_with_previous_response_id(client: openai.OpenAI, streamed: bool) -> None:
    first = respond(client, streamed, input=QUESTION, tool_choice="required")
    check_responses_usage(first)
    outputs = run_function_calls(first)
    assert_calls_were_run([o["output"] for o in outputs])
    second = respond(client, streamed, input=outputs, previous_response_id=first.id, tool_choice="none")
    check_text_answer(second)
    assert second.previous_response_id == first.id


def test_responses_agent_loop_sending_the_whole_history(client: openai.OpenAI) -> None:
    question = {"type": "message", "role": "user", "content": QUESTION}
    first = respond(client, False, input=[question], tool_choice="required", store=False)
    check_responses_usage(first)
    outputs = run_function_calls(first)
    history = [question, *(item.model_dump(exclude_none=True) for item in first.output), *outputs]
    second = respond(client, False, input=history, tool_choice="auto", store=False)
    check_text_answer(second)
    assert second.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]


# -- Anthropic Messages ----------------------------------------------------------------------


def message_turn(claude: anthropic.Anthropic, messages: list[dict[str, Any]], choice: dict[str, Any],
                 streamed: bool) -> anthropic.types.Message:  # fmt: skip
    params: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": messages,
                              "tools": [ANTHROPIC_TOOL], "tool_choice": choice}  # fmt: skip
    if streamed:
        with claude.messages.stream(**params) as stream:
            return stream.get_final_message()
    return claude.messages.create(**params)  # type: ignore[no-any-return]


def check_anthropic_usage(message: anthropic.types.Message) -> None:
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) > 0
    assert 0 < usage.output_tokens <= MAX_TOKENS


@pytest.mark.parametrize(
    ("forced", "streamed"),
    [({"type": "any"}, False), ({"type": "any"}, True),
     ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, False)],
    ids=["any", "any-streamed", "named"],
)  # fmt: skip
def test_anthropic_agent_loop(claude: anthropic.Anthropic, forced: dict[str, Any], streamed: bool) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": QUESTION}]
    replies: list[anthropic.types.Message] = []
    results: list[str] = []
    for turn in range(MAX_TURNS):
        message = message_turn(claude, messages, forced if turn == 0 else {"type": "auto"}, streamed)
        replies.append(message)
        check_anthropic_usage(message)
        uses = [block for block in message.content if block.type == "tool_use"]
        if not uses:
            break
        assert turn == 0, "a call after the tool's result, with no call forced"
        assert message.stop_reason == "tool_use"
        assert [block.type for block in message.content] == ["tool_use"] * len(uses)
        if forced.get("disable_parallel_tool_use"):
            assert len(uses) == 1
        messages.append({"role": "assistant", "content": [block.model_dump(exclude_none=True)
                                                           for block in message.content]})  # fmt: skip
        answers = []
        for use in uses:
            assert use.id.startswith("toolu_")
            result = run_tool(use.name, use.input)  # type: ignore[arg-type]
            results.append(result)
            answers.append({"type": "tool_result", "tool_use_id": use.id, "content": result})
        messages.append({"role": "user", "content": answers})
    assert_calls_were_run(results)
    assert len(replies) == 2
    final = replies[-1]
    assert final.stop_reason == "end_turn"
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].text == ANSWER  # type: ignore[union-attr]
