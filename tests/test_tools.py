"""Tool calling through every dialect, with the official SDKs, a real gateway and a real worker.

The tiny random model cannot choose to call a tool, but when a call is forced
(``required`` or a named tool) the worker's grammar makes it write one: a real,
schema-valid call produced by the real engine, which drives the wire shapes.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.conftest import TINY_MODEL, Gateway

pytestmark = pytest.mark.usefixtures("gateway")

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Tokyo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}  # fmt: skip
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


@pytest.fixture(scope="module")
def claude(gateway: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.root_url, api_key="unused", max_retries=0, timeout=60,
                               _strict_response_validation=True)  # fmt: skip


def valid_weather(arguments: str | dict[str, object]) -> dict[str, object]:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert set(args) == {"city", "days"}
    assert args["city"] in ("Paris", "Berlin", "Tokyo")
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 9
    return args


def chat(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    params: dict[str, object] = {"model": TINY_MODEL, "messages": ASK, "tools": OPENAI_TOOLS, "temperature": 0,
                                 "max_tokens": 120, "parallel_tool_calls": False}  # fmt: skip
    return client.chat.completions.create(**(params | kwargs))  # type: ignore[call-overload,no-any-return]


# -- OpenAI chat completions --------------------------------------------------------


def test_named_tool_call_is_returned_whole(client: openai.OpenAI) -> None:
    reply = chat(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"  # as OpenAI ends a call forced by name
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function"
    assert calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    valid_weather(calls[0].function.arguments)


def test_required_calls_one_of_the_tools(client: openai.OpenAI) -> None:
    reply = chat(client, tool_choice="required", temperature=1.0, seed=7)
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name in ("get_weather", "get_time")
    json.loads(calls[0].function.arguments)


def test_streamed_tool_call_matches_the_whole_one(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole = chat(client, tool_choice=choice).choices[0].message.tool_calls
    assert whole
    pieces = list(chat(client, tool_choice=choice, stream=True))
    deltas = [d for p in pieces for c in p.choices for d in (c.delta.tool_calls or [])]
    assert len(deltas) > 2, "arguments should stream in pieces"
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id and first.type == "function" and first.function
    assert first.function.name == "get_weather"
    for d in rest:  # the SDK concatenates strings: id, type and name only once
        assert d.index == 0 and d.id is None and d.type is None and d.function and d.function.name is None
    arguments = "".join((d.function.arguments or "") if d.function else "" for d in deltas)
    assert arguments == whole[0].function.arguments
    roles = [c.delta.role for p in pieces for c in p.choices if c.delta.role]
    assert roles == ["assistant"]
    assert [c.finish_reason for p in pieces for c in p.choices if c.finish_reason] == ["stop"]  # named: OpenAI's
    assert not "".join(c.delta.content or "" for p in pieces for c in p.choices), "markup leaked into the text"


def test_stream_helper_accumulates_tool_calls(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=TINY_MODEL, messages=ASK, tools=OPENAI_TOOLS, temperature=0, max_tokens=120,  # type: ignore[arg-type]
        parallel_tool_calls=False, tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ) as stream:  # fmt: skip
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    valid_weather(calls[0].function.arguments)


def test_tool_results_continue_the_conversation(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    reply = chat(client, messages=messages, tool_choice="none", max_tokens=8)
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.tool_calls is None
    assert reply.usage and reply.usage.prompt_tokens > 40


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [], "tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}]},
         "tools[0].function.parameters"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ],
)  # fmt: skip
def test_bad_tools_are_400(client: openai.OpenAI, change: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, **change)
    assert caught.value.param == param


# -- OpenAI Responses -------------------------------------------------------------

RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather forecast", "parameters": WEATHER,
                    "strict": True}]  # fmt: skip


def respond(client: openai.OpenAI, **kwargs: object) -> openai.types.responses.Response:
    params: dict[str, object] = {"model": TINY_MODEL, "input": "Weather in Paris?", "tools": RESPONSES_TOOLS,
                                 "tool_choice": "required", "temperature": 0, "max_output_tokens": 120,
                                 "parallel_tool_calls": False}  # fmt: skip
    return client.responses.create(**(params | kwargs))  # type: ignore[call-overload,no-any-return]


def test_responses_function_call_items(client: openai.OpenAI) -> None:
    response = respond(client)
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["function_call"]
    call = response.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    valid_weather(call.arguments)
    assert response.tool_choice == "required" and response.tools[0].name == "get_weather"  # type: ignore[union-attr]


def test_responses_stream_helper_accumulates_the_call(client: openai.OpenAI) -> None:
    whole = respond(client).output[0]
    with client.responses.stream(
        model=TINY_MODEL, input="Weather in Paris?", tools=RESPONSES_TOOLS, tool_choice="required",  # type: ignore[arg-type]
        temperature=0, max_output_tokens=120, parallel_tool_calls=False,
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.output_text.delta" not in kinds
    assert kinds[-4:] == ["response.function_call_arguments.delta", "response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    (call,) = final.output
    assert call.type == "function_call" and whole.type == "function_call"
    assert call.arguments == whole.arguments and call.name == whole.name


def test_responses_function_call_output_continues(client: openai.OpenAI) -> None:
    first = respond(client)
    call = first.output[0]
    assert call.type == "function_call"
    follow = respond(client, input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
                     previous_response_id=first.id, tool_choice="none", max_output_tokens=4)  # fmt: skip
    assert [item.type for item in follow.output] == ["message"]
    assert follow.status == "incomplete"
    items = [call.model_dump(exclude_none=True), {"type": "function_call_output", "call_id": call.call_id,
                                                   "output": "Sunny"}]  # fmt: skip
    explicit = respond(client, input=[{"role": "user", "content": "Weather in Paris?"}, *items], tool_choice="none",
                       max_output_tokens=4)  # fmt: skip
    assert explicit.usage and follow.usage
    assert explicit.usage.input_tokens == follow.usage.input_tokens


# -- Anthropic messages -------------------------------------------------------------

ANTHROPIC_TOOLS = [
    {"name": "get_weather", "description": "Weather forecast", "input_schema": WEATHER},
    {"name": "get_time", "description": "Current time", "input_schema": TIME, "cache_control": {"type": "ephemeral"}},
]
GREEDY = {"temperature": 0}


def message(claude: anthropic.Anthropic, **kwargs: object) -> anthropic.types.Message:
    params: dict[str, object] = {"model": TINY_MODEL, "max_tokens": 120, "messages": ASK, "tools": ANTHROPIC_TOOLS,
                                 "tool_choice": {"type": "tool", "name": "get_weather",
                                                 "disable_parallel_tool_use": True},
                                 "extra_body": GREEDY}  # fmt: skip
    return claude.messages.create(**(params | kwargs))  # type: ignore[call-overload,no-any-return]


def test_anthropic_tool_use_block(claude: anthropic.Anthropic) -> None:
    reply = message(claude)
    assert reply.stop_reason == "tool_use"
    (block,) = reply.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.id
    valid_weather(block.input)  # type: ignore[arg-type]


def test_anthropic_any_picks_a_tool(claude: anthropic.Anthropic) -> None:
    reply = message(claude, tool_choice={"type": "any", "disable_parallel_tool_use": True},
                    extra_body={"temperature": 1.0})  # fmt: skip
    assert reply.stop_reason == "tool_use"
    assert next(b.name for b in reply.content if b.type == "tool_use") in ("get_weather", "get_time")


def test_anthropic_stream_helper_accumulates_input_json(claude: anthropic.Anthropic) -> None:
    whole = message(claude).content[0]
    with claude.messages.stream(
        model=TINY_MODEL, max_tokens=120, messages=ASK, tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, extra_body=GREEDY,
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_message()
    raw = [e.type for e in events]
    assert raw[:2] == ["message_start", "content_block_start"]
    assert "text" not in raw, "markup leaked into a text block"
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"]
    pieces = [e for e in events if e.type == "input_json"]
    assert len(pieces) > 2
    assert final.stop_reason == "tool_use"
    (block,) = final.content
    assert block.type == "tool_use" and whole.type == "tool_use"
    assert block.input == whole.input and block.name == "get_weather"


def test_anthropic_tool_result_turn(claude: anthropic.Anthropic) -> None:
    first = message(claude)
    use = first.content[0]
    assert use.type == "tool_use"
    other = {"type": "tool_use", "id": "toolu_other", "name": "get_time", "input": {"zone": "UTC"}}
    history = [*ASK, {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, use.model_dump(),
                                                       other]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "Sunny"}]},
                   {"type": "tool_result", "tool_use_id": "toolu_other", "content": "boom", "is_error": True},
                   {"type": "text", "text": "Thanks!"}]}]  # fmt: skip
    reply = message(claude, messages=history, tool_choice={"type": "none"}, max_tokens=4)
    assert reply.stop_reason == "max_tokens"
    assert [b.type for b in reply.content] == ["text"]
    with_tools = claude.messages.count_tokens(model=TINY_MODEL, messages=history, tools=ANTHROPIC_TOOLS)  # type: ignore[arg-type]
    without = claude.messages.count_tokens(model=TINY_MODEL, messages=history)  # type: ignore[arg-type]
    assert with_tools.input_tokens > without.input_tokens > 0


@pytest.mark.parametrize(
    "change",
    [
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"tool_choice": {"type": "tool", "name": "nope"}},
        {"tool_choice": {"type": "sometimes"}},
        {"tools": [{"name": "f", "input_schema": {"type": "nonsense"}}]},
        {
            "tools": [
                {"name": "f", "input_schema": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
    ],
)
def test_anthropic_bad_tools_are_400(claude: anthropic.Anthropic, change: dict[str, object]) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        message(claude, **change)
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    if "input_schema" in str(change):
        assert "tools.0.input_schema" in caught.value.message  # the field as Anthropic names it
